"""Named beta schedules as pure functions of the number of diffusion steps.

The families of improved-diffusion and Diffusion-LM (which DiffuRec's reference code copies).
Every schedule returns float64 betas in (0, 1) so that alpha-bar decreases strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from diffurec.errors import DiffuRecError

MAX_BETA = 0.999


def linear(steps: int) -> np.ndarray:
    # scaled so that any T spans the same total noise as the 1000-step schedule of DDPM
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def trunc_lin(steps: int) -> np.ndarray:
    # DiffuRec's default: linear, with the start raised so early steps already add real noise
    scale = 1000 / steps
    return np.linspace(scale * 0.0001 + 0.01, scale * 0.02 + 0.01, steps, dtype=np.float64)


def pw_lin(steps: int) -> np.ndarray:
    # piecewise linear: a quick fall from a raised start, then the linear ramp
    scale = 1000 / steps
    start, mid, end = scale * 0.0001 + 0.01, scale * 0.0001, scale * 0.02
    head = min(10, max(1, steps // 3))  # the reference's 10 steps, shrunk for small T
    if steps == 1:
        return np.array([start], dtype=np.float64)
    return np.concatenate(
        [np.linspace(start, mid, head, dtype=np.float64), np.linspace(mid, end, steps - head, dtype=np.float64)]
    )


def cosine(steps: int) -> np.ndarray:
    return _betas_for_alpha_bar(steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


def sqrt(steps: int) -> np.ndarray:
    return _betas_for_alpha_bar(steps, lambda t: 1 - math.sqrt(t + 0.0001))


def trunc_cos(steps: int) -> np.ndarray:
    # the first beta comes from alpha_bar(0) itself, which the 0.1 offset makes well below 1
    alpha_bar = lambda t: math.cos((t + 0.1) / 1.1 * math.pi / 2) ** 2  # noqa: E731
    betas = [1 - alpha_bar(0)]
    betas += [1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps) for i in range(steps - 1)]
    return np.clip(np.array(betas, dtype=np.float64), None, MAX_BETA)


def _betas_for_alpha_bar(steps: int, alpha_bar: Callable[[float], float]) -> np.ndarray:
    betas = [1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps) for i in range(steps)]
    return np.clip(np.array(betas, dtype=np.float64), None, MAX_BETA)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "trunc_lin": trunc_lin,
    "linear": linear,
    "cosine": cosine,
    "sqrt": sqrt,
    "trunc_cos": trunc_cos,
    "pw_lin": pw_lin,
}


def named_beta_schedule(name: str, steps: int) -> np.ndarray:
    if name not in SCHEDULES:
        raise DiffuRecError(f"unknown noise_schedule '{name}' (one of {', '.join(SCHEDULES)})")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise DiffuRecError(f"diffusion_steps must be an integer >= 1, got {steps!r}")
    # linear ramps scaled by 1000/T exceed 1 for small T; clipping keeps every beta a valid variance
    return np.clip(SCHEDULES[name](int(steps)), 1e-8, MAX_BETA)


def strided_timesteps(diffusion_steps: int, reverse_steps: int) -> np.ndarray:
    """The S training steps the reverse process visits, ascending, always including 0 and T-1.

    Evenly spaced over [0, T-1] so that S = T gives every step and S = 1 a single jump from T-1.
    """
    if not 1 <= reverse_steps <= diffusion_steps:
        raise DiffuRecError(
            f"reverse_steps={reverse_steps} must be in [1, diffusion_steps={diffusion_steps}]"
        )
    if reverse_steps == 1:
        return np.array([diffusion_steps - 1], dtype=np.int64)
    steps = np.round(np.linspace(0, diffusion_steps - 1, reverse_steps)).astype(np.int64)
    return np.unique(steps)
