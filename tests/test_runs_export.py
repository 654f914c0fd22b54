"""Runs exported to JSON files and imported into another MLflow store (diffurec.runs_export)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffurec.errors import DiffuRecError
from diffurec.runs_export import SOURCE_TAG, export_runs, import_runs, portable_path, read_runs

ROOT = Path(__file__).resolve().parents[1]


def make_store(uri: str, repo: Path) -> dict[str, str]:
    """A parent run with a FAILED child (metric history, a NaN) and a RUNNING run elsewhere, with
    machine paths and machine-specific mlflow.* tags. Returns their ids by role."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from diffurec.tracking import ensure_experiment

    client = mlflow.MlflowClient(uri)
    sweeps, other = ensure_experiment(uri, "sweeps"), ensure_experiment(uri, "other")
    parent = client.create_run(sweeps, start_time=1_700_000_000_000, run_name="sweep-1", tags={
        "kind": "sweep", "data_dir": str(repo / "data" / "beauty"), "mlflow.user": "someone",
        "mlflow.source.name": str(repo / "pipelines" / "tune.py"), "mlflow.source.git.commit": "abc123",
        "space": f"file://{repo}/tune_spaces/default.yaml", "note": f"see {repo}/outputs/x.html"}).info.run_id
    client.log_batch(parent, params=[Param("lr", "0.001"), Param("output_dir", str(repo / "outputs"))])
    client.set_terminated(parent, "FINISHED", end_time=1_700_000_100_000)
    child = client.create_run(sweeps, start_time=1_700_000_001_000, run_name="trial-1",
                              tags={"mlflow.parentRunId": parent, "dataset": "beauty"}).info.run_id
    client.log_batch(child, params=[Param("lr", "0.01")], tags=[RunTag("budget", "3 epochs")], metrics=[
        Metric("valid/NDCG_at_10", v, 1_700_000_002_000 + 10 * step, step)
        for step, v in enumerate([0.01, 0.02, math.nan, 0.025])] + [Metric("train/loss", 1.5, 1_700_000_002_005, 0)])
    client.set_terminated(child, "FAILED", end_time=1_700_000_050_000)
    running = client.create_run(other, start_time=1_700_000_200_000, run_name="live").info.run_id
    client.log_batch(running, metrics=[Metric("train/loss", 2.0, 1_700_000_200_001, 0)])
    return {"parent": parent, "child": child, "running": running}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.json"))}


def test_export_import_round_trip(tmp_path):
    import mlflow

    repo = tmp_path / "repo"
    repo.mkdir()
    src = f"sqlite:///{tmp_path / 'src.db'}"
    ids = make_store(src, repo)
    out = repo / "results" / "runs"

    assert export_runs(src, out, root=repo)["exported"] == 3
    files = snapshot(out)
    assert sorted(files) == sorted([f"sweeps/{ids['parent']}.json", f"sweeps/{ids['child']}.json",
                                    f"other/{ids['running']}.json"])
    # stable: the same store exports to the same bytes and rewrites nothing
    assert export_runs(src, out, root=repo)["changed"] == 0 and snapshot(out) == files
    assert not any(str(tmp_path).encode() in text for text in files.values())

    parent = json.loads(files[f"sweeps/{ids['parent']}.json"])
    assert parent["tags"]["data_dir"] == "data/beauty" and parent["params"]["output_dir"] == "outputs"
    assert parent["tags"]["space"] == "tune_spaces/default.yaml"
    assert parent["tags"]["note"] == "see outputs/x.html"
    assert "mlflow.user" not in parent["tags"] and "mlflow.source.name" not in parent["tags"]
    assert parent["tags"]["mlflow.source.git.commit"] == "abc123"
    child = json.loads(files[f"sweeps/{ids['child']}.json"])
    assert child["metrics"]["valid/NDCG_at_10"][2] == [2, 1_700_000_002_020, "NaN"]
    assert child["status"] == "FAILED" and child["end_time"] == 1_700_000_050_000

    dst = f"sqlite:///{tmp_path / 'dst.db'}"
    assert import_runs(out, dst) == {"imported": 3, "skipped": 0, "experiments": ["other", "sweeps"],
                                     "tracking_uri": dst}
    client = mlflow.MlflowClient(dst)
    exps = [client.get_experiment_by_name(n).experiment_id for n in ("sweeps", "other")]
    runs = {r.data.tags[SOURCE_TAG]: r for r in client.search_runs(exps)}
    assert sorted(runs) == sorted(ids.values())
    for record in read_runs(out):
        run = runs[record["run_id"]]
        assert run.info.run_name == record["run_name"] and run.info.status == record["status"]
        assert (run.info.start_time, run.info.end_time) == (record["start_time"], record["end_time"])
        assert run.data.params == record["params"]
        tags = {k: v for k, v in run.data.tags.items() if k != SOURCE_TAG}
        expected = dict(record["tags"])
        if "mlflow.parentRunId" in expected:  # nesting kept: the parent's id in this store
            expected["mlflow.parentRunId"] = runs[expected["mlflow.parentRunId"]].info.run_id
        assert tags == expected
        for key, points in record["metrics"].items():
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            got = [[m.step, m.timestamp, "NaN" if math.isnan(m.value) else m.value] for m in history]
            assert got == points
    # a second import, or an import into the store the runs came from, adds nothing
    assert import_runs(out, dst)["skipped"] == 3 and len(client.search_runs(exps)) == 3
    assert import_runs(out, src) == {"imported": 0, "skipped": 3, "experiments": ["other", "sweeps"],
                                     "tracking_uri": src}
    # the imported store exports the same files, under the original ids with the original nesting;
    # a tag set after the import lands in that run's own file, not in a copy
    again = tmp_path / "again"
    assert export_runs(dst, again, root=repo)["exported"] == 3 and snapshot(again) == files
    client.set_tag(runs[ids["child"]].info.run_id, "ablation", "lr")
    export_runs(dst, again, experiments=["sweeps"], run_filter="tags.ablation = 'lr'", root=repo)
    assert sorted(snapshot(again)) == sorted(files)
    (edited,) = [r for r in read_runs(again, ["sweeps"]) if r["run_id"] == ids["child"]]
    assert edited["tags"] == dict(json.loads(files[f"sweeps/{ids['child']}.json"])["tags"], ablation="lr")
    assert edited["tags"]["mlflow.parentRunId"] == ids["parent"]


