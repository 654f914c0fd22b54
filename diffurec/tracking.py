"""MLflow tracking: where runs go, what a run records.

The default store is an absolute ``sqlite:///<output_dir>/mlflow.db``: MLflow 3 refuses the plain
file store, and a relative sqlite path breaks once Ray workers run in other directories.
``--mlflow-uri`` or ``MLFLOW_TRACKING_URI`` point it at a server instead.

A tracking server that goes away mid-run does not stop training. :class:`MLflowRun` gives up on a
write after a few seconds (MLflow's own retries, shortened unless the user set them), keeps the
write in memory and in a pending file (JSON lines) and warns once; every later write first sends
the backlog, in order, with its original timestamps. Closing the run waits for the server (up to
``DIFFUREC_TRACKING_WAIT_S``, default 900 s) so the run still ends FINISHED with every epoch; if
it never comes back the pending file stays, and ``python pipelines/runs.py replay FILE`` sends it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffurec.config import Config

DEFAULT_EXPERIMENT = "diffurec"
PENDING_FILE = "mlflow_pending.jsonl"
WAIT_ENV = "DIFFUREC_TRACKING_WAIT_S"
# a write to an unreachable server gives up after ~3 s instead of MLflow's ~4 min of retries
FAST_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow's error codes for a server that is down or overloaded (connection errors arrive as
# INTERNAL_ERROR from its REST client); anything else is the caller's mistake and is raised
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


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


def is_transient(exc: BaseException) -> bool:
    """An error that says the tracking server is unreachable, not that the request was wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


