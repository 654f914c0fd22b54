"""Transformer blocks shared by DiffuRec's Approximator and SASRec, plus the step embedding.

Histories are left-padded, so the last position is always the most recent real item. Attention
uses ``scaled_dot_product_attention`` with a key padding mask; a batch with no padding passes no
mask at all, which lets torch pick its fastest kernel. Only the last position is ever read, so
the final block computes its query, attention and feed-forward for that row alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffurec.models.dropout import Dropout, dropout


def attention_mask(valid: torch.Tensor | None, causal: bool, length: int, device) -> torch.Tensor | None:
    """Boolean mask [B, 1, L, L] (True = may attend), or None when nothing needs masking.

    ``valid`` [B, L] marks real (non-padding) positions; None means the batch has no padding.
    Padded query rows keep their own diagonal so that no row is all-masked (which would give
    NaNs that leak through the values of later layers).
    """
    if valid is None and not causal:
        return None
    if valid is None:
        valid = torch.ones(1, length, dtype=torch.bool, device=device)
    mask = valid[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return mask | (eye & ~valid[:, None, :, None])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v, with attention dropout ``dropout_p``.

    On CPU the short histories of recommendation data are faster as plain batched matmuls than
    in SDPA's flash kernel (tuned for long sequences): at [512, 4, L, 32] on 2 threads about 3x
    at L = 3-8 in fp32 and up to L = 50 in bf16; SDPA's CPU dropout is also a slow per-element
    Bernoulli draw. Elsewhere (GPU, long fp32 histories) SDPA picks its fused kernel.
    """
    L = k.shape[-2]
    if q.device.type == "cpu" and (dropout_p > 0 or L <= 20 or q.dtype != torch.float32):
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return dropout(scores.softmax(-1), dropout_p, dropout_p > 0) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _fused_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes (of bf16 and float32) oneDNN's fused linear runs in on this CPU.

    The build having the op is not enough: its bf16 primitives need AVX512 (BW/VL/DQ) or
    AVX-NE-CONVERT, and on a CPU without them (AVX2 only) the call raises. A tiny call of
    each op, once at import, asks the library itself rather than guessing from CPU flags.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    runs = []
    for dtype in (torch.bfloat16, torch.float32):
        x, weight, bias = torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype), torch.zeros(4, dtype=dtype)
        try:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
                torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "tanh")
        except RuntimeError:
            continue
        runs.append(dtype)
    return tuple(runs)