def test_export_filter_and_missing_experiment(tmp_path):
    src = f"sqlite:///{tmp_path / 'src.db'}"
    ids = make_store(src, tmp_path)
    out = tmp_path / "runs"
    assert export_runs(src, out, run_filter="attributes.status = 'FINISHED'", root=tmp_path)["exported"] == 1
    assert [r["run_id"] for r in read_runs(out)] == [ids["parent"]]
    with pytest.raises(DiffuRecError, match="no MLflow experiment named nope"):
        export_runs(src, out, experiments=["nope"])
    with pytest.raises(DiffuRecError, match="run filter"):
        export_runs(src, out, run_filter="not a filter ==")
    with pytest.raises(DiffuRecError, match="no MLflow store"):
        export_runs(f"sqlite:///{tmp_path / 'missing.db'}", out)
    assert not (tmp_path / "missing.db").exists()


def test_portable_path(tmp_path):
    repo = tmp_path / "work" / "repo"
    assert portable_path(repo / "data" / "beauty", repo) == "data/beauty"
    assert portable_path(repo, repo) == "."
    assert portable_path(tmp_path / "work" / "shared" / "datasets" / "beauty", repo) == "../shared/datasets/beauty"
    assert portable_path("/somewhere/else/beauty/log.parquet", repo) == ".../beauty/log.parquet"


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(DiffuRecError, match="not found"):
        read_runs(tmp_path / "none")
    (tmp_path / "exp").mkdir()
    bad = tmp_path / "exp" / "broken.json"
    bad.write_text('{"run_id": ')
    with pytest.raises(DiffuRecError, match="broken.json: not a readable JSON file"):
        read_runs(tmp_path)
    bad.write_text('{"run_id": "x"}')
    with pytest.raises(DiffuRecError, match="broken.json: missing format, run_name"):
        read_runs(tmp_path)
    record = {"format": 1, "run_id": "x", "run_name": "r", "experiment": "e", "status": "FINISHED",
              "start_time": 1, "end_time": 2, "params": {}, "tags": {}, "metrics": {"m": [[0, 1]]}}
    bad.write_text(json.dumps(record))
    with pytest.raises(DiffuRecError, match=r"broken.json: metrics must map each key to a list of \[step"):
        read_runs(tmp_path)
    bad.unlink()
    with pytest.raises(DiffuRecError, match="no exported runs"):
        import_runs(tmp_path, f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists()  # nothing written before the input was checked


def test_cli_round_trip_and_errors(tmp_path):
    src = f"sqlite:///{tmp_path / 'src.db'}"
    make_store(src, tmp_path)
    cli = [sys.executable, str(ROOT / "pipelines" / "runs.py")]

    def run(*args):
        return subprocess.run(cli + list(args), capture_output=True, text=True, timeout=120)

    proc = run("export", "--mlflow-uri", src, "--experiment", "sweeps", "--to", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exported"] == 2
    dst = f"sqlite:///{tmp_path / 'dst.db'}"
    proc = run("import", "--from", str(tmp_path / "runs"), "--mlflow-uri", dst)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["imported"] == 2

    proc = run("import", "--from", str(tmp_path / "nowhere"), "--mlflow-uri", dst)
    assert proc.returncode == 2 and "nowhere: exported runs folder not found" in proc.stderr
    (tmp_path / "runs" / "sweeps" / "bad.json").write_text("[1, 2")
    proc = run("import", "--from", str(tmp_path / "runs"), "--mlflow-uri", dst)
    assert proc.returncode == 2 and "bad.json: not a readable JSON file" in proc.stderr
