"""The training step replayed as CUDA graphs (config ``cuda_graphs``, on by default; it changes
only speed: ``tests/test_cuda_graphs.py`` checks replays against eager steps on a GPU).

On a GPU an eager step of this model launches about 400 small kernels whose launch cost, not
their run time, sets the pace: on an H100 a batch-512 step took 25 ms of host time for 2.4 ms
of kernel time (``benchmarks/gpu_profile.py``). A CUDA graph replays the whole step (forward,
backward, gradient clipping, Adam) as one launch: 3.1 ms a step, the GPU 97% busy.

A graph fixes its tensor shapes, so batches are grouped by padded length: each history is
left-padded further, to a multiple of ``pad_multiple`` (at most ``max_len``). Padding is masked,
so this changes no result (``test_bucketed_and_unbucketed_batches_give_the_same_loss``), and
Beauty's lengths 1-50 need 7 graphs per batch size. A shape's first ``warmup`` steps run eagerly
(they build cuBLAS/cuDNN plans, which cannot be built under capture); its next step captures the
graph and every later one replays it. Each graph has its own memory pool: graphs replay in any
order, so one graph's pool must never be reused by another.

Used only where a replay is the same step: a CUDA device, no DDP (its all-reduce hooks would
need capturing too), a constant learning rate (the graph holds Adam's lr as a constant) and a
timestep sampler that draws on the GPU (the loss-aware one reads losses back to the host).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def eager_step(model: nn.Module, optimizer, history: torch.Tensor, target: torch.Tensor,
               autocast_region, grad_clip: float) -> torch.Tensor:
    """One optimizer step; returns the loss (on the device, detached)."""
    with autocast_region():
        loss = model(history, target)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    # detached, so the caller does not keep this step's autograd graph alive into the next step:
    # its parameters' gradient accumulators would then carry this step's CUDA stream into the
    # next (a warm-up on the side stream into the capture, which torch warns may break it)
    return loss.detach()


def graphs_unusable(model: nn.Module, device: torch.device, lr_schedule: str) -> str | None:
    """Why a graphed step would not be the same step here (None: it would)."""
    from torch.nn.parallel import DistributedDataParallel

    from diffurec.models.diffusion import LossAwareSampler

    if device.type != "cuda":
        return "not a CUDA device"
    if isinstance(model, DistributedDataParallel):
        return "DDP"
    if lr_schedule != "constant":
        return f"lr_schedule {lr_schedule!r}"
    if isinstance(getattr(model, "timestep_sampler", None), LossAwareSampler):
        return "the loss-aware timestep sampler"
    return None


class GraphedTrainStep:
    """``step(history, target) -> loss``: one optimizer step, replayed from a CUDA graph per
    (batch size, padded length) once that shape has run ``warmup`` times eagerly."""

    def __init__(self, model: nn.Module, optimizer, autocast_region, *, grad_clip: float = 0.0,
                 max_len: int = 50, pad_multiple: int = 8, warmup: int = 2):
        self.model, self.optimizer = model, optimizer
        self.autocast_region = autocast_region  # a callable returning an autocast context
        self.grad_clip, self.max_len, self.pad_multiple, self.warmup = grad_clip, max_len, pad_multiple, warmup
        self.seen: dict[tuple[int, int], int] = {}
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.failed: str | None = None  # a capture failed: every later step runs eagerly
        self.side = None

    def padded_length(self, length: int) -> int:
        return min(max(length, self.max_len), -(-length // self.pad_multiple) * self.pad_multiple)

    def step(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        length = self.padded_length(history.shape[1])
        if length != history.shape[1]:
            history = F.pad(history, (length - history.shape[1], 0))  # left: the padding id 0
        key = (history.shape[0], length)
        graph = self.graphs.get(key)
        if graph is not None:
            static_history, static_target, static_loss, cuda_graph = graph
            static_history.copy_(history)
            static_target.copy_(target)
            cuda_graph.replay()
            return static_loss
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.failed is None and self.seen[key] > self.warmup:
            try:
                self.graphs[key] = self._capture(history, target)
            except Exception as exc:  # never lose the run to a capture: fall back to eager steps
                self.failed = repr(exc)
                warnings.warn(f"CUDA graph capture failed, training on eagerly: {exc!r}", stacklevel=2)
            else:
                return self.step(history, target)
        return self._eager(history, target)

    def _eager(self, history, target):
        # warm-up steps run on a side stream, as the CUDA-graph recipe asks, so that lazily
        # created per-stream state (cuBLAS workspaces, autograd's streams) matches the capture
        if self.side is None:
            self.side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            loss = eager_step(self.model, self.optimizer, history, target, self.autocast_region, self.grad_clip)
        main.wait_stream(self.side)
        return loss

    def _capture(self, history, target):
        static_history, static_target = history.clone(), target.clone()
        torch.cuda.synchronize()
        # gradients are allocated inside the graph (from its own pool), so a replay needs no
        # zeroing; outside the graph .grad is left None
        self.optimizer.zero_grad(set_to_none=True)
        cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call must not invalidate this capture (Ray Train sets
        # up a process group, NCCL's watchdog thread included, even for one worker)
        with torch.cuda.graph(cuda_graph, capture_error_mode="thread_local"):
            static_loss = eager_step(self.model, self.optimizer, static_history, static_target,
                                     lambda: self.autocast_region(cache_enabled=False), self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return static_history, static_target, static_loss, cuda_graph
