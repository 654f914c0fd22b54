"""Turn a raw interaction log into the training input, with Ray.

    python pipelines/prepare.py --input PATH --output DIR [--min-user N] [--min-item N]
        [--user-col C] [--item-col C] [--time-col C] [--rating-col C --min-rating R]
        [--overwrite] [--address ADDR] [--num-cpus N] [--object-store-memory BYTES]

Output: the core library's prepared-dataset format (``diffurec.data.sequences``), identical to
``python -m diffurec split`` / ``write_split`` on the same input. Ends with one JSON line on
stdout (``{"output": ..., "stats": {...}}``); progress goes to stderr. User errors print one line
(``error: ...``) and exit 1.

How it runs: a map/reduce over Ray tasks; all per-block work is vectorised pyarrow from
``diffurec.data.split``.

1. map:        one task per file chunk (Parquet row groups / streamed CSV batches), validated by
               ``logs.normalize_log``; rows are split into P pieces by a hash of the user id,
               each piece keeping the log's row order.
2. reduce:     one task per partition reads its pieces in log order, sorts stably on
               ``(user_id, timestamp)`` (ties keep the log's order, as in the single-process
               path), applies ``split.dedupe`` and counts items:
               every user's events are now in one block.
3. k-core:     item counts summed on the driver; per block ``split.kcore_round`` with the global
               counts, which also recounts; repeated until a round would drop nothing (the
               schedule of ``split.kcore``).
4. finalize:   ``split.build_item_map`` over the surviving items; per block
               ``split.drop_short_users`` + ``split.user_sequences`` and one Parquet shard each.

Why not Ray Data: its keyed ``repartition`` plus per-block sort ran at 0.30x the single-process
baseline at 10M events here, and at 100M it spilled the whole log through a 2 GB object store.
Pieces and blocks between stages are uncompressed Arrow IPC files under the run's staging
directory (``_work``, beside the output), so memory is bounded by the block size (P grows with
the input: about 2.5M events a block) and only counts travel through the object store. The
staging directory becomes the output with one rename, or is deleted on any failure. On a
multi-node cluster the output directory must be on a filesystem every node sees (shared/NFS).

Cluster: ``--address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins an existing
cluster; otherwise a fresh local cluster is started with ``ray.init(address="local")`` (never a
stale one). Ray's own auth settings (``RAY_AUTH_MODE``) are left as the environment has them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as `python pipelines/prepare.py` without installing
    sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from diffurec.data import split as S  # noqa: E402
from diffurec.data.logs import (  # noqa: E402
    READ_ERRORS,
    _filesystem,
    log_format,
    normalize_log,
    read_error,
    read_log_file,
    resolve_log_paths,
)
from diffurec.data.sequences import (  # noqa: E402
    ITEMS_FILE,
    SEQUENCES_DIR,
    STATS_FILE,
    USERS_FILE,
    check_target,
    publish_dataset,
    staging_dir,
    write_stats,
)
from diffurec.errors import DiffuRecError  # noqa: E402

UNIT_ROWS = 1_000_000  # rows per read task
BLOCK_ROWS = 2_500_000  # target events per user-keyed block


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- read


def plan_units(files: list[str], columns: list[str], unit_rows: int = UNIT_ROWS) -> list[dict]:
    """Read tasks: Parquet files split by row groups (about UNIT_ROWS rows each); CSV/JSON
    files one task each (streamed in batches)."""
    units = []
    for fi, path in enumerate(files):
        fmt = log_format(path)
        if fmt != "parquet":
            fsys, local = _filesystem(path)
            try:
                size = (fsys.get_file_info(local).size if fsys is not None
                        else os.path.getsize(local))
            except (OSError, TypeError):
                size = 0
            units.append({"file": fi, "path": path, "fmt": fmt, "rgs": [], "row": 0,
                          "rows": max(1, (size or 0) // 25)})
            continue
        fsys, local = _filesystem(path)
        try:
            pf = pq.ParquetFile(local if fsys is None else fsys.open_input_file(local))
        except READ_ERRORS as exc:
            raise read_error(path, "parquet", exc) from None
        names = pf.schema_arrow.names
        for col in columns:
            if col not in names:
                raise DiffuRecError(
                    f"{path}: missing column {col!r} (columns present: {', '.join(names)})"
                )
        md = pf.metadata
        row, cur, cur_rows = 0, [], 0
        for rg in range(md.num_row_groups):
            cur.append(rg)
            cur_rows += md.row_group(rg).num_rows
            if cur_rows >= unit_rows or rg == md.num_row_groups - 1:
                units.append({"file": fi, "path": path, "fmt": fmt, "rgs": cur, "row": row,
                              "rows": cur_rows})
                row += cur_rows
                cur, cur_rows = [], 0
        if md.num_row_groups == 0:
            units.append({"file": fi, "path": path, "fmt": fmt, "rgs": [], "row": 0, "rows": 0})
    for index, unit in enumerate(units):
        unit["index"], unit["chunk_rows"] = index, unit_rows
    return units


def _raw_chunks(unit: dict, columns: list[str]):
    """(row_base, raw table) chunks of one read unit."""
    path, fmt = unit["path"], unit["fmt"]
    fsys, local = _filesystem(path)
    try:
        if fmt == "parquet":
            if not unit["rgs"]:
                yield 0, read_log_file(path, columns)
                return
            pf = pq.ParquetFile(local if fsys is None else fsys.open_input_file(local))
            yield unit["row"], pf.read_row_groups(unit["rgs"], columns=columns)
            return
        if fmt == "csv":
            from pyarrow import csv

            src = fsys.open_input_stream(local) if fsys is not None else local
            reader = csv.open_csv(src)
            names = reader.schema.names
            for col in columns:
                if col not in names:
                    raise DiffuRecError(
                        f"{path}: missing column {col!r} (columns present: {', '.join(names)})"
                    )
            row, buf, n = 0, [], 0
            for batch in reader:
                buf.append(batch)
                n += batch.num_rows
                if n >= unit["chunk_rows"]:
                    yield row, pa.Table.from_batches(buf).select(columns)
                    row, buf, n = row + n, [], 0
            if buf or row == 0:
                yield row, pa.Table.from_batches(buf, schema=reader.schema).select(columns)
            return
        yield 0, read_log_file(path, columns)
    except READ_ERRORS as exc:
        raise read_error(path, fmt, exc) from None


def write_block(table: pa.Table, path: str) -> None:
    """Intermediate blocks are uncompressed Arrow IPC files: written and read at memory speed
    from the page cache, and they keep the object store (and RAM) free of the log."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_block(path: str, remove: bool = True) -> pa.Table:
    with pa.OSFile(path) as source:
        table = pa.ipc.open_file(source).read_all()
    if remove:  # each intermediate file is read once
        os.remove(path)
    return table


