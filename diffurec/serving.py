"""The trained model as an MLflow pyfunc: a history of the log's item ids in, top-K item ids out.

Input (signature): one column ``history``, an array of the log's item ids (int64 or string, as in
the dataset's ``items.parquet``), most recent last. Params: ``k`` (default 10), ``exclude_history``
(default false) and ``reverse_steps`` (DiffuRec; 0 = the model's). Output, one row per input
row: ``item_ids`` (the K ids, best first), ``scores``, ``dropped`` (how many ids of the history
the model does not know: they are dropped before scoring) and ``source``:

- ``"model"``: the model's top K over all items;
- ``"popularity"``: the history was empty or held no known id. The answer is then the K items
  with the most interactions in the training log, ``scores`` their share of all interactions:
  marked, not an error, so one cold-start row does not fail a whole batch request.

A bad ``k`` (not in 1..number of items) or a wrongly typed id is a request error (HTTP 400).

The model folder holds everything needed to load it: ``artifacts/checkpoint.pt`` (weights and
config), ``artifacts/items.parquet`` (the id mapping and interaction counts) and the ``diffurec``
package itself as code; no access to the training data.

    python -m diffurec.serving --checkpoint outputs/runs/NAME/best.pt --data outputs/data/beauty \\
        [--registered-model beauty-diffurec [--alias champion]] [--run-id ID | --experiment NAME]
    mlflow models serve -m models:/beauty-diffurec@champion --env-manager local -h 127.0.0.1 -p 5001

See docs/recommend.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from diffurec.errors import DiffuRecError

CHAMPION_ALIAS = "champion"
DEFAULT_SERVE_K = 10
MODEL_NAME = "recommender"  # the artifact path of the logged model in its run
PACKAGE_DIR = Path(__file__).resolve().parent


def signature(id_type: str = "long"):
    """``id_type``: 'long' or 'string', the log's item id type."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    ids = Array(DataType.string if id_type == "string" else DataType.long)
    return ModelSignature(
        inputs=Schema([ColSpec(ids, "history")]),
        outputs=Schema([ColSpec(ids, "item_ids"), ColSpec(Array(DataType.double), "scores"),
                        ColSpec(DataType.long, "dropped"), ColSpec(DataType.string, "source")]),
        params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_SERVE_K),
                            ParamSpec("exclude_history", DataType.boolean, False),
                            ParamSpec("reverse_steps", DataType.long, 0)]))


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc. ``load_context`` builds a :class:`diffurec.recommend.Recommender` from the
    model's artifacts; ``predict`` maps ids, scores, and maps back."""

    def load_context(self, context):
        import torch

        from diffurec.recommend import ItemCatalog, Recommender
        from diffurec.training import read_checkpoint

        payload = read_checkpoint(Path(context.artifacts["checkpoint"]))
        catalog = ItemCatalog.read(context.artifacts["items"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.recommender = Recommender.from_payload(payload, catalog, device=device, k=1)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        try:
            return self._predict(model_input, params or {})
        except DiffuRecError as exc:
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(exc)) from None

    def _predict(self, model_input, params: dict):
        import pandas as pd
        import pyarrow as pa

        from diffurec.recommend import check_k, history_keys

        rec = self.recommender
        catalog = rec.catalog
        k = check_k(int(params.get("k", DEFAULT_SERVE_K)), catalog.num_items, flag="param k")
        exclude = bool(params.get("exclude_history", False))
        steps = int(params.get("reverse_steps", 0) or 0)
        if steps:
            from diffurec.recommend import Recommender

            rec = Recommender(rec.model, rec.cfg, catalog, device=rec.device, k=k, reverse_steps=steps)
        histories = _histories(model_input)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat_ids = [x for h in histories for x in h]
        try:
            ids = pa.array(flat_ids, type=catalog.id_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            raise DiffuRecError(f"history: item ids must be of type {catalog.id_type}") from None
        dense = catalog.to_dense(ids)
        row = np.repeat(np.arange(len(histories)), lengths)
        known = dense > 0
        dropped = np.bincount(row[~known], minlength=len(histories))
        kept = np.bincount(row[known], minlength=len(histories))
        scored = np.flatnonzero(kept > 0)
        item_ids: list = [None] * len(histories)
        scores: list = [None] * len(histories)
        source = ["popularity"] * len(histories)
        if len(scored):
            offsets = np.zeros(len(histories) + 1, dtype=np.int64)
            np.cumsum(kept, out=offsets[1:])
            flat = dense[known]
            sub = np.concatenate([[0], np.cumsum(kept[scored])])
            parts = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in scored])
            top, val = rec.top_k(parts, sub, history_keys(parts, sub), k=k, exclude_history=exclude)
            for j, i in enumerate(scored):
                keep = top[j] > 0
                item_ids[i] = catalog.log_ids(top[j][keep]).to_pylist()
                scores[i] = [float(v) for v in val[j][keep]]
                source[i] = "model"
        if len(scored) < len(histories):
            pop_ids, pop_scores = catalog.popular(k)
            pop_list = catalog.log_ids(pop_ids).to_pylist()
            for i in np.flatnonzero(kept == 0):
                item_ids[i], scores[i] = list(pop_list), [float(v) for v in pop_scores]
        return pd.DataFrame({"item_ids": item_ids, "scores": scores, "dropped": dropped.astype(np.int64),
                             "source": source})


