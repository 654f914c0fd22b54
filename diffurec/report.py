"""docs/results.md and docs/results.json, regenerated from tracked runs.

The runs come from the exported run files kept in the repository (``results/runs/``, see
:mod:`diffurec.runs_export`; :func:`write_report_from_export`), so a fresh clone regenerates the
same pages, or from a live MLflow store (:func:`write_report`). Both sources give the same run
dicts (:func:`run_dict`) in the same order, so they give the same pages (but for the line naming
the source, and for any machine path in a param, which the export makes repository-relative).

Which runs count:
- **main rows**: finished training runs (no parent run, not tagged ``ablation`` or
  ``kind=evaluation``) with test metrics, grouped by (dataset, model, config without seed and
  runtime keys). Each group is one row: mean ± std over its runs (seeds). ``results.json`` keeps,
  per dataset and model, the group with the most runs (ties: best mean validation NDCG@10).
- **precision**: pairs of main rows whose configs differ in ``precision`` alone (bf16 against
  fp32): the difference in test NDCG@10 against the seeds' spread, and time per epoch.
- **protocols** (time to quality): pairs of main rows whose configs differ in training-protocol
  keys alone (schedule, epochs, validation, early stopping): the shorter protocol's test NDCG@10
  against the longer one's, and the epochs and seconds each took.
- **ablations**: runs tagged ``ablation=<config key>``; the x value is that key's param. A run
  tagged with several comma-separated keys is the shared baseline of each (``ablation_value.<key>``
  tags give its value where the key is no config key). Training
  ablations are training runs; the reverse-steps ablation is ``python -m diffurec evaluate
  --track --tag ablation=reverse_steps`` runs of one trained model.

Nothing here is typed by hand except the paper's figures and the published re-runs' ranges.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffurec.errors import DiffuRecError
from diffurec.tracking import library_metric_name, mlflow_metric_name

# Paper figures (full ranking, leave-one-out, %), and the public SASRec-CE re-run on Beauty.
PAPER = {
    ("beauty", "diffurec"): {"test/HR@10": 7.91, "test/NDCG@10": 4.75, "test/HR@20": 11.11, "test/NDCG@20": 5.56},
    ("beauty", "sasrec"): {"test/HR@10": 7.36, "test/NDCG@10": 3.91},
    ("ml-1m", "diffurec"): {"test/HR@10": 26.26, "test/NDCG@10": 14.79, "test/HR@20": 36.79, "test/NDCG@20": 17.44},
}
# Published re-runs of the reference DiffuRec code on its own splits: the range of their test figures
RERUNS = {
    ("beauty", "diffurec"): {"test/HR@10": (7.36, 7.83), "test/NDCG@10": (4.34, 4.73)},
    ("ml-1m", "diffurec"): {"test/HR@10": (23.75, 23.94), "test/NDCG@10": (12.78, 13.04)},
}
TABLE_METRICS = ["test/HR@10", "test/NDCG@10", "test/HR@20", "test/NDCG@20"]
# keys that do not change what is trained; ``epochs`` is only the cap of early stopping (a resumed
# run may raise or lower it, and MLflow keeps the first value), the epochs actually trained are
# each run's own, and the budget tags say where a cap cut a run short
NON_MODEL_KEYS = {"seed", "device", "threads", "output_dir", "eval_batch_size", "eval_batch_tokens", "cuda_graphs", "keep_freed_memory", "epochs"}


def dataset_label(tag: str | None) -> str:
    if not tag:
        return "unknown"
    p = Path(tag)
    name = p.parent.name if p.suffix in (".parquet", ".csv", ".jsonl", ".json") else p.name
    return name.lower()


# validation metrics read at each run's best epoch (its checkpoint), not at its last epoch
BEST_EPOCH_METRICS = ("valid/NDCG@10", "valid/HR@10")


def run_dict(run_id: str, experiment: str, status: str, start_time: int | None, tags: dict[str, str],
             params: dict[str, str], metrics: dict[str, float],
             history: Callable[[str], list[tuple[int, float]]] | None = None) -> dict:
    """One run as the report reads it; ``metrics`` are each key's latest value, MLflow names.

    ``history(key)`` gives a metric's (step, value) points (MLflow name): with it, the
    validation metrics at the best epoch are added as ``best/valid/...``.
    """
    metrics = {library_metric_name(k): v for k, v in metrics.items()}
    best_epoch = metrics.get("best_epoch")
    valid_curve: list[tuple[int, float]] = []
    if history is not None:
        # one value per epoch, the last logged: a resumed run may train or validate an epoch a
        # second time; cached, so valid NDCG@10's history is read once for its best and its curve
        @functools.cache
        def per_epoch(key: str) -> dict[int, float]:
            return {int(step): value for step, value in history(mlflow_metric_name(key))}

        if best_epoch is not None:
            for key in BEST_EPOCH_METRICS:
                if int(best_epoch) in per_epoch(key):
                    metrics[f"best/{key}"] = per_epoch(key)[int(best_epoch)]
        valid_curve = sorted(per_epoch("valid/NDCG@10").items())
        # the median, not the mean: a run sharing its machine for a while (a test suite, a
        # resumed run's earlier session) keeps its typical epoch time
        seconds = per_epoch("train/seconds")
        if seconds:
            metrics["epoch_seconds_median"] = statistics.median(seconds.values())
            metrics["epochs_trained"] = float(max(seconds))
            metrics["train_seconds_total"] = sum(seconds.values())
    return {
        "run_id": run_id,
        "experiment": experiment,
        "status": status,
        "start_time": start_time or 0,
        "tags": tags,
        "params": params,
        "metrics": metrics,
        "dataset": dataset_label(tags.get("dataset") or tags.get("data_dir")),
        "model": params.get("model") or tags.get("model", "unknown"),
        "valid_curve": valid_curve,
    }


def load_runs(tracking_uri: str, experiments: list[str] | None = None) -> list[dict]:
    """The runs of a live MLflow store, in MLflow's search order (newest start first)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exps = client.search_experiments()
    if experiments:
        exps = [e for e in exps if e.name in experiments]
    if not exps:
        raise DiffuRecError(f"no MLflow experiments found in {tracking_uri}")
    names = {e.experiment_id: e.name for e in exps}
    def history(run_id):
        return lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    return [run_dict(run.info.run_id, names[run.info.experiment_id], run.info.status, run.info.start_time,
                     run.data.tags, run.data.params, run.data.metrics, history(run.info.run_id))
            for run in client.search_runs(list(names), max_results=50000)]


