"""Evaluation by segment and beyond accuracy, in the same pass as the full-ranking metrics.

:func:`evaluate_detailed` ranks every user's target against all items exactly as
``training.evaluate`` does (same batches, same autocast, per-user averages) and, from the same
scores, also reports:

- segments of users: ``short`` / ``long`` history (the history before the target, uncapped, at
  most / above a threshold: by default the median over the evaluated users), and ``head`` /
  ``tail`` target (head: the most popular items that together hold ``head_share``, default 20%,
  of the training interactions; :func:`diffurec.metrics.head_items`);
- beyond-accuracy metrics of each user's top-K list (K = 10, 20):
  :class:`diffurec.metrics.BeyondAccuracyMetrics`.

"Training interactions" are each user's sequence without its validation and test items: what
the model was trained on, whichever split is evaluated. Keys (``split`` = valid or test)::

    {split}/HR@10 ...                        the usual metrics, as training.evaluate
    {split}/segment/{short,long,head,tail}/{HR@10,...,MRR,users}
    {split}/coverage@K, novelty@K, popularity@K, ILD@K
    {split}/segment/history_threshold, {split}/segment/head_items, {split}/segment/head_share
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffurec.config import Config
from diffurec.data.batches import iterate_batches
from diffurec.data.sequences import SequenceData, eval_examples
from diffurec.errors import DiffuRecError
from diffurec.metrics import (
    HEAD_SHARE,
    LIST_KS,
    BeyondAccuracyMetrics,
    RankingMetrics,
    SegmentMetrics,
    exclude_scores,
    head_items,
    history_threshold,
    target_ranks,
)

SEGMENTS = ("short", "long", "head", "tail")

__all__ = ["SEGMENTS", "evaluate_detailed", "training_popularity"]


def training_popularity(data: SequenceData) -> tuple[np.ndarray, np.ndarray]:
    """(interactions, distinct users) per dense item id ``0..N`` over the training part of the
    log: each user's sequence without its last two items (the validation and test targets)."""
    lengths = data.lengths
    keep = np.ones(len(data.items), dtype=bool)
    last = data.offsets[1:] - 1
    keep[last] = False
    keep[last[lengths >= 2] - 1] = False
    items = data.items[keep]
    users = np.repeat(np.arange(len(data), dtype=np.int64), lengths)[keep]
    interactions = np.bincount(items, minlength=data.num_items + 1).astype(np.int64)
    pairs = np.unique(users * (data.num_items + 1) + items)
    distinct = np.bincount(pairs % (data.num_items + 1), minlength=data.num_items + 1).astype(np.int64)
    return interactions, distinct


@torch.no_grad()
def evaluate_detailed(model: nn.Module, data: SequenceData, split: str, cfg: Config, device: torch.device, *,
                      reverse_steps: int | None = None, segments: bool = True, beyond_accuracy: bool = True,
                      threshold: int | None = None, head_share: float = HEAD_SHARE,
                      list_ks: tuple[int, ...] = LIST_KS, progress: bool = False) -> dict[str, float]:
    """Metrics of ``split`` (keys without the split prefix): overall, by segment, beyond accuracy."""
    from diffurec.models.approximator import packed_weights
    from diffurec.training import (
        SCORE_ROWS,
        autocast,
        autocast_dtype,
        eval_batch_order,
        eval_batching,
        pad_to,
        progress_bar,
    )

    if not 0.0 < head_share < 1.0:
        raise DiffuRecError(f"--head-share must lie strictly between 0 and 1, got {head_share}")
    if threshold is not None and threshold < 1:
        raise DiffuRecError(f"--history-threshold must be >= 1, got {threshold}")
    if beyond_accuracy and max(list_ks) > data.num_items:
        raise DiffuRecError(f"lists of {max(list_ks)} items need at least as many items (the data has "
                            f"{data.num_items})")
    ex = eval_examples(data, split, cfg.max_len)
    full_length = ex.end - data.offsets[:-1]  # the whole history before the target
    targets = data.items[ex.end]
    interactions, distinct_users = training_popularity(data)
    head = head_items(interactions, head_share)
    threshold = history_threshold(full_length) if threshold is None else int(threshold)
    masks_all = {"short": full_length <= threshold, "long": full_length > threshold,
                 "head": head[targets], "tail": ~head[targets]}
    overall = RankingMetrics()
    by_segment = SegmentMetrics(SEGMENTS) if segments else None
    beyond = None
    kmax = max(list_ks)
    model.eval()
    if beyond_accuracy:
        beyond = BeyondAccuracyMetrics(interactions, distinct_users, len(data),
                                       model.item_embeddings.weight, ks=list_ks)
    order = eval_batch_order(ex.end - ex.start, cfg, device)
    batches = iterate_batches(data.items, ex.start, ex.end, eval_batching(cfg, device)[0], pad_to=pad_to(cfg),
                              order=order, with_index=True)
    kwargs = {} if reverse_steps is None else {"reverse_steps": reverse_steps}
    dtype = autocast_dtype(device, cfg.precision)
    items = model.item_matrix()  # float32: scores rank in float32 (SequenceEncoderBase.score)
    bar = progress_bar(len(order), f"eval {split} (detailed)", progress)
    with autocast(device, cfg.precision), packed_weights(model, dtype or torch.float32):
        for batch in batches:
            history = batch["history"].to(device)
            target = batch["target"].to(device)
            index = batch["index"]
            reps = [model.predict(history, **kwargs) for _ in range(cfg.reverse_samples)]
            for lo in range(0, len(target), SCORE_ROWS):
                rows = slice(lo, lo + SCORE_ROWS)
                scores = None
                for rep in reps:
                    s = model.score(rep[rows], items)
                    scores = s if scores is None else scores + s
                exclude = history[rows] if cfg.exclude_history else None
                ranks = target_ranks(scores, target[rows], exclude)
                overall.update(ranks)
                if by_segment is not None:
                    users = index[rows]
                    by_segment.update(ranks.cpu(), {name: torch.from_numpy(m[users]) for name, m in masks_all.items()})
                if beyond is not None:
                    if exclude is not None:
                        scores = exclude_scores(scores, exclude)
                    beyond.update(torch.topk(scores, kmax, dim=1).indices + 1)
            bar.update(1)
    bar.close()
    out = overall.compute()
    if by_segment is not None:
        out.update({f"segment/{k}": v for k, v in by_segment.compute().items()})
        out.update({"segment/history_threshold": float(threshold), "segment/head_share": float(head_share),
                    "segment/head_items": float(head.sum())})
    if beyond is not None:
        out.update(beyond.compute())
    return out
