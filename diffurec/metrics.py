"""Full-ranking metrics: each user's target is ranked against every item, then averaged per user.

Streaming: scores are produced a block of users at a time, reduced to the target's rank at once,
and only per-metric sums are kept, so no users x items matrix ever exists.
"""

from __future__ import annotations

import torch

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among all items.

    ``scores`` [B, N]: column j scores item j + 1. ``target`` [B]: dense ids 1..N.
    ``exclude`` [B, L]: item ids (0 = padding) to drop from the ranking, e.g. the history; the
    target itself is never dropped. Ties count against the target only if strictly higher.
    """
    scores = scores.float()
    target_col = (target - 1).unsqueeze(1)
    target_score = scores.gather(1, target_col)
    if exclude is not None:
        scores = scores.clone()
        drop = exclude - 1
        keep_pad = drop >= 0
        drop = torch.where(keep_pad, drop, target_col.expand_as(drop))
        scores.scatter_(1, drop, float("-inf"))
        scores.scatter_(1, target_col, target_score)
    return (scores > target_score).sum(dim=1) + 1


class RankingMetrics:
    """Accumulates HR@K, NDCG@K (K in 5, 10, 20) and MRR from target ranks."""

    def __init__(self, ks: tuple[int, ...] = KS):
        self.ks = ks
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, ranks: torch.Tensor) -> None:
        ranks = ranks.double().cpu()
        sums = {"MRR": (1.0 / ranks).sum().item()}
        for k in self.ks:
            hit = ranks <= k
            sums[f"HR@{k}"] = hit.sum().item()
            sums[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), 0.0).sum().item()
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += len(ranks)

    def merge(self, other_sums: dict[str, float], other_count: int) -> None:
        for key, value in other_sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += other_count

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        order = [f"{m}@{k}" for m in ("HR", "NDCG") for k in self.ks] + ["MRR"]
        return {key: self.sums[key] / self.count for key in order}
