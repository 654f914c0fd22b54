"""pipelines/train.py: Ray Train (V2) on CPU workers with tiny models on the synthetic log.

- bad arguments fail with one ``error:`` line and exit 2 before any worker starts;
- 2 workers end to end through the CLI, tracked on a real ``mlflow server`` (loopback port,
  started here and stopped by pid): params, per-epoch metrics, test metrics, artifacts, model;
  then ``--resume NAME`` continues the same run (and the same MLflow run);
- a worker process killed mid-epoch: the run restarts from the last checkpoint, no finished
  epoch is lost;
- batch equivalence: 2 workers x B/2 follow 1 worker x B's validation trajectory within noise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffurec.config import Config  # noqa: E402

pytestmark = pytest.mark.slow

# tiny model: the whole file must stay within a few minutes on 2 shared cores
TINY = {"hidden_size": 16, "num_blocks": 1, "num_heads": 1, "batch_size": 64, "eval_batch_size": 600,
        "diffusion_steps": 8, "reverse_steps": 4, "dropout": 0.1, "emb_dropout": 0.1, "lr": 3e-3}


def _sets(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from diffurec.data.sequences import write_split
    from diffurec.data.synthetic import write_synthetic_log

    d = tmp_path_factory.mktemp("ray_train_data")
    write_synthetic_log(d / "log.parquet", num_users=600, num_items=120, seed=0)
    write_split(d / "log.parquet", d / "prepared")
    return d / "prepared"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a loopback port; stopped by its pid (process group)."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{(d / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# ---- bad arguments: clear error, exit 2, before any worker starts -------------------------------
def _bad_data_dir(tmp: Path) -> Path:
    d = tmp / "not_prepared"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return d


BAD_CASES = {
    "num_workers_zero": (lambda tmp, data: ["--data", str(data), "--num-workers", "0"], "--num-workers"),
    "num_workers_negative": (lambda tmp, data: ["--data", str(data), "--num-workers", "-2"], "--num-workers"),
    "use_gpu_without_gpu": (lambda tmp, data: ["--data", str(data), "--use-gpu"], "--use-gpu"),
    "data_dir_not_prepared": (lambda tmp, data: ["--data", str(_bad_data_dir(tmp))], "not_prepared"),
    "data_missing": (lambda tmp, data: ["--data", str(tmp / "nope")], "no such file"),
    "data_not_a_log": (lambda tmp, data: ["--data", str(_write(tmp / "notes.txt", "x"))], "neither a prepared"),
    "data_unreadable_log": (lambda tmp, data: ["--data", str(_write(tmp / "broken.csv", "a,b\n1,2\n"))],
                            "broken.csv"),
    "batch_not_divisible": (lambda tmp, data: ["--data", str(data), "--num-workers", "3",
                                               "--set", "batch_size=64"], "batch_size"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_arguments_fail_before_workers(case, tmp_path, prepared, monkeypatch, capsys):
    import torch

    import pipelines.train as train

    if case == "use_gpu_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_workers(*a, **k):
        raise AssertionError("a Ray worker/trainer was started for bad arguments")

    monkeypatch.setattr(train, "make_trainer", no_workers)
    monkeypatch.setattr(train, "init_ray", no_workers)
    build, needle = BAD_CASES[case]
    argv = build(tmp_path, prepared) + ["--set", f"output_dir={tmp_path / 'out'}"]
    rc = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]


def test_local_workers_share_the_local_cpus(ray_local, monkeypatch):
    import argparse

    import pipelines.train as train

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = int(ray_local.cluster_resources()["CPU"])  # 2: the fixture's cluster

    def args(**kw):
        return argparse.Namespace(**{"cpus_per_worker": None, "use_gpu": False, "num_workers": 1, **kw})

    assert train.worker_resources(args()) == {"CPU": cpus}  # one worker gets both cores
    assert train.worker_resources(args(num_workers=2)) == {"CPU": max(1, cpus // 2)}
    assert train.worker_resources(args(num_workers=3)) == {"CPU": 1}  # never below 1
    assert train.worker_resources(args(cpus_per_worker=0.5)) == {"CPU": 0.5}  # the flag wins
    assert train.worker_resources(args(use_gpu=True)) is None  # Ray's 1 CPU + 1 GPU
    assert train.worker_resources(args(use_gpu=True, cpus_per_worker=4)) == {"CPU": 4, "GPU": 1}
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a remote cluster: Ray's default
    assert train.worker_resources(args()) is None


def test_name_reuse_is_refused_and_resume_needs_a_run(tmp_path, prepared, capsys):
    import pipelines.train as train

    storage = tmp_path / "ray_results"
    (storage / "taken").mkdir(parents=True)
    base = ["--data", str(prepared), "--storage-path", str(storage), "--set", f"output_dir={tmp_path}"]
    assert train.main(base + ["--name", "taken"]) == 2
    assert "--resume taken" in capsys.readouterr().err
    assert train.main(base + ["--resume", "missing"]) == 2
    assert "no Ray Train run" in capsys.readouterr().err


# ---- 2 workers end to end, on a real MLflow server; then --resume -------------------------------
def test_two_workers_end_to_end_with_mlflow_server(ray_local, prepared, mlflow_server, tmp_path, capsys):
    import mlflow

    import pipelines.train as train
    from diffurec.tracking import mlflow_metric_name

    # the reference protocol's preset, with --set overriding its epochs and evaluation interval
    preset = REPO / "configs" / "reference_protocol.yaml"
    cfg = dict(TINY, epochs=2, eval_every=1, model="diffurec", output_dir=str(tmp_path / "out"))
    storage = tmp_path / "ray_results"
    argv = ["--data", str(prepared), "--num-workers", "2", "--mlflow-uri", mlflow_server, "--config", str(preset),
            "--storage-path", str(storage), "--name", "e2e", "--experiment", "ray-train-test"] + _sets(cfg)
    assert train.main(argv) == 0, capsys.readouterr().err[-3000:]
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["run_name"] == "e2e"
    assert summary["epochs"] == 2 and summary["num_workers"] == 2
    assert Path(summary["checkpoint"]).is_file() and summary["checkpoint"].endswith("best.pt")
    for key in ("valid/NDCG@10", "valid/HR@10", "test/NDCG@10", "test/HR@10", "test/MRR"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["train/samples_per_s"] > 0
    # the best checkpoint loads in the library
    from diffurec.training import load_checkpoint

    model, loaded_cfg, payload = load_checkpoint(summary["checkpoint"])
    assert loaded_cfg.hidden_size == 16 and payload["epoch"] == summary["best_epoch"]

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    # the whole config as params, under the config's own key names
    expected = {k: str(v) for k, v in Config.from_yaml(preset).with_overrides(cfg).to_dict().items()}
    assert {k: run.data.params[k] for k in expected} == expected
    assert (run.data.params["lr_schedule"], run.data.params["stop_on"]) == ("step", "any_metric")
    # per-epoch metrics: loss, samples/s, validation HR/NDCG at every K
    for key in ("train/loss", "train/samples_per_s", "valid/HR@5", "valid/HR@10", "valid/HR@20",
                "valid/NDCG@5", "valid/NDCG@10", "valid/NDCG@20"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, mlflow_metric_name(key))]
        assert sorted(steps) == [1, 2], key
    for key in ("test/NDCG@10", "test/HR@10"):
        assert run.data.metrics[mlflow_metric_name(key)] == pytest.approx(summary[key])
    # artifacts: the best checkpoint and the config; the model through mlflow.pytorch
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml"} <= artifacts, artifacts
    assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models), models

    # --resume continues the named run (its own config, one more epoch), same MLflow run
    argv = ["--data", str(prepared), "--num-workers", "2", "--mlflow-uri", mlflow_server,
            "--storage-path", str(storage), "--resume", "e2e", "--experiment", "ray-train-test",
            "--set", "epochs=3", "--no-log-model"]
    assert train.main(argv) == 0, capsys.readouterr().err[-3000:]
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["epochs"] == 3 and resumed["mlflow_run_id"] == summary["mlflow_run_id"]
    history = client.get_metric_history(run.info.run_id, mlflow_metric_name("valid/NDCG@10"))
    assert sorted(m.step for m in history) == [1, 2, 3]  # epochs 1-2 were not trained again


# ---- kill a worker mid-epoch ------------------------------------------------------------------
def test_worker_killed_mid_epoch_resumes_from_checkpoint(ray_local, prepared, tmp_path):
    import mlflow

    import pipelines.train as train
    from diffurec.tracking import mlflow_metric_name

    status = tmp_path / "status"
    status.mkdir()
    # small batches make epoch 2 long enough (hundreds of steps) for the killer below to catch
    # it even on a loaded machine
    cfg = Config().with_overrides(dict(TINY, epochs=2, model="sasrec", batch_size=8))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = train.make_trainer(cfg, str(prepared), num_workers=2, name="killed",
                                 storage_path=str(tmp_path / "ray_results"), mlflow_uri=uri,
                                 max_failures=1, log_model=False, status_dir=str(status))
    killed: dict = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for f in status.glob("rank1-*.json"):
                try:
                    s = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if s["epoch"] == 2 and s["step"] >= 1:  # epoch 1 reported, epoch 2 under way
                    os.kill(s["pid"], signal.SIGKILL)
                    killed.update(s)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = trainer.fit()
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result.error is None
    assert result.metrics["epoch"] == 2
    # the restarted workers resumed from the epoch-1 checkpoint: epoch 1 was not lost or redone
    restarted = [json.loads(f.read_text()) for f in status.glob("rank*.json")]
    restarted = [s for s in restarted if s["pid"] != killed["pid"] and s["resumed_from"] > 0]
    assert restarted and {s["resumed_from"] for s in restarted} == {1}, restarted
    assert all(s["epoch"] == 2 for s in restarted)
    # one MLflow run across the restart, with every epoch once
    run_id = result.metrics["mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    history = client.get_metric_history(run_id, mlflow_metric_name("valid/NDCG@10"))
    assert sorted({m.step for m in history}) == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


# ---- same semantics on any worker count --------------------------------------------------------
def test_two_workers_half_batch_follow_one_worker(ray_local, prepared, tmp_path):
    import mlflow

    import pipelines.train as train
    from diffurec.tracking import mlflow_metric_name

    cfg = Config().with_overrides(dict(TINY, epochs=3, model="sasrec", batch_size=64, seed=3))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    curves, runs = {}, {}
    for workers in (1, 2):
        # finish_run=False (what a sweep passes) on one of the two: the run is left to its caller
        trainer = train.make_trainer(cfg, str(prepared), num_workers=workers, name=f"equiv-{workers}",
                                     storage_path=str(tmp_path / "ray_results"), mlflow_uri=uri,
                                     max_failures=0, log_model=False, finish_run=workers == 2)
        result = trainer.fit()
        client = mlflow.MlflowClient(uri)
        runs[workers] = client.get_run(result.metrics["mlflow_run_id"])
        history = client.get_metric_history(result.metrics["mlflow_run_id"], mlflow_metric_name("valid/NDCG@10"))
        curves[workers] = [m.value for m in sorted(history, key=lambda m: m.step)]
    # the worker finishes its run only when it owns it; the sweep's driver owns its trials' runs
    assert runs[2].info.status == "FINISHED"
    assert runs[1].info.status == "RUNNING"
    assert any(k.startswith("test/") for k in runs[1].data.metrics)  # all the work was logged
    one, two = curves[1], curves[2]
    assert len(one) == len(two) == 3
    # both learn (the planted structure is far above chance: 10/120 items ~ NDCG 0.04) ...
    assert one[-1] > one[0] and two[-1] > two[0], curves
    # ... along the same trajectory, epoch by epoch, within noise
    diffs = [abs(a - b) for a, b in zip(one, two)]
    print("valid NDCG@10 by epoch:", curves)
    assert max(diffs) < 0.05, curves
