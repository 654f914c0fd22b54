"""What each knob of a sweep is worth: Optuna's own importance evaluators over its trials.

Two evaluators, because they answer different questions:

- fANOVA (``FanovaImportanceEvaluator``): the share of the variance of the validation metric
  over the whole space that each parameter explains (a random-forest surrogate, marginals).
- PED-ANOVA (``PedAnovaImportanceEvaluator``): how much each parameter's distribution among the
  top trials (top 10% by the metric) differs from its distribution over all trials: what a good
  trial needs, rather than what moves the average.

Both are normalised to sum to 1. The study is rebuilt from plain (params, value) pairs, so the
sweep (``pipelines/tune.py``, live trials) and the report (exported MLflow runs) compute the same
numbers. No Ray import.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

EVALUATORS = ("fanova", "ped_anova")


def distribution(description: str):
    """An Optuna distribution from a space's description (``spaces.Dist.describe``): e.g.
    ``choice['linear', 'cosine']``, ``loguniform[0.0003, 0.003]``, ``int[1, 4]``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind, _, rest = description.partition("[")
    if kind not in ("choice", "uniform", "loguniform", "int", "logint"):
        raise ValueError(f"not a sampled distribution: {description!r}")
    values = ast.literal_eval("[" + rest)
    if kind == "choice":
        return CategoricalDistribution(values)
    if kind in ("uniform", "loguniform"):
        return FloatDistribution(float(values[0]), float(values[1]), log=kind == "loguniform")
    if kind in ("int", "logint"):
        return IntDistribution(int(values[0]), int(values[1]), log=kind == "logint")
    raise ValueError(f"not a sampled distribution: {description!r}")


def _value_in(dist, raw: Any):
    """A logged param (a string in MLflow) as the distribution's own value."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if choice == raw or str(choice) == str(raw):
                return choice
        raise ValueError(f"{raw!r} is not one of {dist.choices}")
    return int(float(raw)) if isinstance(dist, IntDistribution) else float(raw)


def study_from_trials(distributions: dict[str, Any], trials: list[tuple[dict[str, Any], float]]):
    """A maximising Optuna study holding the finished trials: (params, best validation value)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="sweep")
    for params, value in trials:
        kept = {k: _value_in(d, params[k]) for k, d in distributions.items() if k in params}
        study.add_trial(optuna.trial.create_trial(
            params=kept, distributions={k: distributions[k] for k in kept}, value=float(value)))
    return study


def param_importances(study, seed: int = 0) -> dict[str, dict[str, float]]:
    """{evaluator: {param: importance}} (each sums to 1), params in the fANOVA order."""
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    out = {
        "fanova": get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True),
        "ped_anova": get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), normalize=True),
    }
    order = list(out["fanova"])
    # 6 decimals: the evaluators' last digits differ between CPUs (numpy's SIMD paths), and the
    # committed report must regenerate byte for byte on any machine
    return {name: {k: round(float(imp.get(k, 0.0)), 6) for k in order} for name, imp in out.items()}


def importance_rows(importances: dict[str, dict[str, float]]) -> list[dict]:
    order = list(importances["fanova"])
    return [{"param": k, **{name: importances[name].get(k, 0.0) for name in EVALUATORS}} for k in order]


def plot_importances(importances: dict[str, dict[str, float]], path: str | Path, title: str) -> None:
    """Horizontal bars, both evaluators side by side, most important on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = importance_rows(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.28 * len(rows) + 1.4))
    ys = range(len(rows))
    height = 0.4
    for i, (name, label) in enumerate((("fanova", "fANOVA"), ("ped_anova", "PED-ANOVA"))):
        ax.barh([y + (i - 0.5) * height for y in ys], [r[name] for r in rows], height=height, label=label)
    ax.set_yticks(list(ys), [r["param"] for r in rows], fontsize=8)
    ax.set_xlabel("importance (share, each evaluator sums to 1)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    # no "Software" chunk: the same numbers give the same bytes across matplotlib versions
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
