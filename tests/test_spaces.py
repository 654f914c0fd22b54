"""Search-space files (diffurec.spaces): shipped files, unknown keys, impossible ranges, and
reverse_steps never above diffusion_steps. Ray-free and fast."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import yaml

from diffurec.config import NOISE_SCHEDULES, Config
from diffurec.errors import DiffuRecError
from diffurec.spaces import REVERSE_FRACTION, check_space, load_space, parse_space, trial_config

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "tune_spaces"


def write(tmp_path: Path, data, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def checked(path: Path, base: Config | None = None):
    space = load_space(path)
    check_space(space, space.base_config(base))
    return space


@pytest.mark.parametrize("name", ["default", "schedules", "reverse_steps", "lambda", "quality"])
def test_shipped_spaces_are_valid(name):
    space = checked(SPACES / f"{name}.yaml")
    for seed in range(20):
        trial_config(space.base_config(), space.sample(seed))


def test_default_space_has_the_papers_knobs():
    space = load_space(SPACES / "default.yaml")
    assert set(space.params) >= {"noise_schedule", "diffusion_steps", REVERSE_FRACTION, "lambda_mean",
                                 "lambda_std", "lr", "dropout"}
    assert set(space.params["noise_schedule"].choices) == set(NOISE_SCHEDULES)
    assert space.params["lambda_mean"].kind == space.params["lambda_std"].kind == "loguniform"
    assert set(load_space(SPACES / "schedules.yaml").params["noise_schedule"].choices) == set(NOISE_SCHEDULES)


def test_reverse_steps_never_exceeds_diffusion_steps():
    space = load_space(SPACES / "default.yaml")
    base = space.base_config()
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        cfg = trial_config(base, space.sample(rng))
        assert 1 <= cfg.reverse_steps <= cfg.diffusion_steps
        seen.add(cfg.reverse_steps == cfg.diffusion_steps)
    assert seen == {True, False}
    # extreme corners: the smallest fraction of the smallest T, the whole of the largest
    assert trial_config(base, {"diffusion_steps": 1, REVERSE_FRACTION: 0.01}).reverse_steps == 1
    assert trial_config(base, {"diffusion_steps": 64, REVERSE_FRACTION: 1.0}).reverse_steps == 64


def test_reverse_steps_never_exceeds_diffusion_steps_through_optuna():
    """The sampler the sweep really uses: OptunaSearch (TPE) over the Tune space."""
    pytest.importorskip("ray.tune")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_cli", REPO / "pipelines" / "tune.py")
    tune_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_cli)
    space = load_space(SPACES / "default.yaml")
    base = space.base_config()
    searcher = tune_cli.make_searcher(seed=0, num_samples=8)
    searcher.set_search_properties(tune_cli.METRIC, tune_cli.MODE, tune_cli.param_space(space))
    for i in range(60):
        sampled = searcher.suggest(f"t{i}")
        cfg = trial_config(base, sampled)
        assert 1 <= cfg.reverse_steps <= cfg.diffusion_steps
        assert 8 <= cfg.diffusion_steps <= 64 and cfg.noise_schedule in NOISE_SCHEDULES
        searcher.on_trial_complete(f"t{i}", {tune_cli.METRIC: random.Random(i).random()})


@pytest.mark.parametrize("data, key", [
    ({"params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}}, "learning_rate"),
    ({"params": {"lr": {"loguniform": [1e-4, 1e-2]}}, "fixed": {"hiden_size": 32}}, "hiden_size"),
    ({"params": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 3}, "trials"),
])
def test_unknown_key_names_file_and_key(tmp_path, data, key):
    p = write(tmp_path, data)
    with pytest.raises(DiffuRecError) as err:
        checked(p)
    assert str(p) in str(err.value) and f"'{key}'" in str(err.value)


@pytest.mark.parametrize("params, key", [
    ({"dropout": {"uniform": [0.0, 1.5]}}, "dropout"),                      # Config: dropout < 1
    ({"lr": {"loguniform": [0.0, 1e-2]}}, "lr"),                            # log of 0
    ({"lr": {"uniform": [1e-2, 1e-4]}}, "lr"),                              # low > high
    ({"diffusion_steps": {"int": [0, 10]}}, "diffusion_steps"),             # Config: >= 1
    ({"diffusion_steps": {"uniform": [8, 64]}}, "diffusion_steps"),         # floats for an int key
    ({"noise_schedule": {"choice": ["trunc_lin", "zigzag"]}}, "noise_schedule"),
    ({REVERSE_FRACTION: {"uniform": [0.0, 1.0]}}, REVERSE_FRACTION),        # fraction 0 -> (0, 1]
    ({REVERSE_FRACTION: {"uniform": [0.5, 1.2]}}, REVERSE_FRACTION),
    ({"diffusion_steps": {"int": [8, 64]}, "reverse_steps": {"int": [1, 32]}}, "reverse_steps"),
    ({"diffusion_steps": {"int": [8, 64]}}, "diffusion_steps"),             # base reverse_steps=32 > 8
    ({"num_heads": {"choice": [2, 3]}}, "num_heads"),                       # 128 % 3
    ({"device": {"choice": ["cpu", "cuda"]}}, "device"),                    # runtime key
    ({"diffusion_steps": {"int": [8, 64]}, REVERSE_FRACTION: {"uniform": [0.1, 1.0]},
      "reverse_steps": {"int": [1, 4]}}, "reverse_steps"),                  # both ways at once
])
def test_impossible_range_names_file_and_key(tmp_path, params, key):
    p = write(tmp_path, {"params": params})
    with pytest.raises(DiffuRecError) as err:
        checked(p)
    msg = str(err.value)
    assert str(p) in msg and f"'{key}'" in msg, msg


def test_reverse_steps_sampled_directly_is_fine_when_it_cannot_exceed_t(tmp_path):
    p = write(tmp_path, {"params": {"diffusion_steps": {"int": [16, 64]}, "reverse_steps": {"int": [1, 16]}}})
    space = checked(p)
    for seed in range(200):
        cfg = trial_config(space.base_config(), space.sample(seed))
        assert cfg.reverse_steps <= cfg.diffusion_steps


def test_check_against_the_sweep_base(tmp_path):
    """Ranges are checked against fixed + --set: hidden_size 30 cannot take 4 heads."""
    p = write(tmp_path, {"fixed": {"hidden_size": 30, "num_heads": 2},
                         "params": {"num_heads": {"choice": [1, 2]}}})
    with pytest.raises(DiffuRecError, match="both under 'fixed' and under 'params'"):
        load_space(p)
    p = write(tmp_path, {"fixed": {"hidden_size": 30}, "params": {"num_heads": {"choice": [2, 4]}}})
    with pytest.raises(DiffuRecError, match="'num_heads'"):
        checked(p)
    space = load_space(p)
    with pytest.raises(DiffuRecError):
        space.base_config(sets={"hidden_size": 31})


def test_yaml_scientific_notation_and_constants(tmp_path):
    p = write(tmp_path, "params:\n  lr: {loguniform: [1e-4, 1e-2]}\n  epochs: 3\n")
    space = checked(p)
    assert space.params["lr"].low == pytest.approx(1e-4)
    assert space.params["epochs"].kind == "const"
    assert trial_config(space.base_config(), space.sample(0)).epochs == 3


def test_malformed_files(tmp_path):
    with pytest.raises(DiffuRecError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(DiffuRecError, match="not valid YAML"):
        load_space(write(tmp_path, "params: {lr: [1, 2\n"))
    with pytest.raises(DiffuRecError, match="'params'"):
        load_space(write(tmp_path, {"description": "nothing to search"}))
    with pytest.raises(DiffuRecError, match="exactly one of"):
        load_space(write(tmp_path, {"params": {"lr": {"normal": [0, 1]}}}))
    with pytest.raises(DiffuRecError, match="choice"):
        load_space(write(tmp_path, {"params": {"lr": [0.1, 0.2]}}))
    with pytest.raises(DiffuRecError, match="num_samples"):
        parse_space({"num_samples": 0, "params": {"lr": {"uniform": [0.1, 0.2]}}})


def test_quality_space_has_the_knobs_that_move_quality():
    space = load_space(SPACES / "quality.yaml")
    assert set(space.params) >= {
        "noise_schedule", "diffusion_steps", "reverse_steps", "lambda_mean", "lambda_std", "lr", "lr_schedule",
        "weight_decay", "dropout", "emb_dropout", "label_smoothing", "hidden_size", "num_blocks", "num_heads", "max_len",
        "positional_embedding", "batch_size"}
    # lambda reaches the scale of the history's embeddings
    assert space.params["lambda_mean"].high >= 1.0
    # the sweep accepts it as it stands (it validates every epoch, with each trial's own S)
    sys.path.insert(0, str(SPACES.parent))
    from pipelines.tune import build_base

    base = build_base(space, {}, quick=False)
    assert base.eval_every == 1 and base.valid_reverse_steps == 0
