"""The leave-one-out split as pure functions over pyarrow tables.

Tables here have the columns ``user_id``, ``item_id``, ``timestamp`` (see ``logs.read_log``).
"Input order" means row order: every function keeps it, and the per-user ordering is a *stable*
sort on ``(user_id, timestamp)``, so events with equal timestamps keep the order they had in the
log.

The single-process path is :func:`split_log`. The Ray Data pipeline (``pipelines/prepare.py``)
reuses the same functions on user-keyed blocks (every event of a user in one block):
:func:`dedupe`, :func:`drop_short_users` and :func:`user_sequences` are exact per block;
k-core needs global item counts, so the pipeline runs :func:`kcore_round` per block with the
global item counts (:func:`count_values` per block, summed) and repeats until nothing is removed,
which is the same schedule as :func:`kcore`; the item map is :func:`build_item_map` over the
global set of surviving items. Keep those pieces in step with :func:`split_log`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffurec.errors import DiffuRecError

__all__ = [
    "MIN_SEQUENCE_LENGTH",
    "SplitResult",
    "build_item_map",
    "count_values",
    "dedupe",
    "drop_short_users",
    "kcore",
    "kcore_round",
    "make_stats",
    "sort_events",
    "split_log",
    "user_sequences",
]

# A user needs a training target, a validation target and a test target.
MIN_SEQUENCE_LENGTH = 3


def _col(table: pa.Table, name: str) -> pa.Array:
    """One column as a single contiguous Array."""
    c = table.column(name)
    if c.num_chunks == 1:
        return c.chunk(0)
    if c.num_chunks == 0:
        return pa.array([], c.type)
    return c.combine_chunks()


def _codes(arr: pa.Array) -> tuple[np.ndarray, int]:
    """Dense codes 0..K-1 (in order of first appearance) of an array's values, and K."""
    enc = pc.dictionary_encode(arr)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), len(
        enc.dictionary
    )


def _check_log_table(table: pa.Table) -> None:
    for col in ("user_id", "item_id", "timestamp"):
        if col not in table.column_names:
            raise DiffuRecError(
                f"log table: missing column {col!r} (columns: {', '.join(table.column_names)})"
            )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _sort_order(table: pa.Table, order_col: str | None = None) -> np.ndarray:
    """Stable sort order of the rows by ``(user_id, timestamp[, order_col])``."""
    keys = ["user_id", "timestamp"] + ([order_col] if order_col else [])
    if all(_is_numeric(table.schema.field(k).type) for k in keys):
        cols = [_col(table, k).to_numpy(zero_copy_only=False) for k in reversed(keys)]
        return np.lexsort(cols)  # stable
    idx = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
    return idx.to_numpy()


def _same_as_previous(arr: pa.Array) -> np.ndarray:
    """bool[n-1]: value i+1 equals value i."""
    n = len(arr)
    if _is_numeric(arr.type):
        a = arr.to_numpy(zero_copy_only=False)
        return a[1:] == a[:-1]
    return pc.equal(arr.slice(1), arr.slice(0, n - 1)).to_numpy(zero_copy_only=False)


