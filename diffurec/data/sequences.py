"""The on-disk sequence format, loading it, and expanding users into examples.

A prepared dataset is a directory::

    DIR/sequences/*.parquet   one row per user: user_id (original id),
                              items (list<int64>: dense item ids in chronological order;
                              the last two are the validation and the test target).
                              Each shard's rows are sorted by user_id; together the shards
                              hold every user once (the loader sorts across shards).
    DIR/items.parquet         item_id (original id), item (dense id 1..N; 0 is padding)
    DIR/users.parquet         user_id (original id), user (row index 0..U-1 in user_id order)
    DIR/stats.json            users, items, interactions, mean_length, max_length,
                              input_events, min_user, min_item, removed{...}

Both the single-process path (:func:`write_split`) and the Ray Data pipeline
(``pipelines/prepare.py``) write it; the Ray pipeline uses :func:`staging_dir` and
:func:`publish_dataset` for the same atomic publish.

Training examples are derived, not stored: :func:`train_examples` and :func:`eval_examples` return
index arrays into the flat ``items`` array of a :class:`SequenceData`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffurec.data.logs import LOG_EXTENSIONS, read_log
from diffurec.data.split import MIN_SEQUENCE_LENGTH, split_log
from diffurec.errors import DiffuRecError

__all__ = [
    "Examples",
    "SequenceData",
    "eval_examples",
    "is_prepared_dataset",
    "load_sequences",
    "publish_dataset",
    "sequence_data_from_tables",
    "staging_dir",
    "train_examples",
    "user_map",
    "write_dataset",
    "write_split",
]

SEQUENCES_DIR = "sequences"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
STATS_FILE = "stats.json"


# --------------------------------------------------------------------------- writing


def staging_dir(out_dir: str | os.PathLike) -> Path:
    """A fresh, empty temporary directory beside ``out_dir`` (same filesystem, so the final
    rename is atomic)."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def check_target(out: str | os.PathLike, overwrite: bool, replaceable=None,
                 kind: str = "a prepared dataset") -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and even then unless it is empty or
    ``replaceable(out)`` (default: a prepared dataset); ``kind`` names what may be replaced."""
    out = Path(out)
    if not out.exists():
        return
    if not overwrite:
        raise DiffuRecError(
            f"{out}: output already exists; remove it or pass overwrite (--overwrite) to replace it"
        )
    replaceable = replaceable or is_prepared_dataset
    if not out.is_dir() or not (replaceable(out) or not any(out.iterdir())):
        raise DiffuRecError(
            f"{out}: exists and is not {kind}; refusing to replace it"
        )


def publish_dataset(staging: str | os.PathLike, out_dir: str | os.PathLike,
                    overwrite: bool = False, replaceable=None, kind: str = "a prepared dataset") -> Path:
    """Move a fully written ``staging`` directory to ``out_dir`` with a rename.

    An existing ``out_dir`` is refused unless ``overwrite``; even then only an empty directory or
    one that is ``replaceable`` (default: a prepared dataset) is replaced (renamed aside, then
    deleted).
    """
    out = Path(out_dir).absolute()
    staging = Path(staging)
    check_target(out, overwrite, replaceable, kind)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
    return out


def user_map(sequences: pa.Table) -> pa.Table:
    """``Table(user_id, user)``: original user ids sorted ascending -> row index 0..U-1."""
    uid = sequences.column("user_id").combine_chunks()
    uid = uid.take(pc.array_sort_indices(uid))
    return pa.table({"user_id": uid, "user": pa.array(np.arange(len(uid), dtype=np.int64))})


def write_stats(path: str | os.PathLike, stats: dict) -> None:
    with open(path, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")


def write_dataset(
    out_dir: str | os.PathLike,
    sequences: pa.Table,
    items: pa.Table,
    stats: dict,
    rows_per_shard: int = 100_000,
    overwrite: bool = False,
) -> Path:
    """Write a prepared dataset to ``out_dir`` atomically.

    Everything is written to a temporary directory beside ``out_dir`` and published with one
    rename, so a failure leaves no half-written output. An existing ``out_dir`` is refused unless
    ``overwrite`` (and then only a prepared dataset or an empty directory is replaced).
    """
    out = Path(out_dir).absolute()
    check_target(out, overwrite)  # fail before doing the work
    if rows_per_shard < 1:
        raise DiffuRecError(f"rows_per_shard must be >= 1 (got {rows_per_shard})")
    tmp = staging_dir(out)
    try:
        seq_dir = tmp / SEQUENCES_DIR
        seq_dir.mkdir()
        order = pc.sort_indices(sequences, sort_keys=[("user_id", "ascending")])
        sequences = sequences.select(["user_id", "items"]).take(order)
        n = sequences.num_rows
        n_shards = max(1, -(-n // rows_per_shard))
        for s in range(n_shards):
            part = sequences.slice(s * rows_per_shard, rows_per_shard)
            pq.write_table(part, seq_dir / f"part-{s:05d}.parquet")
        pq.write_table(items.select(["item_id", "item"]), tmp / ITEMS_FILE)
        pq.write_table(user_map(sequences), tmp / USERS_FILE)
        write_stats(tmp / STATS_FILE, stats)
        return publish_dataset(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_split(
    log_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_user: int = 5,
    min_item: int = 5,
    overwrite: bool = False,
    **read_kwargs,
) -> dict:
    """Read a log, split it in one process and write a prepared dataset; returns the stats.

    ``read_kwargs`` go to :func:`diffurec.data.logs.read_log` (``user_col``, ``item_col``,
    ``time_col``, ``rating_col``, ``min_rating``).
    """
    info: dict = {}
    table = read_log(log_path, info=info, **read_kwargs)
    extra = {"rating": info["rating_removed"]} if read_kwargs.get("min_rating") is not None else None
    res = split_log(table, min_user=min_user, min_item=min_item, extra_removed=extra)
    write_dataset(out_dir, res.sequences, res.items, res.stats, overwrite=overwrite)
    return res.stats


# --------------------------------------------------------------------------- loading


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory in the prepared format (sequences/, items.parquet,
    stats.json)."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / SEQUENCES_DIR).is_dir()
        and (p / ITEMS_FILE).is_file()
        and (p / STATS_FILE).is_file()
    )


@dataclass
class SequenceData:
    """Every user's chronological item sequence, in CSR form.

    ``items[offsets[u]:offsets[u+1]]`` is user ``u``'s sequence of dense item ids (1..num_items);
    the last one is the test target, the one before it the validation target. Users are sorted
    by original id ``user_ids[u]``. The embedding table needs ``num_items + 1`` rows (0 = pad).
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    num_items: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_users(self) -> int:
        return len(self)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        """User row ``i``'s full sequence (dense ids, chronological)."""
        return self.items[self.offsets[i] : self.offsets[i + 1]]


