"""Hyper-parameter sweep: Ray Tune (OptunaSearch TPE + ASHA) over Ray Train trials, tracked in MLflow.

    python pipelines/tune.py [--data DIR] [--space tune_spaces/FILE.yaml] [--num-samples N]
        [--max-concurrent N] [--workers-per-trial N] [--use-gpu] [--set key=value ...]
        [--name NAME] [--resume NAME] [--mlflow-uri URI]
        [--cpus-per-worker X] [--experiment NAME] [--registered-model NAME] [--max-failures N]

With no arguments it runs a small sweep of ``tune_spaces/default.yaml`` on a synthetic log (written
and split once under ``<output_dir>/data/synthetic``) with a tiny model, on a local Ray and the
local MLflow store ``<output_dir>/mlflow.db``. ``--data`` takes a prepared dataset (or a raw log,
split once into ``<output_dir>/data/<name>-prepared``); then the model is Config's defaults plus the
space's ``fixed`` and ``--set``. On success the last stdout line is one JSON object with
``experiment``, ``name``, ``best_config``, ``best_metrics``, ``best_checkpoint``,
``mlflow_parent_run_id`` (and a few more keys). User errors print ``error: ...`` and exit 2; an
interrupted sweep (SIGINT/SIGTERM) prints a JSON line with ``"interrupted": true`` and exits 130,
and ``--resume NAME`` continues it with ``Tuner.restore``.

How a trial runs: each trial is a function trainable that builds ``pipelines/train.py``'s
TorchTrainer (Train V2; possibly several DDP workers) and forwards its per-epoch reports to Tune
with ``TuneReportCallback``. The trial function itself holds almost no resources; the Train
workers hold ``--cpus-per-worker`` CPUs each (fractional by default, so two trials share 2 CPUs).
A trial that cannot fit the cluster is refused before the sweep starts (local cluster) or fails
after ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (default here 60 s) instead of hanging.

MLflow: one parent run per sweep (space, sweep settings, best metrics, Optuna plots as HTML, the
best config as YAML); one child run per trial, created by the Train worker (rank 0) with the
parent's id, tagged ``trial_id`` and, when the trial ends, ``trial_status`` = completed /
stopped_by_asha / failed (run status FINISHED / KILLED / FAILED). The best trial's model is
registered in the model registry. See docs/tune.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as `python pipelines/tune.py` without installing
    sys.path.insert(0, str(_REPO))

from diffurec import spaces  # noqa: E402
from diffurec.config import Config  # noqa: E402
from diffurec.errors import DiffuRecError  # noqa: E402
from pipelines._common import init_ray, new_run_name, print_error  # noqa: E402

METRIC = "valid/NDCG@10"
CHAMPION_ALIAS = "champion"  # the registry alias set on the best trial's registered version
MODE = "max"
DEFAULT_SPACE = _REPO / "tune_spaces" / "default.yaml"
DEFAULT_EXPERIMENT = "diffurec-tune"
# the no-argument sweep: a tiny model on a small synthetic log, a handful of trials
QUICK_CONFIG = {"hidden_size": 32, "num_blocks": 1, "num_heads": 2, "max_len": 20, "epochs": 4,
                "batch_size": 128, "eval_batch_size": 512, "patience": 4, "threads": 1}
QUICK_SAMPLES = 6
SYNTHETIC_LOG = {"num_users": 500, "num_items": 120, "mean_length": 12, "seed": 0}
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
STATUS_TAG = "trial_status"
# the trial function only waits on its TorchTrainer: a sliver of a CPU (Tune refuses 0)
TRIAL_DRIVER_CPU = 0.01
RUN_STATUS = {"completed": "FINISHED", "stopped_by_asha": "KILLED", "failed": "FAILED",
              "interrupted": "KILLED"}


def log(msg: str) -> None:
    print(f"[tune] {msg}", file=sys.stderr, flush=True)


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipelines/tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="prepared dataset dir (or a raw log, split once); default: synthetic")
    p.add_argument("--space", default=None, help="search space YAML (default tune_spaces/default.yaml)")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples; 6 on synthetic)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once (default 2)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train (DDP) workers per trial")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Config override for every trial (repeatable)")
    p.add_argument("--name", help="sweep name (default tune-<time>-<hex>)")
    p.add_argument("--resume", metavar="NAME", help="continue an interrupted sweep with Tuner.restore")
    p.add_argument("--mlflow-uri", help="tracking URI (default MLFLOW_TRACKING_URI or <output_dir>/mlflow.db)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per Train worker (default: the cluster's CPUs shared by the concurrent "
                        "trials' workers, at most 1)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment ({DEFAULT_EXPERIMENT})")
    p.add_argument("--registered-model", help="registry name for the best model (default: <experiment>-best)")
    p.add_argument("--max-failures", type=int, default=1, help="retries per trial: Ray Train restarts its worker group, Tune retries a trial whose "
                   "process was lost (a node gone); both resume from the last checkpoint (default 1)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    return p.parse_args(argv)


def _sets(assignments: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in assignments or []:
        if "=" not in item:
            raise DiffuRecError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in Config.keys() and key not in spaces.SPECIAL_KEYS:
            raise DiffuRecError(f"--set: unknown config key '{key}' (known keys: {', '.join(Config.keys())})")
        out[key] = yaml.safe_load(raw) if raw.strip() else raw
    return out


# ---- the sweep's setup ------------------------------------------------------------------------
def build_base(space: spaces.SearchSpace, sets: dict[str, Any], quick: bool) -> Config:
    """Config() (+ the tiny model when quick) + the space's ``fixed`` + ``--set``; checked, with
    every corner of the space, before Ray starts."""
    base = Config().with_overrides(QUICK_CONFIG, source="quick sweep defaults") if quick else Config()
    cfg = space.base_config(base, {k: v for k, v in sets.items() if k not in spaces.SPECIAL_KEYS})
    if "eval_every" in space.params or cfg.eval_every != 1:
        raise DiffuRecError(f"{space.path}: key 'eval_every': a sweep evaluates every epoch (ASHA stops "
                            "trials on the per-epoch validation NDCG@10); leave eval_every at 1")
    sp = {**space.specials(), **{k: v for k, v in sets.items() if k in spaces.SPECIAL_KEYS}}
    if sp:
        space.fixed.update(sp)
        spaces._check_reverse_steps(space)
    spaces.check_space(space, cfg)
    return cfg


def prepare_data(data: str | None, output: Path, cfg: Config) -> str:
    from diffurec.data.sequences import is_prepared_dataset, write_split

    if data is None:
        out = output / "data" / "synthetic"
        if not is_prepared_dataset(out):
            from diffurec.data.synthetic import write_synthetic_log

            log_path = output / "data" / "synthetic_log.parquet"
            write_synthetic_log(log_path, **SYNTHETIC_LOG)
            write_split(log_path, out, overwrite=True)
            log(f"wrote the synthetic dataset to {out}")
        return str(out.resolve())
    path = Path(data).expanduser()
    if is_prepared_dataset(path):
        return str(path.resolve())
    if not path.exists():
        raise DiffuRecError(f"--data {data}: no such file or directory")
    out = output / "data" / f"{path.name.split('.')[0]}-prepared"
    if not is_prepared_dataset(out):
        log(f"--data {data} is a raw log: splitting it into {out}")
        write_split(path, out, min_user=cfg.min_user, min_item=cfg.min_item, overwrite=True)
    return str(out.resolve())



def worker_resources(args, cluster: dict[str, float], started_here: bool) -> dict[str, float]:
    """Per-worker resources, and a refusal (before any trial) when a trial can never fit."""
    workers = args.workers_per_trial
    if args.cpus_per_worker is not None:
        cpw = args.cpus_per_worker
    else:
        # what is left after the trial functions' slivers, shared by the concurrent trials' workers
        total = cluster.get("CPU", 1.0) - args.max_concurrent * TRIAL_DRIVER_CPU
        cpw = min(1.0, total / max(1, args.max_concurrent * workers))
        cpw = max(0.1, math.floor(cpw * 100) / 100)
    res = {"CPU": cpw}
    if args.use_gpu:
        res["GPU"] = 1.0
    for kind, per in res.items():
        need = per * workers + (TRIAL_DRIVER_CPU if kind == "CPU" else 0.0)
        have = cluster.get(kind, 0.0)
        if need > have + 1e-9:
            msg = (f"a trial needs {need:g} {kind} ({workers} workers x {per:g}) but the cluster has "
                   f"{have:g}: lower --workers-per-trial / --cpus-per-worker")
            if started_here:
                raise DiffuRecError(msg)
            log(f"warning: {msg}; trials wait for the autoscaler and fail after "
                f"{os.environ.get(START_TIMEOUT_ENV, '60')} s")
    return res


# ---- one trial --------------------------------------------------------------------------------
def run_trial(sampled: dict, setup: dict) -> None:
    """Tune's function trainable: one TorchTrainer (Train V2) whose reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import train as train_pipeline

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = spaces.trial_config(Config.from_dict(setup["base"]), sampled, source=f"trial {trial_id}")
    os.environ.setdefault(START_TIMEOUT_ENV, str(setup["start_timeout"]))  # propagated to Train
    # Tune holds no checkpoint of its own here (TuneReportCallback forwards the checkpoint path
    # only); a restored trial resumes through Ray Train, whose run has the same name and storage.
    if tune.get_checkpoint() is not None:
        log(f"trial {trial_id}: Tune restored a checkpoint; Ray Train resumes from its own storage")
    tags = {"trial_id": trial_id, "trial_name": ctx.get_trial_name(), "sweep": setup["name"]}
    if spaces.REVERSE_FRACTION in sampled:
        tags[spaces.REVERSE_FRACTION] = str(sampled[spaces.REVERSE_FRACTION])
    trainer = train_pipeline.make_trainer(
        cfg, setup["data_dir"], num_workers=setup["workers"], use_gpu=setup["use_gpu"],
        name=f"{setup['name']}-{trial_id}", storage_path=setup["train_storage"],
        mlflow_uri=setup["mlflow_uri"], experiment=setup["experiment"],
        parent_run_id=setup["parent_run_id"], resources_per_worker=setup["resources"],
        max_failures=setup["max_failures"], callbacks=[TuneReportCallback()], tags=tags,
        log_model=False,  # only the best trial's model is logged (and registered) by the sweep
        finish_run=False)  # the driver marks the run (ChildRunStatus, then finish()): one writer
    trainer.fit()


