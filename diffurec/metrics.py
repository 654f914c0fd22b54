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
        scores = exclude_scores(scores, exclude)
        scores.scatter_(1, target_col, target_score)
    return (scores > target_score).sum(dim=1) + 1


def exclude_scores(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """A copy of ``scores`` [B, N] with the items in ``items`` [B, L] (dense ids, 0 = padding)
    set to -inf. Padding goes to an extra column that is dropped afterwards."""
    index = torch.where(items > 0, items - 1, scores.shape[1])
    out = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    out.scatter_(1, index, float("-inf"))
    return out[:, :-1]


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


# ---- segments and beyond-accuracy metrics -----------------------------------------------------
# Added for evaluation by segment and of the top-K lists themselves (docs/recommend.md). Inputs are
# numpy arrays over dense item ids (index 0 = padding, never an item), so these functions know
# nothing about datasets or models.

HEAD_SHARE = 0.2  # the head: the most popular items that together hold 20% of the interactions
LIST_KS = (10, 20)  # list lengths the beyond-accuracy metrics are measured at


def head_items(popularity, share: float = HEAD_SHARE):
    """Boolean mask over dense ids ``0..N``: True for the head items.

    ``popularity[i]`` is item i's interaction count (index 0, padding, is ignored). Items are
    sorted by count, descending (ties: lower id first); the head is the shortest prefix whose
    counts reach ``share`` of all interactions. Every other item is the long tail.
    """
    import numpy as np

    pop = np.asarray(popularity, dtype=np.float64).copy()
    if not 0.0 < share < 1.0:
        raise ValueError(f"head share must lie in (0, 1), got {share}")
    pop[0] = 0.0
    order = np.argsort(-pop[1:], kind="stable") + 1
    cumulative = np.cumsum(pop[order])
    total = cumulative[-1] if len(cumulative) else 0.0
    mask = np.zeros(len(pop), dtype=bool)
    if total <= 0:
        return mask
    n_head = int(np.searchsorted(cumulative, share * total, side="left")) + 1
    mask[order[:n_head]] = True
    return mask


def history_threshold(lengths) -> int:
    """The default short/long boundary: the median history length (short = length <= it)."""
    import numpy as np

    return int(np.median(np.asarray(lengths))) if len(lengths) else 0


class SegmentMetrics:
    """:class:`RankingMetrics` per named user segment (segments may overlap), plus user counts."""

    def __init__(self, names: tuple[str, ...], ks: tuple[int, ...] = KS):
        self.names = tuple(names)
        self.metrics = {name: RankingMetrics(ks) for name in self.names}

    def update(self, ranks: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """``masks[name]``: bool [B], which of these users belong to segment ``name``."""
        for name in self.names:
            mask = masks[name].to(ranks.device)
            if bool(mask.any()):
                self.metrics[name].update(ranks[mask])

    def compute(self) -> dict[str, float]:
        """``{"<segment>/HR@10": ..., "<segment>/users": n}``; an empty segment reports users 0."""
        out: dict[str, float] = {}
        for name in self.names:
            m = self.metrics[name]
            out.update({f"{name}/{k}": v for k, v in m.compute().items()})
            out[f"{name}/users"] = float(m.count)
        return out


class BeyondAccuracyMetrics:
    """Streaming beyond-accuracy metrics of top-K lists, averaged per user (lists of K = each of
    ``ks``, the first K of a longer list):

    - ``coverage@K``: distinct items in all lists / all items (catalogue coverage);
    - ``novelty@K``: mean self-information ``-log2(p_i)`` of the listed items, ``p_i`` = the share
      of users whose training interactions hold item i (at least one user, so it stays finite);
    - ``popularity@K``: mean popularity (training interaction count) of the listed items
      (popularity bias, the average recommendation popularity);
    - ``ILD@K``: intra-list diversity, 1 - the mean cosine similarity over the list's item pairs,
      from the model's item embeddings.
    """

    def __init__(self, popularity, users_per_item, num_users: int, embeddings: torch.Tensor,
                 ks: tuple[int, ...] = LIST_KS):
        import numpy as np

        self.ks = tuple(sorted(ks))
        pop = np.asarray(popularity, dtype=np.float64)
        users = np.maximum(np.asarray(users_per_item, dtype=np.float64), 1.0)
        self.num_items = len(pop) - 1
        self.popularity = torch.from_numpy(pop)
        self.self_info = torch.from_numpy(-np.log2(np.minimum(users / max(num_users, 1), 1.0)))
        # [N + 1, H] unit rows; row 0 (padding) zero
        emb = embeddings.detach().float().cpu()
        self.unit = torch.nn.functional.normalize(emb, dim=1)
        self.seen = {k: torch.zeros(self.num_items + 1, dtype=torch.bool) for k in self.ks}
        self.sums = {f"{m}@{k}": 0.0 for k in self.ks for m in ("novelty", "popularity", "ILD")}
        self.count = 0

    def update(self, top: torch.Tensor) -> None:
        """``top`` [B, >= max(ks)]: dense item ids of each user's list, best first."""
        top = top.cpu().long()
        if top.shape[0] == 0:
            return
        if top.shape[1] < self.ks[-1]:
            raise ValueError(f"lists of {top.shape[1]} items; beyond-accuracy metrics need {self.ks[-1]}")
        for k in self.ks:
            ids = top[:, :k]
            self.seen[k][ids.reshape(-1)] = True
            self.sums[f"novelty@{k}"] += self.self_info[ids].mean(dim=1).sum().item()
            self.sums[f"popularity@{k}"] += self.popularity[ids].mean(dim=1).sum().item()
            if k > 1:
                u = self.unit[ids]  # [B, k, H]
                gram = u @ u.transpose(1, 2)
                off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
                self.sums[f"ILD@{k}"] += (1.0 - off_diagonal / (k * (k - 1))).double().sum().item()
        self.count += top.shape[0]

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        out = {}
        for k in self.ks:
            out[f"coverage@{k}"] = self.seen[k][1:].sum().item() / max(self.num_items, 1)
            for m in ("novelty", "popularity", "ILD"):
                out[f"{m}@{k}"] = self.sums[f"{m}@{k}"] / self.count
        return out