def load_exported_runs(runs_dir: str | Path, experiments: list[str] | None = None) -> list[dict]:
    """The runs exported under ``runs_dir``, as :func:`load_runs` gives them from the store."""
    from diffurec.runs_export import latest_metrics, read_runs

    hint = "(`python pipelines/runs.py export` writes them; --mlflow-uri reads a store instead)"
    if not Path(runs_dir).is_dir():
        raise DiffuRecError(f"no exported runs: {runs_dir} not found {hint}")
    records = read_runs(runs_dir, experiments)
    if not records:
        which = f" of experiments {', '.join(experiments)}" if experiments else ""
        raise DiffuRecError(f"no exported runs{which} in {runs_dir} {hint}")
    # MLflow's search order (start time descending, then run id): ties in the report's sorts
    # keep this order, so the store and its export give the same pages
    records.sort(key=lambda r: (-(r["start_time"] or 0), r["run_id"]))
    def history(record):
        return lambda key: [(step, value) for step, _, value in record["metrics"].get(key, [])]

    return [run_dict(r["run_id"], r["experiment"], r["status"], r["start_time"], r["tags"], r["params"],
                     latest_metrics(r), history(r)) for r in records]


# schedules whose shape is set by ``epochs`` (the learning rate reaches 0 at the last epoch): there
# ``epochs`` changes what is trained
EPOCH_SHAPED_SCHEDULES = {"cosine", "warmup_cosine"}


def _ignored_keys(config: dict) -> set[str]:
    if str(config.get("lr_schedule")) in EPOCH_SHAPED_SCHEDULES:
        return NON_MODEL_KEYS - {"epochs"}
    return NON_MODEL_KEYS


def bf16_ranked(run: dict) -> bool:
    """A bf16 run from before rankings used float32 scores (``tracking.RUN_TAGS``): its bf16
    scores tied the target with its neighbours and the ties counted for the target, so its
    HR and NDCG read high. Its rows and points are marked, and never the headline."""
    return (run["params"].get("precision") == "bf16"
            and run["tags"].get("ranking_scores") != "float32")


BF16_RANKED_NOTE = ("bf16-ranked: evaluated on bf16 scores (8 significant bits), where items tied with the "
                    "target counted in its favour; these figures read high. Later runs rank on float32 scores.")


def _config_key(params: dict[str, str]) -> tuple:
    """The training config a run's params describe, defaults filled in, so a run logged before
    a config key existed groups with later runs that leave that key at its default."""
    full = _typed_or_none(params) or params  # not a Config (foreign runs): as logged
    ignored = _ignored_keys(full)
    return tuple(sorted((k, str(v)) for k, v in full.items() if k not in ignored))


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _typed(params: dict[str, str]) -> dict[str, Any]:
    from diffurec.config import Config

    known = set(Config.keys())
    cfg = Config.from_dict({k: _parse(v) for k, v in params.items() if k in known}, source="mlflow params")
    return cfg.to_dict()


def _typed_or_none(params: dict[str, str]) -> dict[str, Any] | None:
    try:
        return _typed(params)
    except (DiffuRecError, TypeError, ValueError):
        return None


def _parse(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def main_groups(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        t = r["tags"]
        # an ablation point trained to the end of its protocol is a config like any other; one
        # cut to a small budget is comparable only within its ablation
        if (r["status"] != "FINISHED" or "mlflow.parentRunId" in t or ("ablation" in t and "budget" in t)
                or t.get("kind") in ("evaluation", "sweep") or "test/NDCG@10" not in r["metrics"]):
            continue
        groups[(r["dataset"], r["model"], _config_key(r["params"]), bf16_ranked(r))].append(r)
    rows = []
    for (dataset, model, _, tied), members in groups.items():
        members.sort(key=lambda r: r["params"].get("seed", ""))
        metrics = sorted({k for r in members for k in r["metrics"] if k.startswith(("test/", "valid/", "best/"))
                          or k in ("seconds_to_best", "best_epoch", "epoch_seconds_median", "epochs_trained",
                                   "train_seconds_total")})
        row = {"dataset": dataset, "model": model, "runs": [r["run_id"] for r in members],
               "budget": sorted({r["tags"]["budget"] for r in members if "budget" in r["tags"]}),
               "epochs_run": [int(r["metrics"].get("best_epoch", 0)) for r in members],
               "seeds": [r["params"].get("seed") for r in members], "bf16_ranked": tied,
               "machines": sorted({r["tags"]["machine"] for r in members if "machine" in r["tags"]}),
               # the newest run's config: a resumed older run may carry a stale epochs cap
               "config": _typed(max(members, key=lambda r: r.get("start_time", 0))["params"])}
        for k in metrics:
            values = [r["metrics"][k] for r in members if k in r["metrics"]]
            if values:
                row[k] = _stats(values)
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["model"], -len(r["runs"])))
    return rows


def headline(rows: list[dict]) -> dict:
    """{dataset: {model: row}}: the row with most runs, ties broken by validation NDCG@10; a
    bf16-ranked row only where no other row exists."""
    best: dict[str, dict[str, dict]] = defaultdict(dict)

    def score(row):
        valid = row.get("best/valid/NDCG@10") or row.get("valid/NDCG@10") or {}
        return not row.get("bf16_ranked"), len(row["runs"]), valid.get("mean", 0.0)

    for row in rows:
        current = best[row["dataset"]].get(row["model"])
        if current is None or score(row) > score(current):
            best[row["dataset"]][row["model"]] = row
    return {d: dict(sorted(m.items())) for d, m in sorted(best.items())}