# ---- trial outcome -> MLflow ------------------------------------------------------------------
def classify(history: list[dict], error: bool, cfg: Config) -> str:
    """completed (all epochs, or early-stopped by patience), stopped_by_asha, or failed."""
    if error:
        return "failed"
    if not history:
        return "stopped_by_asha"
    last_epoch = max(int(r.get("epoch", r.get("training_iteration", 0)) or 0) for r in history)
    if last_epoch >= cfg.epochs:
        return "completed"
    values = [r.get(METRIC) for r in history if r.get(METRIC) is not None]
    if values:
        best = max(range(len(values)), key=lambda i: values[i])  # first best
        if len(values) - 1 - best >= cfg.patience:
            return "completed"
    return "stopped_by_asha"


def find_child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=5000)


def mark_child(client, run_id: str, status: str, extra_tags: dict | None = None) -> None:
    client.set_tag(run_id, STATUS_TAG, status)
    for k, v in (extra_tags or {}).items():
        client.set_tag(run_id, k, str(v))
    client.set_terminated(run_id, status=RUN_STATUS[status])


def reap_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead (driver side).

    A trial stopped by ASHA (or finishing) kills its Train controller; the controller's worker
    placement group outlives it (placement groups live as long as the job) and would starve the
    next trials. Ray Train's own PlacementGroupCleaner does this through the state API, which
    needs the dashboard and an unambiguous cluster address; this does the same from the GCS table.
    """
    import ray
    from ray._private.state import state
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    try:
        accessor = state._global_state_accessor
        if accessor is None:
            return 0
        job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
        for raw in accessor.get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            nil_creator = set(pg.creator_actor_id) <= {0xFF}
            if (pg.state == gcs_pb2.PlacementGroupTableData.CREATED and not pg.is_detached
                    and pg.creator_job_id == job_id  # only this sweep's own
                    and not nil_creator and pg.creator_actor_dead):
                remove_placement_group(PlacementGroup(PlacementGroupID(pg.placement_group_id)))
                removed += 1
    except Exception as exc:  # private API: never let it stop a sweep
        if ray.is_initialized():
            log(f"could not check for orphaned placement groups: {exc}")
    return removed


# the driver's view of the sweep, shared with run_tuner (Tune may copy its callbacks)
_PROGRESS: dict[str, Any] = {}


def _make_status_callback(setup: dict):
    from ray.tune import Callback

    class ChildRunStatus(Callback):
        """Marks each trial's child run as soon as Tune finishes with it (the sweep's final
        reconciliation repeats this from the results)."""

        def __init__(self):
            self.history: dict[str, list[dict]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.history.setdefault(trial.trial_id, []).append(
                {k: result.get(k) for k in ("epoch", "training_iteration", METRIC)})

        def _mark(self, trial, error: bool):
            try:
                import mlflow

                client = mlflow.MlflowClient(setup["mlflow_uri"])
                run_id = (trial.last_result or {}).get("mlflow_run_id")
                if not run_id:
                    runs = client.search_runs(
                        [setup["experiment_id"]],
                        f"tags.trial_id = '{trial.trial_id}' and tags.mlflow.parentRunId = '{setup['parent_run_id']}'")
                    run_id = runs[0].info.run_id if runs else None
                if run_id is None:
                    return
                cfg = spaces.trial_config(Config.from_dict(setup["base"]), trial.config)
                mark_child(client, run_id, classify(self.history.get(trial.trial_id, []), error, cfg))
            except Exception as exc:  # never let bookkeeping stop the sweep
                log(f"could not mark the MLflow run of trial {trial.trial_id}: {exc}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._mark(trial, error=False)
            reap_orphaned_placement_groups()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, error=True)
            reap_orphaned_placement_groups()

        def on_step_end(self, iteration, trials, **info):
            # the last step before Tune stops tells whether the sweep ran out or was interrupted
            _PROGRESS["trials"] = len(trials)
            _PROGRESS["unfinished"] = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
            now = time.monotonic()
            if now - _PROGRESS.get("reaped_at", 0.0) > 5.0:
                _PROGRESS["reaped_at"] = now
                reap_orphaned_placement_groups()

    return ChildRunStatus()


# ---- results -> summary, plots, registry --------------------------------------------------------
def trial_records(results, base: Config) -> list[dict]:
    """One dict per trial: id, sampled config, per-epoch history, status, best metrics, run id."""
    records = []
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    for i, res in enumerate(results):
        trial_id = res.metrics.get("trial_id") if res.metrics else None
        if trial_id is None and trials is not None and i < len(trials):
            trial_id = trials[i].trial_id
        df = res.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        sampled = dict(res.config or {})
        cfg = spaces.trial_config(base, sampled)
        best_row = None
        for row in history:
            v = row.get(METRIC)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                if best_row is None or v > best_row[METRIC]:
                    best_row = row
        run_id = None
        for row in reversed(history):
            if row.get("mlflow_run_id"):
                run_id = row["mlflow_run_id"]
                break
        ckpt = None
        for row in reversed(history):
            p = row.get("checkpoint_path")
            if isinstance(p, str) and p:
                ckpt = p
                break
        records.append({
            "trial_id": trial_id, "sampled": sampled, "config": cfg, "history": history,
            "status": classify(history, res.error is not None, cfg), "error": res.error,
            "best": best_row, "run_id": run_id, "checkpoint_dir": ckpt,
        })
    return records


def best_metrics(row: dict) -> dict:
    keep = ("epoch",)
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in row.items()
            if (k.startswith(("valid/", "train/", "test/")) or k in keep)
            and v is not None and not (isinstance(v, float) and math.isnan(v))}


def build_study(space: spaces.SearchSpace, records: list[dict]):
    """An Optuna study of the finished trials (ASHA-stopped ones count with the best value they
    reached; their per-epoch values are intermediate values)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for key, d in space.params.items():
        if d.kind == "choice":
            dists[key] = CategoricalDistribution(list(d.choices))
        elif d.kind in ("uniform", "loguniform"):
            dists[key] = FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
        elif d.kind in ("int", "logint"):
            dists[key] = IntDistribution(d.low, d.high, log=d.kind == "logint")
    study = optuna.create_study(direction="maximize", study_name="sweep")
    for rec in records:
        params = {k: rec["sampled"][k] for k in dists if k in rec["sampled"]}
        inter = {}
        for row in rec["history"]:
            v = row.get(METRIC)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                inter[int(row.get("epoch") or row.get("training_iteration") or len(inter) + 1)] = float(v)
        value = rec["best"][METRIC] if rec["best"] else None
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, value=value, state=state,
            intermediate_values=inter,
            user_attrs={"trial_id": rec["trial_id"], "status": rec["status"],
                        "reverse_steps": rec["config"].reverse_steps,
                        "diffusion_steps": rec["config"].diffusion_steps}))
    return study


