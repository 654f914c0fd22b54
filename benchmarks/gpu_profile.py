"""GPU training throughput and how busy the GPU is, at several batch sizes.

    python benchmarks/gpu_profile.py [--data DIR_OR_LOG] [--batch-sizes 512,1024,2048,4096]
                                     [--seconds 8] [--profile-steps 10] [--set KEY=VALUE ...]

For each batch size: a seeded model after 3 warm-up steps trains on epoch 1's real batches
(cycled if the epoch is shorter than ``--seconds``) while NVML samples the GPU's utilisation
every 50 ms. Then ``--profile-steps`` steps run under ``torch.profiler`` to split a step's wall
time into GPU kernel time and the rest, count the kernels a step launches, and find host-device
synchronisations. Prints one JSON line per batch size:
``samples_per_s``, ``gpu_util_mean`` (NVML, %; null without NVML), ``kernel_busy`` (kernel time
over wall time under the profiler), ``kernels_per_step``, ``ms_per_step``, ``syncs_per_step`` and
the ``top`` kernels by GPU time. On a CPU device it prints the throughput alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import load_data, sync, warmed_up_training  # noqa: E402

from diffurec.config import Config  # noqa: E402
from diffurec.training import train_epoch  # noqa: E402


class UtilSampler:
    """NVML's utilisation.gpu (percent of time a kernel ran) sampled on a thread."""

    def __init__(self, device: torch.device, every_s: float = 0.05):
        self.samples: list[int] = []
        self.every_s = every_s
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # no NVML: report utilisation as unknown
                self.handle = None
        self._stop = threading.Event()

    def __enter__(self):
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()
        if self.handle is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def profile_steps(model, batches, optimizer, graphs, device, precision: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        train_epoch(model, batches, optimizer, device, precision=precision, graphs=graphs)
        sync(device)
        wall = time.perf_counter() - began
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                             "cudaEventSynchronize")]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    steps = len(batches)
    return {"kernel_busy": round(kernel_us / 1e6 / wall, 3), "ms_per_step": round(1e3 * wall / steps, 2),
            "kernel_ms_per_step": round(kernel_us / 1e3 / steps, 2),
            "kernels_per_step": round(len(kernels) / steps, 1), "syncs_per_step": round(len(syncs) / steps, 2),
            "top": [[name[:80], round(us / 1e3 / steps, 3)]
                    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}


def measure(cfg: Config, data, device, seconds: float, profile_steps_n: int, top: int) -> dict:
    # on a GPU the warm-up is a whole epoch: every shape's plans and graph are built before timing
    model, optimizer, graphs, stream = warmed_up_training(cfg, data, device, batches=10**9)

    def for_seconds():
        # one train_epoch over the cycled batches: a call per step would read its loss back to
        # the host, synchronising the GPU every step
        for batch in itertools.cycle(stream):
            yield batch
            if time.perf_counter() - began >= seconds:
                return

    sync(device)
    began = time.perf_counter()
    with UtilSampler(device) as util:
        samples = train_epoch(model, for_seconds(), optimizer, device, precision=cfg.precision,
                              graphs=graphs)["samples"]
        sync(device)
        wall = time.perf_counter() - began
    out = {"batch_size": cfg.batch_size, "cuda_graphs": None if graphs is None else len(graphs.graphs),
           "capture_failed": None if graphs is None else graphs.failed, "steps_per_epoch": len(stream) + 3,
           "samples_per_s": round(samples / wall, 1), "gpu_util_mean": util.mean()}
    if profile_steps_n and device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        try:
            out.update(profile_steps(model, stream[:profile_steps_n], optimizer, graphs, device, cfg.precision, top))
        except Exception as exc:  # the throughput figure above still counts
            out["profile_error"] = repr(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="512,1024,2048,4096")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    args = parser.parse_args()
    device = torch.device(args.device)
    data, _ = load_data(args.data)
    for size in (int(s) for s in args.batch_sizes.split(",")):
        cfg = Config().with_sets([f"batch_size={size}"] + (args.set or []))
        print(json.dumps(measure(cfg, data, device, args.seconds, args.profile_steps, args.top)), flush=True)


if __name__ == "__main__":
    main()
