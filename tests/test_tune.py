"""pipelines/tune.py: user errors before Ray starts, and one real sweep that is interrupted with
SIGINT after its first trial result and finished with ``--resume``; the resumed sweep is then
checked end to end through the MLflow client (parent + nested children, statuses, plots, best
config YAML, registered model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffurec.config import Config
from diffurec.tracking import mlflow_metric_name

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "pipelines" / "tune.py"
PY = sys.executable
STATUSES = {"completed": "FINISHED", "stopped_by_asha": "KILLED", "failed": "FAILED"}
PLOTS = {"optimization_history", "param_importances", "parallel_coordinate", "metric_vs_reverse_steps"}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always a fresh local cluster, never a stale or foreign one
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(args: list[str], log_dir: Path, tag: str) -> subprocess.Popen:
    """The sweep in its own session, so the whole process group can be ended by its pid."""
    out = open(log_dir / f"{tag}.out", "w")
    err = open(log_dir / f"{tag}.err", "w")
    return subprocess.Popen([PY, str(TUNE), *args], cwd=REPO, env=_env(), stdout=out, stderr=err,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log_dir: Path, tag: str, timeout: float) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(f"{tag}: no exit within {timeout}s; stderr tail:\n{tail(log_dir / f'{tag}.err')}")
    return rc, (log_dir / f"{tag}.out").read_text()


def stop_group(proc: subprocess.Popen) -> None:
    """End the sweep and everything it started (its process group), by the pid we started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.exists() else ""


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