def _partition_of(users: pa.ChunkedArray, parts: int) -> np.ndarray:
    """Partition (0..parts-1) of each event's user: a deterministic hash, the same in every
    process, so all of a user's events meet in one reduce task."""
    if parts == 1:
        return np.zeros(len(users), dtype=np.int64)
    if pa.types.is_integer(users.type):
        u = users.to_numpy().astype(np.uint64, copy=False)
        with np.errstate(over="ignore"):  # Fibonacci hashing: wraps mod 2**64 by design
            mixed = u * np.uint64(0x9E3779B97F4A7C15)
        return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)
    import pandas as pd  # a dependency of Ray Data; used for string ids only

    h = pd.util.hash_array(np.asarray(users.to_numpy(zero_copy_only=False), dtype=object))
    return (h % np.uint64(parts)).astype(np.int64)


def map_unit(unit: dict, cols: dict, parts: int, work_dir: str):
    """Map task: read one unit chunk by chunk, validate each, split its rows by user partition.

    Writes one piece per chunk and partition (``user_id, item_id, timestamp``, in log order) under
    ``work_dir`` and returns ``(raw rows, kept rows, piece paths by partition)``, so a task holds
    one chunk (about UNIT_ROWS rows) at a time, however large a CSV file is.
    """
    wanted = [cols["user_col"], cols["item_col"], cols["time_col"]]
    if cols.get("rating_col"):
        wanted.append(cols["rating_col"])
    raw_rows = kept_rows = 0
    paths: list[list[str]] = [[] for _ in range(parts)]
    for chunk, (row_base, raw) in enumerate(_raw_chunks(unit, wanted)):
        t = normalize_log(raw, unit["path"], row_base=row_base, **cols)
        raw_rows += raw.num_rows
        kept_rows += t.num_rows
        t = t.combine_chunks()
        part = _partition_of(t.column("user_id"), parts)
        t = t.take(pa.array(np.argsort(part, kind="stable")))  # stable: pieces keep log order
        bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=parts))])
        for k in range(parts):
            if bounds[k + 1] == bounds[k] and chunk > 0:
                continue  # the first chunk writes every piece, so each has a schema to read
            path = os.path.join(work_dir, f"piece-{unit['index']:06d}-{chunk:05d}-{k:05d}.arrow")
            write_block(t.slice(bounds[k], bounds[k + 1] - bounds[k]), path)
            paths[k].append(path)
    return raw_rows, kept_rows, paths