def sequence_data_from_tables(
    sequences: pa.Table, num_items: int, stats: dict | None = None, source: str = "sequences"
) -> SequenceData:
    """Build :class:`SequenceData` from a ``Table(user_id, items)`` (any row order)."""
    for col in ("user_id", "items"):
        if col not in sequences.column_names:
            raise DiffuRecError(f"{source}: missing column {col!r}")
    if sequences.num_rows > 1:
        sequences = sequences.take(pc.sort_indices(sequences, sort_keys=[("user_id", "ascending")]))
    lists = sequences.column("items").combine_chunks()
    if sequences.num_rows == 0:
        raise DiffuRecError(f"{source}: no users")
    if lists.null_count:
        raise DiffuRecError(f"{source}: column 'items' has null rows")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if lengths.min() < MIN_SEQUENCE_LENGTH:
        row = int(np.argmin(lengths))
        raise DiffuRecError(
            f"{source}: user row {row} has {lengths[row]} items; every user needs at least "
            f"{MIN_SEQUENCE_LENGTH}"
        )
    if len(flat) and (flat.min() < 1 or flat.max() > num_items):
        raise DiffuRecError(
            f"{source}: item ids must lie in 1..{num_items} (found {flat.min()}..{flat.max()})"
        )
    user_ids = sequences.column("user_id").to_numpy()
    return SequenceData(user_ids, offsets, flat, int(num_items), dict(stats or {}))