def write_plots(study, records: list[dict], out_dir: Path) -> list[Path]:
    """Optuna's plots plus metric-vs-reverse_steps, as self-contained HTML files."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str, make) -> None:
        path = out_dir / f"{name}.html"
        try:
            fig = make()
        except Exception as exc:  # e.g. importance needs 2+ finished trials with varying params
            path.write_text(f"<html><body><h3>{name}</h3><p>not available: {exc}</p></body></html>")
        else:
            fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        written.append(path)

    save("optimization_history", lambda: vis.plot_optimization_history(study, target_name=METRIC))
    save("param_importances", lambda: vis.plot_param_importances(study, target_name=METRIC))
    save("parallel_coordinate", lambda: vis.plot_parallel_coordinate(study, target_name=METRIC))
    save("intermediate_values", lambda: vis.plot_intermediate_values(study))

    def reverse_steps_fig():
        pts = [(r["config"].reverse_steps, r["best"][METRIC], r["config"].diffusion_steps,
                r["config"].noise_schedule, r["trial_id"], r["status"]) for r in records if r["best"]]
        if not pts:
            raise ValueError("no trial reported a validation metric")
        fig = go.Figure(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
            marker={"size": 11, "color": [p[2] for p in pts], "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": "diffusion_steps"}},
            text=[f"trial {p[4]} ({p[5]})<br>T={p[2]} {p[3]}" for p in pts],
            hovertemplate="reverse_steps=%{x}<br>" + METRIC + "=%{y:.4f}<br>%{text}<extra></extra>"))
        fig.update_layout(title=f"{METRIC} vs reverse_steps (best epoch of each trial)",
                          xaxis_title="reverse_steps", yaxis_title=METRIC)
        return fig

    save("metric_vs_reverse_steps", reverse_steps_fig)
    return written


def write_importances(study, out_dir: Path, sweep: str) -> list[Path]:
    """fANOVA and PED-ANOVA importances (``diffurec.importance``) as JSON and a PNG; none when the
    study cannot support them (fewer than 2 finished trials, nothing varied)."""
    from diffurec.importance import importance_rows, param_importances, plot_importances

    try:
        imp = param_importances(study)
    except Exception as exc:  # noqa: BLE001 - Optuna's own message says what is missing
        log(f"parameter importances not computed: {exc}")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "importances.json").write_text(json.dumps(
        {"metric": METRIC, "trials": len(study.trials), "rows": importance_rows(imp)}, indent=1))
    plot_importances(imp, out_dir / "importances.png", f"{sweep}: what each knob is worth ({METRIC})")
    return [out_dir / "importances.json", out_dir / "importances.png"]


def register_best(uri: str, run_id: str | None, checkpoint: str | None, model_name: str,
                  sweep: str) -> dict | None:
    """Log the best trial's model (from best.pt) into its child run and register it."""
    if not run_id or not checkpoint or not Path(checkpoint).is_file():
        log("no checkpoint to register (best trial has no best.pt)")
        return None
    from diffurec.tracking import MLflowRun
    from diffurec.training import load_checkpoint

    # reopen=False: the run keeps its status (a best trial stopped by ASHA stays KILLED)
    tracker = MLflowRun(uri, run_id=run_id, reopen=False)
    model, _, _ = load_checkpoint(checkpoint, "cpu")
    info = tracker.log_model(model, registered_model_name=model_name)
    version = info.registered_model_version
    alias = None
    if version is not None:
        tracker.client.set_model_version_tag(model_name, str(version), "sweep", sweep)
        # the sweep's best becomes the registered model's champion (an alias: stages are deprecated),
        # moved from any earlier version; `models:/<name>@champion` then names it for
        # pipelines/recommend.py and `python -m diffurec recommend` (docs/recommend.md)
        tracker.client.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(version))
        alias = CHAMPION_ALIAS
    return {"name": model_name, "version": str(version), "model_uri": info.model_uri, "alias": alias}


