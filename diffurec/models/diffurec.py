"""DiffuRec: item embeddings + Approximator + Gaussian diffusion + rounding by inner product.

Training: the target item's embedding x_0 is noised to x_t at a sampled step t; the Approximator
predicts x_0 from the history and x_t; the loss is cross-entropy of x0-hat . E^T over all items.
Inference: start from N(0, I), run S strided reverse steps, and score x0-hat . E^T.
"""

from __future__ import annotations

import torch
from torch import nn

from diffurec.config import Config
from diffurec.models.approximator import Approximator, BlockOptions, attention_mask, compute_dtype
from diffurec.models.diffusion import GaussianDiffusion, make_timestep_sampler
from diffurec.models.dropout import Dropout
from diffurec.models.losses import full_cross_entropy


class SequenceEncoderBase(nn.Module):
    """Item (and optional position) embeddings, and scoring against every item."""

    causal = False

    def __init__(self, cfg: Config, num_items: int):
        super().__init__()
        self.num_items = num_items
        self.max_len = cfg.max_len
        self.attend_to_padding = cfg.attend_to_padding
        self.item_embeddings = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)
        item_std = cfg.embedding_init_std or cfg.hidden_size**-0.5
        nn.init.normal_(self.item_embeddings.weight, std=item_std)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()
        self.position_embeddings = (
            nn.Embedding(cfg.max_len, cfg.hidden_size) if cfg.positional_embedding else None
        )
        if self.position_embeddings is not None and cfg.position_init_std != 1.0:
            # 1.0 keeps nn.Embedding's own draw, so runs made before this key existed replay
            # bit for bit from their seed
            nn.init.normal_(self.position_embeddings.weight, std=cfg.position_init_std or item_std)
        self.emb_dropout = Dropout(cfg.emb_dropout)
        self.block_options = BlockOptions.from_config(cfg)
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ce_padding_column = cfg.ce_padding_column
        self.label_smoothing = cfg.label_smoothing

    def embed_history(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, L] left-padded ids -> (representations [B, L, H], attention mask or None)."""
        x = self.item_embeddings(history)
        L = history.shape[1]
        if self.position_embeddings is not None:
            # positions count back from the most recent item, so padding never shifts them
            positions = torch.arange(self.max_len - L, self.max_len, device=history.device)
            x = x + self.position_embeddings(positions)
        x = self.emb_norm(self.emb_dropout(x))
        valid = history > 0
        # no mask when nothing is padded; the check reads the tensor, so only on CPU (on a GPU it
        # would synchronise every step, and a mask costs the fused kernel little)
        if self.attend_to_padding or (history.device.type == "cpu" and bool(valid.all())):
            valid = None
        return x, attention_mask(valid, self.causal, L, history.device)

    def score(self, rep: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Rounding: inner product with every real item, in float32 under any autocast; column j
        is item j + 1. ``items`` is ``item_matrix()``, computed once by an evaluation pass.

        Ranking needs the float32 product: a bf16 score keeps 8 significant bits, so near the top
        of a ranking (scores around 10, spaced 0.06 apart in bf16) the target ties with its
        neighbours, and ``target_ranks`` counts ties in the target's favour.
        """
        items = self.item_matrix() if items is None else items
        with torch.autocast(rep.device.type, enabled=False):
            return rep.float() @ items.float().t()

    def item_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real items' embeddings [num_items, H] (row 0, the padding id, left out)."""
        items = self.item_embeddings.weight[1:]
        return items if dtype is None else items.to(dtype)

    def cross_entropy(self, rep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy over every real item (``target`` holds item ids).

        With ``ce_padding_column`` the padding id's row joins the softmax, as in the reference's
        loss over its whole embedding table: the row starts at zero and is learned through this
        loss alone (``padding_idx`` keeps lookups from training it). Ranking covers real items only.
        """
        dtype = compute_dtype(rep)
        if self.ce_padding_column:
            return full_cross_entropy(rep.to(dtype), self.item_embeddings.weight.to(dtype), target,
                                      self.label_smoothing)
        return full_cross_entropy(rep.to(dtype), self.item_matrix(dtype), target - 1, self.label_smoothing)


class DiffuRec(SequenceEncoderBase):
    def __init__(self, cfg: Config, num_items: int):
        super().__init__(cfg, num_items)
        self.diffusion = GaussianDiffusion(cfg.noise_schedule, cfg.diffusion_steps)
        self.approximator = Approximator(
            cfg.hidden_size, cfg.num_heads, cfg.num_blocks, cfg.dropout, cfg.diffusion_steps,
            cfg.lambda_mean, cfg.lambda_std, self.block_options,
        )
        self.timestep_sampler = make_timestep_sampler(cfg.timestep_sampler, cfg.diffusion_steps)
        self.reverse_steps = cfg.reverse_steps
        self.deterministic_reverse = cfg.deterministic_reverse

    def forward(self, history: torch.Tensor, target: torch.Tensor,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        rep, mask = self.embed_history(history)
        x0 = self.item_embeddings(target)
        weights = torch.ones(target.shape[0], device=target.device)
        if t is None:
            t, weights = self.timestep_sampler.sample(target.shape[0], target.device)
        x_t = self.diffusion.q_sample(x0, t, noise)
        x0_hat = self.approximator(rep, mask, x_t, t)
        losses = self.cross_entropy(x0_hat, target)
        if self.training:
            self.timestep_sampler.update(t, losses)
        return {"loss": (losses * weights).mean(), "losses": losses, "t": t}

    @torch.no_grad()
    def predict(self, history: torch.Tensor, reverse_steps: int | None = None,
                deterministic: bool | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """x0-hat [B, H] after the reverse process from x_T ~ N(0, I)."""
        rep, mask = self.embed_history(history)
        deterministic = self.deterministic_reverse if deterministic is None else deterministic
        if x_T is None:
            x_T = torch.randn(history.shape[0], rep.shape[-1], device=history.device, dtype=rep.dtype)

        def denoise(x_t, t):
            # every row is at the same step: embed it once and broadcast
            return self.approximator(rep, mask, x_t, t[:1], sample_lambda=not deterministic)

        return self.diffusion.reverse(denoise, x_T, reverse_steps or self.reverse_steps, deterministic)
