"""Cross-entropy over every item, with the softmax kept and the backward written out.

Autograd's ``log_softmax`` + ``nll_loss`` walks the [batch, items] scores five times per step on
top of the GEMMs: an upcast copy, the log-softmax, a zero-filled gradient for ``nll_loss``, the
log-softmax backward and a downcast of its result for the backward GEMMs. Here the forward keeps
the softmax (computed in float32 inside the kernel, stored in the scores' dtype, which is exactly
what the old path fed the backward GEMMs) and the backward is ``softmax - onehot`` handed to the
two GEMMs. On 2 CPU threads, forward and backward of [512, 128] x [12101, 128] in bf16 took
18-22 ms against 33-48 ms in one interleaved microbenchmark (``benchmarks/profile_step.py``
showed the extra passes).
"""

from __future__ import annotations

import torch


class _FullCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rep: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                label_smoothing: float) -> torch.Tensor:
        with torch.autocast(rep.device.type, enabled=False):
            probs = torch.softmax(rep @ items.t(), dim=-1)
            target_prob = probs.gather(1, target[:, None]).squeeze(1).float()
            # -log p(target); a probability that underflows float32 (a target more than ~87 nats
            # below the best item) reports a loss of 87.3, its gradient is still exact
            losses = -target_prob.clamp_min(torch.finfo(torch.float32).tiny).log()
            item_mean = None
            if label_smoothing:
                # (1 - e) (-log p_t) + e mean_j(-log p_j), with -log p_j = lse - s_j and
                # lse = s_t - log p_t: -log p_t + e (s_t - mean_j s_j), from [B, H] operands
                # only, so the [B, items] matrix is not walked again
                rep32 = rep.float()
                target_score = (rep32 * items[target].float()).sum(-1)
                item_mean = items.float().mean(0)  # [H], reused by the backward
                mean_score = rep32 @ item_mean
                losses = losses + label_smoothing * (target_score - mean_score)
        ctx.label_smoothing, ctx.item_mean = label_smoothing, item_mean
        ctx.save_for_backward(probs, rep, items, target)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        if getattr(ctx, "probs_overwritten", False):
            raise RuntimeError("full_cross_entropy supports one backward per forward: the first "
                               "overwrote its saved softmax (retain_graph is not supported)")
        ctx.probs_overwritten = True
        probs, rep, items, target = ctx.saved_tensors
        with torch.autocast(rep.device.type, enabled=False):
            # d loss_i / d score_ij = p_ij - (1 - e) [j = target_i] - e / N, written over the
            # saved probs (the [B, items] matrix is not copied). One entry per row, so plain
            # indexing: scatter_add_ upcasts the whole bf16 matrix
            smoothing = ctx.label_smoothing
            rows = torch.arange(len(target), device=target.device)
            probs[rows, target] -= 1 - smoothing
            grad_scores = probs
            # the per-example upstream gradients scale rows: apply them to the [B, H] operands
            # rather than to the [B, items] matrix
            row_scale = grad_losses.to(probs.dtype)[:, None]
            scaled_rep = rep * row_scale
            grad_rep = (grad_scores @ items) * row_scale
            grad_items = grad_scores.t() @ scaled_rep
            if smoothing:
                # the uniform -e / N term is rank one: applied to the GEMMs' results, not to
                # every entry of the [B, items] matrix
                grad_rep = grad_rep - smoothing * ctx.item_mean.to(rep.dtype) * row_scale
                grad_items = grad_items - (smoothing / len(items)) * scaled_rep.float().sum(0).to(items.dtype)
        return grad_rep, grad_items, None, None


def full_cross_entropy(rep: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example cross-entropy of the scores ``rep @ items.T`` against column ``target``.

    ``rep`` [B, H] and ``items`` [N, H] must share a dtype: the scores and softmax are in it
    (bf16 under autocast), the softmax accumulates in float32, the losses [B] are float32.
    ``label_smoothing`` e mixes the one-hot target with the uniform distribution over all N
    columns, as ``torch.nn.functional.cross_entropy(label_smoothing=e)`` does.
    """
    if rep.dtype != items.dtype:
        raise TypeError(f"rep is {rep.dtype} but items is {items.dtype}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _FullCrossEntropy.apply(rep, items, target, float(label_smoothing))
