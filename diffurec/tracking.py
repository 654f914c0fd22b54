"""MLflow tracking: where runs go, what a run records.

The default store is an absolute ``sqlite:///<output_dir>/mlflow.db``: MLflow 3 refuses the plain
file store, and a relative sqlite path breaks once Ray workers run in other directories.
``--mlflow-uri`` or ``MLFLOW_TRACKING_URI`` point it at a server instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffurec.config import Config

DEFAULT_EXPERIMENT = "diffurec"


def resolve_tracking_uri(uri: str | None = None, output_dir: str | Path = "outputs") -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(output_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


@contextmanager
def sqlite_init_lock(tracking_uri: str):
    """Serialise first use of a sqlite store: two processes creating its tables at once (Tune
    trials, parallel runs) collide in MLflow's schema migration."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = tracking_uri[len("sqlite:///"):] + ".lock"
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it if needed. Beside a sqlite store its artifacts go to an
    absolute ``mlartifacts/`` next to the database: MLflow's default ``./mlruns`` would follow
    whichever process's working directory created the experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    with sqlite_init_lock(tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # another process (a parallel trial on a server store) created it first
            return client.get_experiment_by_name(name).experiment_id


def config_params(cfg: Config) -> dict[str, Any]:
    """The config as MLflow params, under the same key names as YAML, ``--set`` and tune spaces."""
    return cfg.to_dict()


def mlflow_metric_name(key: str) -> str:
    """MLflow rejects '@' in metric names: ``valid/NDCG@10`` is logged as ``valid/NDCG_at_10``."""
    return key.replace("@", "_at_")


def library_metric_name(key: str) -> str:
    """Inverse of :func:`mlflow_metric_name`."""
    return key.replace("_at_", "@")


class MLflowRun:
    """One MLflow run: params once, metrics per epoch, artifacts and the model at the end."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None, run_id: str | None = None,
                 reopen: bool = True):
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)
        if run_id is not None:
            # an existing run: continued (a resumed training: RUNNING again), or with
            # ``reopen=False`` only added to (a sweep logging its best model), status kept
            self.run_id = run_id
            exp_id = self.client.get_run(run_id).info.experiment_id
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
            for key, value in (tags or {}).items():
                self.client.set_tag(run_id, key, str(value))
        else:
            exp_id = ensure_experiment(tracking_uri, experiment)
            tags = dict(tags or {})
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        self.experiment_id = exp_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_name(k), float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model, name: str = "model", registered_model_name: str | None = None):
        """The model through ``mlflow.pytorch`` (loads with ``mlflow.pytorch.load_model``).

        MLflow 3.17 defaults to the traced 'pt2' format, which needs an input example and traces
        ``forward`` (the training loss here); the pickled module is what a recommender needs.
        Requirements are given, not inferred: inferring re-imports the model in a subprocess.
        The run keeps its status: the fluent ``start_run`` this needs would end it FINISHED.
        """
        import mlflow.pytorch
        import torch

        with self._as_active_run():
            return mlflow.pytorch.log_model(
                model.cpu().eval(), name=name, serialization_format="pickle",
                registered_model_name=registered_model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # ---- the servable model (diffurec.serving) ------------------------------------------------
    @contextmanager
    def _as_active_run(self):
        """This run as MLflow's active (fluent) run, for flavors' ``log_model``; afterwards the
        previous tracking URI and environment are restored and the run keeps its status (the
        fluent ``start_run`` would end it FINISHED)."""
        status = self.client.get_run(self.run_id).info.status
        previous = self.mlflow.get_tracking_uri()
        # set_tracking_uri also exports MLFLOW_TRACKING_URI to the environment (for subprocesses);
        # restoring only the URI would leave it pointing every later child process at this store
        previous_env = os.environ.get("MLFLOW_TRACKING_URI")
        self.mlflow.set_tracking_uri(self.tracking_uri)
        try:
            with self.mlflow.start_run(run_id=self.run_id):
                yield
        finally:
            self.mlflow.set_tracking_uri(previous)
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
            if status == "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.client.set_terminated(self.run_id, status=status)

    def log_recommender(self, checkpoint: str | Path, data_dir: str | Path, name: str = "recommender",
                        registered_model_name: str | None = None, alias: str | None = None):
        """The model as a servable MLflow pyfunc (``diffurec.serving``: history of the log's item
        ids in, top-K ids and scores out; checkpoint and id mapping as artifacts). Optionally
        registered, and ``alias`` (e.g. ``champion``) set on the new version. Returns the ModelInfo."""
        from diffurec.serving import log_pyfunc

        with self._as_active_run():
            info = log_pyfunc(checkpoint, data_dir, name=name, registered_model_name=registered_model_name)
        if alias and registered_model_name and info.registered_model_version is not None:
            self.client.set_registered_model_alias(registered_model_name, alias, str(info.registered_model_version))
        return info
