"""MLflow runs as JSON files kept in the repository, and back into any MLflow store.

The report (``docs/results.md``) is built from these files, so a fresh clone regenerates it
without the machine-local store the runs were tracked in. One file per run,
``<out_dir>/<experiment>/<run_id>.json``: run id, name, experiment, status, start and end time
(ms since the epoch), params, tags, and every metric's full history as
``key -> [[step, timestamp_ms, value], ...]``. No artifacts (checkpoints, plots). The format is
described for users in ``results/README.md``.

Files are stable: keys sorted, indent 1, one metric point per line, so exporting an unchanged
store again rewrites nothing and a changed run shows as a small diff. Machine paths stay out
(:func:`portable_value`): a path inside the repository becomes repository-relative, one beside
it ``../...``, anything else only its last two parts after ``.../`` (enough to name the dataset,
which the report derives from ``data_dir``). Of MLflow's own ``mlflow.*`` tags only those in
:data:`KEPT_MLFLOW_TAGS` are kept (``mlflow.user``, ``mlflow.source.name`` and the like
describe the machine, not the run).

Importing recreates each run through the client API (create_run with its start time,
log_batch of params, tags and every metric point with its step and timestamp, set_terminated
with its status and end time) and tags it ``diffurec.source_run_id`` with the original id; a run
whose id or original id the target experiment already holds is skipped, so importing twice, or
into the store it came from, adds nothing. Nested runs keep their nesting: ``mlflow.parentRunId``
is rewritten to the parent's id in the target store. Exporting an imported run writes it back
under its original id (the tag dropped, the parent's id mapped back), so import, a change in the
UI or by the client (a tag, a note), then export updates the run's own file: no copy appears.

Why not the ``mlflow-export-import`` package: its PyPI release (1.2.0, the newest there) writes
a folder per run whose ``run.json`` carries the export time, user, platform and tracking URI
(never byte-stable, and machine details in the repository), prints on import (the pipelines
print one JSON line), always copies artifacts, pulls pytest and pytest-html in as runtime
dependencies, and on import sets every run FINISHED with a new start time. MLflow's own client
API does all that is needed here in a page of code.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from diffurec.errors import DiffuRecError

FORMAT = 1
SOURCE_TAG = "diffurec.source_run_id"
PARENT_TAG = "mlflow.parentRunId"
# MLflow system tags that describe the run rather than the machine it ran on
KEPT_MLFLOW_TAGS = {"mlflow.runName", PARENT_TAG, "mlflow.source.type", "mlflow.source.git.commit",
                    "mlflow.source.git.branch", "mlflow.note.content"}
TERMINAL = {"FINISHED", "FAILED", "KILLED"}
# JSON has no NaN or infinity: such metric values are written as these strings
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
REQUIRED = ("format", "run_id", "run_name", "experiment", "status", "start_time", "end_time",
            "params", "tags", "metrics")


# ----------------------------------------------------------------------------- portable values

def portable_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` as the repository at ``root`` sees it, without naming the machine."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))  # a relative path: from the cwd
    bases = _bases(root)
    for prefix, anchors in (("", bases), ("..", [b.parent for b in bases])):  # inside first, then beside
        for anchor in anchors:
            if prefix and anchor.parent == anchor:  # the repository sits at "/": nothing is beside it
                continue
            if p.is_relative_to(anchor):
                return str(Path(prefix or ".") / p.relative_to(anchor))
    return ".../" + "/".join(p.parts[-2:])


def _bases(root: str | os.PathLike) -> list[Path]:
    # recorded paths may be symlink-resolved or not: try both spellings of the root
    absolute = Path(os.path.normpath(os.path.abspath(root)))
    resolved = Path(root).resolve()
    return [absolute] if absolute == resolved else [absolute, resolved]


def portable_value(value: str, root: str | os.PathLike) -> str:
    """A param or tag value with machine paths replaced (see the module docstring)."""
    if "\n" not in value:
        if value.startswith(("/", "~/")):
            return portable_path(value, root)
        if value.startswith("file://"):
            return portable_path(urlsplit(value).path, root)
    for base in _bases(root):  # a path inside a longer value (a list, a message)
        value = value.replace(f"{base}/", "")
    return value


def _portable_tags(tags: dict[str, str], root) -> dict[str, str]:
    return {k: portable_value(v, root) for k, v in tags.items()
            if not k.startswith("mlflow.") or k in KEPT_MLFLOW_TAGS}


# ----------------------------------------------------------------------------- file format

def dumps_record(record: dict) -> str:
    """Indent 1, sorted keys, lists of plain values (the metric points) on one line each."""
    return _encode(record, 0) + "\n"


def _encode(value, level: int) -> str:
    pad = " " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_encode(v, level + 1)}"
                 for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [pad + _encode(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * level + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _number(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _float(value: float | str) -> float:
    return NON_FINITE[value] if isinstance(value, str) else float(value)


def folder_name(experiment: str) -> str:
    """A file-system-safe folder for an experiment (the file itself holds the exact name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "_"


def read_runs(in_dir: str | os.PathLike, experiments: list[str] | None = None) -> list[dict]:
    """Every exported run under ``in_dir`` (checked), in file-name order; only ``experiments``
    when given. Bad input raises DiffuRecError naming the file."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise DiffuRecError(f"{in_dir}: exported runs folder not found")
    records, seen = [], {}
    for path in sorted(in_dir.rglob("*.json")):
        record = _check(path)
        if record["run_id"] in seen:
            raise DiffuRecError(f"{path}: run {record['run_id']} is also in {seen[record['run_id']]}")
        seen[record["run_id"]] = path
        if not experiments or record["experiment"] in experiments:
            records.append(record)
    return records


def _check(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffuRecError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(record, dict):
        raise DiffuRecError(f"{path}: expected a JSON object (one exported run)")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise DiffuRecError(f"{path}: missing {', '.join(missing)} (not an exported run?)")
    if record["format"] != FORMAT:
        raise DiffuRecError(f"{path}: format {record['format']!r}, this code reads format {FORMAT}")
    for key in ("params", "tags"):
        if not isinstance(record[key], dict) or not all(isinstance(v, str) for v in record[key].values()):
            raise DiffuRecError(f"{path}: {key} must map names to strings")
    metrics = record["metrics"]
    ok = isinstance(metrics, dict) and all(
        isinstance(points, list) and all(
            isinstance(p, list) and len(p) == 3 and isinstance(p[0], int) and isinstance(p[1], int)
            and (isinstance(p[2], (int, float)) or p[2] in NON_FINITE) for p in points)
        for points in metrics.values())
    if not ok:
        raise DiffuRecError(f"{path}: metrics must map each key to a list of [step, timestamp_ms, value]")
    return record


def latest_metrics(record: dict) -> dict[str, float]:
    """Each metric's latest value, chosen as MLflow chooses ``run.data.metrics``: the point with
    the largest (step, timestamp, value), a NaN counting as 0."""
    return {k: _float(max(points, key=lambda p: _order(p[0], p[1], _float(p[2])))[2])
            for k, points in record["metrics"].items() if points}


def _order(step: int, timestamp: int, value: float) -> tuple:
    return step, timestamp, 0.0 if math.isnan(value) else value


# ----------------------------------------------------------------------------- export / import

def _client(tracking_uri: str, must_exist: bool):
    import mlflow

    # MLflow would create an empty database at a mistyped sqlite path and find nothing in it
    if must_exist and tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):].split("?")[0]
        if not path.startswith("file:") and not Path(path).is_file():
            raise DiffuRecError(f"no MLflow store at {tracking_uri}")
    return mlflow.MlflowClient(tracking_uri)


def _all_runs(client, experiment_ids: list[str], filter_string: str = ""):
    from mlflow.exceptions import MlflowException

    token = None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        except MlflowException as exc:
            raise DiffuRecError(f"run filter {filter_string!r}: {exc.message}") from None
        yield from page
        token = page.token
        if not token:
            return


def run_record(client, run, experiment: str, root: str | os.PathLike = ".",
               source_ids: dict[str, str] | None = None) -> dict:
    """One run as its exported record (see the module docstring). ``source_ids`` maps a store's
    run id to the id it was imported from, for the run and its parent."""
    info = run.info
    source_ids = source_ids or {}
    tags = _portable_tags(run.data.tags, root)
    # an imported run exports as the run it was imported from: import -> edit -> export updates
    # that run's file instead of adding a copy under the store's new id
    run_id = tags.pop(SOURCE_TAG, info.run_id)
    if tags.get(PARENT_TAG) in source_ids:
        tags[PARENT_TAG] = source_ids[tags[PARENT_TAG]]
    metrics = {}
    for key in sorted(run.data.metrics):
        history = client.get_metric_history(info.run_id, key)
        history = sorted(history, key=lambda m: _order(m.step, m.timestamp, m.value))
        metrics[key] = [[m.step, m.timestamp, _number(m.value)] for m in history]
    return {"format": FORMAT, "run_id": run_id, "run_name": info.run_name, "experiment": experiment,
            "status": info.status, "start_time": info.start_time, "end_time": info.end_time,
            "params": {k: portable_value(v, root) for k, v in run.data.params.items()},
            "tags": tags, "metrics": metrics}


def export_runs(tracking_uri: str, out_dir: str | os.PathLike, experiments: list[str] | None = None,
                run_filter: str | None = None, root: str | os.PathLike = ".") -> dict:
    """Write every active run of the store (only ``experiments`` and runs matching the MLflow
    search filter ``run_filter`` when given) to ``out_dir``; ``root`` is the repository that
    machine paths are made relative to. Files whose content is unchanged are not rewritten."""
    client = _client(tracking_uri, must_exist=True)
    exps = {e.name: e for e in client.search_experiments()}
    missing = sorted(set(experiments or []) - set(exps))
    if missing:
        raise DiffuRecError(f"no MLflow experiment named {', '.join(missing)} in {tracking_uri}")
    names = sorted(experiments or exps)
    out_dir = Path(out_dir)
    exported = changed = 0
    selected = {n: list(_all_runs(client, [exps[n].experiment_id], run_filter or "")) for n in names}
    # every imported run's original id, for parents too; a filter may leave a parent out, and only
    # then is the store searched a second time
    everyone = ([r for runs in selected.values() for r in runs] if not run_filter
                else _all_runs(client, [exps[n].experiment_id for n in names]))
    source_ids = {run.info.run_id: run.data.tags[SOURCE_TAG] for run in everyone if SOURCE_TAG in run.data.tags}
    for name in names:
        for run in selected[name]:
            record = run_record(client, run, name, root, source_ids)
            path = out_dir / folder_name(name) / f"{record['run_id']}.json"
            text = dumps_record(record)
            exported += 1
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                changed += 1
    return {"exported": exported, "changed": changed, "experiments": names, "out": str(out_dir)}


def import_runs(in_dir: str | os.PathLike, tracking_uri: str, experiments: list[str] | None = None) -> dict:
    """Recreate the exported runs under ``in_dir`` in the store at ``tracking_uri`` (experiments
    by name, created when missing); runs already there are skipped (see the module docstring)."""
    records = read_runs(in_dir, experiments)  # bad files fail here, before anything is written
    if not records:
        raise DiffuRecError(f"{in_dir}: no exported runs" + (f" of {', '.join(experiments)}" if experiments else ""))
    from mlflow.entities import Metric, Param, RunTag

    from diffurec.tracking import ensure_experiment

    client = _client(tracking_uri, must_exist=False)
    exp_ids = {name: ensure_experiment(tracking_uri, name) for name in sorted({r["experiment"] for r in records})}
    known: dict[str, str] = {}  # run id or original id -> the run's id in the target store
    for run in _all_runs(client, list(exp_ids.values())):
        known[run.info.run_id] = run.info.run_id
        if SOURCE_TAG in run.data.tags:
            known[run.data.tags[SOURCE_TAG]] = run.info.run_id
    by_id = {r["run_id"]: r for r in records}
    placed: dict[str, str] = {}
    counts = {"imported": 0, "skipped": 0}

    def place(record: dict) -> str:
        source = record["run_id"]
        if source in placed:
            return placed[source]
        original = record["tags"].get(SOURCE_TAG, source)  # a run exported from an import
        target = known.get(source) or known.get(original)
        if target:
            counts["skipped"] += 1
            placed[source] = target
            return target
        placed[source] = source  # a guard: a parent cycle stops here instead of recursing
        tags = dict(record["tags"], **{SOURCE_TAG: original})
        parent = tags.get(PARENT_TAG)
        if parent in by_id and parent != source:
            tags[PARENT_TAG] = place(by_id[parent])  # parents first: the child names its new id
        run_id = client.create_run(exp_ids[record["experiment"]], start_time=record["start_time"],
                                   run_name=record["run_name"]).info.run_id
        try:
            params = [Param(k, v) for k, v in sorted(record["params"].items())]
            run_tags = [RunTag(k, v) for k, v in sorted(tags.items())]
            points = [Metric(k, _float(v), ts, step) for k, pts in sorted(record["metrics"].items())
                      for step, ts, v in pts]
            for i in range(0, len(params), 100):  # MLflow's per-request limits
                client.log_batch(run_id, params=params[i:i + 100])
            for i in range(0, len(run_tags), 100):
                client.log_batch(run_id, tags=run_tags[i:i + 100])
            for i in range(0, len(points), 1000):
                client.log_batch(run_id, metrics=points[i:i + 1000])
            if record["status"] in TERMINAL:
                client.set_terminated(run_id, record["status"], end_time=record["end_time"])
            elif record["status"] != "RUNNING":
                client.update_run(run_id, status=record["status"])
        except BaseException:
            client.delete_run(run_id)  # no half-imported run; a deleted one is retried next time
            raise
        counts["imported"] += 1
        placed[source] = known[source] = run_id
        return run_id

    for record in records:
        place(record)
    return {**counts, "experiments": sorted(exp_ids), "tracking_uri": tracking_uri}