FUSED_DTYPES = _fused_linear_dtypes()  # the dtypes the fused linear is used in
_HAS_FUSED_LINEAR = bool(FUSED_DTYPES)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product on ``x`` runs in here: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _fusable(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused oneDNN linear runs in here, or None where the plain path is used.

    Only inference (no autograd graph: the fused op has no backward), on CPU, in bf16 (own or
    autocast) or float32, where it was measured to pay: float32 S=8 evaluation ran at 1.12x
    ``addmm`` (8 paired passes, with ``packed_weights``). In training, a bias-only fused
    forward with a written-out backward ran at 0.97x the plain path (6 interleaved 30-batch
    rounds), so training keeps ``addmm``.
    """
    if x.device.type != "cpu" or torch.is_grad_enabled() or not _HAS_FUSED_LINEAR:
        return None
    dtype = compute_dtype(x)
    return dtype if dtype in FUSED_DTYPES else None


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False, approximate: str = "none") -> torch.Tensor:
    """``layer(x)``, then GELU if ``gelu`` (exact, or ``approximate="tanh"``).

    In bf16 CPU inference this is one oneDNN call with the bias and the GELU fused into the
    matrix product: ``addmm`` first copies the broadcast bias into the [tokens, out] output and
    GELU is a further pass over it. The reverse process runs the Approximator S times per user,
    so its feed-forward pair dominates evaluation: 4.0 against 4.6 ms for [5376, 128] -> 512 ->
    128 on 2 threads (microbenchmark). Inside ``packed_weights`` the weight comes ready in
    oneDNN's own layout.
    """
    dtype = _fusable(x)
    if dtype is None:
        y = layer(x)
        return F.gelu(y, approximate=approximate) if gelu else y
    packed = layer.__dict__.get("_packed")
    if packed is not None and packed[0] == dtype:
        _, weight, bias = packed
    else:
        weight = layer.weight.to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype).contiguous(), weight, bias,
                                              "gelu" if gelu else "none", [], approximate if gelu else "")


@contextlib.contextmanager
def packed_weights(model: nn.Module, dtype: torch.dtype | None, rows: int = 4096):
    """Within this block, the Transformer linears of ``model`` use ``dtype`` (bf16 or float32)
    weights reordered once into oneDNN's blocked layout, for CPU inference (``linear``).

    Otherwise each call casts its weight and bias and oneDNN reorders the weight again. In
    bf16, [6144, 128] -> 512 with GELU took 2.51 against 2.67 ms, 512 -> 128 1.79 against
    1.85 ms (2 threads, medians of 40); in float32, 128 -> 512 3.85 against 4.05 ms
    (``addmm``: 4.58). The results are the same for any number of rows (``rows`` only hints
    the layout). The copies are dropped on exit, so a model trained afterwards never reads
    stale weights. Does nothing off the CPU, in other dtypes, or where oneDNN's fused linear
    is missing.
    """
    layers = [layer for m in model.modules() if isinstance(m, Block) for layer in m.fused_linears()]
    if not (_HAS_FUSED_LINEAR and dtype in FUSED_DTYPES and layers and layers[0].weight.device.type == "cpu"):
        layers = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.to(dtype), rows)
                layer.__dict__["_packed"] = (dtype, weight, None if layer.bias is None else layer.bias.to(dtype))
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_packed", None)


def _heads(y: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, parts * H] -> ``parts`` views [B, heads, L, H / heads] (no copies)."""
    B, L, width = y.shape
    return tuple(y.view(B, L, parts, heads, width // parts // heads).permute(2, 0, 3, 1, 4))


@dataclass(frozen=True)
class BlockOptions:
    """The block's behaviours, each a config key for its ablation.

    The defaults are the reference code's block (``Config``'s defaults): tanh GELU, dropout also
    on the feed-forward's hidden activation and the block's output, LayerNorm epsilon 1e-12,
    Xavier-normal feed-forward and attention-output weights. ``project()`` is the block this
    project used before: exact GELU, dropout on the residual branches and attention weights
    only, torch's epsilon and initialisation.
    """

    gelu: str = "tanh"  # or "exact"
    reference_dropout: bool = True
    layer_norm_eps: float = 1e-12
    xavier_init: bool = True

    @classmethod
    def from_config(cls, cfg) -> BlockOptions:
        return cls(gelu=cfg.gelu, reference_dropout=cfg.dropout_placement == "reference",
                   layer_norm_eps=cfg.layer_norm_eps, xavier_init=cfg.linear_init == "xavier")

    @classmethod
    def reference(cls) -> BlockOptions:
        return cls(gelu="tanh", reference_dropout=True, layer_norm_eps=1e-12, xavier_init=True)

    @classmethod
    def project(cls) -> BlockOptions:
        return cls(gelu="exact", reference_dropout=False, layer_norm_eps=1e-5, xavier_init=False)


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) with a 4x GELU MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float, options: BlockOptions = BlockOptions()):
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(hidden, eps=options.layer_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden, eps=options.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)  # applied by linear()
        )
        if options.xavier_init:
            for layer in (self.ffn[0], self.ffn[2], self.out):
                nn.init.xavier_normal_(layer.weight)
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout
        self.gelu_approximate = "tanh" if options.gelu == "tanh" else "none"
        # the reference's extra dropouts: the feed-forward's hidden activation, the block's output
        self.extra_dropout = Dropout(dropout) if options.reference_dropout else None

    def fused_linears(self) -> tuple[nn.Linear, ...]:
        """The linears ``forward`` applies through ``linear`` (what ``packed_weights`` packs)."""
        return self.qkv, self.out, self.ffn[0], self.ffn[2]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        B, L, H = x.shape
        heads = self.heads
        h = self.norm_attn(x)
        if last_only and _fusable(h) is None:
            # only the last row is read downstream: its query alone, keys and values for all rows.
            # The qkv output is laid out as (q, k, v) x heads x d, so q is the weight's first H
            # rows. A third of the last block's qkv product, forward and backward, is skipped:
            # about 1% of a bf16 training step (paired steps at lengths 8 and 30). Inference
            # keeps the one fused, pre-packed qkv product (``linear``)
            weight, bias = self.qkv.weight, self.qkv.bias
            (q,) = _heads(F.linear(h[:, -1:], weight[:H], None if bias is None else bias[:H]), 1, heads)
            k, v = _heads(F.linear(h, weight[H:], None if bias is None else bias[H:]), 2, heads)
        else:
            q, k, v = _heads(linear(h, self.qkv), 3, heads)
            if last_only:
                q = q[:, :, -1:]  # one query row instead of L
        if last_only:
            x = x[:, -1:]
            mask = mask[:, :, -1:] if mask is not None else None
        a = attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(linear(a.transpose(1, 2).reshape(B, x.shape[1], H), self.out))
        hidden = linear(self.norm_ffn(x), self.ffn[0], gelu=True, approximate=self.gelu_approximate)
        if self.extra_dropout is None:
            return x + self.dropout(linear(hidden, self.ffn[2]))
        x = x + self.dropout(linear(self.extra_dropout(hidden), self.ffn[2]))
        return self.extra_dropout(x)