# ----------------------------------------------------------------------------- per-block steps
# Each step is a plain function of one user-keyed block (every event of its users), so the
# same code runs in a Ray task or, in tests, directly. Steps that change a block also return
# its per-item counts, so no k-core round needs a pass of its own to count.


def block_sort_dedupe(block: pa.Table) -> pa.Table:
    """Stable order by (user, timestamp), then drop exact duplicates. A reduce task's block is
    already in log order (pieces by unit, then chunk; rows kept in order within each), so the
    stable sort alone keeps ties in log order."""
    block = S.sort_events(block)
    block, _ = S.dedupe(block, presorted=True)
    return block


def block_counts(block: pa.Table, min_user: int) -> pa.Table:
    """Per item: events, and events of users long enough to split; block-level user figures
    ride along as constant columns (``b_*``)."""
    item_type = block.schema.field("item_id").type
    uc = S.count_values(block, "user_id")
    n_users = uc.num_rows
    short = uc.filter(pc.less(uc.column("count"), S.MIN_SEQUENCE_LENGTH))
    ic = S.count_values(block, "item_id")
    if short.num_rows:
        long_ev = pc.invert(pc.is_in(block.column("user_id"),
                                     value_set=short.column("key").combine_chunks()))
        lc = S.count_values(block.filter(long_ev), "item_id")
        idx = pc.index_in(ic.column("key"), value_set=lc.column("key").combine_chunks())
        long_counts = pc.fill_null(lc.column("count").combine_chunks().take(idx), 0)
    else:
        long_counts = ic.column("count")
    n = ic.num_rows
    min_uc = int(pc.min(uc.column("count")).as_py()) if n_users else 1 << 62
    under = int(pc.sum(pc.less(uc.column("count"), min_user)).as_py() or 0) if n_users else 0

    def const(v):
        return pa.array(np.full(n, v, dtype=np.int64))

    return pa.table({
        "item_id": ic.column("key").cast(item_type),
        "count": ic.column("count"),
        "count_long": long_counts,
        "b_users": const(n_users),
        "b_min_user_count": const(min_uc),
        "b_users_under": const(under),
        "b_short_users": const(short.num_rows),
        "b_short_events": const(int(pc.sum(short.column("count")).as_py() or 0)),
    })


def reduce_partition(pieces: list[str], block_path: str, min_user: int) -> pa.Table:
    """Reduce task: one partition's pieces from every map task (in log order) -> a sorted,
    deduplicated block file; returns its counts."""
    block = pa.concat_tables([read_block(p) for p in pieces]).combine_chunks()
    block = block_sort_dedupe(block)
    write_block(block, block_path)
    return block_counts(block, min_user)


