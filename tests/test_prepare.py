"""pipelines/prepare.py: the Ray pipeline gives exactly the core library's split.

Runs on a real local Ray cluster (the ``ray_local`` fixture: ``ray.init(address="local")``),
plus one run of the command line in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffurec.data.logs import read_log
from diffurec.data.sequences import load_sequences, write_split
from diffurec.data.split import split_log
from diffurec.errors import DiffuRecError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "prepare.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("prepare_pipeline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prep = _load_module()


def assert_same_dataset(a: Path, b: Path):
    da, db = load_sequences(a), load_sequences(b)
    assert np.array_equal(da.user_ids, db.user_ids)
    assert np.array_equal(da.offsets, db.offsets)
    assert np.array_equal(da.items, db.items)
    assert da.num_items == db.num_items
    assert da.stats == db.stats
    for f in ("items.parquet", "users.parquet"):
        assert pq.read_table(a / f).equals(pq.read_table(b / f)), f


@pytest.mark.parametrize("name,min_user,min_item,expected", [
    ("beauty", 5, 5, (22_363, 12_101, 198_502)),
    ("ml-1m", 5, 0, (6_040, 3_706, 1_000_209)),  # user threshold only
])
def test_shared_logs_equal_library(ray_local, shared_path, tmp_path, name, min_user, min_item, expected):
    src = shared_path(f"datasets/{name}/interactions.parquet")
    stats = prep.prepare(str(src), str(tmp_path / "ray"), min_user, min_item)
    assert (stats["users"], stats["items"], stats["interactions"]) == expected
    write_split(src, tmp_path / "lib", min_user, min_item)
    assert_same_dataset(tmp_path / "ray", tmp_path / "lib")


def _hand_log():
    # k-core chain (user 3 -> item 8 -> user 4 ...), timestamp ties, a duplicate, string ids.
    rows = [("u1", "a", 0), ("u1", "b", 1), ("u1", "c", 2), ("u2", "a", 0), ("u2", "b", 1),
            ("u2", "c", 2), ("u3", "a", 0), ("u3", "h", 1), ("u3", "i", 2), ("u4", "h", 0),
            ("u4", "b", 1), ("u4", "c", 2), ("u5", "c", 7), ("u5", "a", 7), ("u5", "b", 7),
            ("u5", "c", 7), ("u6", "b", 1), ("u6", "a", 1), ("u6", "c", 0)]
    u, i, t = zip(*rows)
    return pa.table({"user_id": list(u), "item_id": list(i), "timestamp": list(t)})


def test_hand_made_kcore_ties_and_dedupe(ray_local, tmp_path):
    src = tmp_path / "log"
    src.mkdir()
    t = _hand_log()
    pq.write_table(t.slice(0, 10), src / "a.parquet")
    pq.write_table(t.slice(10), src / "b.parquet")
    stats = prep.prepare(str(src), str(tmp_path / "ray"), 3, 2, num_blocks=3)
    lib = split_log(read_log(src), 3, 2)
    assert stats == lib.stats
    assert stats["removed"]["duplicates"] == 1
    assert stats["removed"]["kcore_iterations"] >= 2
    assert stats["removed"]["kcore_users"] == 2 and stats["removed"]["kcore_items"] == 2
    data = load_sequences(tmp_path / "ray")
    assert list(data.user_ids) == lib.sequences.column("user_id").to_pylist()
    assert [list(data.sequence(k)) for k in range(len(data))] == \
        lib.sequences.column("items").to_pylist()
    # ties keep log order: u5 = c, a, b at t=7 (dup c dropped); u6 = c, then b, a at t=1
    assert data.sequence(2).tolist() == [3, 1, 2] and data.sequence(3).tolist() == [3, 2, 1]


def test_more_blocks_than_users_and_no_intermediates_left(ray_local, tmp_path):
    # 16 partitions for 6 users: most are empty; the output holds only the dataset
    src = tmp_path / "log.parquet"
    pq.write_table(_hand_log(), src)
    stats = prep.prepare(str(src), str(tmp_path / "ray"), 3, 2, num_blocks=16)
    assert stats == split_log(read_log(src), 3, 2).stats
    assert sorted(os.listdir(tmp_path)) == ["log.parquet", "ray"]
    assert "_work" not in os.listdir(tmp_path / "ray")
    assert len(os.listdir(tmp_path / "ray" / "sequences")) <= stats["users"]


def test_short_users_dropped_and_counted(ray_local, tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps({"user_id": u, "item_id": i, "timestamp": k}) + "\n"
                         for u, n in [(1, 4), (2, 2), (3, 3)] for k, i in enumerate(range(n))))
    stats = prep.prepare(str(p), str(tmp_path / "ray"), 0, 0)
    assert stats["users"] == 2
    assert stats["removed"]["short_users"] == 1 and stats["removed"]["short_events"] == 2
    assert stats == split_log(read_log(p), 0, 0).stats


BAD = [
    ("missing.csv", "user_id,item_id\n1,2\n", {}, r"missing.csv: missing column 'timestamp'"),
    ("nullts.csv", "user_id,item_id,timestamp\n1,2,5\n1,3,\n", {},
     r"nullts.csv: column 'timestamp' has 1 null timestamp.*row 1"),
    ("neg.csv", "user_id,item_id,timestamp\n1,2,5\n1,-3,6\n", {},
     r"neg.csv: column 'item_id' has a negative id -3 at row 1"),
    ("frac.csv", "user_id,item_id,timestamp\n1.5,2,5\n", {}, r"frac.csv: column 'user_id'.*1.5"),
    ("empty.csv", "user_id,item_id,timestamp\n", {}, r"empty.csv: empty log"),
    ("broken.parquet", "not parquet at all", {}, r"broken.parquet: cannot read"),
    ("norating.csv", "user_id,item_id,timestamp,r\n1,2,3,1\n", {"rating_col": "r",
     "min_rating": 4}, r"norating.csv: empty log"),
    ("tooshort.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,4\n", {"min_user": 0,
     "min_item": 0}, r"no events left"),
]


@pytest.mark.parametrize("name, content, kw, match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(ray_local, tmp_path, name, content, kw, match):
    src = tmp_path / "in"
    src.mkdir()
    (src / name).write_text(content)
    out = tmp_path / "out"
    args = {"min_user": 5, "min_item": 5, **kw}
    with pytest.raises(DiffuRecError, match=match):
        prep.prepare(str(src / name), str(out), **args)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in"]  # nothing half-written


def test_bad_parquet_column_and_existing_output(ray_local, tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [1], "timestamp": [1]}), p)
    with pytest.raises(DiffuRecError, match=r"x.parquet: missing column 'user_id'"):
        prep.prepare(str(p), str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DiffuRecError, match="already exists"):
        prep.prepare(str(p), str(tmp_path / "out"))


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_cli_movielens_csv(shared_path, tmp_path):
    """The command line on the raw MovieLens CSV, with flags alone; starts its own cluster."""
    src = shared_path("datasets/raw/ml-latest-small/ratings.csv")
    flags = ["--user-col", "userId", "--item-col", "movieId", "--rating-col", "rating",
             "--min-rating", "4", "--num-cpus", "2", "--object-store-memory", str(200 << 20)]
    r = _run_cli("--input", str(src), "--output", str(tmp_path / "ray"), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(tmp_path / "ray")
    stats = write_split(src, tmp_path / "lib", 5, 5, user_col="userId", item_col="movieId",
                        rating_col="rating", min_rating=4)
    assert summary["stats"] == stats
    assert stats["removed"]["rating"] > 0 and stats["users"] > 100
    assert_same_dataset(tmp_path / "ray", tmp_path / "lib")


def test_csv_read_in_chunks_equals_library(ray_local, shared_path, tmp_path):
    """A CSV larger than one read chunk: pieces per chunk keep ties in file order."""
    src = shared_path("datasets/raw/ml-latest-small/ratings.csv")
    kw = {"user_col": "userId", "item_col": "movieId", "rating_col": "rating", "min_rating": 3.5}
    stats = prep.prepare(str(src), str(tmp_path / "ray"), 5, 5, num_blocks=3, unit_rows=20_000,
                         **kw)
    assert stats == write_split(src, tmp_path / "lib", 5, 5, **kw)
    assert_same_dataset(tmp_path / "ray", tmp_path / "lib")


def test_cli_user_error_one_line(tmp_path):
    r = _run_cli("--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.csv'}: no such file or "
                                             "directory"]
    assert "Traceback" not in r.stderr and r.stdout == ""