def precision_comparisons(rows: list[dict]) -> list[dict]:
    """Pairs of float32-ranked main rows whose configs differ in ``precision`` alone: what bf16
    autocast costs in quality and what it saves in time (median epoch seconds where the runs
    have histories, else seconds to the best epoch over it). ``within_spread``: the difference
    of the mean test NDCG@10 is no larger than the larger of the two rows' seed std."""
    out = []
    for a in rows:
        for b in rows:
            if (a is b or a["bf16_ranked"] or b["bf16_ranked"] or (a["dataset"], a["model"]) != (b["dataset"], b["model"])
                    or a["config"].get("precision") != "bf16" or b["config"].get("precision") != "fp32"):
                continue
            if _differing_keys(a["config"], b["config"], _ignored_keys(a["config"])) - {"precision"}:
                continue
            if "test/NDCG@10" not in a or "test/NDCG@10" not in b:
                continue
            diff = a["test/NDCG@10"]["mean"] - b["test/NDCG@10"]["mean"]
            spread = max(a["test/NDCG@10"]["std"], b["test/NDCG@10"]["std"])
            entry = {"dataset": a["dataset"], "model": a["model"], "bf16_runs": a["runs"], "fp32_runs": b["runs"],
                     "test_ndcg10_difference": diff, "larger_std": spread,
                     # one seed on either side has no spread to be within
                     "within_spread": abs(diff) <= spread if len(a["runs"]) > 1 and len(b["runs"]) > 1 else None}
            epoch_seconds = {}
            for name, row in (("bf16", a), ("fp32", b)):
                secs, epochs = row.get("seconds_to_best"), row.get("best_epoch")
                if row.get("epoch_seconds_median"):
                    epoch_seconds[name] = row["epoch_seconds_median"]["mean"]
                elif secs and epochs and epochs["mean"] > 0:
                    epoch_seconds[name] = secs["mean"] / epochs["mean"]
            if len(epoch_seconds) == 2:
                entry["epoch_seconds"] = epoch_seconds
                entry["fp32_over_bf16_time"] = epoch_seconds["fp32"] / epoch_seconds["bf16"]
            entry["machines"] = sorted(set(a.get("machines", [])) | set(b.get("machines", [])))
            out.append(entry)
    return out


def _differing_keys(a: dict, b: dict, ignored: set[str]) -> set[str]:
    """The config keys, outside ``ignored``, where two configs differ."""
    return {k for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k)}


SPREAD_WORDS = {True: "yes", False: "no", None: "- (one seed)"}


# keys of the training protocol: how long a config trains, on which learning-rate schedule, how
# often it validates and when it stops; not what the model is
PROTOCOL_KEYS = {"epochs", "lr_schedule", "lr_step_epochs", "lr_gamma", "warmup_epochs", "eval_every",
                 "patience", "stop_on", "reverse_steps", "valid_reverse_steps"}


def protocol_comparisons(rows: list[dict]) -> list[dict]:
    """Pairs of float32-ranked main rows whose configs differ in training-protocol keys alone:
    the shorter protocol (fewer epochs trained) against the longer one. ``within_one_std``: the
    shorter one's mean test NDCG@10 is at most the larger seed std below the longer one's (None
    where a side has one seed); ``meets_goal``: that, in at most a third of the epochs trained."""
    out = []
    ignored = NON_MODEL_KEYS - PROTOCOL_KEYS
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if (a["bf16_ranked"] or b["bf16_ranked"] or (a["dataset"], a["model"]) != (b["dataset"], b["model"])
                    or "test/NDCG@10" not in a or "test/NDCG@10" not in b):
                continue
            differ = _differing_keys(a["config"], b["config"], ignored)
            if not differ or not differ <= PROTOCOL_KEYS:
                continue
            short, long_ = sorted((a, b), key=lambda r: _epochs_trained(r))
            diff = short["test/NDCG@10"]["mean"] - long_["test/NDCG@10"]["mean"]
            spread = max(short["test/NDCG@10"]["std"], long_["test/NDCG@10"]["std"])
            within = diff >= -spread if len(short["runs"]) > 1 and len(long_["runs"]) > 1 else None
            epochs = {"short": _epochs_trained(short), "long": _epochs_trained(long_)}
            entry = {"dataset": a["dataset"], "model": a["model"], "short_runs": short["runs"],
                     "long_runs": long_["runs"], "keys": sorted(differ),
                     "short_protocol": _schedule(short["config"]), "long_protocol": _schedule(long_["config"]),
                     "test_ndcg10_difference": diff, "larger_std": spread, "within_one_std": within,
                     "epochs_trained": epochs,
                     "best_epoch": {"short": short["best_epoch"]["mean"], "long": long_["best_epoch"]["mean"]}
                     if "best_epoch" in short and "best_epoch" in long_ else None,
                     "seconds_to_best": {"short": short["seconds_to_best"]["mean"], "long": long_["seconds_to_best"]["mean"]}
                     if "seconds_to_best" in short and "seconds_to_best" in long_ else None,
                     "long_over_short_epochs": epochs["long"] / epochs["short"] if epochs["short"] else None,
                     "machines": sorted(set(short.get("machines", [])) | set(long_.get("machines", [])))}
            ratio = entry["long_over_short_epochs"]
            entry["meets_goal"] = None if within is None else bool(within and ratio is not None and ratio >= 3)
            out.append(entry)
    return out


def _epochs_trained(row: dict) -> float:
    """Mean epochs trained by a row's runs: from their histories, else the best epoch (a lower bound)."""
    stat = row.get("epochs_trained") or row.get("best_epoch")
    return stat["mean"] if stat else 0.0


