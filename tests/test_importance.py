"""diffurec.importance: Optuna's fANOVA and PED-ANOVA over a sweep's (params, value) pairs, as the
sweep and the report compute them from MLflow's string params."""

from __future__ import annotations

import random

import pytest

from diffurec.importance import (
    distribution,
    importance_rows,
    param_importances,
    plot_importances,
    study_from_trials,
)
from diffurec.spaces import parse_space


def test_descriptions_round_trip_the_space_file():
    space = parse_space({"params": {
        "noise_schedule": {"choice": ["linear", "cosine"]}, "lr": {"loguniform": [3e-4, 3e-3]},
        "num_blocks": {"int": [1, 4]}, "positional_embedding": {"choice": [False, True]},
        "weight_decay": {"choice": [0.0, 1e-6]}, "dropout": {"uniform": [0.0, 0.5]}}})
    for key, dist in space.params.items():
        d = distribution(dist.describe())
        assert d._contains(d.to_internal_repr(dist.corners()[0])), key
    assert distribution("loguniform[0.0003, 0.003]").log
    assert distribution("choice[False, True]").choices == (False, True)
    with pytest.raises(ValueError, match="not a sampled"):
        distribution("const(3)")


def test_the_knob_that_drives_the_metric_comes_first(tmp_path):
    dists = {"lr": distribution("loguniform[0.0003, 0.003]"), "noise_schedule": distribution("choice['linear', 'cosine']"),
             "num_blocks": distribution("int[1, 4]"), "positional_embedding": distribution("choice[False, True]")}
    rng = random.Random(0)
    trials = []
    for _ in range(24):
        # MLflow gives params back as strings
        params = {"lr": str(10 ** rng.uniform(-3.5, -2.53)), "noise_schedule": rng.choice(["linear", "cosine"]),
                  "num_blocks": str(rng.randint(1, 4)), "positional_embedding": rng.choice(["True", "False"])}
        trials.append((params, 10 * float(params["lr"]) + 1e-4 * rng.random()))
    imp = param_importances(study_from_trials(dists, trials))
    for name in ("fanova", "ped_anova"):
        assert sum(imp[name].values()) == pytest.approx(1.0)
        assert max(imp[name], key=imp[name].get) == "lr", imp[name]
        # rounded, so that the committed report's figures do not depend on the CPU's last digits
        assert all(v == round(v, 6) for v in imp[name].values())
    rows = importance_rows(imp)
    assert [r["param"] for r in rows][0] == "lr" and set(rows[0]) == {"param", "fanova", "ped_anova"}
    plot_importances(imp, tmp_path / "i.png", "t")
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="not one of"):
        study_from_trials(dists, [({**trials[0][0], "noise_schedule": "sqrt"}, 0.1)])