class PendingWrites:
    """Writes that did not reach the tracking server, in order: in memory and, when a path is
    given, appended to a JSON-lines file (first line: the store and run), so that nothing is lost
    if the process dies before the server is back."""

    def __init__(self, path: str | Path | None, tracking_uri: str, run_id: str):
        self.path = Path(path) if path else None
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.ops: list[dict] = []
        if self.path is not None and self.path.is_file():
            head, *ops = read_pending(self.path)
            if head.get("run_id") == run_id:
                self.ops = ops  # left by an earlier process of this run: sent first

    def add(self, op: dict) -> None:
        if self.path is not None and op["op"] == "artifact":
            # the file may live in a folder that is removed when the process ends (a Ray
            # worker's): keep a copy beside the pending file
            kept = self._files / f"{len(self.ops):04d}" / Path(op["path"]).name
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(op["path"], kept)
            op = {**op, "path": str(kept)}
        self.ops.append(op)
        if self.path is None:
            return
        if not self.path.is_file():
            self._rewrite()
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(op) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def sent(self, count: int) -> None:
        """The first ``count`` writes reached the server."""
        self.ops = self.ops[count:]
        if self.path is None or not self.path.is_file():
            return
        if self.ops:
            self._rewrite()
        else:
            self.path.unlink()
            shutil.rmtree(self._files, ignore_errors=True)

    @property
    def _files(self) -> Path:
        return self.path.parent / f"{self.path.stem}_files"

    def _rewrite(self) -> None:
        """The whole file (first line: the store and run), replaced atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write("".join(json.dumps(x) + "\n" for x in [head, *self.ops]))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)


def read_pending(path: str | Path) -> list[dict]:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            out.append(json.loads(ln))
        except ValueError as exc:
            if i == len(lines):  # a write cut off by a crash: the line was never complete
                break
            raise ValueError(f"{path}: line {i} is not JSON ({exc})") from None
    if not out or "run_id" not in out[0]:
        raise ValueError(f"{path}: not a pending-writes file (its first line names no run)")
    return out


def replay_pending(path: str | Path, tracking_uri: str | None = None) -> dict:
    """Send a pending-writes file left by a run whose server never came back; removes it when done."""
    head, *ops = read_pending(path)
    uri = tracking_uri or head["tracking_uri"]
    down = RuntimeError(f"the tracking server {uri} is still unreachable; {path} is kept")
    try:
        run = MLflowRun(uri, run_id=head["run_id"], reopen=False, pending_path=path)
    except Exception as exc:  # noqa: BLE001 - classified
        if is_transient(exc):
            raise down from None
        raise
    if run.pending.ops:
        raise down
    count = len(ops)
    return {"run_id": head["run_id"], "sent": count, "tracking_uri": run.tracking_uri}


# on every run this code creates: its rankings use float32 scores (SequenceEncoderBase.score).
# A bf16 run without the tag ranked on bf16 scores, whose ties counted for the target
# (diffurec.report.bf16_ranked)
RUN_TAGS = {"ranking_scores": "float32"}


class MLflowRun:
    """One MLflow run: params once, metrics per epoch, artifacts and the model at the end.

    Writes survive a tracking-server outage (see the module docstring): ``pending_path`` is where
    they wait on disk."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None, run_id: str | None = None,
                 reopen: bool = True, pending_path: str | Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in FAST_HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
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
            tags = {**RUN_TAGS, **(tags or {})}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        self.experiment_id = exp_id
        self.pending = PendingWrites(pending_path, tracking_uri, self.run_id)
        self._outage_since: float | None = None
        if self.pending.ops:
            _warn(f"{len(self.pending.ops)} tracking writes left by an earlier process of run {self.run_id} "
                  f"are sent first ({pending_path})")
            self.flush()

    # ---- writes that ride out an outage ---------------------------------------------------------
    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, RunTag

        kind = op["op"]
        if kind == "metrics":
            batch = [Metric(k, v, op["timestamp"], op["step"]) for k, v in op["values"].items()]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["values"].items()])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op["path"], op["artifact_path"])
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, status=op["status"], end_time=op["end_time"])
        else:
            raise ValueError(f"unknown pending write {kind!r}")

    def flush(self) -> bool:
        """Send the backlog, oldest first; False (backlog kept) while the server is unreachable."""
        done = 0
        try:
            for op in self.pending.ops:
                self._apply(op)
                done += 1
        except Exception as exc:  # noqa: BLE001 - classified below
            self.pending.sent(done)
            if not is_transient(exc):
                raise
            return False
        self.pending.sent(done)
        if self._outage_since is not None:
            _warn(f"tracking server {self.tracking_uri} is back after {time.time() - self._outage_since:.0f} s; "
                  f"{done} kept writes sent to run {self.run_id}")
            self._outage_since = None
        return True

    def _write(self, op: dict) -> None:
        if self.pending.ops and not self.flush():
            self.pending.add(op)
            return
        try:
            self._apply(op)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            self.pending.add(op)
            if self._outage_since is None:
                self._outage_since = time.time()
                where = self.pending.path or "memory"
                _warn(f"tracking server {self.tracking_uri} unreachable ({str(exc).splitlines()[0][:200]}); "
                      f"training goes on and run {self.run_id}'s writes are kept in {where} until it is back")

    def wait_for_server(self, timeout_s: float | None = None) -> bool:
        """Block until the backlog is sent or ``timeout_s`` (``DIFFUREC_TRACKING_WAIT_S``, 900 s) passes."""
        if not self.pending.ops:
            return True
        timeout_s = float(os.environ.get(WAIT_ENV, 900)) if timeout_s is None else timeout_s
        deadline, last_note = time.time() + timeout_s, 0.0
        while True:
            if self.flush():
                return True
            now = time.time()
            if now >= deadline:
                _warn(f"tracking server {self.tracking_uri} still unreachable after {timeout_s:.0f} s; "
                      f"{len(self.pending.ops)} writes of run {self.run_id} kept in {self.pending.path}: send them "
                      f"with `python pipelines/runs.py replay {self.pending.path}`")
                return False
            if now - last_note >= 60:
                _warn(f"training is done; waiting up to {deadline - now:.0f} s for tracking server "
                      f"{self.tracking_uri} to send {len(self.pending.ops)} kept writes")
                last_note = now
            time.sleep(min(10.0, max(0.0, deadline - now)))

    # ---- what a run records ---------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {mlflow_metric_name(k): float(v) for k, v in metrics.items() if v is not None}
        if values:
            self._write({"op": "metrics", "values": values, "step": step or 0,
                         "timestamp": int(time.time() * 1000)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_model(self, model, name: str = "model", registered_model_name: str | None = None):
        """The model through ``mlflow.pytorch`` (loads with ``mlflow.pytorch.load_model``).

        MLflow 3.17 defaults to the traced 'pt2' format, which needs an input example and traces
        ``forward`` (the training loss here); the pickled module is what a recommender needs.
        Requirements are given, not inferred: inferring re-imports the model in a subprocess.
        The run keeps its status: the fluent ``start_run`` this needs would end it FINISHED.
        """
        import mlflow.pytorch
        import torch

        if not self.wait_for_server():  # a flavor's log_model needs the server: no way to keep it
            _warn(f"model not logged to run {self.run_id}: the tracking server is unreachable "
                  "(its checkpoint is among the kept writes)")
            return None
        with self._as_active_run():
            return mlflow.pytorch.log_model(
                model.cpu().eval(), name=name, serialization_format="pickle",
                registered_model_name=registered_model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def finish(self, status: str = "FINISHED", wait_s: float | None = None) -> bool:
        """End the run with ``status`` once every kept write has reached the server; False when the
        server stayed away (the writes and the status are kept). A finished run waits for the
        server up to ``wait_s`` (default ``DIFFUREC_TRACKING_WAIT_S``); a failed or killed one
        does not wait, so an interrupted process exits at once."""
        self._write({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        return self.wait_for_server(wait_s if wait_s is not None or status == "FINISHED" else 0.0)

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