class TransformerStack(nn.Module):
    def __init__(self, hidden: int, heads: int, blocks: int, dropout: float,
                 options: BlockOptions = BlockOptions()):
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout, options) for _ in range(blocks))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L, H] -> the last position's representation [B, H]."""
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=i == len(self.blocks) - 1)
        return x.squeeze(1)  # the last block keeps one row; a view, so no zero-filled gradient


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) steps, as in improved-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class StepEmbedding(nn.Module):
    """Sinusoid of the step (rescaled to a 1000-step range) through a SiLU MLP."""

    def __init__(self, hidden: int, diffusion_steps: int):
        super().__init__()
        self.hidden = hidden
        self.scale = 1000.0 / diffusion_steps
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
        # the sinusoids of the T integer steps never change: computed once (not saved)
        self.register_buffer("step_sinusoids", timestep_embedding(torch.arange(diffusion_steps) * self.scale, hidden),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() and t.numel() > len(self.step_sinusoids):
            # a training batch holds at most T distinct steps: embed each once and gather its
            # rows (the same values; the MLP runs on T rows instead of the batch)
            return self.mlp(self.step_sinusoids)[t]
        return self.mlp(timestep_embedding(t * self.scale, self.hidden))


class Approximator(nn.Module):
    """x0-hat = f(history, x_t, t): Transformer over history + lambda * (x_t + step embedding).

    lambda is drawn elementwise from N(lambda_mean, lambda_std) at every call (the reference draws
    it in evaluation too); lambda_std = 0 fixes it at lambda_mean.
    """

    def __init__(self, hidden: int, heads: int, blocks: int, dropout: float, diffusion_steps: int,
                 lambda_mean: float, lambda_std: float, options: BlockOptions = BlockOptions()):
        super().__init__()
        self.step_embedding = StepEmbedding(hidden, diffusion_steps)
        self.transformer = TransformerStack(hidden, heads, blocks, dropout, options)
        self.norm = nn.LayerNorm(hidden, eps=options.layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.lambda_mean = lambda_mean
        self.lambda_std = lambda_std

    def forward(self, history_rep: torch.Tensor, mask: torch.Tensor | None, x_t: torch.Tensor,
                t: torch.Tensor, sample_lambda: bool = True) -> torch.Tensor:
        cond = (x_t + self.step_embedding(t)).unsqueeze(1)  # [B, 1, H]
        if sample_lambda and self.lambda_std > 0:
            # one draw, fused into the add: rep + (mean + std * eps) * cond
            eps = torch.randn_like(history_rep)
            z = torch.addcmul(history_rep + self.lambda_mean * cond, eps, self.lambda_std * cond)
        else:
            z = history_rep + self.lambda_mean * cond
        return self.norm(self.dropout(self.transformer(z, mask)))
