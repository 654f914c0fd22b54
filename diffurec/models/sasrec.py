"""SASRec (Kang & McAuley 2018) trained with full cross-entropy over all items.

It shares embeddings, Transformer blocks, examples, training loop and evaluation with DiffuRec,
so the two are compared on equal terms; only the causal mask and the objective differ.
"""

from __future__ import annotations

import torch
from torch import nn

from diffurec.config import Config
from diffurec.models.approximator import TransformerStack
from diffurec.models.diffurec import SequenceEncoderBase


class SASRec(SequenceEncoderBase):
    causal = True

    def __init__(self, cfg: Config, num_items: int):
        super().__init__(cfg, num_items)
        self.transformer = TransformerStack(cfg.hidden_size, cfg.num_heads, cfg.num_blocks, cfg.dropout,
                                            self.block_options)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        rep, mask = self.embed_history(history)
        return self.norm(self.transformer(rep, mask))

    def forward(self, history: torch.Tensor, target: torch.Tensor, **_) -> dict:
        losses = self.cross_entropy(self.encode(history), target)
        return {"loss": losses.mean(), "losses": losses}

    @torch.no_grad()
    def predict(self, history: torch.Tensor, **_) -> torch.Tensor:
        return self.encode(history)
