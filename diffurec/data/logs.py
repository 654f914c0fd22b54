"""Read and validate an interaction log into a pyarrow Table.

A log is Parquet (``.parquet``/``.pq``), CSV (``.csv``) or JSON lines (``.jsonl``/``.json``); a
single file, a directory (every log file inside it, sorted by path) or a glob. Paths with a
scheme (``s3://...``, ``gs://...``) go through ``pyarrow.fs``.

The result always has exactly the columns ``user_id``, ``item_id``, ``timestamp``:

* ids are either ``int64`` (numeric ids; they must be non-negative whole numbers) or ``string``
  (string ids are fine, they get mapped to dense integers later);
* ``timestamp`` is ``int64`` (integers, dates and datetimes) or ``float64`` (fractional numbers);
  nulls are an error.

Rows keep the input order (files in sorted path order, rows in file order): the split's stable
sort uses it to break timestamp ties.

Every problem raises :class:`diffurec.errors.DiffuRecError` naming the file, column and, where
there is one, the (0-based, within that file) row at fault.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffurec.errors import DiffuRecError

__all__ = [
    "LOG_COLUMNS",
    "LOG_EXTENSIONS",
    "log_format",
    "normalize_log",
    "read_log",
    "read_log_file",
    "resolve_log_paths",
]

LOG_COLUMNS = ("user_id", "item_id", "timestamp")
LOG_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
}


def log_format(path: str) -> str:
    """``parquet``, ``csv`` or ``json`` from the file extension; DiffuRecError otherwise."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in LOG_EXTENSIONS:
        raise DiffuRecError(
            f"{path}: unsupported log file extension {ext or '(none)'!r}; "
            f"expected one of {', '.join(sorted(LOG_EXTENSIONS))}"
        )
    return LOG_EXTENSIONS[ext]


def _is_log_file(path: str) -> bool:
    name = os.path.basename(path)
    return (
        not name.startswith((".", "_"))
        and os.path.splitext(name)[1].lower() in LOG_EXTENSIONS
    )


def _filesystem(path: str):
    """(filesystem, path-in-filesystem) for a path that has a URI scheme; (None, path) otherwise."""
    if "://" in str(path) and not str(path).startswith("file://"):
        from pyarrow import fs

        try:
            return fs.FileSystem.from_uri(str(path))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
            raise DiffuRecError(f"{path}: cannot open filesystem: {exc}") from None
    if str(path).startswith("file://"):
        return None, str(path)[len("file://") :]
    return None, str(path)


def resolve_log_paths(path: str | os.PathLike) -> list[str]:
    """The log files that ``path`` (a file, a directory or a glob) names, sorted.

    For a remote path (with a URI scheme) the returned paths carry the same scheme.
    """
    path = str(path)
    fsys, local = _filesystem(path)
    if fsys is not None:
        from pyarrow import fs

        scheme = path.split("://", 1)[0] + "://"
        info = fsys.get_file_info(local)
        if info.type == fs.FileType.File:
            return [path]
        if info.type == fs.FileType.Directory:
            infos = fsys.get_file_info(fs.FileSelector(local, recursive=True))
            files = sorted(
                i.path for i in infos if i.type == fs.FileType.File and _is_log_file(i.path)
            )
            if not files:
                raise DiffuRecError(f"{path}: directory holds no log files (.parquet, .csv, .jsonl)")
            return [scheme + f for f in files]
        raise DiffuRecError(f"{path}: no such file or directory")

    if any(ch in local for ch in "*?["):
        files = sorted(p for p in _glob.glob(local, recursive=True) if os.path.isfile(p))
        if not files:
            raise DiffuRecError(f"{path}: glob matches no files")
        return files
    if os.path.isdir(local):
        files = []
        for root, dirs, names in os.walk(local):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            files.extend(os.path.join(root, n) for n in names if _is_log_file(n))
        if not files:
            raise DiffuRecError(f"{path}: directory holds no log files (.parquet, .csv, .jsonl)")
        return sorted(files)
    if os.path.isfile(local):
        return [local]
    raise DiffuRecError(f"{path}: no such file or directory")


