"""Regenerate docs/results.md, docs/results.json and the ablation plots from an MLflow store.

    python pipelines/report.py [--mlflow-uri URI] [--out docs] [--experiment NAME ...] [--ui-base URL]

The default store is the project's ``sqlite:///<abs>/outputs/mlflow.db`` (or MLFLOW_TRACKING_URI).
Prints one JSON line: the files written and what they hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines._common import run_cli  # noqa: E402


def _main(argv: list[str] | None) -> int:
    from diffurec.report import write_report
    from diffurec.tracking import resolve_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow-uri")
    parser.add_argument("--output-dir", default="outputs", help="where the default MLflow store lives")
    parser.add_argument("--out", default="docs", help="folder for results.md, results.json and PNGs")
    parser.add_argument("--experiment", action="append", help="only these MLflow experiments (repeatable)")
    parser.add_argument("--ui-base", help="MLflow UI address, to link each row to its run")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.mlflow_uri, args.output_dir)
    print(json.dumps(write_report(uri, args.out, args.experiment, args.ui_base)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
