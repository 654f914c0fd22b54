import json
import subprocess
import sys

import pytest

from diffurec.data.synthetic import write_synthetic_log

TINY = ["hidden_size=16", "num_blocks=1", "num_heads=2", "max_len=10", "diffusion_steps=4", "reverse_steps=4",
        "batch_size=64", "epochs=2"]


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "diffurec", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    return proc


def last_json(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    write_synthetic_log(path, num_users=300, num_items=60, mean_length=8, seed=1)
    return path


def test_split_train_evaluate(log, tmp_path):
    out = last_json(run_cli("split", "--data", str(log), "--out", str(tmp_path / "seq")))
    assert out["users"] == 300 and (tmp_path / "seq" / "stats.json").is_file()
    sets = [a for s in TINY for a in ("--set", s)]
    train = last_json(run_cli("train", "--data", str(tmp_path / "seq"), *sets, "--output-dir", str(tmp_path / "o"),
                              "--no-mlflow", "--no-progress", "--name", "r1"))
    assert train["run_name"] == "r1"
    assert {"test/HR@10", "test/NDCG@10", "valid/NDCG@10", "checkpoint"} <= set(train)
    ev = last_json(run_cli("evaluate", "--checkpoint", train["checkpoint"], "--data", str(tmp_path / "seq"),
                           "--reverse-steps", "2", "--split", "valid", "--no-progress"))
    assert ev["reverse_steps"] == 2 and 0 <= ev["valid/HR@10"] <= 1
    # the same name again is refused rather than silently overwritten; --resume continues it
    again = run_cli("train", "--data", str(tmp_path / "seq"), *sets, "--output-dir", str(tmp_path / "o"),
                    "--no-mlflow", "--name", "r1")
    assert again.returncode == 2 and "--resume r1" in again.stderr
    resumed = last_json(run_cli("train", "--data", str(tmp_path / "seq"), *sets, "--set", "epochs=3",
                                "--output-dir", str(tmp_path / "o"), "--no-mlflow", "--no-progress",
                                "--resume", "r1"))
    assert resumed["epochs"] == 3


def test_resume_without_the_config_continues_with_the_runs_own(log, tmp_path):
    """`--resume NAME` alone trains on with the run's config (from its checkpoint), not the
    defaults; a --set still overrides a key (here the number of epochs)."""
    import torch
    import yaml

    preset = tmp_path / "preset.yaml"
    preset.write_text("lr_schedule: cosine\neval_every: 2\nemb_dropout: 0.45\n")
    sets = [a for s in TINY for a in ("--set", s)]
    common = ["--output-dir", str(tmp_path / "o"), "--no-mlflow", "--no-progress"]
    run_cli("train", "--data", str(log), "--config", str(preset), *sets, "--set", "dropout=0.2", *common,
            "--name", "c")
    resumed = last_json(run_cli("train", "--data", str(log), "--set", "epochs=3", *common, "--resume", "c"))
    assert resumed["epochs"] == 3
    run_dir = tmp_path / "o" / "runs" / "c"
    for cfg in (yaml.safe_load((run_dir / "config.yaml").read_text()),
                torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=False)["config"]):
        assert (cfg["lr_schedule"], cfg["eval_every"], cfg["emb_dropout"], cfg["dropout"]) == ("cosine", 2, 0.45, 0.2)
        assert (cfg["hidden_size"], cfg["epochs"]) == (16, 3)


def test_train_on_raw_log_tracks_in_mlflow(log, tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    out = last_json(run_cli("train", "--data", str(log), *sets, "--output-dir", str(tmp_path / "o"),
                            "--no-progress"))
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'o' / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["noise_schedule"] == "trunc_lin" and run.data.params["hidden_size"] == "16"
    assert "test/NDCG_at_10" in run.data.metrics and "valid/NDCG_at_10" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    from diffurec.machine import native_bf16_cpu  # precision auto: what it meant on this machine

    assert run.data.tags["precision_used"] == ("bf16" if native_bf16_cpu() else "fp32")


@pytest.mark.parametrize("args,match", [
    (["train", "--data", "{log}", "--set", "noise_schedule=zigzag"], "noise_schedule"),
    (["train", "--data", "{log}", "--set", "reverse_steps=64"], "reverse_steps"),
    (["train", "--data", "/nonexistent/log.parquet"], "/nonexistent/log.parquet"),
    (["evaluate", "--checkpoint", "/nonexistent.pt", "--data", "{log}"], "checkpoint not found"),
])
def test_bad_input_is_one_line_error(log, tmp_path, args, match):
    proc = run_cli(*[a.replace("{log}", str(log)) for a in args], "--no-progress", cwd=tmp_path) if args[0] == "evaluate" \
        else run_cli(*[a.replace("{log}", str(log)) for a in args], "--no-mlflow", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and match in proc.stderr


def test_sigterm_ends_the_run_killed_and_it_resumes(log, tmp_path):
    """`kill` mid-training: the MLflow run ends KILLED (not left RUNNING), the checkpoint of the
    last finished epoch stays, and --resume continues from it."""
    import os
    import signal
    import time

    import mlflow

    sets = [a for s in TINY[:-1] + ["epochs=500", "patience=500"] for a in ("--set", s)]
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "diffurec", "train", "--data", str(log), *sets,
                             "--output-dir", str(out), "--no-progress", "--name", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = out / "runs" / "k" / "latest.pt"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert latest.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no epoch in 240s"
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    run_id = (out / "runs" / "k" / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"
    done = [json.loads(line)["epoch"] for line in (out / "runs" / "k" / "metrics.jsonl").read_text().splitlines()]
    resumed = last_json(run_cli("train", "--data", str(log), *sets, "--set", f"epochs={done[-1] + 1}",
                                "--output-dir", str(out), "--no-progress", "--resume", "k"))
    assert resumed["epochs"] == done[-1] + 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_termination_waits_for_an_mlflow_write_in_flight():
    """A SIGTERM inside an MLflow write would leave SQLite locked and the run RUNNING: the
    handler holds it back until the write's block ends, then raises it."""
    from diffurec.__main__ import Termination

    term = Termination()
    with pytest.raises(KeyboardInterrupt):
        term.handler(15, None)
    written = []
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with term.deferred():
            term.handler(15, None)  # arrives mid-write: no exception here
            written.append("metrics")
    assert written == ["metrics"]


def test_train_takes_the_reference_protocol_preset(log, tmp_path):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "reference_protocol.yaml"
    sets = [a for s in TINY + ["eval_every=1"] for a in ("--set", s)]
    train = last_json(run_cli("train", "--data", str(log), "--config", str(preset), *sets,
                              "--output-dir", str(tmp_path / "o"), "--no-mlflow", "--no-progress", "--name", "ref"))
    assert train["epochs"] == 2
    saved = (tmp_path / "o" / "runs" / "ref" / "config.yaml").read_text()
    assert "lr_schedule: step" in saved and "stop_on: any_metric" in saved and "epochs: 2" in saved
