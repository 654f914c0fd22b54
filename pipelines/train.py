"""Train one model (DiffuRec or the SASRec baseline) with Ray Train (Train V2 API, Ray 2.60).

    python pipelines/train.py --data DIR [--num-workers N] [--use-gpu] [--config FILE.yaml]
        [--set key=value ...] [--name NAME] [--resume NAME] [--mlflow-uri URI]

On success the last line on stdout is one JSON summary: run_name, checkpoint (best.pt),
mlflow_run_id, best_epoch, the best validation metrics (valid/...) and the test metrics
(test/...). User errors print one ``error: ...`` line on stderr and exit 2 before any worker starts.

How the pieces fit
------------------
- One training loop: every worker runs :func:`diffurec.training.fit`, the loop the
  single-process CLI runs; Ray supplies the hooks (batches, evaluation, report, resume).
- Data: the driver loads the prepared dataset once, expands it into training examples and hands
  Ray a Dataset of ``{start, end}`` index pairs (16 bytes per example, shuffled once with the
  seed). Each worker streams its shard with ``ray.train.get_dataset_shard("train")``; Ray Train
  splits it with ``streaming_split(equal=True)``, so every worker gets the same number of rows,
  hence the same number of steps (no DDP hang on uneven shards). The worker loads the flat
  ``items`` array of the same dataset directory and turns index windows into padded tensors
  with length bucketing (:func:`diffurec.data.batches.iterate_window_batches`).
- Batch semantics: config ``batch_size`` is the GLOBAL batch. With N workers each takes
  ``batch_size / N`` examples per step and DDP averages the gradients, so one step sees
  ``batch_size`` examples on any worker count (same config = same run, within noise).
- Randomness: torch is reseeded from (seed, epoch, rank) at the start of every epoch, so ranks
  draw independent dropout/diffusion noise and a resumed run replays the same streams. The
  length-bucketing stream (:func:`diffurec.training.bucketing_rng`) is the same on every rank, so
  the workers' batches of one step have about the same length and finish together.
- Evaluation is DISTRIBUTED: every ``eval_every`` epochs each rank scores an interleaved slice
  of the validation users (``users[rank::world]``) and the metric sums are all-reduced, so every
  rank holds the same metrics over the whole validation set (and agrees on early stopping).
  The final test evaluation runs on rank 0 from the best model.
- Checkpoints: every epoch rank 0 reports a Checkpoint directory holding ``latest.pt`` (model,
  optimizer, scheduler, loop state: for resume) and ``best.pt`` (the best model so far by
  validation NDCG@10: for export) plus ``mlflow_run_id``. A restarted worker group
  (``FailureConfig(max_failures)``) resumes from ``ray.train.get_checkpoint()``: no finished
  epoch is lost and the same MLflow run continues.
- MLflow: rank 0 only, through :class:`diffurec.tracking.MLflowRun`: the config as params,
  per-epoch metrics, final test metrics, ``checkpoint/best.pt``, ``config.yaml`` and the model
  through ``mlflow.pytorch``.
- Names: the default run name is unique; Ray 2.60 silently resumes a run whose name already
  exists in the storage path, so ``--name`` refuses an existing run and ``--resume NAME``
  continues one on purpose.
- GPU: ``--use-gpu`` gives each worker a GPU and NCCL (gloo on CPU); the library already uses
  bf16 autocast and ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffurec.config import Config  # noqa: E402
from diffurec.errors import DiffuRecError  # noqa: E402
from diffurec.tracking import PENDING_FILE  # noqa: E402
from pipelines._common import (  # noqa: E402
    init_ray,
    new_run_name,
    print_error,
    ray_address,
    run_cli,
)

__all__ = ["make_trainer", "train_loop_per_worker", "main", "resolve_data", "check_scaling",
           "examples_dataset", "summarize"]

DATASET_NAME = "train"
CHECKPOINT_FILES = ("latest.pt", "best.pt", "mlflow_run_id")
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
GPU_CHECK_ESCAPE = "DIFFUREC_ALLOW_PENDING_GPUS"


# ---- driver-side checks (all before any worker starts) -----------------------------------------
def check_scaling(cfg: Config, num_workers: int, use_gpu: bool) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise DiffuRecError(f"--num-workers must be an integer >= 1 (got {num_workers!r})")
    if cfg.batch_size % num_workers:
        raise DiffuRecError(
            f"config key 'batch_size' = {cfg.batch_size} is the global batch and must be divisible by "
            f"--num-workers {num_workers} (each worker takes batch_size / num_workers per step)")
    if not use_gpu and cfg.device.startswith("cuda"):
        raise DiffuRecError(f"config key 'device' = {cfg.device!r} needs --use-gpu")


def check_gpus(use_gpu: bool) -> None:
    """--use-gpu needs a GPU: locally torch must see one; on a cluster Ray must list one."""
    if not use_gpu or os.environ.get(GPU_CHECK_ESCAPE):
        return
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        where = "the Ray cluster"
    else:
        import torch

        gpus = torch.cuda.device_count()
        where = "this machine (torch.cuda sees none)"
    if gpus < 1:
        raise DiffuRecError(
            f"--use-gpu: no GPU in {where}; drop --use-gpu to train on CPU workers "
            f"(set {GPU_CHECK_ESCAPE}=1 if an autoscaler will add GPU nodes)")


def resolve_data(data: str | os.PathLike, cfg: Config) -> Path:
    """A prepared dataset directory as is; a raw log is split first (``write_split``) into
    ``<output_dir>/datasets/<name>-<key>`` (reused when the same log was split before)."""
    from diffurec.data.logs import LOG_EXTENSIONS
    from diffurec.data.sequences import is_prepared_dataset, write_split

    p = Path(data).expanduser().resolve()
    if is_prepared_dataset(p):
        return p
    if not p.exists():
        raise DiffuRecError(f"--data {data}: no such file or directory")
    if p.is_dir() and ((p / "sequences").exists() or (p / "stats.json").exists()):
        raise DiffuRecError(
            f"--data {p}: not a complete prepared dataset (expected sequences/, items.parquet, stats.json)")
    if p.is_file() and p.suffix.lower() not in LOG_EXTENSIONS:
        raise DiffuRecError(
            f"--data {p}: neither a prepared dataset directory nor a log file "
            f"({', '.join(sorted(LOG_EXTENSIONS))})")
    st = p.stat()
    key = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}|{cfg.min_user}|{cfg.min_item}".encode()).hexdigest()[:10]
    out = Path(cfg.output_dir).expanduser().resolve() / "datasets" / f"{p.stem}-{key}"
    if not is_prepared_dataset(out):
        try:
            write_split(p, out, min_user=cfg.min_user, min_item=cfg.min_item)
        except DiffuRecError:
            if not is_prepared_dataset(out):  # a concurrent run may have published it first
                raise
    return out


def examples_dataset(data_dir: str | os.PathLike, cfg: Config):
    """The training examples as a Ray Dataset of ``{start, end}`` (int64 indices into the
    dataset's flat ``items`` array), permuted once with the seed so that any window of rows is a
    random sample of users. Also validates the dataset (DiffuRecError) on the driver."""
    import numpy as np
    import pyarrow as pa
    import ray.data

    from diffurec.data.batches import BUCKET_WINDOW
    from diffurec.data.sequences import load_sequences, train_examples

    data = load_sequences(data_dir)
    ex = train_examples(data, cfg.max_len)
    if len(ex) < 1:
        raise DiffuRecError(f"--data {data_dir}: no training examples (every user has fewer than 4 items)")
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(ex))
    table = pa.table({"start": ex.start[order], "end": ex.end[order]})
    rows = max(1024, cfg.batch_size * BUCKET_WINDOW // 4)
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray.data.from_arrow(blocks)


# ---- the worker --------------------------------------------------------------------------------
def _metric_keys() -> list[str]:
    from diffurec.metrics import KS

    return ["MRR"] + [f"{m}@{k}" for m in ("HR", "NDCG") for k in KS]


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _write_status(status_dir: str | None, **fields) -> None:
    """Progress of this worker process (tests use it to kill a worker mid-epoch)."""
    if not status_dir:
        return
    path = Path(status_dir) / f"rank{fields['rank']}-pid{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), **fields}))
    os.replace(tmp, path)


def _logged_epochs(tracker) -> set[int]:
    """The epochs the MLflow run already holds. An epoch is logged before its checkpoint is
    committed (so a trial that ASHA stops at that report keeps it); a process lost in between
    leaves an epoch logged but not checkpointed, which the restart trains again (the same
    per-epoch random streams) and does not log twice."""
    from diffurec.tracking import mlflow_metric_name

    return {m.step for m in tracker.client.get_metric_history(tracker.run_id, mlflow_metric_name("train/loss"))}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: ``diffurec.training.fit`` with Ray's data shard, DDP, distributed
    validation, per-epoch ``ray.train.report`` and resume from ``ray.train.get_checkpoint()``.

    ``loop_config``: config (Config.to_dict()), data_dir, mlflow_uri, experiment, run_name,
    parent_run_id, tags; optional log_model (default True), status_dir (tests), pending_path
    (where tracking writes wait out a server outage).
    """
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import CheckpointConsistencyMode

    from diffurec.data.batches import BUCKET_WINDOW, iterate_window_batches, num_batches
    from diffurec.data.sequences import load_sequences, train_examples
    from diffurec.machine import machine_description
    from diffurec.metrics import RankingMetrics
    from diffurec.models import build_model
    from diffurec.tracking import MLflowRun, config_params
    from diffurec.training import (
        DDP_OPTIONS,
        bucketing_rng,
        configure_process,
        evaluate_sums,
        fit,
        load_checkpoint,
        pad_to,
        precision_used,
        seed_everything,
        test_best,
        unwrap,
    )

    cfg = Config.from_dict(loop_config["config"], source="loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    configure_process(cfg, device)
    status_dir = loop_config.get("status_dir")
    finish_run = loop_config.get("finish_run", True)  # False: the sweep's driver sets the status
    data = load_sequences(loop_config["data_dir"])
    per_worker = cfg.batch_size // world
    # streaming_split(equal=True) gives every worker floor(n / world) rows
    rows_per_worker = len(train_examples(data, cfg.max_len)) // world
    steps = num_batches(rows_per_worker, per_worker)
    shard = ray.train.get_dataset_shard(DATASET_NAME)
    padded_to = pad_to(cfg)

    # ---- restore -----------------------------------------------------------------------------
    run_dir = Path(tempfile.mkdtemp(prefix=f"diffurec-rank{rank}-"))
    resume_from, mlflow_run_id = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            for name in CHECKPOINT_FILES:
                if (Path(d) / name).is_file():
                    shutil.copy2(Path(d) / name, run_dir / name)
        # on CPU: the RNG state must stay a CPU tensor; load_state_dict moves the rest
        resume_from = torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=False)
        if (run_dir / "mlflow_run_id").is_file():
            mlflow_run_id = (run_dir / "mlflow_run_id").read_text().strip() or None
    resumed_epoch = resume_from["loop"]["epoch"] if resume_from else 0
    _write_status(status_dir, rank=rank, epoch=resumed_epoch, step=0, resumed_from=resumed_epoch)

    # ---- model (DDP via prepare_model; every parameter is used in forward, so no
    # find_unused_parameters) --------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = ray.train.torch.prepare_model(build_model(cfg, data.num_items), parallel_strategy_kwargs=DDP_OPTIONS)

    tracker, logged_epochs = None, set()
    if rank == 0:
        tracker = MLflowRun(loop_config["mlflow_uri"], experiment=loop_config.get("experiment") or "diffurec",
                            run_name=loop_config.get("run_name"), parent_run_id=loop_config.get("parent_run_id"),
                            tags={"model": cfg.model, "data_dir": str(loop_config["data_dir"]),
                                  "num_workers": str(world), "device": device.type,
                                  "machine": machine_description(device),
                                  "precision_used": precision_used(device, cfg.precision),
                                  "torch_threads": str(torch.get_num_threads()),
                                  **{k: str(v) for k, v in (loop_config.get("tags") or {}).items()}},
                            run_id=mlflow_run_id, pending_path=loop_config.get("pending_path"))
        tracker.log_params(config_params(cfg))
        (run_dir / "mlflow_run_id").write_text(tracker.run_id)
        if resume_from is not None:
            tracker.set_tags({"resumed_from_epoch": resumed_epoch})
            logged_epochs = _logged_epochs(tracker)

    # ---- hooks -------------------------------------------------------------------------------
    def batches_for_epoch(epoch: int):
        # independent per-rank streams, replayed identically after a resume
        torch.manual_seed(int(np.random.default_rng([cfg.seed, epoch, rank]).integers(2**62)))

        def generate():
            rng = bucketing_rng(cfg.seed, epoch)  # the same on every rank: aligned step lengths
            windows = ((b["start"], b["end"]) for b in shard.iter_batches(
                batch_size=per_worker * BUCKET_WINDOW, batch_format="numpy", prefetch_batches=1))
            produced = 0
            for produced, batch in enumerate(iterate_window_batches(
                    data.items, windows, per_worker, rng=rng, pad_to=padded_to, max_batches=steps), 1):
                if status_dir:
                    _write_status(status_dir, rank=rank, epoch=epoch, step=produced, resumed_from=resumed_epoch)
                yield batch
            if produced != steps:  # equal=True guarantees equal shards; never let DDP hang silently
                raise RuntimeError(f"rank {rank}: epoch {epoch} produced {produced} batches, expected {steps}")

        return generate(), steps

    keys = _metric_keys()

    def evaluate_valid(m) -> dict:
        sums, count = evaluate_sums(unwrap(m), data, "valid", cfg, device, users=slice(rank, None, world),
                                    reverse_steps=cfg.valid_reverse_steps or None)
        total = _all_reduce([sums.get(k, 0.0) for k in keys] + [float(count)], device)
        merged = RankingMetrics()
        merged.merge(dict(zip(keys, total[:-1])), int(round(total[-1])))
        return merged.compute()

    def on_epoch_end(epoch: int, metrics: dict, state, paths: dict) -> None:
        samples = metrics["train/samples_per_s"] * metrics["train/seconds"]
        loss_sum, total_samples = _all_reduce([metrics["train/loss"] * samples, samples], device)
        (seconds,) = _all_reduce([metrics["train/seconds"]], device, op="max")
        report = {"epoch": epoch, **metrics,
                  "train/loss": loss_sum / max(total_samples, 1.0),
                  "train/samples_per_s": total_samples / seconds if seconds > 0 else 0.0,
                  "train/seconds": seconds,
                  "best_epoch": state.best_epoch,
                  "best/valid/NDCG@10": max(state.best_metric, 0.0)}
        if rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        report["mlflow_run_id"] = tracker.run_id
        if epoch not in logged_epochs:
            tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))}, step=epoch)
        shown = {k: round(v, 4) for k, v in report.items() if k.startswith(("train/loss", "train/samples", "valid/N"))}
        # sys.stderr.write, not print: Ray Train's print patch would log the line twice
        sys.stderr.write(f"epoch {epoch}: {shown}\n")
        sys.stderr.flush()
        ckpt_dir = Path(tempfile.mkdtemp(prefix=f"diffurec-ckpt-{epoch:04d}-"))
        try:
            for name in CHECKPOINT_FILES:
                if (run_dir / name).is_file():
                    shutil.copy2(run_dir / name, ckpt_dir / name)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            # report() only queues the checkpoint; the controller registers it when it next polls
            # (every ~2 s). Wait for that, so a worker killed right after this epoch still
            # restarts from it: no finished epoch is lost.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    # ---- train, then test the best model (rank 0) ---------------------------------------------
    try:
        result = fit(cfg, data, run_dir, model=model, device=device, batches_for_epoch=batches_for_epoch,
                     evaluate_valid=evaluate_valid, on_epoch_end=on_epoch_end, resume_from=resume_from,
                     is_main=rank == 0, progress=False)
        if rank == 0:
            test = test_best(run_dir, data, device)
            tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, step=result["epochs"])
            tracker.log_metrics({"best_epoch": result["best_epoch"],
                                 "seconds_to_best": result["seconds_to_best"]}, step=result["epochs"])
            tracker.log_artifact(run_dir / "best.pt", "checkpoint")
            tracker.log_artifact(run_dir / "config.yaml")
            if loop_config.get("log_model", True):
                tracker.log_model(load_checkpoint(run_dir / "best.pt")[0])
            if finish_run:
                tracker.finish()
    except BaseException:
        if tracker is not None and finish_run:
            try:
                tracker.finish("FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- the trainer -------------------------------------------------------------------------------
def make_trainer(cfg: Config, data_dir: str, *, num_workers: int = 1, use_gpu: bool = False, name: str,
                 storage_path: str, mlflow_uri: str, experiment: str = "diffurec",
                 parent_run_id: str | None = None, resources_per_worker: dict | None = None,
                 max_failures: int = 2, callbacks: list | None = None, tags: dict | None = None,
                 log_model: bool = True, status_dir: str | None = None, finish_run: bool = True):
    """A ``TorchTrainer`` for one training run (not started: call ``.fit()``).

    ``finish_run=False`` leaves the MLflow run's terminal status to the caller: a sweep's driver
    decides it (a trial stopped by ASHA may still be running its last epoch when Tune moves on,
    and a worker marking the run FINISHED after the driver marked it KILLED would contradict
    the ``trial_status`` tag).

    ``data_dir`` must be a prepared dataset (see :func:`resolve_data` for raw logs). Ray must be
    initialised (it is started locally if not). ``callbacks`` are Ray Train ``UserCallback``s
    (e.g. Tune's ``TuneReportCallback``). Raises DiffuRecError for bad arguments.
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffurec.data.sequences import is_prepared_dataset

    check_scaling(cfg, num_workers, use_gpu)
    data_dir = Path(data_dir).expanduser().resolve()
    if not is_prepared_dataset(data_dir):
        raise DiffuRecError(f"{data_dir}: not a prepared dataset (expected sequences/, items.parquet, stats.json)")
    if not ray.is_initialized():
        init_ray()
    check_gpus(use_gpu)
    dataset = examples_dataset(data_dir, cfg)
    loop_config = {"config": cfg.to_dict(), "data_dir": str(data_dir), "mlflow_uri": mlflow_uri,
                   "experiment": experiment, "run_name": name, "parent_run_id": parent_run_id,
                   "tags": dict(tags or {}), "log_model": log_model, "status_dir": status_dir,
                   "finish_run": finish_run,
                   # tracking writes kept through a server outage wait in the run's storage, which
                   # outlives the worker (memory only where the storage is not a local path)
                   "pending_path": None if "://" in str(storage_path) else
                   str(Path(storage_path).resolve() / name / PENDING_FILE)}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            # controller_failure_limit defaults to -1 in Train V2: a worker group that can never be
            # placed would be retried forever; bound it so such a run fails visibly
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
            # each checkpoint holds latest.pt + best.pt; keep the last two
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
        datasets={DATASET_NAME: dataset},
    )


def summarize(result, mlflow_uri: str, name: str) -> dict:
    """The one-line summary of a finished run from its Ray Result and MLflow run."""
    import torch

    if result.checkpoint is None:
        raise DiffuRecError(f"run '{name}' reported no checkpoint")
    metrics = result.metrics or {}
    run_id = metrics.get("mlflow_run_id")
    with result.checkpoint.as_directory() as d:
        best = Path(d) / "best.pt"
        payload = torch.load(best, map_location="cpu", weights_only=False) if best.is_file() else {}
        if not run_id and (Path(d) / "mlflow_run_id").is_file():  # e.g. a resumed run with nothing left to train
            run_id = (Path(d) / "mlflow_run_id").read_text().strip() or None
    ckpt_path = result.checkpoint.path
    out = {"run_name": name, "checkpoint": str(Path(ckpt_path) / "best.pt"), "mlflow_run_id": run_id,
           "best_epoch": payload.get("epoch"), "epochs": metrics.get("epoch"),
           **{f"valid/{k}": v for k, v in (payload.get("valid") or {}).items()}}
    if run_id:
        import mlflow

        from diffurec.tracking import library_metric_name, mlflow_metric_name

        client = mlflow.MlflowClient(mlflow_uri)
        run = client.get_run(run_id)
        # throughput: mean over the epochs after the first (which also pays for start-up)
        speeds = [m.value for m in sorted(client.get_metric_history(run_id, mlflow_metric_name("train/samples_per_s")),
                                          key=lambda m: m.step)]
        if speeds:
            out["train/samples_per_s"] = sum(speeds[1:] or speeds) / len(speeds[1:] or speeds)

        test = {library_metric_name(k): v for k, v in run.data.metrics.items() if k.startswith("test/")}
        out.update(dict(sorted(test.items())))
    return out


# ---- command line ------------------------------------------------------------------------------
def _latest_checkpoint_config(run_path: Path) -> dict | None:
    import torch

    dirs = sorted((p for p in run_path.glob("checkpoint_*") if (p / "latest.pt").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not dirs:
        return None
    return torch.load(dirs[-1] / "latest.pt", map_location="cpu", weights_only=False).get("config")


def worker_resources(args) -> dict | None:
    """Per-worker resources: ``--cpus-per-worker``; else, on a local CPU cluster started here,
    its CPUs shared by the workers (each worker's torch threads follow its CPUs). Ray's own
    default of 1 CPU left a 2-core machine's second core idle in the default one-worker run.
    On a remote cluster (``RAY_ADDRESS``) or with GPUs, Ray's default stays."""
    import ray

    cpus = args.cpus_per_worker
    if cpus is None and not args.use_gpu and not ray_address():
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // args.num_workers))
    if cpus is None:
        return None
    return {"CPU": cpus, **({"GPU": 1} if args.use_gpu else {})}


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python pipelines/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory or raw interaction log")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker, also its torch threads (default: a local cluster's "
                        "CPUs shared by the workers; on RAY_ADDRESS or with --use-gpu, Ray's 1)")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--name", help="run name (default: unique; an existing name is refused)")
    p.add_argument("--resume", metavar="NAME", help="continue the named run from its latest checkpoint")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite under output_dir)")
    p.add_argument("--experiment", default="diffurec", help="MLflow experiment name")
    p.add_argument("--storage-path", help="Ray Train storage (default: <output_dir>/ray_results)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts allowed (default 2)")
    p.add_argument("--no-log-model", action="store_true", help="skip logging the model with mlflow.pytorch")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.name and args.resume:
        raise DiffuRecError("pass either --name (a new run) or --resume NAME (an existing run), not both")
    if args.max_failures < -1:
        raise DiffuRecError(f"--max-failures must be >= -1 (got {args.max_failures})")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise DiffuRecError(f"--cpus-per-worker must be > 0 (got {args.cpus_per_worker})")
    cfg = Config.from_yaml(args.config) if args.config else Config()
    cfg = cfg.with_sets(args.set)
    check_scaling(cfg, args.num_workers, args.use_gpu)
    if args.use_gpu and not ray_address():
        check_gpus(True)  # a local cluster: no need to start Ray to know
    storage = Path(args.storage_path or Path(cfg.output_dir) / "ray_results").expanduser().resolve()
    name = args.resume or args.name or new_run_name(cfg.model)
    run_path = storage / name
    if args.resume:
        if not (run_path / SNAPSHOT_FILE).is_file():
            raise DiffuRecError(f"--resume {name}: no Ray Train run at {run_path}")
        stored = _latest_checkpoint_config(run_path)
        if stored and not args.config:  # continue with the run's own config, plus any --set
            cfg = Config.from_dict(stored, source=str(run_path)).with_sets(args.set)
            check_scaling(cfg, args.num_workers, args.use_gpu)
    elif run_path.exists():
        raise DiffuRecError(f"run '{name}' already exists at {run_path}; pass --resume {name} to continue it "
                            f"or choose another --name")
    data_dir = resolve_data(args.data, cfg)
    from diffurec.data.sequences import load_sequences

    load_sequences(data_dir)  # validate before Ray starts
    from diffurec.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.mlflow_uri, cfg.output_dir)
    started = init_ray()
    try:
        check_gpus(args.use_gpu)
        resources = worker_resources(args)
        trainer = make_trainer(cfg, str(data_dir), num_workers=args.num_workers, use_gpu=args.use_gpu,
                               name=name, storage_path=str(storage), mlflow_uri=uri, experiment=args.experiment,
                               resources_per_worker=resources, max_failures=args.max_failures,
                               tags={"dataset": str(args.data)}, log_model=not args.no_log_model)
        try:
            result = trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError and friends: not a user error
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            cause = lines[-1] if lines else type(exc).__name__
            print_error(f"training run '{name}' failed: {cause} (checkpoints under {run_path}; "
                        f"--resume {name} continues it)")
            return 1
        summary = summarize(result, uri, name)
        summary.update({"num_workers": args.num_workers, "storage_path": str(run_path), "data": str(data_dir)})
    finally:
        if started:
            import ray

            ray.shutdown()  # also flushes worker logs, so the summary really is the last line
    print(json.dumps(summary, default=str), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    from pipelines.train import main as _entry  # run as the importable module, so workers unpickle it

    sys.exit(_entry())
