"""Faults a cluster user meets, on a real two-node Ray cluster on loopback.

- a node lost mid-epoch under ``pipelines/train.py`` (2 workers, one per node): the run resumes
  from its last checkpoint once the node is back, one MLflow run holds every epoch once;
- the same node lost under ``pipelines/tune.py``: the affected trial is retried and resumes
  from its Ray Train checkpoint, the sweep completes, the MLflow children carry their status;
- the sweep driver SIGKILLed after ASHA's first rung: ``--resume`` continues it, no trial trains
  an epoch twice, ASHA's decisions stand and the MLflow parent run is reused.

The cluster: a head (``ray start --head --block``) and a second node (``ray start --address
--block``), each with 2 CPUs; workers ask for more than half a node's CPUs, so a 2-worker run
(or two 1-worker trials) puts one worker on each. (With 1-CPU nodes a trial's driver slice leaves
no node a whole CPU for the Ray Data tasks its trainer starts, and the sweep waits forever.) Every process is started
in its own session and stopped through its process group by the pid this file started; nothing
calls ``ray stop``. The node-loss tests are marked ``node_loss`` (deselected by default:
``python -m pytest -m node_loss``); the driver-kill test runs in the suite.
"""

from __future__ import annotations

import json
import os
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffurec.tracking import mlflow_metric_name  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
NDCG = mlflow_metric_name("valid/NDCG@10")
TINY = {"hidden_size": 16, "num_blocks": 1, "num_heads": 1, "eval_batch_size": 600, "diffusion_steps": 8,
        "reverse_steps": 2, "dropout": 0.1, "emb_dropout": 0.1, "lr": 3e-3}