def _histories(model_input) -> list[list]:
    """The ``history`` column of a request as lists (a DataFrame, a dict of columns or a list)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "history" not in model_input.columns:
            raise DiffuRecError(f"the input needs a column 'history' (got {list(model_input.columns)})")
        column = model_input["history"].tolist()
    elif isinstance(model_input, dict):
        column = model_input.get("history")
        if column is None:
            raise DiffuRecError("the input needs a field 'history'")
    else:
        column = list(model_input)
    out = []
    for h in column:
        if h is None:
            out.append([])
        elif isinstance(h, str | bytes):
            raise DiffuRecError("each history must be a list of item ids, got a single string")
        else:
            out.append([x for x in np.asarray(h, dtype=object).tolist() if x is not None])
    return out


def check_inputs(checkpoint: str | Path, data_dir: str | Path) -> None:
    """The checkpoint loads and the dataset's id mapping has the model's item count."""
    from diffurec.recommend import ItemCatalog
    from diffurec.training import read_checkpoint

    payload = read_checkpoint(Path(checkpoint))
    catalog = ItemCatalog.read(data_dir)
    if int(payload["num_items"]) != catalog.num_items:
        raise DiffuRecError(f"--data {data_dir} has {catalog.num_items} items but the checkpoint was trained "
                            f"on {payload['num_items']}: use the dataset the model was trained on")


def save_artifacts(checkpoint: str | Path, data_dir: str | Path, into: Path) -> dict[str, str]:
    """Copy the checkpoint's inference part and the dataset's id mapping (with interaction
    counts) into ``into``; returns the pyfunc ``artifacts`` dict. Refuses a data/model mismatch."""
    import torch

    from diffurec.recommend import load_catalog
    from diffurec.training import read_checkpoint

    payload = read_checkpoint(Path(checkpoint))
    catalog = load_catalog(data_dir, counts=True)
    if int(payload["num_items"]) != catalog.num_items:
        raise DiffuRecError(f"--data {data_dir} has {catalog.num_items} items but the checkpoint was trained "
                            f"on {payload['num_items']}: use the dataset the model was trained on")
    into.mkdir(parents=True, exist_ok=True)
    slim = {k: payload[k] for k in ("model", "config", "num_items")}
    torch.save(slim, into / "checkpoint.pt")
    catalog.write(into / "items.parquet")
    return {"checkpoint": str(into / "checkpoint.pt"), "items": str(into / "items.parquet")}


def requirements() -> list[str]:
    import importlib.metadata as md

    pins = []
    for dist in ("torch", "numpy", "pyarrow", "pandas", "pyyaml", "tqdm", "mlflow"):
        try:
            version = md.version(dist).split("+")[0]
        except md.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version}")
    return pins


def log_pyfunc(checkpoint: str | Path, data_dir: str | Path, *, name: str = MODEL_NAME,
               registered_model_name: str | None = None):
    """Log the pyfunc into the active MLflow run (``mlflow.start_run``); returns its ModelInfo.
    ``diffurec.tracking.MLflowRun.log_recommender`` is the usual way in."""
    from diffurec.recommend import ItemCatalog

    with tempfile.TemporaryDirectory(prefix="diffurec-pyfunc-") as tmp:
        artifacts = save_artifacts(checkpoint, data_dir, Path(tmp))
        id_type = "string" if str(ItemCatalog.read(artifacts["items"]).id_type) in ("string", "large_string") \
            else "long"
        return mlflow.pyfunc.log_model(
            name=name, python_model=RecommenderModel(), artifacts=artifacts, signature=signature(id_type),
            code_paths=[str(PACKAGE_DIR)], pip_requirements=requirements(),
            registered_model_name=registered_model_name)


# ---- command line: log (and register) a checkpoint as a servable model --------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffurec.serving",
                                description="log a checkpoint as an MLflow pyfunc model (and register it)")
    p.add_argument("--checkpoint", required=True, help="best.pt of a training run")
    p.add_argument("--data", required=True, help="the prepared dataset the model was trained on (id mapping)")
    p.add_argument("--run-id", help="log into this existing run (default: a new run)")
    p.add_argument("--experiment", default="diffurec", help="experiment of the new run")
    p.add_argument("--registered-model", help="register the model under this name")
    p.add_argument("--alias", help=f"set this registry alias on the new version (e.g. {CHAMPION_ALIAS})")
    p.add_argument("--mlflow-uri")
    args = p.parse_args(argv)
    try:
        from diffurec.tracking import MLflowRun, resolve_tracking_uri

        if args.alias and not args.registered_model:
            raise DiffuRecError("--alias needs --registered-model")
        if not Path(args.checkpoint).is_file():
            raise DiffuRecError(f"checkpoint not found: {args.checkpoint}")
        check_inputs(args.checkpoint, args.data)  # before any run is created
        uri = resolve_tracking_uri(args.mlflow_uri)
        if args.run_id:
            tracker = MLflowRun(uri, run_id=args.run_id, reopen=False)
        else:
            tracker = MLflowRun(uri, experiment=args.experiment,
                                run_name=f"model-{Path(args.checkpoint).resolve().parent.name}",
                                tags={"kind": "model", "checkpoint": str(Path(args.checkpoint).resolve()),
                                      "data_path": str(args.data)})
        try:
            info = tracker.log_recommender(args.checkpoint, args.data,
                                           registered_model_name=args.registered_model, alias=args.alias)
        except BaseException:
            if not args.run_id:
                tracker.finish("FAILED")
            raise
        if not args.run_id:
            tracker.finish()
        out = {"model_uri": info.model_uri, "run_id": tracker.run_id, "mlflow_uri": uri,
               "registered_model": args.registered_model,
               "version": str(info.registered_model_version) if info.registered_model_version else None,
               "alias": args.alias}
        if args.registered_model and args.alias:
            out["serve_uri"] = f"models:/{args.registered_model}@{args.alias}"
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