def dedupe(table: pa.Table, presorted: bool = False) -> tuple[pa.Table, int]:
    """Drop exact duplicate events (same user, item and timestamp).

    Keeps the first occurrence of each and the input order. Returns ``(table, n_removed)``.
    ``presorted=True`` promises the rows are already ordered by ``(user_id, timestamp)`` (as
    :func:`sort_events` leaves them), which saves a sort.
    """
    n = table.num_rows
    if n < 2:
        return table, 0
    order = None if presorted else _sort_order(table)
    keys = table.select(["user_id", "timestamp"])
    if order is not None:
        keys = keys.take(pa.array(order))
    # Duplicates share (user, timestamp), so they sit in runs of equal keys in sorted order.
    tie = _same_as_previous(_col(keys, "user_id")) & _same_as_previous(_col(keys, "timestamp"))
    if not tie.any():
        return table, 0
    in_run = np.zeros(n, dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    cand = np.flatnonzero(in_run)
    rows = cand if order is None else np.sort(order[cand])
    sub = table.select(["user_id", "item_id", "timestamp"]).take(pa.array(rows))
    sub = sub.append_column("__row", pa.array(rows))
    firsts = sub.group_by(["user_id", "item_id", "timestamp"], use_threads=False).aggregate(
        [("__row", "min")]
    )
    if len(firsts) == len(rows):
        return table, 0
    keep = np.ones(n, dtype=bool)
    keep[rows] = False
    keep[firsts.column("__row_min").to_numpy()] = True
    return table.filter(pa.array(keep)), n - int(keep.sum())


def count_values(table: pa.Table, column: str) -> pa.Table:
    """``Table(key, count)``: how many rows hold each value of ``column``."""
    vc = pc.value_counts(_col(table, column))
    return pa.table(
        {"key": vc.field("values"), "count": vc.field("counts").cast(pa.int64())}
    )


def kcore_round(
    table: pa.Table,
    min_user: int,
    min_item: int,
    item_counts: pa.Table | None = None,
) -> pa.Table:
    """One simultaneous k-core round: drop every event whose user has fewer than ``min_user``
    events or whose item has fewer than ``min_item`` events (0 disables a threshold).

    User counts come from ``table`` itself (exact when the table holds whole users). Item counts
    come from ``item_counts`` (``Table(key, count)``, global counts) when given, else from the
    table. Keeps the input order.
    """
    if table.num_rows == 0:
        return table
    keep = None
    if min_user > 0:
        uc = count_values(table, "user_id")
        ok_users = uc.filter(pc.greater_equal(uc.column("count"), min_user)).column("key")
        keep = pc.is_in(_col(table, "user_id"), value_set=ok_users.combine_chunks())
    if min_item > 0:
        ic = item_counts if item_counts is not None else count_values(table, "item_id")
        ok_items = ic.filter(pc.greater_equal(ic.column("count"), min_item)).column("key")
        ik = pc.is_in(
            _col(table, "item_id"),
            value_set=ok_items.combine_chunks().cast(table.schema.field("item_id").type),
        )
        keep = ik if keep is None else pc.and_(keep, ik)
    if keep is None:
        return table
    return table.filter(keep)


def kcore(table: pa.Table, min_user: int, min_item: int) -> tuple[pa.Table, dict]:
    """Iterative k-core: repeat :func:`kcore_round` until nothing is removed.

    ``0`` disables a threshold. The result is the unique largest sub-log in which every user has
    at least ``min_user`` events and every item at least ``min_item`` events. ``info`` counts the
    removed ``events``, ``users``, ``items`` and the ``iterations`` (rounds that removed events).
    """
    if min_user < 0 or min_item < 0:
        raise DiffuRecError(f"k-core thresholds must be >= 0 (got min_user={min_user}, "
                            f"min_item={min_item})")
    n = table.num_rows
    info = {"events": 0, "users": 0, "items": 0, "iterations": 0}
    if n == 0 or (min_user <= 0 and min_item <= 0):
        return table, info
    # Fast path: already a k-core (the usual case for a prepared benchmark log).
    uc = count_values(table, "user_id").column("count")
    ic = count_values(table, "item_id").column("count")
    if (min_user <= 0 or pc.min(uc).as_py() >= min_user) and (
        min_item <= 0 or pc.min(ic).as_py() >= min_item
    ):
        return table, info
    ucodes, n_users = _codes(_col(table, "user_id"))
    icodes, n_items = _codes(_col(table, "item_id"))
    cur = np.arange(n, dtype=np.int64)
    u, i = ucodes, icodes
    while len(cur):
        bad = np.zeros(len(cur), dtype=bool)
        if min_user > 0:
            bad |= np.bincount(u, minlength=n_users)[u] < min_user
        if min_item > 0:
            bad |= np.bincount(i, minlength=n_items)[i] < min_item
        if not bad.any():
            break
        info["iterations"] += 1
        keep = ~bad
        cur, u, i = cur[keep], u[keep], i[keep]
    info["events"] = n - len(cur)
    info["users"] = n_users - int(np.count_nonzero(np.bincount(u, minlength=n_users)))
    info["items"] = n_items - int(np.count_nonzero(np.bincount(i, minlength=n_items)))
    if len(cur) == n:
        return table, info
    return table.take(pa.array(cur)), info


def drop_short_users(
    table: pa.Table, min_events: int = MIN_SEQUENCE_LENGTH
) -> tuple[pa.Table, int, int]:
    """Drop users with fewer than ``min_events`` events (they cannot be split leave-one-out).

    Returns ``(table, n_users_dropped, n_events_dropped)``; keeps the input order.
    """
    if table.num_rows == 0:
        return table, 0, 0
    uc = count_values(table, "user_id")
    short = uc.filter(pc.less(uc.column("count"), min_events))
    if len(short) == 0:
        return table, 0, 0
    n_events = int(pc.sum(short.column("count")).as_py())
    keep = pc.invert(pc.is_in(_col(table, "user_id"), value_set=short.column("key").combine_chunks()))
    return table.filter(keep), len(short), n_events


def build_item_map(table: pa.Table) -> pa.Table:
    """``Table(item_id, item)``: the original item ids, sorted ascending, mapped to 1..N.

    Dense id 0 is the padding item. Deterministic: depends only on the set of item ids, so the
    Ray pipeline (unique items per block, then this function) builds the identical map.
    """
    uniq = pc.unique(_col(table, "item_id"))
    uniq = uniq.take(pc.array_sort_indices(uniq))
    return pa.table(
        {"item_id": uniq, "item": pa.array(np.arange(1, len(uniq) + 1, dtype=np.int64))}
    )


def sort_events(table: pa.Table, order_col: str | None = None) -> pa.Table:
    """Events ordered by ``(user_id, timestamp)``; a stable sort, so ties keep input order.

    ``order_col`` names a column holding each row's position in the log: ties are then ordered
    by it instead of by row order (the Ray pipeline's blocks are not in log order).
    """
    if table.num_rows < 2:
        return table
    return table.take(pa.array(_sort_order(table, order_col)))


def user_sequences(
    table: pa.Table,
    item_map: pa.Table,
    min_length: int = MIN_SEQUENCE_LENGTH,
    presorted: bool = False,
) -> pa.Table:
    """``Table(user_id, items: list<int64>)``, one row per user, rows sorted by ``user_id``.

    Each user's events are ordered by timestamp (stable: ties keep input order) and their items
    replaced by dense ids from ``item_map``. Users with fewer than ``min_length`` events are left
    out (count them beforehand with :func:`drop_short_users`, as :func:`split_log` does).
    ``presorted=True`` promises the rows are already in :func:`sort_events` order.
    """
    _check_log_table(table)
    user_type = table.schema.field("user_id").type
    if table.num_rows == 0:
        return pa.table(
            {"user_id": pa.array([], user_type), "items": pa.array([], pa.list_(pa.int64()))}
        )
    t = table if presorted else sort_events(table)
    users = _col(t, "user_id")
    pos = pc.index_in(_col(t, "item_id"), value_set=_col(item_map, "item_id"))
    if pos.null_count:
        missing = t.column("item_id").filter(pc.is_null(pos))[0].as_py()
        raise DiffuRecError(f"item_map: item_id {missing!r} of the log is not in the item map")
    dense = _col(item_map, "item").take(pos)
    n = len(users)
    change = ~_same_as_previous(users)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [n]]))
    keep_users = lengths >= min_length
    if not keep_users.all():
        ev_keep = np.repeat(keep_users, lengths)
        dense = dense.filter(pa.array(ev_keep))
        starts, lengths = starts[keep_users], lengths[keep_users]
    user_ids = users.take(pa.array(starts))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    items = pa.ListArray.from_arrays(pa.array(offsets), dense.cast(pa.int64()))
    return pa.table({"user_id": user_ids, "items": items})