# ---- main -------------------------------------------------------------------------------------
def sweep_dir(output: Path, name: str) -> Path:
    return output / "sweeps" / name


def main(argv: list[str] | None = None) -> int:
    began = time.time()
    args = parse_args(argv)
    if args.resume and args.name and args.name != args.resume:
        raise DiffuRecError("--resume NAME continues sweep NAME; --name must be the same or left out")
    for opt in ("num_samples", "max_concurrent", "workers_per_trial"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise DiffuRecError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise DiffuRecError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    sets = _sets(args.set)
    output = Path(str(sets.get("output_dir", Config().output_dir))).expanduser().resolve()

    if args.resume:
        meta_path = sweep_dir(output, args.resume) / "sweep.json"
        if not meta_path.is_file():
            raise DiffuRecError(f"--resume {args.resume}: no sweep at {meta_path} (same --set output_dir?)")
        meta = json.loads(meta_path.read_text())
        for key in ("space", "num_samples", "max_concurrent", "workers_per_trial", "use_gpu",
                    "cpus_per_worker", "experiment", "registered_model", "max_failures", "seed", "data"):
            setattr(args, key, meta["args"][key])
        sets = meta["sets"]
        args.mlflow_uri = args.mlflow_uri or meta["mlflow_uri"]
        name = args.resume
    else:
        meta = None
        name = args.name or new_run_name("tune")

    space_path = Path(args.space) if args.space else DEFAULT_SPACE
    space = spaces.load_space(space_path)
    quick = args.data is None
    base = build_base(space, sets, quick)
    num_samples = args.num_samples or (QUICK_SAMPLES if quick else space.num_samples or 8)
    registered = args.registered_model or f"{args.experiment}-best"

    from diffurec.tracking import MLflowRun, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(args.mlflow_uri, output)
    experiment_id = ensure_experiment(uri, args.experiment)
    data_dir = prepare_data(args.data, output, base)
    sdir = sweep_dir(output, name)
    storage = output / "ray_results"
    exp_path = storage / name
    if meta is None and (sdir / "sweep.json").exists():
        raise DiffuRecError(f"sweep '{name}' already exists at {sdir}; pass --resume {name} to continue it")

    import ray

    connected_here = init_ray()
    started_here = connected_here and not os.environ.get("RAY_ADDRESS")
    try:
        cluster = ray.cluster_resources()
        resources = worker_resources(args, cluster, started_here)
        fits = math.floor(cluster.get("CPU", 0) / (resources["CPU"] * args.workers_per_trial + TRIAL_DRIVER_CPU)
                          + 1e-9)
        max_concurrent = args.max_concurrent
        if started_here and fits < max_concurrent:
            log(f"only {fits} trial(s) fit this machine's {cluster.get('CPU', 0):g} CPUs at once; "
                f"running {fits} at a time")
            max_concurrent = max(1, fits)

        if meta is None:
            parent = MLflowRun(uri, experiment=args.experiment, run_name=name,
                               tags={"sweep": name, "space": str(space_path), "data": data_dir,
                                     "kind": "sweep"})
            parent.log_params({
                **{f"space.{k}": v for k, v in space.describe().items()},
                **{f"fixed.{k}": v for k, v in {**space.fixed, **sets}.items()},
                "sweep.num_samples": num_samples, "sweep.max_concurrent": max_concurrent,
                "sweep.workers_per_trial": args.workers_per_trial, "sweep.cpus_per_worker": resources["CPU"],
                "sweep.use_gpu": args.use_gpu, "sweep.search": f"optuna-tpe(seed={args.seed})",
                "sweep.scheduler": "asha", "sweep.metric": METRIC, "sweep.data": data_dir,
                "sweep.space_file": str(space_path)})
            sdir.mkdir(parents=True, exist_ok=True)
            meta = {"name": name, "parent_run_id": parent.run_id, "mlflow_uri": uri, "sets": sets,
                    "data_dir": data_dir, "experiment_path": str(exp_path),
                    "args": {"space": str(space_path.resolve()), "num_samples": num_samples,
                             "max_concurrent": args.max_concurrent,
                             "workers_per_trial": args.workers_per_trial, "use_gpu": args.use_gpu,
                             "cpus_per_worker": args.cpus_per_worker, "experiment": args.experiment,
                             "registered_model": args.registered_model, "max_failures": args.max_failures,
                             "seed": args.seed, "data": args.data}}
            (sdir / "sweep.json").write_text(json.dumps(meta, indent=1))
        else:
            parent = MLflowRun(uri, experiment=args.experiment, run_id=meta["parent_run_id"])
            parent.set_tags({"resumed": "true"})
        log(f"sweep {name}: {num_samples} trials of {space_path} on {data_dir}; MLflow {uri} "
            f"(parent run {parent.run_id}); Ray results {exp_path}")

        setup = {"name": name, "base": base.to_dict(), "data_dir": data_dir, "workers": args.workers_per_trial,
                 "use_gpu": args.use_gpu, "resources": resources, "mlflow_uri": uri,
                 "experiment": args.experiment, "experiment_id": experiment_id,
                 "parent_run_id": parent.run_id, "train_storage": str(storage / f"{name}-trials"),
                 "max_failures": args.max_failures,
                 "start_timeout": float(os.environ.get(START_TIMEOUT_ENV, 60))}
        results, interrupted = run_tuner(args, space, base, setup, num_samples, max_concurrent,
                                         storage, name, resume=args.resume is not None)
        rc, payload = finish(args, results, interrupted, space, base, setup, parent, registered, sdir,
                             exp_path, began)
    finally:
        if connected_here:
            # flushes the workers' output first (a joined cluster's too: a lost node's last log
            # lines arrive late), so the summary is the last line
            ray.shutdown()
    print(json.dumps(payload, default=str), flush=True)
    return rc


def param_space(space: spaces.SearchSpace) -> dict:
    from ray import tune

    out = {}
    for key, d in space.params.items():
        if d.kind == "choice":
            out[key] = tune.choice(list(d.choices))
        elif d.kind == "const":
            out[key] = d.choices[0]
        elif d.kind == "uniform":
            out[key] = tune.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(d.low, d.high)
        elif d.kind == "int":
            out[key] = tune.randint(d.low, d.high + 1)  # Tune's upper bound is exclusive
        elif d.kind == "logint":
            out[key] = tune.lograndint(d.low, d.high + 1)
    return out


def make_searcher(seed: int, num_samples: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, num_samples // 2)))
    return OptunaSearch(metric=METRIC, mode=MODE, sampler=sampler)


def make_scheduler(base: Config, epochs: int):
    """ASHA (grace period 2, reduction factor 2) that stops weak trials but never one at its own
    last epoch.

    A stop kills the trial's workers right after its report, before they test the best model
    and log artifacts, and stopping a trial that has trained every epoch saves nothing. ASHA
    stops any trial reaching ``max_t`` (so ``max_t`` is one past the longest trial) and may
    also stop at a rung that falls on a trial's last epoch (``epochs`` a power of two).
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LastEpochKeepingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                last = spaces.trial_config(base, dict(trial.config or {})).epochs
                if result.get(self._time_attr, 0) >= last:
                    self._num_stopped -= 1
                    return TrialScheduler.CONTINUE
            return action

    # time is the epoch the trial reports, not Tune's iteration count: a trial restored from its
    # checkpoint reports its real epoch, so a resumed sweep keeps its rungs
    return LastEpochKeepingASHA(time_attr="epoch", max_t=epochs + 1,
                                grace_period=min(2, epochs), reduction_factor=2)


def run_tuner(args, space, base, setup, num_samples, max_concurrent, storage: Path, name: str,
              resume: bool):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_DRIVER_CPU})
    # a SIGTERM (ray job stop, kill) takes the same graceful path as Ctrl+C: Tune saves its state
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    callbacks = [_make_status_callback(setup)]
    if resume:
        path = str(storage / name)
        if not tune.Tuner.can_restore(path):
            raise DiffuRecError(f"--resume {name}: no Tune experiment state at {path}")
        log(f"resuming sweep {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, param_space=param_space(space))
        # the restored RunConfig holds unpickled copies of the callbacks: use this process's
        run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
        if run_config is not None:
            run_config.callbacks = callbacks
    else:
        scheduler = make_scheduler(base, int(spaces.max_value(space, base, "epochs")))
        tuner = tune.Tuner(
            trainable, param_space=param_space(space),
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(args.seed, num_samples),
                                        scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures), verbose=1))
    _PROGRESS.clear()
    results = tuner.fit()
    # Tune returns normally after a SIGINT; the last step's view says whether trials were cut off
    interrupted = bool(_PROGRESS.get("unfinished")) or _PROGRESS.get("trials", num_samples) < num_samples
    return results, interrupted


def finish(args, results, interrupted, space, base, setup, parent, registered, sdir: Path,
           exp_path: Path, began: float) -> int:
    import mlflow

    client = mlflow.MlflowClient(setup["mlflow_uri"])
    records = trial_records(results, base)
    by_run = {}
    for rec in records:
        run_id = rec["run_id"]
        if run_id is None and rec["trial_id"]:
            runs = client.search_runs([setup["experiment_id"]],
                                      f"tags.trial_id = '{rec['trial_id']}' and "
                                      f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                      order_by=["attributes.start_time DESC"])
            run_id = rec["run_id"] = runs[0].info.run_id if runs else None
        if run_id:
            by_run[run_id] = rec
    # final reconciliation of the child runs (also catches runs left RUNNING by a killed worker)
    for run in find_child_runs(client, setup["experiment_id"], parent.run_id):
        rid = run.info.run_id
        rec = by_run.get(rid)
        cut_off = interrupted and rec is not None and rec["trial_id"] in _PROGRESS.get("unfinished", [])
        if rec is not None and not cut_off:
            mark_child(client, rid, rec["status"])
            if spaces.REVERSE_FRACTION in rec["sampled"] and spaces.REVERSE_FRACTION not in run.data.params:
                client.log_param(rid, spaces.REVERSE_FRACTION, rec["sampled"][spaces.REVERSE_FRACTION])
        elif run.info.status == "RUNNING":
            mark_child(client, rid, "interrupted")
    if interrupted:
        parent.set_tags({"sweep_status": "interrupted"})
        parent.finish("KILLED")
        log(f"sweep {name_of(setup)} interrupted; continue it with: python pipelines/tune.py "
            f"--resume {name_of(setup)}" + ("" if str(Path(base.output_dir).resolve()) == str(Path('outputs').resolve())
                                            else f" --set output_dir={base.output_dir}"))
        return 130, {"name": name_of(setup), "interrupted": True, "experiment_path": str(exp_path),
                     "mlflow_parent_run_id": parent.run_id}

    finished = [r for r in records if r["best"] is not None]
    if not finished:
        errors = "; ".join(f"{r['trial_id']}: {str(r['error']).splitlines()[0] if r['error'] else 'no result'}"
                           for r in records)
        parent.set_tags({"sweep_status": "failed"})
        parent.finish("FAILED")
        raise DiffuRecError(f"sweep {name_of(setup)}: no trial reported {METRIC} ({errors})")
    best = max(finished, key=lambda r: r["best"][METRIC])
    best_cfg = best["config"]
    sdir.mkdir(parents=True, exist_ok=True)
    best_yaml = sdir / "best_config.yaml"
    best_cfg.to_yaml(best_yaml)
    checkpoint = None
    if best["checkpoint_dir"]:
        cand = Path(best["checkpoint_dir"]) / "best.pt"
        checkpoint = str(cand) if cand.is_file() else best["checkpoint_dir"]
    metrics = best_metrics(best["best"])

    study = build_study(space, records)
    plots = write_plots(study, records, sdir / "plots")
    for p in plots:
        parent.log_artifact(p, "plots")
    for p in write_importances(study, sdir / "importances", name_of(setup)):
        parent.log_artifact(p, "importances")
    parent.log_artifact(best_yaml)
    (sdir / "trials.json").write_text(json.dumps(
        [{"trial_id": r["trial_id"], "status": r["status"], "run_id": r["run_id"], "sampled": r["sampled"],
          "best": best_metrics(r["best"]) if r["best"] else None} for r in records], indent=1, default=str))
    parent.log_artifact(sdir / "trials.json")
    parent.log_metrics({f"best/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    counts = {s: sum(r["status"] == s for r in records) for s in ("completed", "stopped_by_asha", "failed")}
    parent.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best["run_id"] or "",
                     "sweep_status": "completed", **{f"trials.{k}": v for k, v in counts.items()}})
    reg = None
    try:
        reg = register_best(setup["mlflow_uri"], best["run_id"], checkpoint, registered, name_of(setup))
    except Exception as exc:
        log(f"warning: could not register the best model: {exc}")
    if reg:
        parent.set_tags({"registered_model": f"{reg['name']}/{reg['version']}"})
    parent.finish("FINISHED")
    summary = {
        "experiment": setup["experiment"], "name": name_of(setup), "best_trial_id": best["trial_id"],
        "best_config": best_cfg.to_dict(), "best_sampled": best["sampled"], "best_metrics": metrics,
        "best_checkpoint": checkpoint, "best_config_yaml": str(best_yaml),
        "mlflow_parent_run_id": parent.run_id, "mlflow_best_run_id": best["run_id"],
        "mlflow_uri": setup["mlflow_uri"], "registered_model": reg, "trials": counts,
        "experiment_path": str(exp_path), "seconds": round(time.time() - began, 1),
    }
    return 0, summary


def name_of(setup: dict) -> str:
    return setup["name"]


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except DiffuRecError as exc:
        print_error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(cli())