def read_log_file(
    path: str,
    columns: Sequence[str],
) -> pa.Table:
    """Read the named columns of one log file, as they are (no validation but presence)."""
    fmt = log_format(path)
    fsys, local = _filesystem(path)
    columns = list(dict.fromkeys(columns))
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(local, filesystem=fsys)
            _check_columns(path, columns, schema.names)
            return pq.read_table(local, columns=columns, filesystem=fsys)
        opener = fsys.open_input_stream if fsys is not None else None
        if fmt == "csv":
            from pyarrow import csv

            src = opener(local) if opener else local
            table = csv.read_csv(src)
        else:
            from pyarrow import json as pjson

            src = opener(local) if opener else local
            table = pjson.read_json(src)
    except READ_ERRORS as exc:
        raise read_error(path, fmt, exc) from None
    _check_columns(path, columns, table.column_names)
    return table.select(columns)


READ_ERRORS = (FileNotFoundError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError)


def read_error(path: str, fmt: str, exc: BaseException) -> DiffuRecError:
    """The one-line error for a log file pyarrow could not read (``READ_ERRORS``)."""
    if isinstance(exc, FileNotFoundError):
        return DiffuRecError(f"{path}: no such file")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DiffuRecError(f"{path}: cannot read as {fmt}: {first}")


def _check_columns(path: str, wanted: Sequence[str], present: Sequence[str]) -> None:
    for col in wanted:
        if col not in present:
            raise DiffuRecError(
                f"{path}: missing column {col!r} (columns present: {', '.join(present) or 'none'})"
            )


