"""What machine a figure came from: named in every benchmark's output and tagged on every run.

This project's 2-core VMs have been AMD Zen 4 (family 25), Zen 5 (family 26) and Intel parts with
AMX; bf16 matrix products run at very different speeds on them while float32 memory-bound work
does not, so speeds and speed ratios are only comparable between runs on the same kind of CPU.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU, e.g. ``AMD EPYC (family 26, model 2), 2 cpus, avx512_bf16``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            import platform

            return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    fields: dict[str, str] = {}  # the first processor's
    cpus = 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        cpus += key.strip() == "processor"
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join([name, f"{cpus or os.cpu_count()} cpus", *extras])


def machine_description(device: str = "cpu") -> str:
    """The CPU, or on a CUDA device the GPU's name."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast trains
    about 1.6x faster than fp32. Without it PyTorch emulates bf16 and gains nothing."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    try:  # an older PyTorch: the kernel's flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
