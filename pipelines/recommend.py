"""Top-K recommendations for every user with Ray Data: read the users' full histories, score them
on an actor pool, write parquet.

    python pipelines/recommend.py --model MODEL --data DIR --output DIR [--k 20] [--exclude-history]
        [--num-workers N] [--use-gpu] [--reverse-steps S] [--cpus-per-worker X] [--batch-size B]
        [--set key=value ...] [--overwrite] [--mlflow-uri URI]

MODEL: a checkpoint (``best.pt``), an MLflow model URI (``models:/NAME@champion``,
``runs:/RUN_ID/recommender``) or a registered model name (its ``champion`` alias, else the latest
version). The output folder holds parquet files of ``user_id, rank, item_id, score`` (the log's
own ids; K rows per user) and ``_recommendations.json``; it appears only when everything is
written (a staging folder is renamed). ``python -m diffurec recommend`` writes the same rows in
one process without Ray. The last stdout line is one JSON summary (users, rows, users_per_s, ...).
User errors (bad K, a missing model, a model and data whose items differ, an existing output)
print one ``error: ...`` line and exit 2 before Ray starts.

How it runs: the driver checks everything and loads the checkpoint once; Ray Data reads
``DIR/sequences/*.parquet`` (``user_id``, ``items``: each user's full history as dense ids) in
blocks of ``--batch-size`` users; ``map_batches`` with ``compute=ActorPoolStrategy(size=N)`` runs
:class:`RecommendActor`, which holds one :class:`diffurec.recommend.Recommender` (the model is
shipped to the actors with their constructor, so nothing but the output path needs shared
storage) and calls its ``recommend_table`` on each batch; ``write_parquet`` writes the result.
Ray Data's progress bars show the progress.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffurec.errors import DiffuRecError  # noqa: E402
from pipelines._common import init_ray, ray_address, run_cli  # noqa: E402

__all__ = ["RecommendActor", "main", "recommend_with_ray"]

DEFAULT_BATCH = 2048  # users per map_batches call (scored in token-budget batches inside)


class RecommendActor:
    """One actor of the pool: a Recommender built once, applied to every batch it is given."""

    def __init__(self, payload: dict, item_ids, options: dict, threads: int | None = None):
        import torch

        from diffurec.recommend import ItemCatalog, Recommender

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.recommender = Recommender.from_payload(payload, ItemCatalog(item_ids), **options)

    def __call__(self, batch):
        return self.recommender.recommend_table(batch)


def sequence_files(data_dir: Path) -> list[str]:
    files = sorted(str(p) for p in (data_dir / "sequences").glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DiffuRecError(f"--data {data_dir}: no parquet files under sequences/")
    return files


def recommend_with_ray(rec, payload: dict, data_dir: str | os.PathLike, output: str | os.PathLike, *,
                       num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
                       batch_size: int = DEFAULT_BATCH, overwrite: bool = False, model: str = "",
                       sets: list[str] | None = None, progress: bool = True) -> dict:
    """Score every user of ``data_dir`` on a Ray Data actor pool and publish ``output``.

    ``rec`` is the driver's :class:`diffurec.recommend.Recommender` (already checked against the
    data); the actors rebuild it from ``payload`` with the same options. Ray must be initialised.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from diffurec.recommend import publish_output, run_meta, staging_output

    data_dir = Path(data_dir)
    files = sequence_files(data_dir)
    users = sum(_rows(f) for f in files)
    cpus_per_worker, threads = actor_cpus(ray.cluster_resources().get("CPU", 1), num_workers, use_gpu,
                                          cpus_per_worker)
    options = {"k": rec.k, "exclude_history": rec.exclude_history, "sets": sets,
               "reverse_steps": rec.cfg.reverse_steps if rec.diffusion else None,
               "device": "cuda" if use_gpu else "cpu"}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    staging = staging_output(output, overwrite)
    try:
        began = time.perf_counter()
        # reads and writes are light and hold no CPU, so the actors can have every core
        ds = ray.data.read_parquet(files, columns=["user_id", "items"], num_cpus=0)
        ds = ds.repartition(target_num_rows_per_block=batch_size)
        ds = ds.map_batches(
            RecommendActor,
            fn_constructor_kwargs={"payload": payload, "item_ids": rec.catalog.item_ids, "options": options,
                                   "threads": threads},
            compute=ActorPoolStrategy(size=num_workers),
            batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
            num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0)
        ds.write_parquet(str(staging), ray_remote_args={"num_cpus": 0})
        seconds = time.perf_counter() - began
        rows = sum(_rows(p) for p in staging.glob("*.parquet"))
        meta = run_meta(rec, model, data_dir, users, rows, seconds, path="ray",
                        num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
        out = publish_output(staging, output, meta, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"output": str(out), **meta}


def actor_cpus(cluster_cpus: float, num_workers: int, use_gpu: bool,
               cpus_per_worker: float | None) -> tuple[float, int | None]:
    """(CPUs each actor requests from Ray, torch threads it runs).

    ``--cpus-per-worker`` gives both. On a local CPU cluster the default shares its cores among
    the actors (threads = cores // workers) but requests one CPU less in all: Ray Data's own tasks
    (listing the files, repartitioning) ask for a CPU each, and with every CPU held by an actor
    that waits for their output the pipeline would never start. On a remote cluster or with GPUs
    the actors ask Ray's usual 1 CPU.
    """
    if cpus_per_worker is not None:
        return float(cpus_per_worker), None if use_gpu else max(1, int(cpus_per_worker))
    if use_gpu or ray_address():
        return 1.0, None
    threads = max(1, int(cluster_cpus // num_workers))
    request = max(0.1, (cluster_cpus - 1) / num_workers)
    return round(min(request, float(threads)), 3), threads


def _rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python pipelines/recommend.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint, MLflow model URI (models:/NAME@champion) or registered model name")
    p.add_argument("--data", required=True, help="the prepared dataset the model was trained on")
    p.add_argument("--output", required=True, help="output folder (parquet: user_id, rank, item_id, score)")
    p.add_argument("--k", type=int, default=20, help="list length (default 20)")
    p.add_argument("--exclude-history", action="store_true", help="leave the user's known items out of the list")
    p.add_argument("--num-workers", type=int, default=1, help="actors in the pool (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per actor, also its torch threads (default: a local cluster's CPUs shared)")
    p.add_argument("--reverse-steps", type=int, help="DiffuRec reverse steps S (default: the model's)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="users per actor call")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="inference-time config keys, e.g. reverse_samples=4, deterministic_reverse=true")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier recommendations folder")
    p.add_argument("--mlflow-uri", help="MLflow store for models:/ URIs and registered names")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.num_workers < 1:
        raise DiffuRecError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.batch_size < 1:
        raise DiffuRecError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise DiffuRecError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.use_gpu and not ray_address():
        import torch

        if not torch.cuda.is_available():
            raise DiffuRecError("--use-gpu: torch sees no GPU on this machine; drop --use-gpu")
    from diffurec.recommend import open_recommender, staging_output

    # everything a user can get wrong is checked here, before Ray starts and before any write
    rec, payload, what = open_recommender(args.model, args.data, k=args.k,
                                          exclude_history=True if args.exclude_history else None,
                                          reverse_steps=args.reverse_steps, sets=args.set,
                                          tracking_uri=args.mlflow_uri, device="cpu")
    shutil.rmtree(staging_output(args.output, args.overwrite))  # the output check, early
    started = init_ray()
    try:
        summary = recommend_with_ray(rec, payload, args.data, args.output, num_workers=args.num_workers,
                                     use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                                     batch_size=args.batch_size, overwrite=args.overwrite, model=what,
                                     sets=args.set, progress=not args.no_progress)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(json.dumps(summary, default=str), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    from pipelines.recommend import main as _entry  # the importable module, so actors unpickle its class

    sys.exit(_entry())
