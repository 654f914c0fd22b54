"""Turn example index arrays into padded tensors, padded only to each batch's longest history.

Length bucketing: examples are shuffled, then sorted by history length inside windows of many
batches, cut into batches, and the batch order shuffled again. Batches hold histories of similar
length, so padding (and the compute it costs) nearly vanishes while every epoch still sees the
examples in a fresh random order.
"""

from __future__ import annotations

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


def iterate_batches(items: np.ndarray, start: np.ndarray, end: np.ndarray, batch_size: int, *,
                    rng: np.random.Generator | None = None, bucket: bool = True,
                    pad_to: int | None = None, with_index: bool = False) -> Iterator[dict]:
    """Yield {"history": LongTensor [B, L], "target": LongTensor [B]} (and "index" into the arrays)."""
    for idx in batch_order(end - start, batch_size, rng, bucket):
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
