"""Where a training step's CPU time goes, and the throughput bound that the GEMMs alone set.

    python benchmarks/profile_step.py [--data DIR_OR_LOG] [--batches 30] [--set precision=bf16]
                                      [--top 12]

Runs ``--batches`` real training batches of epoch 1 (the same ones ``throughput.py`` times) under
``torch.profiler`` and prints one JSON object:
- ``samples_per_s``: measured under the profiler (a little below ``throughput.py``);
- ``share``: self CPU time by kind: ``gemm`` (mm, addmm, bmm), ``copy`` (dtype casts and layout
  copies), ``other`` torch ops, and ``outside_torch`` (wall time not in any torch op: Python,
  numpy dropout masks, data);
- ``gemm_only_samples_per_s``: the samples/s if everything but the matrix products were free.
  The model's FLOPs at the batches' padded lengths fix the GEMM time, so no rewrite of the
  rest can pass this bound on the machine it was measured on;
- ``top``: the most expensive ops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import load_data, warmed_up_training  # noqa: E402

from diffurec.config import Config  # noqa: E402
from diffurec.training import precision_used, train_epoch  # noqa: E402

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
COPY = {"aten::copy_"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, source = load_data(args.data)
    cfg = Config().with_sets(args.set or [])
    device = torch.device("cpu")
    model, optimizer, _, timed = warmed_up_training(cfg, data, device, args.batches)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        stats = train_epoch(model, timed, optimizer, device, precision=cfg.precision)
        wall = time.perf_counter() - began
    events = prof.key_averages()
    by_kind = {"gemm": 0.0, "copy": 0.0, "other": 0.0}
    for e in events:
        kind = "gemm" if e.key in GEMM else "copy" if e.key in COPY else "other"
        by_kind[kind] += e.self_cpu_time_total / 1e6
    # an op's intra-op threads are booked once, to the calling thread, so the op times add up to
    # at most the wall time; the remainder is time outside torch ops
    by_kind["outside_torch"] = max(0.0, wall - sum(by_kind.values()))
    total = sum(by_kind.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    print(json.dumps({
        "data": source, "precision": precision_used(device, cfg.precision), "batches": args.batches, "samples": stats["samples"],
        "samples_per_s": round(stats["samples"] / wall, 1),
        "share": {k: round(v / total, 3) for k, v in by_kind.items()},
        "gemm_only_samples_per_s": round(stats["samples"] / by_kind["gemm"], 1),
        "top": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
    }))


if __name__ == "__main__":
    main()
