"""Export MLflow runs to JSON files in the repository, or load those files into an MLflow store.

    python pipelines/runs.py export [--mlflow-uri URI] [--experiment NAME ...] [--filter STR] [--to results/runs]
    python pipelines/runs.py import [--from results/runs] [--mlflow-uri URI] [--experiment NAME ...]
    python pipelines/runs.py replay FILE [--mlflow-uri URI]

The store defaults to the project's ``sqlite:///<abs>/outputs/mlflow.db`` (or MLFLOW_TRACKING_URI).
``export`` writes one file per run (params, tags, metric histories; no artifacts) and rewrites
only files whose content changed; ``import`` recreates the runs so ``mlflow ui`` shows them,
skipping runs already there. The format: ``results/README.md``. ``replay`` sends the tracking
writes a run kept through a server outage (``mlflow_pending.jsonl``, named in the run's warning) to
its run, once the server is back. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffurec.errors import DiffuRecError  # noqa: E402
from pipelines._common import REPO_ROOT, run_cli  # noqa: E402

DEFAULT_RUNS = REPO_ROOT / "results" / "runs"


def _main(argv: list[str] | None) -> int:
    from diffurec.runs_export import export_runs, import_runs
    from diffurec.tracking import replay_pending, resolve_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="MLflow store -> JSON files")
    exp.add_argument("--to", type=Path, default=DEFAULT_RUNS, help="folder (default: the repository's results/runs)")
    exp.add_argument("--filter", help="MLflow search filter, e.g. \"attributes.status = 'FINISHED'\"")
    imp = sub.add_parser("import", help="JSON files -> MLflow store")
    imp.add_argument("--from", dest="runs_dir", type=Path, default=DEFAULT_RUNS,
                     help="folder (default: the repository's results/runs)")
    for p in (exp, imp):
        p.add_argument("--mlflow-uri", help="the MLflow store (default: the project's)")
        p.add_argument("--output-dir", default="outputs", help="where the project's MLflow store lives")
        p.add_argument("--experiment", action="append", help="only these experiments (repeatable)")
    rep = sub.add_parser("replay", help="a run's kept tracking writes -> its MLflow run")
    rep.add_argument("file", type=Path, help="the run's mlflow_pending.jsonl")
    rep.add_argument("--mlflow-uri", help="the store (default: the one the file names)")
    args = parser.parse_args(argv)
    if args.command == "replay":
        if not args.file.is_file():
            raise DiffuRecError(f"replay: no such file {args.file}")
        try:
            out = replay_pending(args.file, args.mlflow_uri)
        except (ValueError, RuntimeError) as exc:
            raise DiffuRecError(f"replay: {exc}") from None
        print(json.dumps(out))
        return 0
    uri = resolve_tracking_uri(args.mlflow_uri, args.output_dir)
    if args.command == "export":
        out = export_runs(uri, args.to, args.experiment, args.filter, root=REPO_ROOT)
    else:
        out = import_runs(args.runs_dir, uri, args.experiment)
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