def _load_prepared(path: Path) -> SequenceData:
    try:
        with open(path / STATS_FILE) as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffuRecError(f"{path / STATS_FILE}: cannot read: {exc}") from None
    try:
        items = pq.read_table(path / ITEMS_FILE, columns=["item"])
    except Exception as exc:  # noqa: BLE001
        raise DiffuRecError(f"{path / ITEMS_FILE}: cannot read: {exc}") from None
    num_items = int(pc.max(items.column("item")).as_py() or 0) if items.num_rows else 0
    files = sorted(
        p for p in (path / SEQUENCES_DIR).iterdir()
        if p.suffix == ".parquet" and not p.name.startswith((".", "_"))
    )
    if not files:
        raise DiffuRecError(f"{path / SEQUENCES_DIR}: no .parquet shards")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=["user_id", "items"]))
        except Exception as exc:  # noqa: BLE001
            raise DiffuRecError(f"{f}: cannot read sequence shard: {exc}") from None
    try:
        seqs = pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise DiffuRecError(f"{path / SEQUENCES_DIR}: shards disagree on schema: {exc}") from None
    return sequence_data_from_tables(seqs, num_items, stats, source=str(path / SEQUENCES_DIR))


def load_sequences(path: str | os.PathLike, min_user: int = 5, min_item: int = 5) -> SequenceData:
    """Load a prepared dataset directory, or split a raw log file in memory.

    A raw log (``.parquet``, ``.csv``, ``.jsonl`` file with columns user_id, item_id, timestamp)
    goes through :func:`diffurec.data.split.split_log` with ``min_user``/``min_item``; those
    thresholds are ignored for a prepared dataset. Anything else raises DiffuRecError.
    """
    p = Path(path)
    if is_prepared_dataset(p):
        return _load_prepared(p)
    if p.is_file() and p.suffix.lower() in LOG_EXTENSIONS:
        res = split_log(read_log(p), min_user=min_user, min_item=min_item)
        return sequence_data_from_tables(res.sequences, len(res.items), res.stats, source=str(p))
    if p.is_dir():
        raise DiffuRecError(
            f"{p}: not a prepared dataset (expected {SEQUENCES_DIR}/, {ITEMS_FILE}, {STATS_FILE}); "
            f"run `python pipelines/prepare.py --input LOG --output {p}` or pass a log file"
        )
    if not p.exists():
        raise DiffuRecError(f"{p}: no such file or directory")
    raise DiffuRecError(
        f"{p}: neither a prepared dataset directory nor a log file "
        f"({', '.join(sorted(LOG_EXTENSIONS))})"
    )


# --------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """Examples as indices into ``SequenceData.items``.

    Example ``k`` belongs to user row ``user[k]``; its history is ``items[start[k]:end[k]]``
    (at most ``max_len`` items, chronological) and its target is ``items[end[k]]``.
    """

    user: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.end)

    def subset(self, idx) -> Examples:
        return Examples(self.user[idx], self.start[idx], self.end[idx])


def _check_max_len(max_len: int) -> None:
    if int(max_len) < 1:
        raise DiffuRecError(f"max_len must be >= 1 (got {max_len})")


def train_examples(data: SequenceData, max_len: int) -> Examples:
    """Every training prefix: for a user with sequence ``s`` of length ``n``, targets are the
    positions ``1..n-3`` (each prefix of ``s[:-2]``); the validation (``n-2``) and test (``n-1``)
    positions are never an input or a target. History is capped at the last ``max_len`` items.
    """
    _check_max_len(max_len)
    begin = data.offsets[:-1]
    counts = np.maximum(np.diff(data.offsets) - 3, 0)
    total = int(counts.sum())
    user = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
    ubegin = np.repeat(begin, counts)
    end = ubegin + within + 1
    start = np.maximum(ubegin, end - int(max_len))
    return Examples(user, start, end)


def eval_examples(data: SequenceData, split: str, max_len: int) -> Examples:
    """One example per user. ``"valid"``: target = position ``n-2``, history = everything
    before it. ``"test"``: target = position ``n-1``, history includes the validation item."""
    _check_max_len(max_len)
    if split not in ("valid", "test"):
        raise DiffuRecError(f"eval split must be 'valid' or 'test' (got {split!r})")
    begin = data.offsets[:-1].astype(np.int64)
    end = data.offsets[1:].astype(np.int64) - (2 if split == "valid" else 1)
    start = np.maximum(begin, end - int(max_len))
    return Examples(np.arange(len(begin), dtype=np.int64), start, end)
