"""The single-process data path: reading logs, the split, the on-disk format, examples."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffurec.data import sequences as seqmod
from diffurec.data.logs import read_log
from diffurec.data.sequences import (
    eval_examples,
    is_prepared_dataset,
    load_sequences,
    train_examples,
    write_dataset,
    write_split,
)
from diffurec.data.split import (
    build_item_map,
    dedupe,
    kcore,
    split_log,
    user_sequences,
)
from diffurec.errors import DiffuRecError

BEAUTY = "datasets/beauty/interactions.parquet"


def log(rows, types=None):
    u, i, t = zip(*rows) if rows else ((), (), ())
    return pa.table({"user_id": list(u), "item_id": list(i), "timestamp": list(t)})


# ----------------------------------------------------------------------------- Beauty


@pytest.fixture(scope="module")
def beauty(shared_path):
    return load_sequences(shared_path(BEAUTY), min_user=5, min_item=5)


def test_beauty_split_counts(beauty):
    assert len(beauty) == 22_363
    assert beauty.num_items == 12_101
    assert len(beauty.items) == 198_502
    st = beauty.stats
    assert (st["users"], st["items"], st["interactions"]) == (22_363, 12_101, 198_502)
    assert st["max_length"] == int(beauty.lengths.max())
    assert st["mean_length"] == round(198_502 / 22_363, 4)
    assert set(st["removed"]) >= {"duplicates", "kcore_users", "kcore_items", "kcore_events",
                                  "short_users"}
    assert beauty.items.min() == 1 and beauty.items.max() == 12_101
    assert np.all(np.diff(beauty.user_ids.astype(np.int64)) > 0)


def test_no_leak_of_validation_or_test(beauty):
    ex = train_examples(beauty, max_len=50)
    lo = beauty.offsets[ex.user]
    n = beauty.offsets[ex.user + 1] - lo
    pos = ex.end - lo  # target position within the user
    assert pos.min() >= 1
    assert np.all(pos <= n - 3)  # targets never reach n-2 (valid) or n-1 (test)
    assert np.all(ex.start >= lo) and np.all(ex.end - ex.start <= 50)
    assert np.all(ex.end > ex.start)
    # every prefix is there: n-3 examples per user
    assert len(ex) == int(np.maximum(beauty.lengths - 3, 0).sum())
    va = eval_examples(beauty, "valid", 50)
    te = eval_examples(beauty, "test", 50)
    assert np.array_equal(va.end, beauty.offsets[1:] - 2)
    assert np.array_equal(te.end, beauty.offsets[1:] - 1)
    assert np.all(te.start >= beauty.offsets[:-1]) and np.all(te.end - te.start <= 50)


def test_examples_small():
    data = seqmod.sequence_data_from_tables(
        pa.table({"user_id": [7, 3], "items": [[1, 2, 3, 4, 5, 6], [4, 5, 6]]}), 6
    )
    assert list(data.user_ids) == [3, 7]  # sorted by user id
    assert list(data.sequence(1)) == [1, 2, 3, 4, 5, 6]
    ex = train_examples(data, max_len=2)
    hist = [list(data.items[s:e]) for s, e in zip(ex.start, ex.end)]
    tgt = [int(data.items[e]) for e in ex.end]
    assert hist == [[1], [1, 2], [2, 3]] and tgt == [2, 3, 4]
    va = eval_examples(data, "valid", 10)
    assert [int(data.items[e]) for e in va.end] == [5, 5]
    te = eval_examples(data, "test", 10)
    assert list(data.items[te.start[1]:te.end[1]]) == [1, 2, 3, 4, 5]
    with pytest.raises(DiffuRecError, match="split"):
        eval_examples(data, "train", 10)


# ----------------------------------------------------------------------------- split logic


def test_stable_tie_order():
    # user 1 has three events at t=5 in the order c, a, b: they must stay in that order.
    t = log([(1, 30, 5), (2, 10, 1), (1, 10, 5), (1, 20, 5), (1, 40, 1), (2, 20, 1), (2, 30, 0)])
    items = build_item_map(t)
    assert items.column("item_id").to_pylist() == [10, 20, 30, 40]
    assert items.column("item").to_pylist() == [1, 2, 3, 4]
    s = user_sequences(t, items)
    assert s.column("user_id").to_pylist() == [1, 2]
    assert s.column("items").to_pylist() == [[4, 3, 1, 2], [3, 1, 2]]


def test_dedupe_keeps_first_and_order():
    t = log([(1, 1, 1), (1, 2, 1), (1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)])
    out, n = dedupe(t)
    assert n == 2
    assert out.to_pylist() == log([(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 1, 2)]).to_pylist()


def _naive_kcore(rows, mu, mi):
    rows = list(rows)
    while True:
        uc, ic = {}, {}
        for u, i, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        keep = [r for r in rows if uc[r[0]] >= mu and ic[r[1]] >= mi]
        if len(keep) == len(rows):
            return keep
        rows = keep


def test_kcore_fixed_point():
    # A chain: item 9 is rare, so user 3 loses an event, falls below 3, which drops item 8 ...
    rows = [(1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 1, 0), (2, 2, 1), (2, 3, 2),
            (3, 1, 0), (3, 8, 1), (3, 9, 2), (4, 8, 0), (4, 2, 1), (4, 3, 2),
            (5, 1, 0), (5, 2, 1), (5, 3, 2)]
    out, info = kcore(log(rows), 3, 2)
    expect = _naive_kcore(rows, 3, 2)
    assert out.to_pylist() == log(expect).to_pylist()
    assert info["iterations"] >= 2
    assert info["events"] == len(rows) - len(expect)
    assert info["users"] == 2 and info["items"] == 2  # users 3, 4; items 8, 9
    # the result is a fixed point
    again, info2 = kcore(out, 3, 2)
    assert again.num_rows == out.num_rows and info2["iterations"] == 0
    # 0 disables
    same, info0 = kcore(log(rows), 0, 0)
    assert same.num_rows == len(rows) and info0["events"] == 0
    only_users, _ = kcore(log(rows), 4, 0)
    assert only_users.num_rows == 0


def test_kcore_random_matches_naive():
    rng = np.random.default_rng(3)
    rows = [(int(u), int(i), k) for k, (u, i) in
            enumerate(zip(rng.integers(0, 30, 300), rng.integers(0, 25, 300)))]
    for mu, mi in [(5, 5), (8, 0), (0, 12), (10, 10)]:
        out, _ = kcore(log(rows), mu, mi)
        assert out.to_pylist() == log(_naive_kcore(rows, mu, mi)).to_pylist()


def test_short_users_dropped_and_counted():
    t = log([(1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 1, 0), (2, 2, 1)])
    res = split_log(t, min_user=0, min_item=0)
    assert res.sequences.column("user_id").to_pylist() == [1]
    assert res.stats["removed"]["short_users"] == 1
    assert res.stats["removed"]["short_events"] == 2
    with pytest.raises(DiffuRecError, match="no events left"):
        split_log(t, min_user=10, min_item=0)


def test_string_ids_mapped(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item,ts\nbob,x,3\nbob,y,1\nbob,z,2\nann,y,5\nann,x,6\nann,z,7\n"
                 "bob,y,1\n")
    t = read_log(p, user_col="user", item_col="item", time_col="ts")
    res = split_log(t, min_user=0, min_item=0)
    assert res.items.to_pylist() == [{"item_id": "x", "item": 1}, {"item_id": "y", "item": 2},
                                     {"item_id": "z", "item": 3}]
    assert res.sequences.to_pylist() == [{"user_id": "ann", "items": [2, 1, 3]},
                                         {"user_id": "bob", "items": [2, 3, 1]}]
    assert res.stats["removed"]["duplicates"] == 1
    out = tmp_path / "out"
    write_dataset(out, res.sequences, res.items, res.stats)
    data = load_sequences(out)
    assert list(data.user_ids) == ["ann", "bob"] and data.num_items == 3


# ----------------------------------------------------------------------------- reading logs


def test_read_formats_dir_and_glob(tmp_path):
    t = log([(1, 1, 0), (1, 2, 1), (1, 3, 2)])
    pq.write_table(t.slice(0, 2), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"user_id": 1, "item_id": 3, "timestamp": 2}\n')
    both = read_log(tmp_path)
    assert both.to_pylist() == t.to_pylist()
    assert read_log(str(tmp_path / "*.parquet")).num_rows == 2
    assert read_log(tmp_path / "b.jsonl").num_rows == 1


def test_rating_filter(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("u,i,r,t\n1,1,5,0\n1,2,2,1\n1,3,4.5,2\n")
    info = {}
    t = read_log(p, "u", "i", "t", rating_col="r", min_rating=4, info=info)
    assert t.column_names == ["user_id", "item_id", "timestamp"]
    assert t.column("item_id").to_pylist() == [1, 3]
    assert info == {"rows_read": 3, "rating_removed": 1}


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        ("user_id,item_id\n1,2\n", {}, "missing column 'timestamp'"),
        ("user_id,item_id,timestamp\n1,2,5\n1,3,\n", {}, "null timestamp.*row 1"),
        ("user_id,item_id,timestamp\n1,2,5\n-1,3,6\n", {}, "user_id.*negative id -1 at row 1"),
        ("user_id,item_id,timestamp\n1,2.5,5\n", {}, "item_id.*non-integer id 2.5"),
        ("user_id,item_id,timestamp\n", {}, "empty log"),
        ("u,item_id,timestamp\n1,2,3\n", {"user_col": "user"}, "missing column 'user'"),
        ("user_id,item_id,timestamp,r\n1,2,3,1\n", {"rating_col": "r", "min_rating": 4},
         "empty log"),
    ],
)
def test_bad_csv_inputs(tmp_path, content, kwargs, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DiffuRecError, match=match) as exc:
        read_log(p, **kwargs)
    assert "bad.csv" in str(exc.value)


def test_unreadable_and_missing_files(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet")
    with pytest.raises(DiffuRecError, match="broken.parquet"):
        read_log(p)
    with pytest.raises(DiffuRecError, match="nope.parquet.*no such"):
        read_log(tmp_path / "nope.parquet")
    q = tmp_path / "log.txt"
    q.write_text("x")
    with pytest.raises(DiffuRecError, match="unsupported"):
        read_log(q)
    with pytest.raises(DiffuRecError, match="not a prepared dataset"):
        load_sequences(tmp_path)
    with pytest.raises(DiffuRecError, match="missing.*no such"):
        load_sequences(tmp_path / "missing")


def test_parquet_null_and_negative(tmp_path):
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, None], "timestamp": [1, 2]}), p)
    with pytest.raises(DiffuRecError, match="n.parquet.*item_id.*null"):
        read_log(p)


# ----------------------------------------------------------------------------- on-disk format


def _small_result():
    t = log([(u, (u * 7 + k) % 11, k) for u in range(1, 9) for k in range(6)])
    return split_log(t, min_user=0, min_item=0)


def test_round_trip(tmp_path):
    res = _small_result()
    out = tmp_path / "ds"
    write_dataset(out, res.sequences, res.items, res.stats, rows_per_shard=3)
    assert is_prepared_dataset(out)
    assert len(list((out / "sequences").glob("*.parquet"))) == 3
    assert json.loads((out / "stats.json").read_text()) == res.stats
    data = load_sequences(out)
    assert list(data.user_ids) == res.sequences.column("user_id").to_pylist()
    flat = [x for s in res.sequences.column("items").to_pylist() for x in s]
    assert data.items.tolist() == flat
    assert data.num_items == len(res.items)
    assert data.stats == res.stats
    assert pq.read_table(out / "users.parquet").column("user").to_pylist() == list(range(8))
    # write_split gives the same thing from a file
    p = tmp_path / "log.parquet"
    pq.write_table(log([(u, (u * 7 + k) % 11, k) for u in range(1, 9) for k in range(6)]), p)
    stats = write_split(p, tmp_path / "ds2", min_user=0, min_item=0)
    assert stats == res.stats
    assert load_sequences(tmp_path / "ds2").items.tolist() == flat
    assert load_sequences(p, min_user=0, min_item=0).items.tolist() == flat


def test_atomic_write(tmp_path, monkeypatch):
    res = _small_result()
    out = tmp_path / "ds"
    real = pq.write_table

    def failing(table, where, *a, **k):
        if str(where).endswith("items.parquet"):
            raise OSError("disk full")
        return real(table, where, *a, **k)

    monkeypatch.setattr(seqmod.pq, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(out, res.sequences, res.items, res.stats)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temp dir left behind
    monkeypatch.setattr(seqmod.pq, "write_table", real)

    write_dataset(out, res.sequences, res.items, res.stats)
    with pytest.raises(DiffuRecError, match="already exists"):
        write_dataset(out, res.sequences, res.items, res.stats)
    res.stats["marker"] = 1
    write_dataset(out, res.sequences, res.items, res.stats, overwrite=True)
    assert json.loads((out / "stats.json").read_text())["marker"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    other = tmp_path / "notmine"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(DiffuRecError, match="not a prepared dataset"):
        write_dataset(other, res.sequences, res.items, res.stats, overwrite=True)
    assert (other / "precious.txt").exists()
