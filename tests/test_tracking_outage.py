"""A tracking server that goes away: writes are kept (memory + pending file) and sent, in order,
once it is back; a run ends FINISHED with every epoch; training never waits on it mid-run.

Real ``mlflow server`` processes on a loopback port, stopped and restarted on the same port and
store by their own process ids. The 5-minute outage during a real training run is marked
``outage`` (deselected by default: ``python -m pytest -m outage``); the others run in the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffurec.tracking import PENDING_FILE, MLflowRun, mlflow_metric_name  # noqa: E402

NDCG = mlflow_metric_name("valid/NDCG@10")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """``mlflow server`` on 127.0.0.1:port over a sqlite store in ``root``; stop() and start()
    again keep the port and the store, as an operator's restart does."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        deadline = time.time() + 300  # a loaded 2-core machine takes its time
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        return (self.root / f"server-{self.starts}.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the group may outlive its leader (gunicorn/uvicorn workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = TrackingServer(tmp_path)
    try:
        srv.start()  # inside: a server that never answers is stopped too
        yield srv
    finally:
        srv.stop()


def steps_of(client, run_id: str, key: str = NDCG) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_writes_during_an_outage_are_kept_and_sent_in_order(server, tmp_path, capfd):
    import mlflow

    pending = tmp_path / "run" / PENDING_FILE
    run = MLflowRun(server.uri, experiment="outage", run_name="r", pending_path=pending)
    run.log_metrics({"valid/NDCG@10": 0.1}, step=1)
    server.stop()

    began = time.time()
    run.log_metrics({"valid/NDCG@10": 0.2}, step=2)
    run.set_tags({"phase": "outage"})
    (tmp_path / "best.pt").write_bytes(b"weights")
    run.log_artifact(tmp_path / "best.pt", "checkpoint")
    run.log_metrics({"valid/NDCG@10": 0.3}, step=3)
    took = time.time() - began
    err = capfd.readouterr().err
    # one warning, naming the server and where the writes wait; the writes did not block for
    # MLflow's minutes of retries (a bound far above the ~3 s fast-fail, not a speed target)
    assert err.count("unreachable") == 1 and server.uri in err and str(pending) in err, err
    assert took < 60, took
    lines = [json.loads(x) for x in pending.read_text().splitlines()]
    assert lines[0] == {"tracking_uri": server.uri, "run_id": run.run_id}
    assert [x["op"] for x in lines[1:]] == ["metrics", "tags", "artifact", "metrics"]
    # the artifact is copied beside the pending file: the original may vanish with its process
    kept = Path(lines[3]["path"])
    assert kept.is_file() and kept.name == "best.pt" and kept.parent.parent.parent == pending.parent
    (tmp_path / "best.pt").unlink()

    server.start()
    run.log_metrics({"valid/NDCG@10": 0.4}, step=4)  # the backlog goes first, then this
    assert run.finish() is True
    assert "is back" in capfd.readouterr().err
    assert not pending.exists() and not kept.exists()

    client = mlflow.MlflowClient(server.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["phase"] == "outage"
    history = sorted(client.get_metric_history(run.run_id, NDCG), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    # timestamps are those of the original writes, not of the replay
    assert all(history[i].timestamp <= history[i + 1].timestamp for i in range(3))
    assert history[2].timestamp < (time.time() - 1) * 1000
    assert [a.path for a in client.list_artifacts(run.run_id, "checkpoint")] == ["checkpoint/best.pt"]


@pytest.mark.slow
def test_a_server_that_never_returns_leaves_a_file_that_replay_sends(server, tmp_path, capfd):
    import mlflow

    from pipelines.runs import main as runs_main

    pending = tmp_path / "run" / PENDING_FILE
    run = MLflowRun(server.uri, experiment="outage", run_name="r", pending_path=pending)
    run_id = run.run_id
    server.stop()
    run.log_metrics({"valid/NDCG@10": 0.5}, step=1)
    assert run.finish(wait_s=0) is False
    err = capfd.readouterr().err
    assert f"python pipelines/runs.py replay {pending}" in err, err
    # the process ends here; a later process (or the user) replays the file
    del run

    assert runs_main(["replay", str(pending)]) == 2  # still down: a clear error, file kept
    assert "still unreachable" in capfd.readouterr().err and pending.is_file()

    server.start()
    assert runs_main(["replay", str(pending)]) == 0
    out = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert out["run_id"] == run_id and out["sent"] == 2
    assert not pending.exists()
    client = mlflow.MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps_of(client, run_id) == [1]


def test_a_wrong_request_is_an_error_not_an_outage(tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MLflowRun(uri, experiment="e", run_name="r", pending_path=tmp_path / PENDING_FILE)
    mlflow.MlflowClient(uri).delete_run(run.run_id)
    with pytest.raises(MlflowException):
        run.log_metrics({"valid/NDCG@10": 0.1}, step=1)
    assert not (tmp_path / PENDING_FILE).exists()


def test_replay_rejects_a_file_that_is_not_a_pending_file(tmp_path, capsys):
    from pipelines.runs import main as runs_main

    bad = tmp_path / "x.jsonl"
    bad.write_text('{"op": "metrics"}\n')
    assert runs_main(["replay", str(bad)]) == 2
    assert "names no run" in capsys.readouterr().err
    assert runs_main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- 5 minutes without the server, during a real training run ----------------------------------
OUTAGE_S = float(os.environ.get("DIFFUREC_OUTAGE_S", 300))


@pytest.mark.slow
@pytest.mark.outage
def test_training_rides_out_a_five_minute_tracking_outage(server, tmp_path):
    """``python -m diffurec train`` against the server; the server is stopped once epoch 1 is
    on it and started again OUTAGE_S later. Training goes on meanwhile (its last epoch ends
    while the server is still down), then waits for the server, sends every kept epoch and
    ends FINISHED with exit status 0."""
    import mlflow

    from diffurec.data.sequences import write_split
    from diffurec.data.synthetic import write_synthetic_log

    write_synthetic_log(tmp_path / "log.parquet", num_users=600, num_items=120, seed=0)
    write_split(tmp_path / "log.parquet", tmp_path / "prepared")
    epochs = 6
    sets = {"hidden_size": 16, "num_blocks": 1, "num_heads": 1, "batch_size": 32, "epochs": epochs,
            "eval_every": 1, "diffusion_steps": 8, "reverse_steps": 2, "threads": 1,
            "output_dir": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "diffurec", "train", "--data", str(tmp_path / "prepared"), "--name", "outage",
           "--mlflow-uri", server.uri, "--experiment", "outage", "--no-progress"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFUREC_TRACKING_WAIT_S": str(OUTAGE_S + 300)}
    err_path = tmp_path / "train.err"
    with open(err_path, "w") as err, open(tmp_path / "train.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
    client = mlflow.MlflowClient(server.uri)
    try:
        run_id_file = tmp_path / "out" / "runs" / "outage" / "mlflow_run_id"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if run_id_file.is_file() and steps_of(client, run_id_file.read_text().strip()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, err_path.read_text()[-3000:]
        run_id = run_id_file.read_text().strip()
        server.stop()
        down_at = time.time()
        while time.time() - down_at < OUTAGE_S and proc.poll() is None:
            time.sleep(1)
        text = err_path.read_text()
        # training did not stall on the server: it trained every epoch while the server was down
        assert "training is done; waiting" in text, text[-3000:]
        assert proc.poll() is None, "the run exited while its server was down:\n" + text[-3000:]
        server.start()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "unreachable" in text and "is back" in text, text[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert steps_of(client, run_id) == list(range(1, epochs + 1))
    assert mlflow_metric_name("test/NDCG@10") in run.data.metrics
    assert not (tmp_path / "out" / "runs" / "outage" / PENDING_FILE).exists()
