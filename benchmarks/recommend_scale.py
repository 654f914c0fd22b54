"""Recommendation throughput: pipelines/recommend.py (Ray Data, 1 and 2 actors) against the
one-process command ``python -m diffurec recommend``, in the same run, on the same data and model.

    python benchmarks/recommend_scale.py [--data DIR | --users 20000] [--model CKPT]
        [--k 20] [--reverse-steps 4] [--workers 1 2] [--repeats 1] [--set key=value ...]
        [--workdir DIR] [--keep]

Without ``--data`` it writes and splits a synthetic log (``diffurec.data.synthetic``, 300 items
per 1,000 users, mean 15 events) of ``--users`` users; without ``--model`` it scores with an
untrained model of the config's defaults (the reference's size: hidden 128, 4 blocks; the speed
does not depend on the weights). Each command runs in its own process, the rounds interleaved
(in-process, Ray with each worker count, repeated ``--repeats`` times) so that a change in the
machine's load touches every path alike.

Prints one JSON object: per path the median ``users_per_s`` the command itself reports (the
scoring and writing: for Ray, the dataset's execution including its actors' start, not
``ray.init``), the median wall time of the whole process (start-up, imports, Ray's start
included) and ``users_per_s_wall``; the ratio of each Ray figure to the in-process one; the
CPU, its core count and the load average before and after (other jobs on the machine show there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a prepared dataset (default: a synthetic one of --users users)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--model", help="checkpoint (default: an untrained model of the config's defaults)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--reverse-steps", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor counts")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048, help="users per Ray actor call")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config keys for the untrained model and inference (e.g. precision=bf16)")
    p.add_argument("--workdir", help="where data, model and outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    return p.parse_args(argv)


def make_inputs(args, work: Path) -> tuple[Path, Path]:
    import torch

    from diffurec.config import Config
    from diffurec.data.sequences import load_sequences, write_split
    from diffurec.data.synthetic import write_synthetic_log
    from diffurec.models import build_model
    from diffurec.training import model_payload, save_atomic

    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        write_synthetic_log(work / "log.parquet", num_users=args.users, num_items=max(50, args.users * 3 // 10),
                            mean_length=15, seed=0)
        write_split(work / "log.parquet", data)
    if args.model:
        return data, Path(args.model)
    num_items = load_sequences(data).num_items
    cfg = Config().with_sets(args.set)
    torch.manual_seed(0)
    return data, save_atomic(model_payload(build_model(cfg, num_items), cfg, num_items), work / "model.pt")


def run(cmd: list[str], env: dict) -> tuple[dict, float]:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_REPO)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffurec.machine import machine_description

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recommend-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    data, model = make_inputs(args, work)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    common = ["--model", str(model), "--data", str(data), "--k", str(args.k), "--reverse-steps",
              str(args.reverse_steps), *[a for s in args.set for a in ("--set", s)]]
    paths = {"in_process": lambda out: [sys.executable, "-m", "diffurec", "recommend", *common, "--output", out,
                                        "--no-progress"]}
    for n in args.workers:
        paths[f"ray_{n}_workers"] = lambda out, n=n: [
            sys.executable, str(_REPO / "pipelines" / "recommend.py"), *common, "--output", out,
            "--num-workers", str(n), "--batch-size", str(args.batch_size), "--no-progress"]
    load_before = os.getloadavg()
    results: dict[str, list] = {name: [] for name in paths}
    users = None
    for r in range(args.repeats):
        for name, cmd in paths.items():
            out = work / f"out-{name}-{r}"
            summary, wall = run(cmd(str(out)), env)
            users = summary["users"]
            results[name].append((summary["users_per_s"], wall))
            print(f"{name} round {r + 1}: {summary['users_per_s']} users/s (wall {wall:.1f} s)", file=sys.stderr,
                  flush=True)
            if not args.keep:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    figures = {}
    for name, rows in results.items():
        ups = statistics.median(r[0] for r in rows)
        wall = statistics.median(r[1] for r in rows)
        figures[name] = {"users_per_s": round(ups, 1), "wall_s": round(wall, 1),
                         "users_per_s_wall": round(users / wall, 1), "runs": [r[0] for r in rows]}
    base = figures["in_process"]
    for name, fig in figures.items():
        if name != "in_process":
            fig["ratio_vs_in_process"] = round(fig["users_per_s"] / base["users_per_s"], 2)
            fig["ratio_vs_in_process_wall"] = round(fig["users_per_s_wall"] / base["users_per_s_wall"], 2)
    print(json.dumps({"users": users, "k": args.k, "reverse_steps": args.reverse_steps, "sets": args.set,
                      "data": str(data), "model": str(model), "cpu": machine_description(), "cores": os.cpu_count(),
                      "load_average_before": [round(x, 2) for x in load_before],
                      "load_average_after": [round(x, 2) for x in os.getloadavg()], "paths": figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
