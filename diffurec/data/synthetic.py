"""A synthetic interaction log with planted sequential structure.

Each item has three likely successors (a sparse Markov chain, successors drawn with a mild
popularity skew). A user's first event, and a ``noise`` fraction of later events, are "random"
events; every other event follows the chain from the previous item (successor weights 0.6, 0.25,
0.15). A model that learns the transitions beats a popularity ranking on HR@10 by a wide margin.

Guarantees (for the defaults, and whenever ``num_users * (1 + noise * (mean_length - 1)) >=
5 * num_items``): every user has at least 5 events, and every item appears at least 5 times (the
random events cycle through all items), so a 5/5 k-core removes nothing. There are no duplicate
events: each user's timestamps strictly increase. Rows are ordered by timestamp, as in a real
log. Deterministic for a seed; vectorised (about a second per 10M events).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffurec.errors import DiffuRecError

__all__ = ["generate_synthetic_log", "write_synthetic_log"]

MIN_EVENTS = 5
SUCCESSOR_WEIGHTS = np.array([0.6, 0.25, 0.15])


def generate_synthetic_log(
    num_users: int = 1000,
    num_items: int = 300,
    mean_length: float = 15,
    seed: int = 0,
    noise: float = 0.2,
) -> pa.Table:
    """``Table(user_id, item_id, timestamp)`` (all int64; ids start at 1)."""
    if num_users < 1 or num_items < 4:
        raise DiffuRecError(
            f"synthetic log needs num_users >= 1 and num_items >= 4 "
            f"(got {num_users}, {num_items})"
        )
    if mean_length < MIN_EVENTS:
        raise DiffuRecError(f"synthetic log: mean_length must be >= {MIN_EVENTS} (got {mean_length})")
    if not 0.0 <= noise <= 1.0:
        raise DiffuRecError(f"synthetic log: noise must lie in [0, 1] (got {noise})")
    rng = np.random.default_rng(seed)

    # Successors: three distinct items per item, skewed toward a popular head.
    pop = 1.0 / (np.arange(num_items) + 10.0) ** 0.8
    pop = pop[rng.permutation(num_items)]
    pop /= pop.sum()
    succ = np.empty((num_items, 3), dtype=np.int64)
    draws = rng.choice(num_items, size=(num_items, 8), p=pop)
    for k in range(num_items):  # tiny loop over items only
        cand = [c for c in dict.fromkeys(draws[k].tolist()) if c != k]
        while len(cand) < 3:
            c = int(rng.integers(num_items))
            if c != k and c not in cand:
                cand.append(c)
        succ[k] = cand[:3]

    # Lengths: 5 + geometric tail with the requested mean.
    extra = mean_length - MIN_EVENTS
    if extra > 0:
        lengths = MIN_EVENTS + rng.geometric(1.0 / (extra + 1.0), size=num_users) - 1
        lengths = np.minimum(lengths, int(50 * mean_length))
    else:
        lengths = np.full(num_users, MIN_EVENTS)
    lengths = lengths.astype(np.int64)

    # Users sorted by length (descending): at step s the active users are a prefix.
    order = np.argsort(-lengths, kind="stable")
    slen = lengths[order]
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(slen, out=offsets[1:])
    total = int(offsets[-1])

    # Which events are random: each user's first, plus a `noise` fraction. Random events cycle
    # through every item (a shuffled round-robin), so each item gets >= floor(m / num_items).
    random_ev = rng.random(total) < noise
    random_ev[offsets[:-1]] = True
    m = int(random_ev.sum())
    rand_items = rng.permutation(np.arange(m, dtype=np.int64) % num_items)
    flat = np.zeros(total, dtype=np.int64)
    flat[random_ev] = rand_items
    choice = rng.choice(3, size=total, p=SUCCESSOR_WEIGHTS)

    # counts_ge[s] = number of users with length >= s
    counts_ge = np.bincount(slen, minlength=int(slen[0]) + 2)[::-1].cumsum()[::-1]
    for s in range(1, int(slen[0])):
        a = int(counts_ge[s + 1])  # users with length > s
        pos = offsets[:a] + s
        follow = ~random_ev[pos]
        prev = flat[pos - 1]
        flat[pos] = np.where(follow, succ[prev, choice[pos]], flat[pos])

    # Timestamps: per-user start plus strictly positive gaps.
    gaps = rng.integers(1, 3600, size=total)
    gaps[offsets[:-1]] = rng.integers(0, 10_000_000, size=num_users)
    ts = np.cumsum(gaps)
    ts -= np.repeat(ts[offsets[:-1]] - gaps[offsets[:-1]], slen)

    users = np.repeat(order.astype(np.int64) + 1, slen)
    rows = np.argsort(ts, kind="stable")
    return pa.table(
        {
            "user_id": pa.array(users[rows]),
            "item_id": pa.array(flat[rows] + 1),
            "timestamp": pa.array(ts[rows]),
        }
    )


def write_synthetic_log(path: str | os.PathLike, **kw) -> pa.Table:
    """Generate a synthetic log (``kw`` as :func:`generate_synthetic_log`) and write it as
    Parquet to ``path``; returns the table."""
    table = generate_synthetic_log(**kw)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    pq.write_table(table, path)
    return table