def _section_head(title: str, intro: str, columns: list[str]) -> list[str]:
    """A report section's title, its one-paragraph intro and its table's header."""
    return [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _protocol_lines(comparisons: list[dict], rows: list[dict]) -> list[str]:
    by_runs = {tuple(r["runs"]): r for r in rows}
    lines = _section_head(
        "Time to quality: training protocols",
        "Rows of the main table whose configs differ only in how they train (schedule, epochs, "
        "validation, early stopping): the protocol that trains fewer epochs against the one that "
        "trains more. Goal: the same test NDCG@10 within one seed std in at most a third of the epochs "
        "trained. Seconds: training time, validation excluded, mean over the row's runs.",
        ["dataset", "model", "protocol", "n", "test HR@10", "test NDCG@10", "best epoch", "epochs trained",
         "train s to best", "train s in all"])
    shown = dict.fromkeys(tuple(c[side]) for c in comparisons for side in ("short_runs", "long_runs"))
    for runs in shown:
        r = by_runs[runs]
        cells = [f"{r[k]['mean']:.0f}" if k in r else "-"
                 for k in ("best_epoch", "epochs_trained", "seconds_to_best", "train_seconds_total")]
        lines.append(f"| {r['dataset']} | {r['model']} | {_schedule(r['config'])} | {len(r['runs'])} | "
                     f"{_fmt(r.get('test/HR@10'))} | {_fmt(r.get('test/NDCG@10'))} | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | model | shorter protocol | longer protocol | shorter - longer test NDCG@10 | "
              "larger seed std | within one std | epochs trained, longer / shorter | goal met |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        ratio = f"{c['long_over_short_epochs']:.1f}x" if c["long_over_short_epochs"] else "-"
        lines.append(f"| {c['dataset']} | {c['model']} | {c['short_protocol']} | {c['long_protocol']} | "
                     f"{100 * c['test_ndcg10_difference']:+.2f} | {100 * c['larger_std']:.2f} | "
                     f"{SPREAD_WORDS[c['within_one_std']]} | {ratio} | {SPREAD_WORDS[c['meets_goal']]} |")
    machines = sorted({m for c in comparisons for m in c["machines"]})
    if machines:
        lines += ["", "Machines: " + "; ".join(machines) + "."]
    return lines + [""]


def _precision_lines(comparisons: list[dict], rows: list[dict]) -> list[str]:
    by_runs = {tuple(r["runs"]): r for r in rows}
    lines = _section_head(
        "Precision: bf16 autocast against fp32",
        "Rows of the main table whose configs differ only in `precision`. Both rank items on float32 "
        "scores. Time per epoch: each run's median training seconds per epoch (validation excluded), "
        "averaged over the row's runs; compare the two only where they ran on one machine "
        "(the machines line).",
        ["dataset", "model", "bf16 test NDCG@10", "fp32 test NDCG@10", "bf16 - fp32", "larger seed std",
         "within the seeds' spread", "bf16 s/epoch", "fp32 s/epoch", "fp32 / bf16 time"])
    for c in comparisons:
        a, b = by_runs[tuple(c["bf16_runs"])], by_runs[tuple(c["fp32_runs"])]
        secs = c.get("epoch_seconds", {})
        ratio = f"{c['fp32_over_bf16_time']:.2f}x" if "fp32_over_bf16_time" in c else "-"
        lines.append(f"| {c['dataset']} | {c['model']} | {_fmt(a['test/NDCG@10'])} (n={len(a['runs'])}) | "
                     f"{_fmt(b['test/NDCG@10'])} (n={len(b['runs'])}) | {100 * c['test_ndcg10_difference']:+.2f} | "
                     f"{100 * c['larger_std']:.2f} | {SPREAD_WORDS[c['within_spread']]} | "
                     + " | ".join(f"{secs[k]:.0f}" if k in secs else "-" for k in ("bf16", "fp32"))
                     + f" | {ratio} |")
    machines = sorted({m for c in comparisons for m in c["machines"]})
    if machines:
        lines += ["", "Machines: " + "; ".join(machines) + "."]
    return lines + [""]


def ablations(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        keys = [k.strip() for k in r["tags"].get("ablation", "").split(",") if k.strip()]
        if not keys or r["status"] != "FINISHED":
            continue
        config = _typed_or_none(r["params"]) or {}  # defaults filled: a baseline may predate a key
        for key in keys:
            # a run tagged with several keys (``ablation=noise_schedule,positional_embedding``) is
            # the shared baseline point of each; its value is its own param for every key
            single = len(keys) == 1
            # ``ablation_value.<key>`` names a shared baseline's value for one of its keys (needed
            # where the key is not a config key, e.g. a bundle of several)
            value = (r["tags"].get("ablation_value") if single else r["tags"].get(f"ablation_value.{key}")
                     ) or r["params"].get(key)
            if value is None and key in config:
                value = str(config[key])
            labelled = single and "ablation_label" in r["tags"]
            point = {"run_id": r["run_id"], "dataset": r["dataset"], "model": r["model"],
                     "value": _parse(value) if value is not None else None,
                     "label": r["tags"]["ablation_label"] if labelled else str(value)}
            if labelled:
                point["labelled"] = True  # a variant at this value (e.g. a fixed lambda), not the sweep
            if "budget" in r["tags"]:
                point["budget"] = r["tags"]["budget"]
            if bf16_ranked(r):
                point["bf16_ranked"] = True
            for k in ("valid/NDCG@10", "test/NDCG@10", "valid/HR@10", "test/HR@10", "seconds_to_best", "best_epoch"):
                if k in r["metrics"]:
                    point[k] = r["metrics"][k]
            for k in BEST_EPOCH_METRICS:  # a finished run's selection point, not its last epoch
                if f"best/{k}" in r["metrics"]:
                    point[k] = r["metrics"][f"best/{k}"]
            out[key].append(point)
    for points in out.values():
        points.sort(key=lambda p: (p["dataset"], _sort_key(p["value"]), p["label"]))
    return dict(sorted(out.items()))


SEGMENTS = ("short", "long", "head", "tail")
BEYOND_ACCURACY = ("coverage", "novelty", "popularity", "ILD")


def detailed_evaluations(runs: list[dict]) -> list[dict]:
    """``evaluate --segments --beyond-accuracy --track`` runs: per run, the test split's metrics by
    segment and beyond accuracy, and the trained run it evaluated (its checkpoint's folder)."""
    out = []
    for r in runs:
        t = r["tags"]
        if r["status"] != "FINISHED" or t.get("kind") != "evaluation" or not (
                t.get("segments") == "true" or t.get("beyond_accuracy") == "true"):
            continue
        metrics = {k.removeprefix("test/"): v for k, v in r["metrics"].items() if k.startswith("test/")}
        out.append({"run_id": r["run_id"], "dataset": r["dataset"], "model": r["model"],
                    "trained_run": Path(t.get("checkpoint", "?")).parent.name,
                    "reverse_steps": r["params"].get("reverse_steps"), "metrics": metrics})
    out.sort(key=lambda e: (e["dataset"], e["model"], e["trained_run"]))
    return out


def _detailed_lines(evals: list[dict], link) -> list[str]:
    lines = ["## Segments and beyond accuracy", "",
             "Test split, from `python -m diffurec evaluate --segments --beyond-accuracy --track` on each "
             "trained model (`docs/recommend.md`). History: short = at most the median history length "
             "of the evaluated users, long = above it. Target: head = the most popular items that "
             "together hold 20% of the training interactions, tail = the rest. HR@10 and NDCG@10 in %; "
             "users per segment in brackets.", "",
             "| dataset | model | trained run | " + " | ".join(f"{s} HR@10 / NDCG@10" for s in SEGMENTS) + " | run |",
             "|---|---|---|" + "---|" * len(SEGMENTS) + "---|"]
    for e in evals:
        m = e["metrics"]
        cells = []
        for seg in SEGMENTS:
            hr, ndcg, users = (m.get(f"segment/{seg}/{k}") for k in ("HR@10", "NDCG@10", "users"))
            cells.append("-" if hr is None else f"{100 * hr:.2f} / {100 * ndcg:.2f} ({users:.0f})")
        lines.append(f"| {e['dataset']} | {e['model']} | {e['trained_run']} | " + " | ".join(cells)
                     + f" | {link(e['run_id'])} |")
    thresholds = sorted({(e["dataset"], e["metrics"].get("segment/history_threshold"),
                          e["metrics"].get("segment/head_items")) for e in evals
                         if "segment/history_threshold" in e["metrics"]})
    for dataset, threshold, head in thresholds:
        lines += ["", f"{dataset}: short histories have at most {threshold:.0f} items; the head is "
                      f"{head:.0f} items."]
    lines += ["", "Beyond accuracy, on each user's top-K list: coverage = the share of the catalogue "
                  "recommended to anyone; novelty = mean self-information -log2(p) of the recommended "
                  "items, p = the share of users who interacted with the item in training; popularity = "
                  "their mean training interaction count; ILD = 1 - the mean pairwise cosine similarity "
                  "of their item embeddings.", "",
              "| dataset | model | trained run | " + " | ".join(f"{b}@10" for b in BEYOND_ACCURACY)
              + " | " + " | ".join(f"{b}@20" for b in BEYOND_ACCURACY) + " |",
              "|---|---|---|" + "---|" * (2 * len(BEYOND_ACCURACY))]
    for e in evals:
        m = e["metrics"]
        cells = []
        for k in (10, 20):
            for b in BEYOND_ACCURACY:
                v = m.get(f"{b}@{k}")
                cells.append("-" if v is None else f"{v:.4g}")
        lines.append(f"| {e['dataset']} | {e['model']} | {e['trained_run']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _config_diff(row: dict, head: dict | None) -> str:
    """'headline' for the row ``results.json`` keeps; else the keys where its config differs."""
    if head is None or row is head:
        return "headline"
    ignored = _ignored_keys(row["config"]) & _ignored_keys(head["config"])
    diff = [f"{k}={v}" for k, v in sorted(row["config"].items())
            if k not in ignored and head["config"].get(k) != v]
    return ", ".join(diff) or "the headline's config"  # e.g. its bf16-ranked runs


def _schedule(c: dict) -> str:
    """The training protocol in words: learning-rate schedule, epochs, early stopping."""
    sched = c.get("lr_schedule", "constant")
    if sched == "step":
        sched = f"x{c['lr_gamma']} every {c['lr_step_epochs']} epochs"
    elif sched in ("cosine", "warmup_cosine"):
        sched = f"cosine to 0 at epoch {c['epochs']}" + (f", {c['warmup_epochs']} warmup" if c.get("warmup_epochs") else "")
    stop = ("no early stop" if c["patience"] * c["eval_every"] >= c["epochs"]
            else f"stop after {c['patience']} validations without gain")
    return f"{sched}; up to {c['epochs']} epochs, validation every {c['eval_every']}, {stop}"


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _fmt(stat: dict | None, scale: float = 100.0) -> str:
    if not stat:
        return "-"
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f}" if stat["n"] > 1 else f"{stat['mean'] * scale:.2f}"


def sweeps(runs: list[dict]) -> list[dict]:
    """Each finished sweep (``pipelines/tune.py`` parent run) with its trials and what each knob
    of its space is worth (``diffurec.importance``: fANOVA, PED-ANOVA over the trials' best
    validation NDCG@10)."""
    from diffurec.importance import distribution, importance_rows, param_importances, study_from_trials

    out = []
    for parent in sorted((r for r in runs if r["tags"].get("kind") == "sweep" and r["status"] == "FINISHED"),
                         key=lambda r: r["start_time"]):
        space = {k[len("space."):]: v for k, v in parent["params"].items() if k.startswith("space.")}
        dists = {}
        for key, text in space.items():
            try:
                dists[key] = distribution(text)
            except ValueError:  # a constant: nothing to weigh
                continue
        metric = "best/valid/NDCG@10"
        children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]
                    and r["tags"].get("trial_status") in ("completed", "stopped_by_asha")
                    and metric in r["metrics"]]
        trials = [{"trial_id": c["tags"].get("trial_id", c["run_id"][:8]), "run_id": c["run_id"],
                   "status": c["tags"]["trial_status"], "valid/NDCG@10": c["metrics"][metric],
                   "epochs": int(c["metrics"].get("epoch", 0)),
                   "params": {k: c["params"].get(k) for k in dists}, "bf16_ranked": bf16_ranked(c),
                   **{k: c["metrics"][k] for k in ("test/NDCG@10", "test/HR@10") if k in c["metrics"]}}
                  for c in children]
        trials.sort(key=lambda t: -t["valid/NDCG@10"])
        entry = {"name": parent["tags"].get("sweep", parent["run_id"][:8]), "run_id": parent["run_id"],
                 "dataset": parent["dataset"] if parent["dataset"] != "unknown" else
                 dataset_label(parent["params"].get("sweep.data")),
                 "counts": {k[len("trials."):]: int(v) for k, v in parent["tags"].items() if k.startswith("trials.")},
                 "space": space, "trials": trials, "best": trials[0] if trials else None, "importances": None}
        if len(trials) >= 2:
            try:
                entry["importances"] = importance_rows(param_importances(study_from_trials(
                    dists, [(t["params"], t["valid/NDCG@10"]) for t in trials])))
            except (ValueError, RuntimeError):  # nothing varied, or too few trials for an evaluator
                pass
        out.append(entry)
    return out


def _short(value: str | None) -> str:
    """A logged float param with 3 significant digits (0.0019961115 -> 0.002)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if "." not in str(value) and "e" not in str(value) else f"{number:.3g}"


def _sweep_lines(sweep: dict, out_dir: Path, link) -> list[str]:
    from diffurec.importance import plot_importances

    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(sweep["counts"].items()) if v)
    lines = [f"## Sweep: {sweep['name']} ({sweep['dataset']})", "",
             f"Parent run {link(sweep['run_id'])}; {len(sweep['trials'])} trials with a validation metric "
             f"({counts}). Every choice below is made on validation NDCG@10 (the best epoch of each trial).", ""]
    if any(t.get("bf16_ranked") for t in sweep["trials"]):
        lines += [f"Its trials are bf16-ranked: {BF16_RANKED_NOTE} The bias grows with the scale of a "
                  "model's scores, so even their order is approximate.", ""]
    if sweep["best"]:
        best = sweep["best"]
        shown = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        tested = (f" (its test NDCG@10 {100 * best['test/NDCG@10']:.2f}, HR@10 {100 * best['test/HR@10']:.2f}, "
                  "read after the choice)" if "test/NDCG@10" in best else "")
        lines += [f"Best trial {best['trial_id']} ({link(best['run_id'])}): valid NDCG@10 "
                  f"{100 * best['valid/NDCG@10']:.2f}{tested}; {shown}", ""]
    if sweep["importances"]:
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", sweep["name"])
        png = f"importances_{name}.png"
        plot_importances({e: {r["param"]: r[e] for r in sweep["importances"]} for e in ("fanova", "ped_anova")},
                         out_dir / png, f"{sweep['name']}: what each knob is worth (valid NDCG@10)")
        lines += ["What each knob is worth (Optuna's evaluators over the trials; each column sums to 1). "
                  "fANOVA: share of the metric's variance over the space; PED-ANOVA: how far the top 10% "
                  "of trials sit from the rest on that knob.", "", f"![importances]({png})", "",
                  "| knob | fANOVA | PED-ANOVA |", "|---|---|---|"]
        lines += [f"| {r['param']} | {r['fanova']:.3f} | {r['ped_anova']:.3f} |" for r in sweep["importances"]]
        lines.append("")
    lines += ["Trials by validation NDCG@10 (top 10):", "",
              "| trial | status | epochs | valid NDCG@10 | run |", "|---|---|---|---|---|"]
    lines += [f"| {t['trial_id']} | {t['status']} | {t['epochs']} | {100 * t['valid/NDCG@10']:.2f} | "
              f"{link(t['run_id'])} |" for t in sweep["trials"][:10]]
    lines.append("")
    return lines


# what each named ablation varies; shown above its table
ABLATION_NOTES = {
    "lambda_mean": "The uncertainty weight: lambda ~ N(lambda_mean, lambda_std) elementwise, with lambda_std = "
                   "lambda_mean. At 0 the noised target item never enters the Approximator, so the model is a "
                   "Transformer over the history trained with cross-entropy; at 1 the noised target is on the "
                   "scale of the history's embeddings.",
    "reverse_steps": "The number of reverse denoising steps S at evaluation, on one trained model "
                     "(`python -m diffurec evaluate --reverse-steps S`): the same weights at each point.",
    "reference_transformer": "The reference code's Transformer block against this project's earlier block, "
                             "all five block keys switched together (see block_key for each alone).",
    "block_key": "Each key of the Transformer block switched alone from the reference code's value (the "
                 "default; reference_block is the run with all five at it) to this project's earlier one: "
                 "`gelu` exact (reference: tanh), `dropout_placement` residual (reference: also on the "
                 "feed-forward's hidden activation and every block's output), `layer_norm_eps` 1e-5 "
                 "(reference: 1e-12), `linear_init` torch (reference: Xavier normal), "
                 "`ce_padding_column` false (reference: the padding id's column in the cross-entropy).",
}


def _ablation_finding(name: str, points: list[dict]) -> list[str]:
    """The point that validates best, and for lambda what that says about the diffusion input."""
    scored = [p for p in points if "valid/NDCG@10" in p]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda p: p["valid/NDCG@10"])
    test = f", test NDCG@10 {100 * best['test/NDCG@10']:.2f}" if "test/NDCG@10" in best else ""
    out = [f"Best on validation NDCG@10: {best['label']} ({100 * best['valid/NDCG@10']:.2f}{test})."]
    if name == "lambda_mean":
        top = max(p["value"] for p in scored if isinstance(p["value"], (int, float)))
        worst = next(p for p in scored if p["value"] == top)
        drop = 100 * (best["valid/NDCG@10"] - worst["valid/NDCG@10"])
        if best["value"] == 0:
            out.append(f"The best validation is at lambda 0, with no diffusion input: on this data the "
                       f"uncertainty injection does not improve the ranking, and at lambda {top:g} validation "
                       f"NDCG@10 is {drop:.2f} points lower"
                       + (f" while test HR@10 goes from {100 * best['test/HR@10']:.2f} to "
                          f"{100 * worst['test/HR@10']:.2f}: the noised target spreads the ranking, it does "
                          f"not sharpen it." if "test/HR@10" in best and "test/HR@10" in worst else "."))
        else:
            out.append(f"The diffusion input helps on validation: lambda {best['label']} is above lambda 0.")
    return out


def plot_ablation(name: str, points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    numeric = all(isinstance(p["value"], (int, float)) and not isinstance(p["value"], bool) for p in points)
    for dataset in sorted({p["dataset"] for p in points}):
        pts = [p for p in points if p["dataset"] == dataset]
        labels = [p["label"] for p in pts]
        for metric, marker in (("valid/NDCG@10", "o"), ("test/NDCG@10", "s")):
            ys = [100 * p.get(metric, float("nan")) for p in pts]
            if numeric:
                # the sweep is a line; labelled variants (e.g. "0.001 fixed") are lone annotated marks
                sweep = [(p["value"], y) for p, y in zip(pts, ys) if not p.get("labelled")]
                line, = ax.plot([x for x, _ in sweep], [y for _, y in sweep], marker=marker,
                                label=f"{dataset} {metric}")
                for p, y in zip(pts, ys):
                    if p.get("labelled"):
                        ax.plot([p["value"]], [y], marker=marker, color=line.get_color(), fillstyle="none",
                                markersize=9, linestyle="none")
                        ax.annotate(p["label"], (p["value"], y), textcoords="offset points", xytext=(6, -10),
                                    fontsize=7)
            else:
                ax.plot(range(len(pts)), ys, marker=marker, linestyle="none", label=f"{dataset} {metric}")
                ax.set_xticks(range(len(pts)), labels, rotation=20)
    positive = sorted(p["value"] for p in points if numeric and p["value"] > 0)
    if positive and (positive[-1] / positive[0] >= 100 or name == "reverse_steps"):
        if all(p["value"] > 0 for p in points):
            ax.set_xscale("log", base=2 if name == "reverse_steps" else 10)
        else:  # values spanning decades plus a 0: linear around 0, log beyond the smallest step
            ax.set_xscale("symlog", linthresh=positive[0])
    ax.set_xlabel(name)
    ax.set_ylabel("NDCG@10 (%)")
    ax.set_title(f"ablation: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    # no "Software" (matplotlib version) chunk: the same data gives the same bytes across versions
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_validation_curves(heads: dict, runs: list[dict], path: Path) -> bool:
    """Validation NDCG@10 per epoch of each headline row's runs, one panel per dataset (their
    scales differ); False, and no file, when no headline run has a validation history."""
    by_id = {r["run_id"]: r for r in runs}
    panels = {dataset: [(model, by_id[rid]) for model, row in models.items() for rid in row["runs"]
                        if by_id.get(rid, {}).get("valid_curve")]
              for dataset, models in sorted(heads.items())}
    panels = {dataset: curves for dataset, curves in panels.items() if curves}
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, curves) in zip(axes[0], panels.items()):
        for model, run in curves:
            epochs, values = zip(*run["valid_curve"])
            seed = run["params"].get("seed", "?")
            ax.plot(epochs, [100 * v for v in values], marker="o", markersize=3,
                    label=f"{model} seed {seed} ({run['run_id'][:8]})")
        ax.set_title(f"{dataset}: headline rows")
        ax.set_xlabel("epoch")
        ax.set_ylabel("valid NDCG@10 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


def write_report(tracking_uri: str, out_dir: str | Path, experiments: list[str] | None = None,
                 ui_base: str | None = None, root: str | Path = ".") -> dict:
    """The pages from a live MLflow store; ``root``: the repository the page names paths from."""
    source = f"the MLflow store `{store_label(tracking_uri, root)}`"
    return write_report_from_runs(load_runs(tracking_uri, experiments), out_dir, source, ui_base)


def write_report_from_export(runs_dir: str | Path, out_dir: str | Path, experiments: list[str] | None = None,
                             ui_base: str | None = None, root: str | Path = ".") -> dict:
    """The pages from exported run files (the default: ``results/runs/`` of the repository)."""
    from diffurec.runs_export import portable_path

    source = f"the exported runs in `{portable_path(Path(runs_dir).absolute(), root)}/`"
    return write_report_from_runs(load_exported_runs(runs_dir, experiments), out_dir, source, ui_base)


def store_label(tracking_uri: str, root: str | Path = ".") -> str:
    """A store's URI as the page may show it: no machine path, no credentials."""
    from urllib.parse import urlsplit

    from diffurec.runs_export import portable_path

    if tracking_uri.startswith("sqlite:///"):
        return portable_path(tracking_uri[len("sqlite:///"):].split("?")[0].removeprefix("file:"), root)
    parts = urlsplit(tracking_uri)
    if parts.hostname:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=host, query="", fragment="").geturl()
    return tracking_uri


