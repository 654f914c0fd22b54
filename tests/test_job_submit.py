"""The platform's main job, the way users run it: a real Ray head on free loopback ports, then
``ray job submit --working-dir . -- python pipelines/tune.py ...``; wait for SUCCEEDED and check
the MLflow run tree. Token auth is on (``RAY_AUTH_MODE=token`` with a per-test ``RAY_AUTH_TOKEN``,
so ~/.ray is neither read nor written). The head is stopped through the process group of the
``ray start --block`` process this test started, never with ``ray stop`` (which would end every
Ray process on the machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
EXCLUDES = [".git", ".venv", "outputs", "data", "mlruns", "mlartifacts", "*.db", ".pytest_cache",
            ".ruff_cache", "*.egg-info", "__pycache__"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group of the head we started (its pid)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the group may outlive its leader (raylet workers): make sure all of it is gone
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


@pytest.mark.slow
def test_ray_job_submit_tune(tmp_path):
    import mlflow

    env = ray_env()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit
    gcs, dash = free_port(), free_port()
    ports = {"--port": gcs, "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", temp_dir,
         *[str(x) for kv in ports.items() for x in kv]],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    job_id = f"tune-{secrets.token_hex(3)}"
    try:
        # wait for the dashboard (job API) to answer
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                                   text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, f"head never came up: {probe.stderr[-2000:]}"
            time.sleep(2)

        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
             "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
             "python", "pipelines/tune.py", "--num-samples", "2", "--max-concurrent", "2",
             "--set", "epochs=2", "--set", f"output_dir={out}", "--mlflow-uri", uri, "--name", "job-sweep"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr

        status = None
        deadline = time.time() + 420
        while time.time() < deadline:
            res = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                                 capture_output=True, text=True, timeout=60)
            text = res.stdout + res.stderr
            # "Status for job 'X': RUNNING" while it runs, "Job 'X' succeeded" once it is done
            m = (re.search(r"Status for job '[^']+': (\w+)", text)
                 or re.search(r"Job '[^']+' (succeeded|failed|stopped)", text))
            status = m.group(1).upper() if m else None
            if status in TERMINAL:
                break
            time.sleep(5)
        logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        (tmp_path / "job.log").write_text(logs)
        if status not in TERMINAL:
            subprocess.run([RAY, "job", "stop", "--address", address, job_id], env=env,
                           capture_output=True, timeout=60)
        assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs[-4000:]}"
    finally:
        stop_head(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert summary["name"] == "job-sweep" and summary["best_metrics"]["valid/NDCG@10"] > 0
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len({c.data.tags["trial_id"] for c in children}) == 2
    for c in children:
        assert c.data.tags["trial_status"] in ("completed", "stopped_by_asha", "failed")
        assert c.info.status in ("FINISHED", "KILLED", "FAILED")