# Train's wait for a lost node's worker slot: long enough for the node to come back on a loaded
# machine (the default 30 s would count a slow restart as another failure)
START_TIMEOUT_S = "240"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # loopback only; the job-submit test covers token auth
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = START_TIMEOUT_S
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def stop_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process group of a process this file started (its pid)."""
    if proc is None or proc.poll() is not None and proc.returncode is not None and _group_gone(proc.pid):
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


class TwoNodeCluster:
    """A head and a second node on 127.0.0.1, 2 CPUs each; ``kill_node()`` SIGKILLs the second
    node's whole process group (raylet and its workers), ``start_node()`` brings it back."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: socket paths must fit
        self.gcs = free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.head: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None
        self.node_starts = 0

    def _ports(self, head: bool) -> list[str]:
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        if head:
            names += ["--dashboard-port", "--ray-client-server-port"]
        return [x for n in names for x in (n, str(free_port()))]

    def start_head(self) -> None:
        log = open(self.root / "head.log", "w")
        self.head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs),
             "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
             "--temp-dir", self.temp_dir, *self._ports(head=True)],
            env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_node(self) -> None:
        self.node_starts += 1
        log = open(self.root / f"node-{self.node_starts}.log", "w")
        self.node = subprocess.Popen(
            [RAY, "start", "--address", self.address, "--block", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "2", *self._ports(head=False)],
            env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_nodes(2)

    def kill_node(self) -> None:
        stop_group(self.node)
        self.node = None

    def alive_nodes(self) -> int:
        probe = subprocess.run(
            [sys.executable, "-c",
             "import ray, json; ray.init(address='%s', log_to_driver=False); "
             "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % self.address],
            env=ray_env(), capture_output=True, text=True, timeout=120)
        return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0

    def wait_for_nodes(self, count: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() < count:
            assert self.head is not None and self.head.poll() is None, (self.root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, f"the cluster never had {count} nodes"
            time.sleep(2)

    def stop(self) -> None:
        stop_group(self.node)
        stop_group(self.head)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.wait_for_nodes(1)
        c.start_node()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from diffurec.data.sequences import write_split
    from diffurec.data.synthetic import write_synthetic_log

    d = tmp_path_factory.mktemp("fault_data")
    write_synthetic_log(d / "log.parquet", num_users=600, num_items=120, seed=0)
    write_split(d / "log.parquet", d / "prepared")
    return d / "prepared"


def _sets(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def _spawn(args: list[str], log_dir: Path, tag: str, env: dict) -> subprocess.Popen:
    out, err = open(log_dir / f"{tag}.out", "w"), open(log_dir / f"{tag}.err", "w")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=err,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, log_dir: Path, tag: str, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(f"{tag}: no exit within {timeout} s:\n{(log_dir / f'{tag}.err').read_text()[-4000:]}")


def _summary(path: Path) -> dict:
    """The program's JSON summary: its last JSON line on stdout."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    assert lines, path.read_text()[-3000:]
    return json.loads(lines[-1])


def _steps(client, run_id: str, key: str = NDCG) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _store(uri: str):
    """A client of a sqlite store whose tables exist before the programs under test start: two
    processes creating them at once collide in MLflow's schema migration."""
    import mlflow

    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    client.search_experiments()
    return client


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"never saw {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


# ---- 1. a node lost during training -------------------------------------------------------------
@pytest.mark.node_loss
def test_node_lost_mid_epoch_training_resumes_from_its_checkpoint(cluster, prepared, tmp_path):

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 3
    # small batches: an epoch is hundreds of steps, so the node dies inside epoch 2
    cfg = dict(TINY, epochs=epochs, eval_every=1, batch_size=8, model="diffurec", output_dir=str(tmp_path / "out"))
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    client = _store(uri)
    proc = _spawn(["pipelines/train.py", "--data", str(prepared), "--num-workers", "2", "--cpus-per-worker", "2",
                   "--max-failures", "3", "--mlflow-uri", uri, "--experiment", "node-loss", "--name", "node-loss",
                   "--storage-path", str(tmp_path / "ray_results"), "--no-log-model", *_sets(cfg)],
                  tmp_path, "train", env)

    def run_id() -> str | None:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return None
        return runs[0].info.run_id if runs else None

    try:
        _wait_for(lambda: run_id() and _steps(client, run_id()) == [1], proc, tmp_path / "train.err", 600,
                  "epoch 1 in MLflow")
        cluster.kill_node()  # mid-epoch 2: the worker on the second node dies with it
        lost_at = time.time()
        time.sleep(5)
        cluster.start_node()
        rc = _wait(proc, tmp_path, "train", timeout=900)
    finally:
        stop_group(proc)
    err = (tmp_path / "train.err").read_text()
    assert rc == 0, err[-4000:]
    summary = _summary(tmp_path / "train.out")
    assert summary["epochs"] == epochs and summary["num_workers"] == 2
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "a single MLflow run across the node loss"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    # the restarted worker group resumed after epoch 1: epoch 1 logged once, never trained again
    assert int(run.data.tags["resumed_from_epoch"]) >= 1, run.data.tags
    assert _steps(client, run.info.run_id) == list(range(1, epochs + 1))
    assert mlflow_metric_name("test/NDCG@10") in run.data.metrics
    # what the user sees: Ray Train reports the lost worker group and restarts it
    assert cluster.node_starts == 2 and time.time() - lost_at > 5
    (tmp_path / "train.err").rename(tmp_path / "train.err.kept")  # for a person reading the tmp dir


# ---- 2. the same node lost during a sweep -------------------------------------------------------
@pytest.mark.node_loss
def test_node_lost_mid_sweep_retries_the_trial_from_its_checkpoint(cluster, prepared, tmp_path):

    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    sets = dict(TINY, epochs=3, batch_size=8, output_dir=str(out))
    client = _store(uri)
    proc = _spawn(["pipelines/tune.py", "--data", str(prepared), "--num-samples", "2", "--max-concurrent", "2",
                   "--workers-per-trial", "1", "--cpus-per-worker", "1.5", "--max-failures", "3",
                   "--mlflow-uri", uri, "--name", "node-loss-sweep", "--registered-model", "node-loss",
                   *_sets(sets)], tmp_path, "tune", env)

    def children_with_an_epoch() -> bool:
        try:
            exps = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(exps, "tags.trial_id != ''")
        except Exception:  # noqa: BLE001
            return False
        return len(runs) == 2 and all(_steps(client, r.info.run_id) for r in runs)

    try:
        _wait_for(children_with_an_epoch, proc, tmp_path / "tune.err", 900, "both trials' epoch 1")
        cluster.kill_node()
        time.sleep(5)
        cluster.start_node()
        rc = _wait(proc, tmp_path, "tune", timeout=1200)
    finally:
        stop_group(proc)
    err = (tmp_path / "tune.err").read_text()
    assert rc == 0, err[-4000:]
    summary = _summary(tmp_path / "tune.out")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_status"] == "completed"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len({c.data.tags["trial_id"] for c in children}) == len(children) == 2
    resumed = 0
    expected = {"completed": "FINISHED", "stopped_by_asha": "KILLED"}  # ASHA may stop the weaker one
    for c in children:
        status = c.data.tags["trial_status"]
        assert status in expected and c.info.status == expected[status], (status, c.info.status)
        # every epoch once: a retried trial continued from its checkpoint
        steps = _steps(client, c.info.run_id)
        assert steps == list(range(1, len(steps) + 1)), (c.data.tags["trial_id"], steps)
        assert status != "completed" or steps == [1, 2, 3], (c.data.tags["trial_id"], steps)
        resumed += "resumed_from_epoch" in c.data.tags
    assert resumed >= 1, "the lost node held a trial's worker: that trial resumed from its checkpoint"


# ---- 3. the sweep driver SIGKILLed --------------------------------------------------------------
def test_sweep_driver_killed_resumes_with_rungs_and_parent(prepared, tmp_path):
    """SIGKILL (no graceful path) once a trial has passed ASHA's first rung, then ``--resume``."""

    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONUNBUFFERED="1", RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"))
    name = "killed-sweep"
    common = ["pipelines/tune.py", "--data", str(prepared), "--mlflow-uri", uri, *_sets({"output_dir": out})]
    client = _store(uri)
    first = _spawn([*common, "--num-samples", "4", "--max-concurrent", "2", "--name", name,
                    "--registered-model", "killed", *_sets(dict(TINY, epochs=4, batch_size=32))],
                   tmp_path, "first", env)

    def histories() -> dict[str, list[int]]:
        try:
            exps = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(exps, "tags.trial_id != ''")
        except Exception:  # noqa: BLE001
            return {}
        return {r.data.tags["trial_id"]: _steps(client, r.info.run_id) for r in runs}

    try:
        # past the rung at epoch 2 (and Tune has saved its state since the sweep began)
        _wait_for(lambda: any(len(h) >= 3 for h in histories().values()), first, tmp_path / "first.err", 900,
                  "a trial past epoch 2")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop_group(first)  # the driver's local Ray died with it: end the rest of its group
    before = histories()
    parent_id = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.kind = 'sweep'")[0].info.run_id

    second = _spawn([*common, "--resume", name], tmp_path, "second", env)
    try:
        rc = _wait(second, tmp_path, "second", timeout=1200)
    finally:
        stop_group(second)
    err = (tmp_path / "second.err").read_text()
    assert rc == 0, err[-4000:]
    assert "resuming sweep" in err
    summary = _summary(tmp_path / "second.out")
    assert summary["mlflow_parent_run_id"] == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_status"] == "completed"
    after = histories()
    for trial_id, steps in after.items():
        # no epoch trained twice: a trial that had epochs went on from its last checkpoint
        assert steps == sorted(set(steps)), (trial_id, steps)
        assert steps[:len(before.get(trial_id, []))] == before.get(trial_id, []), (trial_id, before, steps)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    statuses = {c.data.tags["trial_id"]: (c.data.tags.get("trial_status"), c.info.status) for c in children}
    assert len(statuses) == 4 and all(s[1] != "RUNNING" for s in statuses.values()), statuses
    # a trial cut off mid-run went on from its checkpoint, not from epoch 1
    resumed = {c.data.tags["trial_id"]: c.data.tags.get("resumed_from_epoch") for c in children}
    for trial_id, steps in before.items():
        if steps and len(after[trial_id]) > len(steps):
            assert resumed[trial_id] is not None and int(resumed[trial_id]) >= 1, (trial_id, resumed)
    # ASHA's decisions stand: a trial stopped at a rung before the kill is not trained further
    for trial_id, steps in before.items():
        if statuses[trial_id][0] == "stopped_by_asha":
            assert after[trial_id] == steps or len(after[trial_id]) < 4, (trial_id, steps, after[trial_id])