def kcore_block(block_path: str, min_user: int, min_item: int, item_counts: pa.Table) -> pa.Table:
    """One k-core round on one block file with the global item counts; returns its counts."""
    block = read_block(block_path)
    block = S.kcore_round(block, min_user, min_item, item_counts=item_counts)
    write_block(block, block_path)
    return block_counts(block, min_user)


def block_finalize(block_path: str, items: pa.Table, out_dir: str) -> pa.Table:
    """Drop short users, build sequences, write one shard; return (user_id, length) rows."""
    block = read_block(block_path)
    block, _, _ = S.drop_short_users(block)
    seqs = S.user_sequences(block, items, presorted=True)
    if seqs.num_rows:
        name = f"part-{uuid.uuid4().hex}.parquet"
        pq.write_table(seqs, os.path.join(out_dir, SEQUENCES_DIR, name))
    return pa.table({
        "user_id": seqs.column("user_id"),
        "length": pc.list_value_length(seqs.column("items")).cast(pa.int64()),
    })


def global_counts(parts: list[pa.Table], min_user: int, min_item: int) -> dict:
    """Sum the blocks' counts: global item counts and what the next k-core round would drop."""
    parts = [t for t in parts if t.num_rows]
    if not parts:
        return {"empty": True}
    allc = pa.concat_tables(parts)
    counts = allc.group_by("item_id").aggregate([("count", "sum"), ("count_long", "sum")])
    counts = counts.rename_columns(["item_id", "count", "count_long"])
    heads = pa.concat_tables([t.slice(0, 1) for t in parts])  # block figures: one row each

    def total(col):
        return int(pc.sum(heads.column(col)).as_py())

    return {
        "empty": False,
        "counts": counts,
        "events": int(pc.sum(counts.column("count")).as_py()),
        "users": total("b_users"),
        "users_under": total("b_users_under") if min_user > 0 else 0,
        "items_under": (int(pc.sum(pc.less(counts.column("count"), min_item)).as_py())
                        if min_item > 0 else 0),
        "short_users": total("b_short_users"),
        "short_events": total("b_short_events"),
    }


# ----------------------------------------------------------------------------- driver


def _wait(refs: list, label: str, t0: float) -> None:
    """Block until every ref is ready, logging progress every few seconds (stderr)."""
    import ray

    pending, total, last = list(refs), len(refs), time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
        if pending and time.time() - last >= 5.0:
            log(f"{label}: {total - len(pending)}/{total} tasks done ({time.time() - t0:.1f}s)")
            last = time.time()


