"""Training samples/s and full-ranking evaluation users/s, with the reference hyper-parameters.

    python benchmarks/throughput.py [--data DIR_OR_LOG] [--device cpu|cuda] [--threads 2]
                                    [--batches 30] [--model diffurec|sasrec] [--eval-users 2048]
                                    [--workers N] [--reference-baseline] [--reference [--reference-rounds 3]]

Prints one JSON object: {"train_samples_per_s": .., "eval_users_per_s": {"32": .., "8": .., "4": .., "1": ..}}.
``--reference-baseline`` also times, in the same run, the reference's padding behaviour
(every batch padded to max_len, attention over padding) so speed-ups are read as ratios
measured on the same machine at the same moment.
``--reference`` also times, in the same run, ``reference_step.py``: the reference code's whole
per-step work (float32, pad to 50, written-out LayerNorm and GELU, full-size lambda and mask
tensors, per-example data loading; 32 reverse steps in evaluation), and prints our figures as
multiples of it: the issue's goals (20x training, 15x at S = 32 and 100x at S = 4) read as
ratios measured in one run. Training is timed in ``--reference-rounds`` rounds (default 3), ours
then the stand-in's in each, and the ratio is the median of the rounds' ratios. The stand-in
runs in a spawned process of its own, with glibc's default allocator as the reference has (ours
keeps freed memory, ``keep_freed_memory``, a process-wide setting).

``--workers N`` (CPU) also times N local processes with ``--threads / N`` threads each, as
``pipelines/train.py --num-workers N`` runs them inside Ray Train (without Ray's start-up):
training with the model in DDP over gloo, each process taking every N-th example at
``batch_size / N`` per step; evaluation with each process scoring every N-th batch. It adds
``workers_N`` with the same two keys: all the processes' samples (users) over the slowest one's
wall time, gradient all-reduce included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffurec.config import Config  # noqa: E402
from diffurec.data.sequences import eval_examples, load_sequences  # noqa: E402
from diffurec.machine import cpu_description  # noqa: E402,F401 (tests import it from here)
from diffurec.models import build_model  # noqa: E402
from diffurec.training import (  # noqa: E402
    DDP_OPTIONS,
    configure_process,
    eval_batch_order,
    eval_batches,
    graphed_step,
    make_optimizer,
    precision_used,
    rank_batches,
    train_epoch,
    training_batches,
)

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "beauty" / "interactions.parquet"


def load_data(path: str | None):
    if path:
        return load_sequences(path), path
    if DEFAULT_DATA.exists():
        return load_sequences(DEFAULT_DATA), str(DEFAULT_DATA)
    from diffurec.data.sequences import sequence_data_from_tables
    from diffurec.data.split import split_log
    from diffurec.data.synthetic import generate_synthetic_log

    res = split_log(generate_synthetic_log(num_users=20000, num_items=10000, mean_length=9, seed=0))
    return sequence_data_from_tables(res.sequences, int(res.items.num_rows), res.stats), "synthetic"


def warmed_up_training(cfg: Config, data, device, batches: int, warmup: int = 3, *,
                       shard: tuple[int, int] = (0, 1), wrap=None):
    """A seeded model, its optimizer and CUDA-graph step (None off the GPU) after ``warmup``
    steps, and the next ``batches`` real batches of epoch 1 to time (what this script,
    ``profile_step.py`` and ``gpu_profile.py`` measure). On a GPU the warm-up is one pass over
    the timed batches themselves: each new shape's first steps build cuDNN plans and capture its
    graph, a one-off cost per run that would otherwise be timed as if it recurred every epoch.

    ``shard`` (rank, world) with ``wrap`` (e.g. DDP): one worker's share, at batch_size / world.
    The process takes ``cfg``'s runtime settings first, as ``fit`` does (``configure_process``).
    """
    configure_process(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_items).to(device)
    if wrap is not None:
        model = wrap(model)
    optimizer = make_optimizer(model, cfg)
    graphs = graphed_step(model, optimizer, device, cfg)
    stream, _ = training_batches(data, cfg, epoch=1, shard=shard, batch_size=cfg.batch_size // shard[1])
    stream = list(itertools.islice(stream, warmup + batches))
    first = stream if device.type == "cuda" else stream[:warmup]
    train_epoch(model, first, optimizer, device, precision=cfg.precision, graphs=graphs)
    return model, optimizer, graphs, stream[warmup:]


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(cfg: Config, data, device, batches: int, warmup: int = 3) -> float:
    model, optimizer, graphs, timed = warmed_up_training(cfg, data, device, batches, warmup)
    sync(device)
    return train_epoch(model, timed, optimizer, device, precision=cfg.precision, graphs=graphs)["samples_per_s"]


def _worker(rank: int, world: int, cfg: Config, data, args, threads: int, port: int, out_dir: str) -> None:
    """One of ``world`` local CPU processes: DDP training, then its share of each evaluation."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")

    def timed(fn):
        dist.barrier()
        began = time.perf_counter()
        out = fn()
        dist.barrier()
        return out, time.perf_counter() - began

    try:
        model, optimizer, _, stream = warmed_up_training(
            cfg, data, cpu, args.batches, shard=(rank, world),
            wrap=lambda m: DistributedDataParallel(m, **DDP_OPTIONS))
        stats, wall = timed(lambda: train_epoch(model, stream, optimizer, cpu, precision=cfg.precision))
        result = {"train": [stats["samples"], wall], "eval": {}}
        # evaluation as pipelines/train.py validates: every rank scores an interleaved share
        net = model.module
        # as pipelines/train.py shards validation: every world-th user, then batched
        start, end = eval_sample(cfg, data, args.eval_users, cpu)
        batches = list(eval_batches(data, start[rank::world], end[rank::world], cfg, cpu)[0])
        for steps in eval_reverse_steps(cfg):
            rank_batches(net, batches[:1], cfg, cpu, reverse_steps=steps)  # warm-up
            metrics, wall = timed(lambda s=steps: rank_batches(net, batches, cfg, cpu, reverse_steps=s))
            result["eval"][str(steps)] = [metrics.count, wall]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure_workers(cfg: Config, data, args) -> dict:
    """Samples/s and users/s of ``args.workers`` local CPU processes, ``args.threads`` in all:
    the work of all the processes over the slowest one's wall time."""
    import tempfile

    import torch.multiprocessing as mp

    workers = args.workers
    if cfg.batch_size % workers:
        raise SystemExit(f"--workers {workers} must divide batch_size {cfg.batch_size}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, nprocs=workers, join=True,
                 args=(workers, cfg, data, args, max(1, args.threads // workers), port, out_dir))
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(workers)]

    def rate(pairs):
        return round(sum(n for n, _ in pairs) / max(w for _, w in pairs), 1)

    return {"train_samples_per_s": rate([r["train"] for r in ranks]),
            "eval_users_per_s": {k: rate([r["eval"][k] for r in ranks]) for k in ranks[0]["eval"]}}


def eval_sample(cfg: Config, data, users: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of the users in every k-th batch of a full validation pass (batches by token
    budget, length-sorted; k leaves at least 8 batches): an unbiased sample of the real pass's
    mix of history lengths and batch sizes. ``users`` sets k, so more users than asked may come."""
    ex = eval_examples(data, "valid", cfg.max_len)
    order = eval_batch_order(ex.end - ex.start, cfg, device)
    every = max(1, min(len(ex.end) // max(users, 1), len(order) // 8))
    pick = np.concatenate(order[int(np.random.default_rng(0).integers(every))::every])
    return ex.start[pick], ex.end[pick]


def eval_reverse_steps(cfg: Config) -> list[int]:
    return [s for s in (32, 8, 4, 1) if s <= cfg.diffusion_steps] if cfg.model == "diffurec" else [1]


def time_eval(cfg: Config, data, device, users: int, reverse_steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, data.num_items).to(device).eval()
    batches = list(eval_batches(data, *eval_sample(cfg, data, users, device), cfg, device)[0])
    # warm-up; on a GPU one S=1 pass over every batch, since each new shape's first call builds
    # cuDNN plans (a cold S=32 pass on an H200 read 2,634 users/s, then S=8 53,434)
    if device.type == "cuda":
        rank_batches(model, batches, cfg, device, reverse_steps=1)
    else:
        rank_batches(model, batches[:1], cfg, device, reverse_steps=reverse_steps)
    sync(device)
    began = time.perf_counter()
    metrics = rank_batches(model, batches, cfg, device, reverse_steps=reverse_steps)
    sync(device)
    return metrics.count / (time.perf_counter() - began)


def measure(cfg, data, device, args) -> dict:
    out = {"train_samples_per_s": round(time_training(cfg, data, device, args.batches), 1)}
    out["eval_users_per_s"] = {str(s): round(time_eval(cfg, data, device, args.eval_users, s), 1)
                               for s in eval_reverse_steps(cfg)}
    return out


def _reference_worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def reference_process(threads: int):
    """One spawned process that runs the stand-in's timings, with glibc's default allocator.

    Ours keeps freed memory for reuse (``keep_freed_memory``, process-wide and not undone);
    the reference code does not, and the stand-in's float32 padded step gains from it too, so
    it is timed in a process of its own, as the reference would run.
    """
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_reference_worker_init, initargs=(threads,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--model", choices=("diffurec", "sasrec"), default="diffurec")
    parser.add_argument("--eval-users", type=int, default=2048)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time this many local CPU processes: DDP training, sharded evaluation")
    parser.add_argument("--reference-baseline", action="store_true")
    parser.add_argument("--reference", action="store_true",
                        help="also time reference_step.py (the reference's per-step work) and print ratios to it")
    parser.add_argument("--reference-rounds", type=int, default=3,
                        help="rounds of (ours, stand-in) training timings; the training ratio is their median")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data, source = load_data(args.data)
    cfg = Config().with_sets([f"model={args.model}"] + (args.set or []))
    result = {"data": source, "device": str(device), "threads": torch.get_num_threads(), "model": args.model,
              "precision": precision_used(device, cfg.precision),
              **({"cpu": cpu_description()} if device.type == "cpu" else {}),
              **measure(cfg, data, device, args)}
    if args.workers:
        if device.type != "cpu":
            raise SystemExit("--workers times CPU processes; use pipelines/train.py --num-workers on GPUs")
        args.threads = args.threads or torch.get_num_threads()
        result[f"workers_{args.workers}"] = measure_workers(cfg, data, args)
    if args.reference_baseline:
        ref = measure(cfg.with_overrides({"attend_to_padding": True}), data, device, args)
        result["reference_padding"] = ref
        result["speedup_vs_reference_padding"] = {
            "train": round(result["train_samples_per_s"] / ref["train_samples_per_s"], 2),
            **{k: round(result["eval_users_per_s"][k] / v, 2) for k, v in ref["eval_users_per_s"].items()},
        }
    if args.reference:
        from reference_step import time_reference

        if args.model != "diffurec" or device.type != "cpu":
            raise SystemExit("--reference times the reference DiffuRec on CPU")
        with reference_process(torch.get_num_threads()) as pool:
            ref = pool.submit(time_reference, cfg, data).result()
            # the machine's speed drifts within a run: the training ratio is read round by round,
            # each round ours then the stand-in's, a minute apart at most
            pairs = [(result["train_samples_per_s"], ref["train_samples_per_s"])]
            for _ in range(args.reference_rounds - 1):
                ours = round(time_training(cfg, data, device, args.batches), 1)
                pairs.append((ours, pool.submit(time_reference, cfg, data, eval_batches=0).result()["train_samples_per_s"]))
        train_ratios = [round(ours / theirs, 1) for ours, theirs in pairs]
        ref_eval = ref["eval_users_per_s"][str(cfg.diffusion_steps)]  # the reference always runs all T steps
        result["reference_step"] = {**ref, "train_rounds": [list(p) for p in pairs]}
        result["speedup_vs_reference_step"] = {
            "train": float(np.median(train_ratios)), "train_rounds": train_ratios,
            **{k: round(v / ref_eval, 1) for k, v in result["eval_users_per_s"].items()},
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
