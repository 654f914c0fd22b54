"""Turn example index arrays into padded tensors, padded only to each batch's longest history.

Length bucketing: examples are shuffled, then sorted by history length inside windows of many
batches, cut into batches, and the batch order shuffled again. Batches hold histories of similar
length, so padding (and the compute it costs) nearly vanishes while every epoch still sees the
examples in a fresh random order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np
import torch

BUCKET_WINDOW = 64  # batches per sorting window


def pad_histories(items: np.ndarray, start: np.ndarray, end: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """Left-padded [B, L] histories items[start:end], L = longest in the batch (or ``pad_to``)."""
    lengths = end - start
    L = int(lengths.max()) if pad_to is None else max(int(pad_to), int(lengths.max()))
    index = end[:, None] - L + np.arange(L)[None, :]
    valid = index >= start[:, None]
    return np.where(valid, items[np.maximum(index, 0)], 0)


def batch_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None, bucket: bool = True) -> list[np.ndarray]:
    """Indices of each batch. ``rng=None`` keeps the input order (evaluation)."""
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if bucket:
        window = batch_size * BUCKET_WINDOW
        for lo in range(0, n, window):
            chunk = order[lo:lo + window]
            order[lo:lo + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None and bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def token_budget_order(lengths: np.ndarray, max_users: int, max_tokens: int,
                       pad_to: int | None = None) -> list[np.ndarray]:
    """Evaluation batches: users sorted by history length, each batch as many as fit
    ``max_tokens`` (users x the batch's padded length), at most ``max_users``, at least one.

    A fixed number of users per batch is either too few for short histories (the per-op cost of
    each of the S reverse passes dominates) or too many for long ones (the activations leave the
    cache). S = 32 on 2 CPU threads, bf16, users/s by batch size (interleaved runs): length 3:
    649 / 915 / 976 at 256 / 512 / 1024 users and 1,109 at 2,048; length 6: 460 / 556 / 599 at
    256 / 512 / 1024; length 20: 165 / 176 at 256 / 512; length 30-50: 72 / 78 / 72 at
    64 / 128 / 256. About 6,000 tokens is the best batch at every length.
    """
    order = np.argsort(lengths, kind="stable")
    padded = lengths[order] if pad_to is None else np.maximum(lengths[order], pad_to)
    batches, lo, n = [], 0, len(order)
    while lo < n:
        hi = min(n, lo + max_users)
        # ascending lengths: a batch [lo, j) is padded to padded[j - 1], so its token count grows with j
        j = bisect.bisect_right(range(lo + 1, hi + 1), max_tokens, key=lambda j: (j - lo) * int(padded[j - 1]))
        end = lo + max(1, j)
        batches.append(order[lo:end])
        lo = end
    return batches


def iterate_batches(items: np.ndarray, start: np.ndarray, end: np.ndarray, batch_size: int, *,
                    rng: np.random.Generator | None = None, bucket: bool = True,
                    pad_to: int | None = None, with_index: bool = False,
                    order: list[np.ndarray] | None = None) -> Iterator[dict]:
    """Yield {"history": LongTensor [B, L], "target": LongTensor [B]} (and "index" into the arrays).

    ``order``: the batches' indices, made by the caller (e.g. :func:`token_budget_order`)."""
    for idx in order if order is not None else batch_order(end - start, batch_size, rng, bucket):
        batch = {
            "history": torch.from_numpy(pad_histories(items, start[idx], end[idx], pad_to)),
            "target": torch.from_numpy(items[end[idx]]),
        }
        if with_index:
            batch["index"] = idx
        yield batch


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def iterate_window_batches(items: np.ndarray, windows, batch_size: int, *,
                           rng: np.random.Generator | None = None, pad_to: int | None = None,
                           max_batches: int | None = None) -> Iterator[dict]:
    """Length-bucketed batches from a stream of example windows (``(start, end)`` index arrays).

    For sources that hand examples over in chunks (a Ray Data shard's ``iter_batches``): each
    window is shuffled with ``rng``, sorted by history length, cut into batches of ``batch_size``
    and the batch order shuffled, exactly as :func:`iterate_batches` does over a whole epoch.
    Windows of ``batch_size * BUCKET_WINDOW`` examples give the same bucketing as one pass.
    ``max_batches`` stops after that many batches (equal step counts across DDP workers).
    """
    produced = 0
    for start, end in windows:
        start = np.asarray(start, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        if len(end) == 0:
            continue
        for batch in iterate_batches(items, start, end, batch_size, rng=rng, pad_to=pad_to):
            if max_batches is not None and produced >= max_batches:
                return
            produced += 1
            yield batch
