"""Scale benchmark: pipelines/prepare.py (Ray map/reduce) against a single-process pyarrow baseline.

    python benchmarks/prepare_scale.py [--events 10000000] [--items 50000]
        [--object-store-memory 2000000000] [--num-cpus N] [--workdir DIR] [--keep]

Writes a synthetic log (``diffurec.data.synthetic``, mean 15 events per user) as Parquet, then
on the same file, each in its own process:

* baseline: ``read_log`` + ``split_log`` + ``write_dataset`` in one Python process (pyarrow with
  its threads): dedupe, k-core to a fixed point, id mapping, stable order, split, write.
* ray: ``python pipelines/prepare.py`` on a fresh local Ray cluster, its object store capped at
  ``--object-store-memory``.

Prints one JSON object: events, seconds, events/s and peak memory of each, and the ratio of
events/s (ray / baseline). ``ray.pipeline_*`` excludes the cluster start, ``ray.total_*`` includes
it. Peak memory is the largest sampled sum of RSS over the process tree (Ray's object store
pages are shared memory and may be counted in more than one worker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

BASELINE = """
import json, sys, time, resource
t0 = time.time()
from diffurec.data.logs import read_log
from diffurec.data.split import split_log
from diffurec.data.sequences import write_dataset
t = read_log(sys.argv[1])
res = split_log(t, 5, 5)
write_dataset(sys.argv[2], res.sequences, res.items, res.stats, rows_per_shard=1_000_000)
print(json.dumps({"seconds": time.time() - t0, "stats": res.stats}))
"""


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _tree_rss(pid: int) -> int:
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        stack.extend(_children(p))
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                    float, int]:
    """Run cmd; return (completed process, wall seconds, peak process-tree RSS bytes)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=_REPO)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.time() - t0, peak[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--object-store-memory", type=int, default=2_000_000_000)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the log and the outputs")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from diffurec.data.synthetic import generate_synthetic_log

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"log_{args.events}.parquet"
    if not log_path.exists():
        t0 = time.time()
        chunk_users = 2_000_000  # generate in slices to bound memory at 100M+
        users = max(1, round(args.events / 15))
        writer = None
        for k, start in enumerate(range(0, users, chunk_users)):
            t = generate_synthetic_log(num_users=min(chunk_users, users - start),
                                       num_items=args.items, seed=k)
            t = t.set_column(0, "user_id", pc.add(t.column("user_id"), pa.scalar(start)))
            if writer is None:
                writer = pq.ParquetWriter(log_path, t.schema)
            writer.write_table(t, row_group_size=1_000_000)
        writer.close()
        print(f"wrote {log_path} in {time.time() - t0:.1f}s", file=sys.stderr)
    events = pq.read_metadata(log_path).num_rows

    import shutil

    for old in ("baseline_out", "ray_out"):  # outputs of a previous --keep run
        shutil.rmtree(work / old, ignore_errors=True)
    result = {"events": events, "cpus": os.cpu_count(),
              "object_store_memory": args.object_store_memory}
    if not args.skip_baseline:
        out = work / "baseline_out"
        r, wall, peak = run_measured([sys.executable, "-c", BASELINE, str(log_path), str(out)])
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        b = json.loads(r.stdout.strip().splitlines()[-1])
        result["baseline"] = {"seconds": round(b["seconds"], 2),
                              "events_per_s": round(events / b["seconds"]),
                              "peak_rss_mb": round(peak / 2**20)}
        base_stats = b["stats"]
    out = work / "ray_out"
    cmd = [sys.executable, "pipelines/prepare.py", "--input", str(log_path), "--output",
           str(out), "--overwrite", "--object-store-memory", str(args.object_store_memory)]
    if args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    r, wall, peak = run_measured(cmd)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    m = re.findall(r"\[prepare\] wrote .* \(([\d.]+)s\)", r.stderr)
    pipe_s = float(m[-1]) if m else wall
    stats = json.loads(r.stdout.strip().splitlines()[-1])["stats"]
    result["ray"] = {"pipeline_seconds": round(pipe_s, 2),
                     "pipeline_events_per_s": round(events / pipe_s),
                     "total_seconds": round(wall, 2),
                     "total_events_per_s": round(events / wall),
                     "peak_rss_mb": round(peak / 2**20)}
    if not args.skip_baseline:
        result["same_stats"] = stats == base_stats
        result["ratio_pipeline"] = round(b["seconds"] / pipe_s, 3)
        result["ratio_total"] = round(b["seconds"] / wall, 3)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