# ---- fast: refused before any trial (and before Ray starts) ----------------------------------
def test_bad_space_fails_before_any_trial(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  diffusion_steps: {int: [8, 64]}\n  reverse_steps: {int: [1, 32]}\n")
    began = time.time()
    proc = subprocess.run([PY, str(TUNE), "--space", str(space), "--set", f"output_dir={tmp_path}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(space) in line and "'reverse_steps'" in line, line
    assert "Started a local Ray instance" not in proc.stderr
    assert not (tmp_path / "ray_results").exists()
    assert time.time() - began < 60

    space.write_text("params:\n  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    proc = subprocess.run([PY, str(TUNE), "--space", str(space), "--set", f"output_dir={tmp_path}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'learning_rate'" in proc.stderr and str(space) in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--resume", "nope"], "--resume nope"),
    (["--set", "eval_every=2"], "eval_every"),
    (["--set", "no_such_key=1"], "no_such_key"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_cli_user_errors(tmp_path, args, needle):
    proc = subprocess.run([PY, str(TUNE), *args, "--set", f"output_dir={tmp_path}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


def test_classify_trial_outcomes():
    sys.path.insert(0, str(REPO))
    from pipelines.tune import classify

    cfg = Config(epochs=4, patience=2)
    hist = lambda *v: [{"epoch": i + 1, "valid/NDCG@10": x} for i, x in enumerate(v)]  # noqa: E731
    assert classify(hist(0.1, 0.2, 0.3, 0.4), False, cfg) == "completed"
    assert classify(hist(0.3, 0.2, 0.1), False, cfg) == "completed"  # early-stopped by patience
    assert classify(hist(0.1, 0.2), False, cfg) == "stopped_by_asha"
    assert classify(hist(0.1), True, cfg) == "failed"


def test_asha_never_stops_a_trial_at_its_last_epoch():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    sys.path.insert(0, str(REPO))
    from pipelines.tune import METRIC, MODE, make_scheduler

    def decisions(scheduler) -> list[str]:
        """A strong trial, then one that passes the epoch-2 rung and collapses by epoch 4 (its
        last: epochs=4 puts a rung there)."""
        scheduler.set_search_properties(METRIC, MODE)
        strong, weak = SimpleNamespace(trial_id="a", config={}), SimpleNamespace(trial_id="b", config={})
        for t in (strong, weak):
            scheduler.on_trial_add(None, t)
        for epoch in (1, 2, 3, 4):
            scheduler.on_trial_result(None, strong, {"training_iteration": epoch, "epoch": epoch, METRIC: 0.5})
        return [scheduler.on_trial_result(None, weak, {"training_iteration": epoch, "epoch": epoch, METRIC: v})
                for epoch, v in ((1, 0.6), (2, 0.6), (3, 0.3), (4, 0.1))]

    plain = decisions(ASHAScheduler(time_attr="training_iteration", max_t=5, grace_period=2, reduction_factor=2))
    assert plain[-1] == TrialScheduler.STOP  # what plain ASHA does at a rung on the last epoch
    ours = decisions(make_scheduler(Config(epochs=4), epochs=4))
    assert ours == [TrialScheduler.CONTINUE] * 4
    # a weak trial is still stopped before its last epoch
    sched = make_scheduler(Config(epochs=4), epochs=4)
    sched.set_search_properties(METRIC, MODE)
    a, b = SimpleNamespace(trial_id="a", config={}), SimpleNamespace(trial_id="b", config={"epochs": 8})
    for t in (a, b):
        sched.on_trial_add(None, t)
    for epoch in (1, 2):
        sched.on_trial_result(None, a, {"epoch": epoch, METRIC: 0.5})
    sched.on_trial_result(None, b, {"epoch": 1, METRIC: 0.1})
    assert sched.on_trial_result(None, b, {"epoch": 2, METRIC: 0.1}) == TrialScheduler.STOP
    # the rungs count epochs, not Tune's iterations: a trial restored after epoch 1 reports
    # iteration 1 for its epoch 2, and meets the epoch-2 rung there
    sched = make_scheduler(Config(epochs=4), epochs=4)
    sched.set_search_properties(METRIC, MODE)
    for t in (a, b):
        sched.on_trial_add(None, t)
    for epoch in (1, 2):
        sched.on_trial_result(None, a, {"training_iteration": epoch, "epoch": epoch, METRIC: 0.5})
    sched.on_trial_result(None, b, {"training_iteration": 1, "epoch": 1, METRIC: 0.1})
    assert sched.on_trial_result(None, b, {"training_iteration": 1, "epoch": 2, METRIC: 0.1}) == TrialScheduler.STOP


def test_registering_the_best_model_keeps_its_runs_status(tmp_path, monkeypatch):
    """The best trial may be one ASHA stopped: its run must stay KILLED after its model is logged
    and registered (neither reopening the run nor MLflow's fluent start_run may end it FINISHED)."""
    import mlflow

    sys.path.insert(0, str(REPO))
    from diffurec.models import build_model
    from diffurec.training import model_payload, save_atomic
    from pipelines.tune import mark_child, register_best

    cfg = Config().with_overrides({"hidden_size": 8, "num_heads": 2, "num_blocks": 1, "diffusion_steps": 4,
                                   "reverse_steps": 2})
    checkpoint = save_atomic(model_payload(build_model(cfg, 12), cfg, 12), tmp_path / "best.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("reg")).info.run_id
    mark_child(client, run_id, "stopped_by_asha")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = register_best(uri, run_id, str(checkpoint), "reg-best", "sweep-x")
    # logging the model leaves no tracking URI behind for later child processes to inherit
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert reg is not None and reg["version"] == "1"
    run = client.get_run(run_id)
    assert (run.data.tags["trial_status"], run.info.status) == ("stopped_by_asha", "KILLED")
    assert client.get_model_version("reg-best", "1").tags["sweep"] == "sweep-x"


# ---- slow: a real sweep, interrupted and resumed ----------------------------------------------
@pytest.mark.slow
def test_sweep_interrupt_resume_and_mlflow_tree(tmp_path):
    import mlflow

    out = tmp_path / "outputs"
    name = "sweep-e2e"
    common = ["--set", f"output_dir={out}"]
    first = start(["--num-samples", "3", "--max-concurrent", "2", "--set", "epochs=3", "--name", name,
                   "--registered-model", "diffurec-e2e", *common], tmp_path, "first")
    try:
        # interrupt once the first trial has reported an epoch
        exp_dir = out / "ray_results" / name
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if any(p.stat().st_size > 0 for p in exp_dir.glob("*/result.json")):
                break
            time.sleep(1)
        assert first.poll() is None, f"sweep ended before it could be interrupted:\n{tail(tmp_path / 'first.err')}"
        os.kill(first.pid, signal.SIGINT)
        rc, stdout = finish(first, tmp_path, "first", timeout=180)
    finally:
        stop_group(first)
    assert rc == 130, tail(tmp_path / "first.err")
    interrupted = last_json(stdout)
    assert interrupted["interrupted"] is True and interrupted["name"] == name
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent_id = interrupted["mlflow_parent_run_id"]
    assert client.get_run(parent_id).data.tags["sweep_status"] == "interrupted"

    second = start(["--resume", name, *common], tmp_path, "second")
    try:
        rc, stdout = finish(second, tmp_path, "second", timeout=360)
    finally:
        stop_group(second)
    assert rc == 0, tail(tmp_path / "second.err")
    assert "resuming sweep" in (tmp_path / "second.err").read_text()
    summary = last_json(stdout)
    for key in ("experiment", "best_config", "best_metrics", "best_checkpoint", "mlflow_parent_run_id"):
        assert key in summary
    assert summary["mlflow_parent_run_id"] == parent_id
    assert summary["best_metrics"]["valid/NDCG@10"] > 0
    assert Path(summary["best_checkpoint"]).is_file()

    # best config YAML feeds straight back into Config (and pipelines/train.py --config)
    best_yaml = Path(summary["best_config_yaml"])
    assert Config.from_yaml(best_yaml).to_dict() == summary["best_config"]
    assert summary["best_config"]["reverse_steps"] <= summary["best_config"]["diffusion_steps"]

    # the run tree: one parent, children nested under it, one live child per trial
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_status"] == "completed"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    live = [c for c in children if c.data.tags.get("trial_status") != "interrupted"]
    trial_ids = {c.data.tags["trial_id"] for c in live}
    assert len(trial_ids) == len(live) == 3, [(c.data.tags.get("trial_id"), c.data.tags.get("trial_status"))
                                              for c in children]
    param_keys = None
    for c in live:
        status = c.data.tags["trial_status"]
        assert status in STATUSES and c.info.status == STATUSES[status], (status, c.info.status)
        if status == "completed":  # it ended itself: tested its best model, not killed by ASHA
            assert any(k.startswith("test/") for k in c.data.metrics), sorted(c.data.metrics)
        p = c.data.params
        assert int(p["reverse_steps"]) <= int(p["diffusion_steps"])
        assert p["noise_schedule"] and "lr" in p and "lambda_mean" in p
        assert param_keys is None or set(p) >= param_keys or param_keys >= set(p)
        param_keys = set(p) if param_keys is None else param_keys & set(p)
        history = client.get_metric_history(c.info.run_id, mlflow_metric_name("valid/NDCG@10"))
        assert len(history) >= 1  # per-epoch metrics
    assert set(Config.keys()) <= param_keys  # comparable side by side, same names as Config
    for c in children:
        assert c.info.status != "RUNNING"
    assert summary["mlflow_best_run_id"] in {c.info.run_id for c in live}

    # the parent's artifacts: Optuna plots as HTML and the best config
    arts = {a.path for a in client.list_artifacts(parent_id)}
    assert "best_config.yaml" in arts
    plots = {Path(a.path).stem for a in client.list_artifacts(parent_id, "plots")}
    assert plots >= PLOTS
    # what each knob is worth: Optuna's fANOVA and PED-ANOVA, as a table and a plot
    assert {a.path for a in client.list_artifacts(parent_id, "importances")} == {
        "importances/importances.json", "importances/importances.png"}
    html = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="plots/metric_vs_reverse_steps.html",
                                                    tracking_uri=uri, dst_path=str(tmp_path / "dl"))).read_text()
    assert "plotly" in html.lower() and "reverse_steps" in html

    # the best model is in the registry, from the best trial's run
    versions = client.search_model_versions("name = 'diffurec-e2e'")
    assert versions and versions[0].run_id == summary["mlflow_best_run_id"]
