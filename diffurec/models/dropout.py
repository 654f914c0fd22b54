"""Dropout whose CPU mask comes from numpy's SFC64 instead of torch's per-element Bernoulli.

On CPU, ``torch.bernoulli_`` was 15% of a DiffuRec training step (about 4 ms per [512, 9, 128]
activation on 2 threads). Here 16-bit draws from numpy's SFC64 (1.6x faster than its PCG64,
and both pass PractRand) and one compare make the mask: 2.0 ms for 3.3M entries on 2 threads,
against 20.1 ms for ``torch.bernoulli_`` (microbenchmark). The mask is then
written as the multiplier itself, 0 or 1 / (1 - p) in the activation's dtype, by multiplying
the 0/1 bytes by the bit pattern of the scale: torch's bool-to-float conversion and ``where`` on a
bool mask were each about 8x slower than the one same-dtype multiply left, and they ran on every
dropout, forward and backward. The scale is rounded to the activation's dtype, as torch's own
dropout does. Each call seeds a fresh generator from torch's, so ``torch.manual_seed`` and a
restored torch RNG state (resumed runs) still fix every mask. The drop probability is rounded to
a multiple of 2**-16. Off the CPU this is plain ``F.dropout``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scaled_mask):
        ctx.save_for_backward(scaled_mask)
        return x * scaled_mask

    @staticmethod
    def backward(ctx, grad):
        (scaled_mask,) = ctx.saved_tensors
        return grad * scaled_mask, None


def _draws(n: int) -> np.ndarray:
    """n uniform int16 draws from an SFC64 seeded by torch's generator."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]


def _keep(n: int, p: float) -> np.ndarray:
    """n bools, each True with probability 1 - p (p rounded to a multiple of 2**-16)."""
    return _draws(n) >= int(round(p * 65536)) - 32768


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool CPU tensor of ``shape``, each entry True with probability 1 - p."""
    return torch.from_numpy(_keep(int(np.prod(shape)), p)).view(shape)


_SIGNED = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32), 8: (np.int64, torch.int64)}


@functools.lru_cache(maxsize=None)
def _scale_bits(p: float, dtype: torch.dtype):
    """The bit pattern of 1 / (1 - p) rounded to ``dtype``, as a numpy signed int of its width."""
    np_int, torch_int = _SIGNED[dtype.itemsize]
    return np_int(torch.tensor(1.0 / (1.0 - p), dtype=dtype).view(torch_int).item())


def scaled_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier: 1 / (1 - p) where kept (the same entries as ``keep_mask`` under
    the same seed), 0 where dropped, as a CPU tensor of floating ``dtype``."""
    bits = _scale_bits(p, dtype)
    keep = _keep(int(np.prod(shape)), p).view(np.uint8)
    # 0/1 times the scale's bit pattern is the bit pattern of 0/scale
    return torch.from_numpy(np.multiply(keep, bits, dtype=bits.dtype)).view(dtype).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return _ApplyMask.apply(x, scaled_keep_mask(x.shape, p, x.dtype))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the fast CPU mask (same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