def make_stats(
    *,
    users: int,
    interactions: int,
    max_length: int,
    num_items: int,
    input_events: int,
    duplicates: int,
    kcore_info: dict,
    short_users: int,
    short_events: int,
    min_user: int,
    min_item: int,
    extra_removed: dict | None = None,
) -> dict:
    """The ``stats.json`` dict. Shared with the Ray pipeline so both write identical stats."""
    removed = {
        "duplicates": int(duplicates),
        "kcore_events": int(kcore_info["events"]),
        "kcore_users": int(kcore_info["users"]),
        "kcore_items": int(kcore_info["items"]),
        "kcore_iterations": int(kcore_info["iterations"]),
        "short_users": int(short_users),
        "short_events": int(short_events),
    }
    if extra_removed:
        removed.update({k: int(v) for k, v in extra_removed.items()})
    return {
        "users": int(users),
        "items": int(num_items),
        "interactions": int(interactions),
        "mean_length": round(interactions / users, 4) if users else 0.0,
        "max_length": int(max_length),
        "input_events": int(input_events),
        "min_user": int(min_user),
        "min_item": int(min_item),
        "removed": removed,
    }


@dataclass
class SplitResult:
    """The single-process split: sequences ``Table(user_id, items)``, the item map
    ``Table(item_id, item)`` and the stats dict written as ``stats.json``."""

    sequences: pa.Table
    items: pa.Table
    stats: dict = field(default_factory=dict)


def split_log(
    table: pa.Table,
    min_user: int = 5,
    min_item: int = 5,
    extra_removed: dict | None = None,
) -> SplitResult:
    """The whole single-process path: dedupe, k-core to a fixed point, drop users too short to
    split, map items to dense ids, order each user's events.

    ``extra_removed`` adds counts of earlier filters (e.g. ``{"rating": n}``) to the stats.
    Raises DiffuRecError when nothing survives the filters.
    """
    _check_log_table(table)
    table = table.select(["user_id", "item_id", "timestamp"])
    input_events = table.num_rows
    # Sort once; every later step keeps row order, so user_sequences can skip its sort.
    table = sort_events(table)
    table, n_dup = dedupe(table, presorted=True)
    table, kinfo = kcore(table, min_user, min_item)
    table, short_users, short_events = drop_short_users(table)
    if table.num_rows == 0:
        raise DiffuRecError(
            f"log: no events left after filtering (input {input_events} events, "
            f"min_user={min_user}, min_item={min_item}, {n_dup} duplicates, "
            f"k-core removed {kinfo['events']}, short users removed {short_events})"
        )
    items = build_item_map(table)
    seqs = user_sequences(table, items, presorted=True)
    lengths = pc.list_value_length(seqs.column("items"))
    stats = make_stats(
        users=seqs.num_rows,
        interactions=int(pc.sum(lengths).as_py()),
        max_length=int(pc.max(lengths).as_py()),
        num_items=len(items),
        input_events=input_events,
        duplicates=n_dup,
        kcore_info=kinfo,
        short_users=short_users,
        short_events=short_events,
        min_user=min_user,
        min_item=min_item,
        extra_removed=extra_removed,
    )
    return SplitResult(seqs, items, stats)
