"""Turn a raw interaction log into the training input, with Ray Data.

    python pipelines/prepare.py --input PATH --output DIR [--min-user N] [--min-item N]
        [--user-col C] [--item-col C] [--time-col C] [--rating-col C --min-rating R]
        [--overwrite] [--address ADDR] [--num-cpus N] [--object-store-memory BYTES]

Output: the core library's prepared-dataset format (``diffurec.data.sequences``), identical to
``python -m diffurec split`` / ``write_split`` on the same input. Ends with one JSON line on
stdout (``{"output": ..., "stats": {...}}``); progress goes to stderr. User errors print one line
(``error: ...``) and exit 1.

How it runs (all per-block work is vectorised pyarrow from ``diffurec.data.split``):

1. read:       one task per file chunk (Parquet row groups / streamed CSV batches), validated by
               ``logs.normalize_log``; each row gets ``__order`` = (file index, row) so ties keep
               the log's order as in the single-process path.
2. shuffle:    ``repartition(P, keys=["user_id"])`` (hash shuffle; one block per partition, so
               every user's events are in one block), then per block a stable sort on
               ``(user_id, timestamp, __order)`` and ``split.dedupe``.
3. k-core:     per block item counts (``split.count_values``), summed on the driver; per block
               ``split.kcore_round`` with the global counts; repeated until nothing is removed
               (the same schedule as ``split.kcore``).
4. finalize:   ``split.build_item_map`` over the surviving items; per block
               ``split.drop_short_users`` + ``split.user_sequences`` and one Parquet shard each,
               written into a staging directory beside the output, which is then published with
               one rename (``sequences.publish_dataset``).

Memory is bounded by the block size (P grows with the input); the driver holds per-item counts
and the list of user ids only. On a multi-node cluster the output directory must be on a
filesystem every node sees (shared/NFS), since workers write the shards.

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
    _check_target,
    publish_dataset,
    staging_dir,
    write_stats,
)
from diffurec.errors import DiffuRecError  # noqa: E402

ORDER = "__order"
ROW_BITS = 40  # __order = file_index << 40 | row_in_file
UNIT_ROWS = 1_000_000  # rows per read task
BLOCK_ROWS = 2_500_000  # target events per user-keyed block


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- read


def plan_units(files: list[str], columns: list[str]) -> list[dict]:
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
            if cur_rows >= UNIT_ROWS or rg == md.num_row_groups - 1:
                units.append({"file": fi, "path": path, "fmt": fmt, "rgs": cur, "row": row,
                              "rows": cur_rows})
                row += cur_rows
                cur, cur_rows = [], 0
        if md.num_row_groups == 0:
            units.append({"file": fi, "path": path, "fmt": fmt, "rgs": [], "row": 0, "rows": 0})
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
                if n >= UNIT_ROWS:
                    yield row, pa.Table.from_batches(buf).select(columns)
                    row, buf, n = row + n, [], 0
            if buf or row == 0:
                yield row, pa.Table.from_batches(buf, schema=reader.schema).select(columns)
            return
        yield 0, read_log_file(path, columns)
    except READ_ERRORS as exc:
        raise read_error(path, fmt, exc) from None


def read_units(batch: pa.Table, cols: dict, counter):
    """Ray Data UDF: read units -> validated ``user_id, item_id, timestamp, __order`` blocks.

    ``__order`` is the row's position in the raw log (file index, row in file), so timestamp
    ties keep the log's order. Rows read and kept go to the ``counter`` actor.
    """
    import ray

    wanted = [cols["user_col"], cols["item_col"], cols["time_col"]]
    if cols.get("rating_col"):
        wanted.append(cols["rating_col"])
    for unit in batch.to_pylist():
        raw_rows = kept_rows = 0
        for row_base, raw in _raw_chunks(unit, wanted):
            t = normalize_log(raw, unit["path"], row_base=row_base, **cols)
            raw_rows += raw.num_rows
            kept_rows += t.num_rows
            if t.num_rows == raw.num_rows:
                rows = np.arange(row_base, row_base + raw.num_rows, dtype=np.int64)
            else:  # the rating filter dropped rows: recover the kept rows' positions
                rating = raw.column(cols["rating_col"])
                keep = pc.fill_null(pc.greater_equal(rating, cols["min_rating"]), False)
                rows = row_base + np.flatnonzero(keep.to_numpy(zero_copy_only=False))
            order = (np.int64(unit["file"]) << ROW_BITS) + rows.astype(np.int64)
            yield t.append_column(ORDER, pa.array(order))
        ray.get(counter.add.remote(raw_rows, kept_rows))


def _make_counter():
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.raw = self.kept = 0

        def add(self, raw, kept):
            self.raw += raw
            self.kept += kept

        def get(self):
            return self.raw, self.kept

    return Counter


# ----------------------------------------------------------------------------- per-block steps


def block_sort_dedupe(block: pa.Table) -> pa.Table:
    """Stable order by (user, timestamp, log position), then drop exact duplicates."""
    block = S.sort_events(block, order_col=ORDER)
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


def block_kcore_round(block: pa.Table, min_user: int, min_item: int, counts_ref) -> pa.Table:
    import ray

    counts = ray.get(counts_ref[0]) if isinstance(counts_ref, list) else counts_ref
    return S.kcore_round(block, min_user, min_item, item_counts=counts)


def block_finalize(block: pa.Table, items_ref, out_dir: str) -> pa.Table:
    """Drop short users, build sequences, write one shard; return (user_id, length) rows."""
    import ray

    items = ray.get(items_ref[0]) if isinstance(items_ref, list) else items_ref
    block = block.drop_columns([ORDER])
    block, _, _ = S.drop_short_users(block)
    seqs = S.user_sequences(block, items, presorted=True)
    if seqs.num_rows:
        name = f"part-{uuid.uuid4().hex}.parquet"
        pq.write_table(seqs, os.path.join(out_dir, SEQUENCES_DIR, name))
    return pa.table({
        "user_id": seqs.column("user_id"),
        "length": pc.list_value_length(seqs.column("items")).cast(pa.int64()),
    })


# ----------------------------------------------------------------------------- driver


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
) -> dict:
    """Run the pipeline on the current Ray cluster (``ray.init`` first); returns the stats.

    User errors raise DiffuRecError (also when raised inside a Ray task).
    """
    try:
        return _prepare(input_path, output, min_user, min_item, user_col, item_col, time_col,
                        rating_col, min_rating, overwrite, num_blocks)
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
             min_rating, overwrite, num_blocks) -> dict:
    import ray
    import ray.data

    if min_user < 0 or min_item < 0:
        raise DiffuRecError(f"--min-user/--min-item must be >= 0 (got {min_user}, {min_item})")
    if min_rating is not None and not rating_col:
        raise DiffuRecError("--min-rating needs --rating-col")
    out = Path(output).absolute()
    _check_target(out, overwrite)
    t0 = time.time()
    files = resolve_log_paths(input_path)
    cols = {"user_col": user_col, "item_col": item_col, "time_col": time_col,
            "rating_col": rating_col, "min_rating": min_rating}
    wanted = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    units = plan_units(files, wanted)
    log(f"reading {len(files)} file(s) in {len(units)} task(s)")

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.verbose_stats_logs = False

    counter = _make_counter().remote()  # rows read / kept by the rating filter, from the read tasks

    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_units, fn_kwargs={"cols": cols, "counter": counter}, batch_size=1,
                        batch_format="pyarrow")
    est_rows = sum(u["rows"] for u in units)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    p = num_blocks or max(cpus, -(-est_rows // BLOCK_ROWS))
    ds = ds.repartition(p, keys=["user_id"])
    ds = ds.map_batches(block_sort_dedupe, batch_size=None, batch_format="pyarrow")
    ds = ds.materialize()
    raw_rows, rows_read = ray.get(counter.get.remote())
    ray.kill(counter)
    rating_removed = raw_rows - rows_read
    if raw_rows == 0:
        raise DiffuRecError(f"{input_path}: empty log (no rows)")
    if rows_read == 0:
        raise DiffuRecError(f"{input_path}: empty log: no row has {rating_col} >= {min_rating} "
                            f"(of {raw_rows} rows)")
    deduped = ds.count()
    log(f"shuffled into {p} user-keyed blocks ({time.time() - t0:.1f}s)")

    # k-core: global item counts from per-block counts; one simultaneous round at a time.
    kinfo = {"events": 0, "users": 0, "items": 0, "iterations": 0}
    first_users = first_items = None
    while True:
        c = ds.map_batches(block_counts, fn_kwargs={"min_user": min_user}, batch_size=None,
                           batch_format="pyarrow").to_arrow_refs()
        parts = [t for t in ray.get(c) if t.num_rows]
        allc = pa.concat_tables(parts) if parts else None
        if allc is None:
            break
        counts = allc.group_by("item_id").aggregate([("count", "sum"), ("count_long", "sum")])
        counts = counts.rename_columns(["item_id", "count", "count_long"])
        # block-level figures: take one row per block
        heads = pa.concat_tables([t.slice(0, 1) for t in parts])
        n_users = int(pc.sum(heads.column("b_users")).as_py())
        if first_users is None:
            first_users, first_items = n_users, counts.num_rows
        users_under = int(pc.sum(heads.column("b_users_under")).as_py()) if min_user > 0 else 0
        items_under = (
            int(pc.sum(pc.less(counts.column("count"), min_item)).as_py()) if min_item > 0 else 0
        )
        if users_under == 0 and items_under == 0:
            break
        kinfo["iterations"] += 1
        ref = ray.put(counts.select(["item_id", "count"]).rename_columns(["key", "count"]))
        before = ds.count()
        ds = ds.map_batches(block_kcore_round, fn_kwargs={"min_user": min_user,
                                                          "min_item": min_item,
                                                          "counts_ref": [ref]},
                            batch_size=None, batch_format="pyarrow").materialize()
        log(f"k-core round {kinfo['iterations']}: removed {before - ds.count()} events "
            f"({users_under} users, {items_under} items under threshold)")

    if allc is None:
        raise DiffuRecError(f"{input_path}: no events left after filtering")
    kept = ds.count()
    kinfo["events"] = deduped - kept
    kinfo["users"] = first_users - n_users
    kinfo["items"] = first_items - counts.num_rows
    short_users = int(pc.sum(heads.column("b_short_users")).as_py())
    short_events = int(pc.sum(heads.column("b_short_events")).as_py())
    survivors = counts.filter(pc.greater(counts.column("count_long"), 0))
    if survivors.num_rows == 0:
        raise DiffuRecError(
            f"{input_path}: no events left after filtering (min_user={min_user}, "
            f"min_item={min_item}; k-core removed {kinfo['events']}, short users removed "
            f"{short_events})"
        )
    items = S.build_item_map(survivors)
    items_ref = ray.put(items)

    tmp = staging_dir(out)
    try:
        (tmp / SEQUENCES_DIR).mkdir()
        summary_refs = ds.map_batches(
            block_finalize, fn_kwargs={"items_ref": [items_ref], "out_dir": str(tmp)},
            batch_size=None, batch_format="pyarrow").to_arrow_refs()
        summary = pa.concat_tables([t for t in ray.get(summary_refs)])
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
            short_users=short_users,
            short_events=short_events,
            min_user=min_user,
            min_item=min_item,
            extra_removed={"rating": rating_removed} if min_rating is not None else None,
        )
        pq.write_table(items, tmp / ITEMS_FILE)
        pq.write_table(pa.table({"user_id": users, "user": pa.array(
            np.arange(len(users), dtype=np.int64))}), tmp / USERS_FILE)
        write_stats(tmp / STATS_FILE, stats)
        publish_dataset(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({time.time() - t0:.1f}s)")
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
        _check_target(Path(args.output).absolute(), args.overwrite)
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