def write_report_from_runs(runs: list[dict], out_dir: str | Path, source: str, ui_base: str | None = None) -> dict:
    """Write results.md, results.json, the validation curves and the ablation plots; ``source``
    names where the runs came from on the page (repository-relative, so the page does not change
    with the machine)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = main_groups(runs)
    heads = headline(rows)
    abl = ablations(runs)

    results = {}
    for dataset, models in heads.items():
        results[dataset] = {}
        for model, row in models.items():
            entry = {"config": row["config"], "runs": row["runs"], "seeds": row["seeds"]}
            entry.update({k: v for k, v in row.items() if isinstance(v, dict) and "mean" in v})
            if (dataset, model) in PAPER:
                entry["paper"] = {k: v / 100 for k, v in PAPER[(dataset, model)].items()}
            if (dataset, model) in RERUNS:
                entry["published_reruns"] = {k: [lo / 100, hi / 100] for k, (lo, hi) in RERUNS[(dataset, model)].items()}
            results[dataset][model] = entry
    evals = detailed_evaluations(runs)
    results_json = {**results, "_ablations": abl}
    if sweeps(runs):
        results_json["_sweeps"] = [{k: v for k, v in sw.items() if k != "trials"} for sw in sweeps(runs)]
    precision = precision_comparisons(rows)
    if precision:
        results_json["_precision"] = precision
    protocols = protocol_comparisons(rows)
    if protocols:
        results_json["_protocols"] = protocols
    if evals:
        results_json["_segments_and_beyond_accuracy"] = evals
    (out_dir / "results.json").write_text(json.dumps(results_json, indent=2, default=str))

    link = (lambda rid: f"[{rid[:8]}]({ui_base.rstrip('/')}/#/runs/{rid})") if ui_base else (lambda rid: f"`{rid[:8]}`")
    lines = ["# Results", "",
             f"Generated by `python pipelines/report.py` from {source}; do not edit by hand.",
             "Full ranking over all items, leave-one-out, test split, in %. Mean ± std over the runs (seeds)",
             "of one config; `n` runs. Paper figures alongside.", ""]
    lines += ["## Main results", "",
              "| dataset | model | config | n | " + " | ".join(TABLE_METRICS)
              + " | valid NDCG@10 | best epoch | train s to best | runs |",
              "|---|---|---|---|" + "---|" * len(TABLE_METRICS) + "---|---|---|---|"]
    machines: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        cells = [_fmt(row.get(m)) for m in TABLE_METRICS]
        secs = row.get("seconds_to_best")
        secs = f"{secs['mean']:.0f}" if secs else "-"
        be = row.get("best_epoch")
        best_epoch = "-" if not be else (f"{be['mean']:.0f} ± {be['std']:.0f}" if be["n"] > 1 else f"{be['mean']:.0f}")
        valid = row.get("best/valid/NDCG@10") or row.get("valid/NDCG@10")
        head = heads.get(row["dataset"], {}).get(row["model"])
        mark = " (bf16-ranked †)" if row.get("bf16_ranked") else ""
        lines.append(f"| {row['dataset']} | {row['model']} | {_config_diff(row, head)}{mark} | {len(row['runs'])} | "
                     + " | ".join(cells) + f" | {_fmt(valid)} | {best_epoch} | {secs} | "
                     + ", ".join(link(r) for r in row["runs"]) + " |")
        for machine in row.get("machines", []):
            machines[machine] += [link(r) for r in row["runs"]]
    for (dataset, model), fig in sorted(PAPER.items()):
        cells = [f"{fig[m]:.2f}" if m in fig else "-" for m in TABLE_METRICS]
        label = "paper" if model == "diffurec" else "public re-run"
        lines.append(f"| {dataset} | {model} ({label}) | - | - | " + " | ".join(cells) + " | - | - | - | - |")
        if (dataset, model) in RERUNS:
            ranges = RERUNS[(dataset, model)]
            cells = [f"{ranges[m][0]:.2f}-{ranges[m][1]:.2f}" if m in ranges else "-" for m in TABLE_METRICS]
            lines.append(f"| {dataset} | {model} (published re-runs of the reference code) | - | - | "
                         + " | ".join(cells) + " | - | - | - | - |")
    lines += ["", "Valid NDCG@10 is read at each run's best epoch (the checkpoint tested). Train s to best: "
              "training seconds up to the best epoch, validation excluded."]
    if any(row.get("bf16_ranked") for row in rows):
        lines += ["", f"† {BF16_RANKED_NOTE}"]
    if machines:
        lines += ["Machines: " + "; ".join(f"{m} ({', '.join(runs)})" for m, runs in sorted(machines.items())) + "."]
    lines.append("")
    cut = [row for row in rows if row["budget"]]
    if cut:
        lines += ["Runs tagged with a training budget (not run to early stopping; read them as lower bounds):", ""]
        lines += [f"- {row['dataset']} / {row['model']}: {', '.join(row['budget'])}; best epoch per run "
                  f"{row['epochs_run']}" for row in cut]
        lines.append("")
    if heads:
        lines += ["Configs of the headline rows (`results.json` has each in full, ready for "
                  "`python -m diffurec train --config`):", ""]
        for dataset, models in heads.items():
            for model, row in models.items():
                c = row["config"]
                lines.append(f"- {dataset} / {model}: hidden {c['hidden_size']}, blocks {c['num_blocks']}, "
                             f"heads {c['num_heads']}, T={c['diffusion_steps']}, S={c['reverse_steps']}, "
                             f"{c['noise_schedule']}, lambda {c['lambda_mean']}±{c['lambda_std']}, "
                             f"lr {c['lr']} ({_schedule(c)}), batch {c['batch_size']}, "
                             f"dropout {c['dropout']} / {c['emb_dropout']} (embeddings), "
                             f"label smoothing {c.get('label_smoothing', 0.0)}, "
                             f"{'reference' if c.get('dropout_placement') == 'reference' else 'project'} block, "
                             f"seeds {row['seeds']}")
        lines.append("")
        if plot_validation_curves(heads, runs, out_dir / "validation_curves.png"):
            lines += ["Validation NDCG@10 per epoch of the headline rows' runs (each run's own validation "
                      "epochs; the best one is tested):", "", "![validation curves](validation_curves.png)", ""]
    if precision:
        lines += _precision_lines(precision, rows)
    if protocols:
        lines += _protocol_lines(protocols, rows)
    if abl:
        lines += ["## Ablations", ""]
        for name, points in abl.items():
            png = f"ablation_{name}.png"
            plot_ablation(name, points, out_dir / png)
            note = [ABLATION_NOTES[name], ""] if name in ABLATION_NOTES else []
            finding = _ablation_finding(name, points)
            lines += [f"### {name}", "", *note, f"![{name}]({png})", "", *([" ".join(finding), ""] if finding else []),
                      "| dataset | model | value | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 | run |",
                      "|---|---|---|---|---|---|---|---|"]
            for p in points:
                cells = [f"{100 * p[k]:.2f}" if k in p else "-"
                         for k in ("valid/NDCG@10", "valid/HR@10", "test/NDCG@10", "test/HR@10")]
                mark = " †" if p.get("bf16_ranked") else ""
                lines.append(f"| {p['dataset']} | {p['model']} | {p['label']}{mark} | " + " | ".join(cells)
                             + f" | {link(p['run_id'])} |")
            spreads = []
            for metric in ("valid/NDCG@10", "test/NDCG@10"):
                values = [100 * p[metric] for p in points if metric in p]
                if len(values) > 1:
                    spreads.append(f"{metric} {max(values) - min(values):.2f}")
            if spreads:
                lines += ["", f"Spread across the {len(points)} points (max - min, percentage points): "
                          f"{'; '.join(spreads)}."]
            if any(p.get("bf16_ranked") for p in points):
                lines += ["", f"† {BF16_RANKED_NOTE}"]
            budgets = sorted({p["budget"] for p in points if "budget" in p})
            if budgets:
                lines += ["", f"Training budget of these runs (not early-stopped; compare them with each "
                          f"other, not with the main table): {'; '.join(budgets)}."]
            lines.append("")
    if evals:
        lines += _detailed_lines(evals, link)
    sw = sweeps(runs)
    for sweep in sw:
        lines += _sweep_lines(sweep, out_dir, link)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return {"results_md": str(out_dir / "results.md"), "results_json": str(out_dir / "results.json"),
            "rows": len(rows), "ablations": {k: len(v) for k, v in abl.items()}}