def _first_row(mask: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first true value of a boolean array (nulls count as false)."""
    idx = np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False)))
    return int(idx[0]) if len(idx) else -1


def _normalize_id(path: str, col: str, arr: pa.ChunkedArray, row_base: int = 0) -> pa.ChunkedArray:
    t = arr.type
    nulls = arr.null_count
    if nulls:
        row = _first_row(pc.is_null(arr)) + row_base
        raise DiffuRecError(f"{path}: column {col!r} has {nulls} null id(s), first at row {row}")
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr.cast(pa.string())
    if pa.types.is_integer(t):
        if pa.types.is_signed_integer(t) and len(arr):
            neg = pc.less(arr, 0)
            if pc.any(neg).as_py():
                row = _first_row(neg)
                raise DiffuRecError(
                    f"{path}: column {col!r} has a negative id {arr[row].as_py()} at row "
                    f"{row + row_base}; ids must be non-negative integers or strings"
                )
        if t == pa.uint64() and len(arr) and pc.max(arr).as_py() > np.iinfo(np.int64).max:
            raise DiffuRecError(f"{path}: column {col!r} has ids beyond int64")
        return arr.cast(pa.int64())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = arr.cast(pa.float64())
        bad = pc.or_(pc.not_equal(pc.floor(f), f), pc.is_nan(f))
        if len(f) and pc.any(bad).as_py():
            row = _first_row(bad)
            raise DiffuRecError(
                f"{path}: column {col!r} has a non-integer id {f[row].as_py()!r} at row "
                f"{row + row_base}; ids must be non-negative integers or strings"
            )
        neg = pc.less(f, 0)
        if len(f) and pc.any(neg).as_py():
            row = _first_row(neg)
            raise DiffuRecError(
                f"{path}: column {col!r} has a negative id {f[row].as_py()!r} at row "
                f"{row + row_base}; ids must be non-negative integers or strings"
            )
        return f.cast(pa.int64())
    if pa.types.is_null(t):  # an all-null column of zero rows
        return arr.cast(pa.int64())
    raise DiffuRecError(
        f"{path}: column {col!r} has type {t}; ids must be non-negative integers or strings"
    )


def _normalize_time(path: str, col: str, arr: pa.ChunkedArray, row_base: int = 0) -> pa.ChunkedArray:
    t = arr.type
    if arr.null_count:
        row = _first_row(pc.is_null(arr)) + row_base
        raise DiffuRecError(
            f"{path}: column {col!r} has {arr.null_count} null timestamp(s), first at row {row}"
        )
    if pa.types.is_integer(t):
        return arr.cast(pa.int64())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = arr.cast(pa.float64())
        if len(f) and pc.any(pc.is_nan(f)).as_py():
            row = _first_row(pc.is_nan(f)) + row_base
            raise DiffuRecError(f"{path}: column {col!r} has a NaN timestamp at row {row}")
        return f
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_date(t):
            arr = arr.cast(pa.timestamp("s"))
        return arr.cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return arr.cast(pa.timestamp("us")).cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DiffuRecError(
                f"{path}: column {col!r} holds strings that are not ISO timestamps "
                f"(first value {arr[0].as_py()!r})"
            ) from None
    if pa.types.is_null(t):
        return arr.cast(pa.int64())
    raise DiffuRecError(f"{path}: column {col!r} has type {t}; timestamps must be numbers or dates")


def normalize_log(
    table: pa.Table,
    source: str = "<table>",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    row_base: int = 0,
) -> pa.Table:
    """Validate one chunk of a log and return it as ``user_id, item_id, timestamp``.

    ``source`` names the file in error messages; ``row_base`` is the file row of the chunk's
    first row. The rating filter (``rating >= min_rating``) runs before the id checks, so a
    rejected row is never the cause of an error. Shared by :func:`read_log` and the Ray
    pipeline (which applies it to each block it reads).
    """
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    _check_columns(source, wanted, table.column_names)
    if min_rating is not None and not rating_col:
        raise DiffuRecError("min_rating needs a rating column (rating_col / --rating-col)")
    if rating_col:
        rating = table.column(rating_col)
        if not (pa.types.is_integer(rating.type) or pa.types.is_floating(rating.type)):
            raise DiffuRecError(
                f"{source}: rating column {rating_col!r} has type {rating.type}; expected numbers"
            )
        if min_rating is not None:
            keep = pc.fill_null(pc.greater_equal(rating, min_rating), False)
            table = table.filter(keep)
    user = _normalize_id(source, user_col, table.column(user_col), row_base)
    item = _normalize_id(source, item_col, table.column(item_col), row_base)
    ts = _normalize_time(source, time_col, table.column(time_col), row_base)
    return pa.table({"user_id": user, "item_id": item, "timestamp": ts})


def _unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate normalised tables whose id / time types may differ between files."""
    if not tables:
        return pa.table(
            {"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
             "timestamp": pa.array([], pa.int64())}
        )
    out_types = {}
    for col in LOG_COLUMNS:
        types = {t.schema.field(col).type for t in tables}
        if len(types) == 1:
            out_types[col] = types.pop()
        elif col == "timestamp":
            out_types[col] = pa.float64()
        else:
            out_types[col] = pa.string()
    fixed = [
        pa.table({c: t.column(c).cast(out_types[c]) for c in LOG_COLUMNS}) for t in tables
    ]
    return pa.concat_tables(fixed).combine_chunks()


def read_log(
    path: str | os.PathLike,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    info: dict | None = None,
) -> pa.Table:
    """Read an interaction log into a Table with columns ``user_id, item_id, timestamp``.

    ``rating_col``/``min_rating`` keep only events with ``rating >= min_rating``; every other
    column is dropped. Raises DiffuRecError naming the file/column/row for a missing file, an
    unreadable file, a missing column, null timestamps, negative or non-integer numeric ids,
    and an empty log (no rows, or none left after the rating filter).

    If ``info`` is a dict it receives ``rows_read`` and ``rating_removed`` (rows the rating
    filter dropped).
    """
    files = resolve_log_paths(path)
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    tables = []
    total_rows = 0
    for f in files:
        raw = read_log_file(f, wanted)
        total_rows += raw.num_rows
        tables.append(
            normalize_log(raw, f, user_col, item_col, time_col, rating_col, min_rating)
        )
    table = _unify(tables)
    if info is not None:
        info["rows_read"] = total_rows
        info["rating_removed"] = total_rows - table.num_rows
    if total_rows == 0:
        raise DiffuRecError(f"{path}: empty log (no rows)")
    if table.num_rows == 0:
        raise DiffuRecError(
            f"{path}: empty log: no row has {rating_col} >= {min_rating} "
            f"(of {total_rows} rows)"
        )
    return table
