"""``python -m diffurec split|train|evaluate|recommend``: each prints one JSON line of results on stdout.

User errors (bad paths, bad config, bad data) print one ``error: ...`` line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from diffurec.errors import DiffuRecError


def _emit(result: dict) -> None:
    print(json.dumps(result, default=str), flush=True)


def dataset_name(path: str) -> str:
    """A readable dataset tag: the prepared folder's name, or a log file's folder name."""
    p = Path(path).resolve()
    return p.parent.name if p.is_file() else p.name


def parse_tags(items: list[str] | None) -> dict[str, str]:
    tags = {}
    for item in items or []:
        if "=" not in item:
            raise DiffuRecError(f"--tag expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        tags[key.strip()] = value.strip()
    return tags


def new_run_name(model: str) -> str:
    return f"{model}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class Termination:
    """SIGTERM (`kill`, a scheduler's stop) raised as KeyboardInterrupt, so the MLflow run ends
    KILLED, but held back while an MLflow write is in flight: interrupted inside a write, SQLite
    keeps its write lock and the run could no longer be marked (it stayed RUNNING in about 1 of
    12 kills landing at an epoch's end)."""

    def __init__(self):
        self.deferring = False
        self.pending: int | None = None

    def handler(self, signum, frame):
        if self.deferring:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def hold(self) -> None:
        """From now on a signal waits and is dropped: the run is being marked, or its work is done."""
        self.deferring = True

    @contextlib.contextmanager
    def deferred(self):
        """Within: a signal waits, and is raised when the block ends."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending is not None:
                raise KeyboardInterrupt(f"signal {self.pending}")


def cmd_split(args) -> dict:
    from diffurec.data.sequences import write_split

    stats = write_split(args.data, args.out, min_user=args.min_user, min_item=args.min_item)
    return {"output": str(Path(args.out).resolve()), **stats}


def load_config(config_path: str | None, sets: list[str] | None):
    from diffurec.config import Config

    cfg = Config.from_yaml(config_path) if config_path else Config()
    return cfg.with_sets(sets)


def cmd_train(args) -> dict:
    import torch

    from diffurec.data.sequences import load_sequences
    from diffurec.training import fit, load_checkpoint, precision_used, resolve_device, test_best

    cfg = load_config(args.config, args.set)
    if args.output_dir:
        cfg = cfg.with_overrides({"output_dir": args.output_dir})
    name = args.resume or args.name or new_run_name(cfg.model)
    run_dir = Path(cfg.output_dir).resolve() / "runs" / name
    resume_from = None
    if args.resume:
        latest = run_dir / "latest.pt"
        if not latest.is_file():
            raise DiffuRecError(f"--resume {name}: no checkpoint at {latest}")
        # on the CPU, as pipelines/train.py loads it: fit() moves the state onto the model's device,
        # and the config that picks the device may be the checkpoint's own
        resume_from = torch.load(latest, map_location="cpu", weights_only=False)
        if not args.config:
            # continue with the run's own config (plus any --set), as pipelines/train.py does: a
            # resume without the original --config must not train on with the defaults
            from diffurec.config import Config

            cfg = Config.from_dict(resume_from["config"], source=str(latest)).with_sets(args.set)
            if args.output_dir:
                cfg = cfg.with_overrides({"output_dir": args.output_dir})
    elif (run_dir / "latest.pt").exists():
        raise DiffuRecError(f"run '{name}' already exists at {run_dir}; pass --resume {name} to continue it")
    device = resolve_device(cfg)
    data = load_sequences(args.data, min_user=cfg.min_user, min_item=cfg.min_item)

    tracker = None
    if not args.no_mlflow:
        from diffurec.machine import machine_description
        from diffurec.tracking import PENDING_FILE, MLflowRun, config_params, resolve_tracking_uri

        uri = resolve_tracking_uri(args.mlflow_uri, cfg.output_dir)
        id_file = run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resume_from and id_file.is_file() else None
        tracker = MLflowRun(uri, experiment=args.experiment, run_name=name, run_id=run_id,
                            pending_path=run_dir / PENDING_FILE,
                            tags={"dataset": dataset_name(args.data), "data_path": str(args.data),
                                  "machine": machine_description(device),
                                  "precision_used": precision_used(device, cfg.precision),
                                  "model": cfg.model, **parse_tags(args.tag)})
        tracker.log_params(config_params(cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(tracker.run_id)

    termination = Termination()

    def on_epoch_end(epoch, metrics, state, paths):
        if tracker is not None:
            with termination.deferred():
                tracker.log_metrics(metrics, step=epoch)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, termination.handler) if in_main else None
    try:
        try:
            result = fit(cfg, data, run_dir, device=device, resume_from=resume_from,
                         on_epoch_end=on_epoch_end, progress=not args.no_progress)
            test = test_best(run_dir, data, device, progress=not args.no_progress)
        except BaseException:
            if tracker is not None:
                termination.hold()  # a second signal must not interrupt the marking
                tracker.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
            raise
        out = {"run_name": name, "checkpoint": str(run_dir / "best.pt"), "best_epoch": result["best_epoch"],
               "epochs": result["epochs"], "seconds_to_best": round(result["seconds_to_best"], 2),
               **{f"valid/{k}": v for k, v in result["best_valid"].items()},
               **{f"test/{k}": v for k, v in test.items()}}
        if tracker is not None:
            termination.hold()  # the run's work is done: record it FINISHED
            tracker.log_metrics({k: v for k, v in out.items() if k.startswith("test/")}, step=result["epochs"])
            tracker.log_metrics({"best_epoch": result["best_epoch"], "seconds_to_best": result["seconds_to_best"]})
            tracker.log_artifact(run_dir / "best.pt", "checkpoint")
            tracker.log_artifact(run_dir / "config.yaml")
            if args.log_model:
                tracker.log_model(load_checkpoint(run_dir / "best.pt")[0])
            tracker.finish()
            out["mlflow_run_id"] = tracker.run_id
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return out


def cmd_evaluate(args) -> dict:
    from diffurec.data.sequences import load_sequences
    from diffurec.training import evaluate, load_checkpoint, resolve_device

    if args.reverse_steps is not None and args.reverse_steps < 1:
        raise DiffuRecError(f"--reverse-steps must be >= 1, got {args.reverse_steps}")
    model, cfg, _ = load_checkpoint(args.checkpoint, "cpu")
    cfg = cfg.with_sets(args.set)
    if args.reverse_steps is not None:
        cfg = cfg.with_overrides({"reverse_steps": args.reverse_steps}, source="--reverse-steps")
    device = resolve_device(cfg)
    model = model.to(device)
    data = load_sequences(args.data, min_user=cfg.min_user, min_item=cfg.min_item)
    if data.num_items != model.num_items:
        raise DiffuRecError(
            f"--data {args.data} has {data.num_items} items but the checkpoint was trained on "
            f"{model.num_items}: evaluate on the dataset the model was trained on")
    splits = ("valid", "test") if args.split == "both" else (args.split,)
    out = {"checkpoint": str(args.checkpoint), "split": args.split, "reverse_steps": cfg.reverse_steps,
           "users": len(data)}
    detailed = args.segments or args.beyond_accuracy
    for split in splits:
        began = time.perf_counter()
        if detailed:
            # one pass: the usual metrics plus segments and/or beyond-accuracy (diffurec/evaluation.py)
            from diffurec.evaluation import evaluate_detailed

            metrics = evaluate_detailed(model, data, split, cfg, device, reverse_steps=cfg.reverse_steps,
                                        segments=args.segments, beyond_accuracy=args.beyond_accuracy,
                                        threshold=args.history_threshold, head_share=args.head_share,
                                        progress=not args.no_progress)
        else:
            metrics = evaluate(model, data, split, cfg, device, reverse_steps=cfg.reverse_steps,
                               progress=not args.no_progress)
        out[f"{split}/users_per_s"] = round(len(data) / (time.perf_counter() - began), 1)
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
    if args.track:
        # an evaluation run of its own (e.g. one point of a reverse-steps ablation), with the
        # config it was evaluated under as params, so the report can place it
        from diffurec.tracking import MLflowRun, config_params, resolve_tracking_uri

        tracker = MLflowRun(resolve_tracking_uri(args.mlflow_uri, cfg.output_dir), experiment=args.experiment,
                            run_name=f"eval-{Path(args.checkpoint).parent.name}-S{cfg.reverse_steps}",
                            tags={"kind": "evaluation", "dataset": dataset_name(args.data), "model": cfg.model,
                                  "checkpoint": str(Path(args.checkpoint).resolve()),
                                  **({"segments": "true"} if args.segments else {}),
                                  **({"beyond_accuracy": "true"} if args.beyond_accuracy else {}),
                                  **parse_tags(args.tag)})
        tracker.log_params(config_params(cfg))
        tracker.log_metrics({k: v for k, v in out.items() if k.startswith(("valid/", "test/"))})
        tracker.finish()
        out["mlflow_run_id"] = tracker.run_id
    return out


def cmd_recommend(args) -> dict:
    """Top-K lists of every user in this process (pipelines/recommend.py: the same with Ray Data)."""
    from diffurec.recommend import open_recommender, recommend_to_parquet

    rec, _, what = open_recommender(args.model, args.data, k=args.k,
                                    exclude_history=True if args.exclude_history else None,
                                    reverse_steps=args.reverse_steps, sets=args.set, tracking_uri=args.mlflow_uri)
    if rec.cfg.threads:  # --set threads=N
        import torch

        torch.set_num_threads(rec.cfg.threads)
    return recommend_to_parquet(rec, args.data, args.output, model=what, overwrite=args.overwrite,
                                progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffurec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="split an interaction log into the on-disk sequence format")
    p.add_argument("--data", required=True, help="interaction log: parquet, csv or jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-user", type=int, default=5)
    p.add_argument("--min-item", type=int, default=5)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", help="train DiffuRec or SASRec in this process")
    p.add_argument("--data", required=True, help="prepared dataset directory or raw interaction log")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--name", help="run name (default: unique)")
    p.add_argument("--resume", metavar="NAME", help="continue the named run from its latest checkpoint, with its own config (plus any --set)")
    p.add_argument("--output-dir", help="output root (config key output_dir)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite under the output root)")
    p.add_argument("--experiment", default="diffurec", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not track the run in MLflow")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="MLflow tag, e.g. ablation=noise_schedule (repeatable)")
    p.add_argument("--log-model", action="store_true", help="also log the model with mlflow.pytorch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking metrics of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--reverse-steps", type=int)
    p.add_argument("--split", choices=("valid", "test", "both"), default="test")
    p.add_argument("--track", action="store_true", help="record the evaluation as an MLflow run")
    p.add_argument("--mlflow-uri")
    p.add_argument("--experiment", default="diffurec")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="MLflow tag (with --track)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="evaluation-time keys, e.g. exclude_history=true, reverse_samples=4")
    p.add_argument("--segments", action="store_true",
                   help="also metrics by history length (short/long) and target popularity (head/tail)")
    p.add_argument("--beyond-accuracy", action="store_true",
                   help="also coverage, novelty, popularity and intra-list diversity of the top-10/20 lists")
    p.add_argument("--history-threshold", type=int, metavar="N",
                   help="short history = at most N items before the target (default: the median)")
    p.add_argument("--head-share", type=float, default=0.2, metavar="X",
                   help="head items = the most popular items holding this share of training interactions")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-K recommendations for every user, in this process")
    p.add_argument("--model", required=True,
                   help="checkpoint (best.pt), MLflow model URI (models:/NAME@champion, runs:/ID/recommender) "
                        "or registered model name")
    p.add_argument("--data", required=True, help="the prepared dataset the model was trained on")
    p.add_argument("--output", required=True, help="output folder (parquet: user_id, rank, item_id, score)")
    p.add_argument("--k", type=int, default=20, help="list length (default 20)")
    p.add_argument("--exclude-history", action="store_true", help="leave the user's known items out of the list")
    p.add_argument("--reverse-steps", type=int, help="DiffuRec reverse steps S (default: the model's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="inference-time config keys, e.g. reverse_samples=4, deterministic_reverse=true")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier recommendations folder")
    p.add_argument("--mlflow-uri", help="MLflow store for models:/ URIs and registered names")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_recommend)

    args = parser.parse_args(argv)
    try:
        _emit(args.func(args))
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