def _ray_error(exc: BaseException) -> DiffuRecError | None:
    """The DiffuRecError that a Ray task raised, if any, from the wrapped exception chain."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiffuRecError) and type(e) is DiffuRecError:
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            stack.append(cause)
        stack.extend([e.__cause__, e.__context__])
        if isinstance(e, DiffuRecError):  # RayTaskError(DiffuRecError): dynamic subclass
            msg = str(e).strip().splitlines()
            for line in reversed(msg):
                if "DiffuRecError:" in line:
                    return DiffuRecError(line.split("DiffuRecError:", 1)[1].strip())
    return None


def init_ray(address: str | None, num_cpus: int | None, object_store_memory: int | None):
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    kw = {"log_to_driver": True, "include_dashboard": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, **kw)
    return ray


def prepare(
    input_path: str,
    output: str,
    min_user: int = 5,
    min_item: int = 5,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    overwrite: bool = False,
    num_blocks: int | None = None,
    unit_rows: int = UNIT_ROWS,
) -> dict:
    """Run the pipeline on the current Ray cluster (``ray.init`` first); returns the stats.

    User errors raise DiffuRecError (also when raised inside a Ray task).
    """
    try:
        return _prepare(input_path, output, min_user, min_item, user_col, item_col, time_col,
                        rating_col, min_rating, overwrite, num_blocks, unit_rows)
    except DiffuRecError as exc:
        err = _ray_error(exc)
        if err is None or err is exc:
            raise
        raise err from None
    except Exception as exc:
        err = _ray_error(exc)
        if err is None:
            raise
        raise err from None


def _prepare(input_path, output, min_user, min_item, user_col, item_col, time_col, rating_col,
             min_rating, overwrite, num_blocks, unit_rows) -> dict:
    import ray

    if min_user < 0 or min_item < 0:
        raise DiffuRecError(f"--min-user/--min-item must be >= 0 (got {min_user}, {min_item})")
    if min_rating is not None and not rating_col:
        raise DiffuRecError("--min-rating needs --rating-col")
    out = Path(output).absolute()
    check_target(out, overwrite)
    t0 = time.time()
    files = resolve_log_paths(input_path)
    cols = {"user_col": user_col, "item_col": item_col, "time_col": time_col,
            "rating_col": rating_col, "min_rating": min_rating}
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    units = plan_units(files, wanted, unit_rows)
    est_rows = sum(u["rows"] for u in units)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    p = num_blocks or max(cpus, -(-est_rows // BLOCK_ROWS))
    log(f"reading {len(files)} file(s) in {len(units)} task(s) into {p} user-keyed blocks")

    # Everything is written under a staging directory beside the output: the final dataset, and
    # meanwhile the intermediate blocks (``_work``), so a failed run leaves nothing behind.
    tmp = staging_dir(out)
    try:
        stats = _run_stages(ray, units, cols, p, tmp, input_path, min_user, min_item,
                            rating_col, min_rating, t0)
        publish_dataset(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({time.time() - t0:.1f}s)")
    return stats


def _run_stages(ray, units, cols, p, tmp: Path, input_path, min_user, min_item, rating_col,
                min_rating, t0) -> dict:
    work = tmp / "_work"
    work.mkdir()
    (tmp / SEQUENCES_DIR).mkdir()

    # 1-2. map: read + validate + split by user hash; reduce: concat, sort, dedupe, count.
    map_task = ray.remote(map_unit)
    map_refs = [map_task.remote(u, cols, p, str(work)) for u in units]
    _wait(map_refs, "read", t0)
    mapped = ray.get(map_refs)
    raw_rows = sum(m[0] for m in mapped)
    rows_read = sum(m[1] for m in mapped)
    if raw_rows == 0:
        raise DiffuRecError(f"{input_path}: empty log (no rows)")
    if rows_read == 0:
        raise DiffuRecError(f"{input_path}: empty log: no row has {rating_col} >= {min_rating} "
                            f"(of {raw_rows} rows)")
    log(f"read {rows_read} events ({time.time() - t0:.1f}s)")
    blocks = [str(work / f"block-{k:05d}.arrow") for k in range(p)]
    reduce_task = ray.remote(reduce_partition)
    counts_refs = [reduce_task.remote([path for m in mapped for path in m[2][k]], blocks[k],
                                      min_user) for k in range(p)]
    _wait(counts_refs, "shuffle, sort, dedupe", t0)
    g = global_counts(ray.get(counts_refs), min_user, min_item)
    deduped = g["events"]
    log(f"shuffled into {p} user-keyed blocks, {deduped} events after dedupe "
        f"({time.time() - t0:.1f}s)")

    # 3. k-core: each round drops every event under either threshold at once (the schedule of
    # split.kcore) and counts what it kept, until a round would drop nothing.
    kinfo = {"events": 0, "users": 0, "items": 0, "iterations": 0}
    first_users, first_items = g["users"], g["counts"].num_rows
    kcore_task = ray.remote(kcore_block)
    while not g["empty"] and (g["users_under"] or g["items_under"]):
        kinfo["iterations"] += 1
        before = g["events"]
        counts_ref = ray.put(g["counts"].select(["item_id", "count"])
                             .rename_columns(["key", "count"]))
        counts_refs = [kcore_task.remote(b, min_user, min_item, counts_ref) for b in blocks]
        _wait(counts_refs, f"k-core round {kinfo['iterations']}", t0)
        g = global_counts(ray.get(counts_refs), min_user, min_item)
        log(f"k-core round {kinfo['iterations']}: removed {before - g.get('events', 0)} events "
            f"({time.time() - t0:.1f}s)")
    if g["empty"]:
        raise DiffuRecError(f"{input_path}: no events left after filtering")
    kinfo["events"] = deduped - g["events"]
    kinfo["users"] = first_users - g["users"]
    kinfo["items"] = first_items - g["counts"].num_rows
    counts = g["counts"]
    survivors = counts.filter(pc.greater(counts.column("count_long"), 0))
    if survivors.num_rows == 0:
        raise DiffuRecError(
            f"{input_path}: no events left after filtering (min_user={min_user}, "
            f"min_item={min_item}; k-core removed {kinfo['events']}, short users removed "
            f"{g['short_events']})"
        )
    items = S.build_item_map(survivors)

    # 4. finalize: one shard per block, then the maps and stats.
    finalize_task = ray.remote(block_finalize)
    items_ref = ray.put(items)
    summary_refs = [finalize_task.remote(b, items_ref, str(tmp))
                    for b in blocks]
    _wait(summary_refs, "write", t0)
    summary = pa.concat_tables(ray.get(summary_refs))
    shutil.rmtree(work)
    users = summary.column("user_id").combine_chunks()
    users = users.take(pc.array_sort_indices(users))
    if len(users) != pc.count_distinct(users).as_py():
        raise RuntimeError("internal error: a user was split across blocks")
    lengths = summary.column("length")
    stats = S.make_stats(
        users=summary.num_rows,
        interactions=int(pc.sum(lengths).as_py()),
        max_length=int(pc.max(lengths).as_py()),
        num_items=items.num_rows,
        input_events=rows_read,
        duplicates=rows_read - deduped,
        kcore_info=kinfo,
        short_users=g["short_users"],
        short_events=g["short_events"],
        min_user=min_user,
        min_item=min_item,
        extra_removed={"rating": raw_rows - rows_read} if min_rating is not None else None,
    )
    pq.write_table(items, tmp / ITEMS_FILE)
    pq.write_table(pa.table({"user_id": users, "user": pa.array(
        np.arange(len(users), dtype=np.int64))}), tmp / USERS_FILE)
    write_stats(tmp / STATS_FILE, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="log file, directory or glob")
    ap.add_argument("--output", required=True, help="output dataset directory")
    ap.add_argument("--min-user", type=int, default=5, help="min events per user (0: off)")
    ap.add_argument("--min-item", type=int, default=5, help="min events per item (0: off)")
    ap.add_argument("--user-col", default="user_id")
    ap.add_argument("--item-col", default="item_id")
    ap.add_argument("--time-col", default="timestamp")
    ap.add_argument("--rating-col", default=None)
    ap.add_argument("--min-rating", type=float, default=None)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    ap.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a new "
                    "local cluster)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster")
    ap.add_argument("--object-store-memory", type=int, default=None,
                    help="object store bytes of a new local cluster")
    ap.add_argument("--num-blocks", type=int, default=None, help="user-keyed blocks (default: "
                    f"max(CPUs, events / {BLOCK_ROWS}))")
    args = ap.parse_args(argv)
    started = False
    try:
        # cheap checks before starting a cluster
        resolve_log_paths(args.input)
        check_target(Path(args.output).absolute(), args.overwrite)
        import ray

        started = not ray.is_initialized()
        init_ray(args.address, args.num_cpus, args.object_store_memory)
        stats = prepare(args.input, args.output, args.min_user, args.min_item, args.user_col,
                        args.item_col, args.time_col, args.rating_col, args.min_rating,
                        args.overwrite, args.num_blocks)
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()
    print(json.dumps({"output": str(Path(args.output).absolute()), "stats": stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
