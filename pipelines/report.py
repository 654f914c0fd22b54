"""Regenerate docs/results.md, docs/results.json and the ablation plots from the tracked runs.

    python pipelines/report.py [--from DIR | --mlflow-uri URI | --from-store] [--out docs]
                               [--experiment NAME ...] [--ui-base URL]

The default source is the exported runs kept in the repository (``results/runs/``, written by
``python pipelines/runs.py export``), so a fresh clone regenerates the same pages.
``--mlflow-uri URI`` reads a live MLflow store instead; ``--from-store`` the project's own
(``sqlite:///<abs>/outputs/mlflow.db``, or MLFLOW_TRACKING_URI).
Prints one JSON line: the files written and what they hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines._common import REPO_ROOT, run_cli  # noqa: E402

DEFAULT_RUNS = REPO_ROOT / "results" / "runs"


def _main(argv: list[str] | None) -> int:
    from diffurec.report import write_report, write_report_from_export
    from diffurec.tracking import resolve_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from", dest="runs_dir", type=Path, default=DEFAULT_RUNS,
                        help="folder of exported runs (default: the repository's results/runs)")
    source.add_argument("--mlflow-uri", help="read this live MLflow store instead")
    source.add_argument("--from-store", action="store_true",
                        help="read the project's MLflow store (--output-dir, or MLFLOW_TRACKING_URI)")
    parser.add_argument("--output-dir", default="outputs", help="where the project's MLflow store lives")
    parser.add_argument("--out", default="docs", help="folder for results.md, results.json and PNGs")
    parser.add_argument("--experiment", action="append", help="only these MLflow experiments (repeatable)")
    parser.add_argument("--ui-base", help="MLflow UI address, to link each row to its run")
    args = parser.parse_args(argv)
    if args.mlflow_uri or args.from_store:
        uri = resolve_tracking_uri(args.mlflow_uri, args.output_dir)
        out = write_report(uri, args.out, args.experiment, args.ui_base, root=REPO_ROOT)
    else:
        out = write_report_from_export(args.runs_dir, args.out, args.experiment, args.ui_base, root=REPO_ROOT)
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
