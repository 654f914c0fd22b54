"""Recommendations (issue 22): the in-process and Ray paths, the MLflow pyfunc (and serving it over
HTTP), the registry's champion alias, evaluation by segment and beyond accuracy.

The log's ids are remapped (items 1000 + 7i, users 500 + 3u) so that a dense index written where a
log id belongs cannot pass. Models are untrained (random weights): the tests check plumbing, not
quality.
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

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from diffurec.config import Config
from diffurec.data.sequences import load_sequences, write_split
from diffurec.data.synthetic import generate_synthetic_log
from diffurec.models import build_model
from diffurec.training import model_payload, save_atomic

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 16, "num_blocks": 1, "num_heads": 2, "max_len": 10, "diffusion_steps": 4,
        "reverse_steps": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared dataset with remapped ids, and untrained DiffuRec / SASRec checkpoints for it."""
    root = tmp_path_factory.mktemp("rec")
    log = generate_synthetic_log(num_users=200, num_items=40, mean_length=8, seed=3)
    log = log.set_column(0, "user_id", pc.add(pc.multiply(log["user_id"], 3), 500))
    log = log.set_column(1, "item_id", pc.add(pc.multiply(log["item_id"], 7), 1000))
    pq.write_table(log, root / "log.parquet")
    write_split(root / "log.parquet", root / "data")
    data = load_sequences(root / "data")
    paths = {"data": root / "data", "root": root, "num_items": data.num_items}
    for model in ("diffurec", "sasrec"):
        cfg = Config().with_overrides({**TINY, "model": model, "deterministic_reverse": True})
        torch.manual_seed(0)
        paths[model] = save_atomic(model_payload(build_model(cfg, data.num_items), cfg, data.num_items),
                                   root / f"{model}.pt")
    # a model of another dataset: five more items
    cfg = Config().with_overrides(TINY)
    paths["other"] = save_atomic(model_payload(build_model(cfg, data.num_items + 5), cfg, data.num_items + 5),
                                 root / "other.pt")
    return paths


def cli(*args, capsys):
    from diffurec.__main__ import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def log_item_ids(prepared) -> set:
    return set(pq.read_table(prepared["data"] / "items.parquet")["item_id"].to_pylist())


# ---- batch recommendations in one process --------------------------------------------------------
def test_in_process_recommend_writes_the_logs_ids(prepared, tmp_path, capsys):
    from diffurec.recommend import read_recommendations

    out = tmp_path / "recs"
    rc, stdout, err = cli("recommend", "--model", prepared["diffurec"], "--data", prepared["data"], "--output", out,
                          "--k", 7, "--exclude-history", "--no-progress", capsys=capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["users"] == 200 and summary["rows"] == 200 * 7 and summary["k"] == 7
    table = read_recommendations(out)
    assert table.column_names == ["user_id", "rank", "item_id", "score"]
    data = load_sequences(prepared["data"])
    assert set(table["user_id"].to_pylist()) == set(data.user_ids.tolist())  # the log's own user ids
    assert set(table["item_id"].to_pylist()) <= log_item_ids(prepared)  # the log's own item ids
    assert table["rank"].to_pylist()[:7] == list(range(1, 8))
    scores = table["score"].to_numpy().reshape(200, 7)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    # --exclude-history: no list holds an item of its user's history
    items = pq.read_table(prepared["data"] / "items.parquet")
    to_log = dict(zip(items["item"].to_pylist(), items["item_id"].to_pylist()))
    seen = {u: {to_log[i] for i in data.sequence(r).tolist()} for r, u in enumerate(data.user_ids.tolist())}
    assert not any(i in seen[u] for u, i in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist()))
    meta = json.loads((out / "_recommendations.json").read_text())
    assert meta["exclude_history"] is True and meta["model_type"] == "diffurec"


def test_a_user_gets_the_same_list_in_any_batch(prepared):
    """DiffuRec's starting noise is keyed by user, so batching does not change a user's list
    (with deterministic_reverse; the reverse steps' noise is per batch otherwise)."""
    from diffurec.recommend import ItemCatalog, Recommender
    from diffurec.training import read_checkpoint

    rec = Recommender.from_payload(read_checkpoint(prepared["diffurec"]), ItemCatalog.read(prepared["data"]), k=5)
    data = load_sequences(prepared["data"])
    keys = np.arange(len(data), dtype=np.uint64)
    whole = rec.top_k(data.items, data.offsets, keys)
    part = rec.top_k(data.items[data.offsets[10]:data.offsets[13]], data.offsets[10:14] - data.offsets[10], keys[10:13])
    np.testing.assert_array_equal(whole[0][10:13], part[0])
    np.testing.assert_allclose(whole[1][10:13], part[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,match", [
    ("k0", "--k must be an integer in 1..40"),
    ("k_too_big", "--k must be an integer in 1..40"),
    ("missing_model", "model not found"),
    ("other_items", "45"),
    ("output_exists", "already exists"),
    ("raw_log", "not a prepared dataset"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(prepared, tmp_path, capsys, case, match):
    out = tmp_path / "recs"
    args = {"model": prepared["sasrec"], "data": prepared["data"], "k": 5}
    if case == "k0":
        args["k"] = 0
    elif case == "k_too_big":
        args["k"] = prepared["num_items"] + 1
    elif case == "missing_model":
        args["model"] = tmp_path / "nope" / "best.pt"
    elif case == "other_items":
        args["model"] = prepared["other"]
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "raw_log":
        args["data"] = prepared["root"] / "log.parquet"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = cli("recommend", "--model", args["model"], "--data", args["data"], "--output", out,
                          "--k", args["k"], "--no-progress", capsys=capsys)
    assert rc == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no staging left
    if case == "output_exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


# ---- the pyfunc model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(prepared):
    """An MLflow store with the DiffuRec pyfunc registered as 'rec-test' (alias champion)."""
    from diffurec.tracking import MLflowRun

    uri = f"sqlite:///{prepared['root'] / 'mlflow.db'}"
    run = MLflowRun(uri, experiment="models", run_name="model")
    info = run.log_recommender(prepared["diffurec"], prepared["data"], registered_model_name="rec-test",
                               alias="champion")
    run.finish()
    return {"uri": uri, "info": info, "run_id": run.run_id}


def test_pyfunc_signature_mapping_and_unknown_ids(prepared, registry, tmp_path):
    import mlflow
    import pandas as pd

    # the registered champion, fetched from the store without touching MLflow's global tracking URI
    client = mlflow.MlflowClient(registry["uri"])
    version = client.get_model_version_by_alias("rec-test", "champion").version
    local = Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("rec-test", version),
                                                     dst_path=str(tmp_path)))
    model = mlflow.pyfunc.load_model(str(local))
    inputs = model.metadata.get_input_schema().to_dict()
    assert inputs == [{"type": "array", "items": {"type": "long"}, "name": "history", "required": True}]
    assert {p.name for p in model.metadata.get_params_schema().params} == {"k", "exclude_history", "reverse_steps"}
    # the id mapping travels with the model: no access to the training data is needed
    assert (local / "artifacts" / "items.parquet").is_file() and (local / "artifacts" / "checkpoint.pt").is_file()
    known = sorted(log_item_ids(prepared))
    request = pd.DataFrame({"history": [known[:4], [known[5], 999_999, known[6], -3], [], [123_456]]})
    out = model.predict(request, params={"k": 3})
    assert list(out.columns) == ["item_ids", "scores", "dropped", "source"]
    assert out["dropped"].tolist() == [0, 2, 0, 1]
    assert out["source"].tolist() == ["model", "model", "popularity", "popularity"]
    assert all(len(ids) == 3 and set(ids) <= set(known) for ids in out["item_ids"])
    # popularity answers are the most interacted-with items, scored by their share
    assert out["item_ids"][2] == out["item_ids"][3] and 0 < out["scores"][2][0] < 1
    # the same request gives the same answer; exclude_history leaves the history out
    again = model.predict(request, params={"k": 3})
    assert again["item_ids"].tolist() == out["item_ids"].tolist()
    excluded = model.predict(request.iloc[:1], params={"k": 5, "exclude_history": True})
    assert not set(excluded["item_ids"][0]) & set(known[:4])
    with pytest.raises(mlflow.exceptions.MlflowException, match="param k must be an integer in 1..40"):
        model.predict(request, params={"k": 0})


def test_recommend_takes_registered_names_and_model_uris(prepared, registry, tmp_path, capsys):
    from diffurec.recommend import read_recommendations

    outs = []
    for i, ref in enumerate(("rec-test", "models:/rec-test@champion", f"runs:/{registry['run_id']}/recommender")):
        out = tmp_path / f"r{i}"
        rc, stdout, err = cli("recommend", "--model", ref, "--data", prepared["data"], "--output", out, "--k", 4,
                              "--mlflow-uri", registry["uri"], "--no-progress", capsys=capsys)
        assert rc == 0, err
        outs.append(read_recommendations(out))
    direct = tmp_path / "direct"
    assert cli("recommend", "--model", prepared["diffurec"], "--data", prepared["data"], "--output", direct,
               "--k", 4, "--no-progress", capsys=capsys)[0] == 0
    for table in outs:
        assert table["item_id"].equals(read_recommendations(direct)["item_id"])
    rc, _, err = cli("recommend", "--model", "no-such-model", "--data", prepared["data"], "--output", tmp_path / "x",
                     "--mlflow-uri", registry["uri"], "--no-progress", capsys=capsys)
    assert rc == 2 and "model not found" in err


def test_tune_registers_the_best_as_champion(prepared, tmp_path, monkeypatch):
    """pipelines/tune.py's registration sets the alias 'champion' (no stages); recommend then
    resolves the mlflow.pytorch model through its run's checkpoint artifact."""
    import mlflow

    sys.path.insert(0, str(REPO))
    import shutil

    from diffurec.recommend import load_model_payload
    from diffurec.tracking import config_params
    from pipelines.tune import register_best

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("tune")
    best = tmp_path / "best.pt"
    shutil.copy(prepared["sasrec"], best)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # a trial run as training leaves it: its checkpoint as the artifact checkpoint/best.pt
    with_checkpoint = client.create_run(experiment).info.run_id
    client.log_artifact(with_checkpoint, str(best), "checkpoint")
    reg = register_best(uri, with_checkpoint, str(best), "tuned", "sweep-x")
    assert reg["alias"] == "champion" and reg["version"] == "1"
    payload, what, own = load_model_payload("tuned", uri)
    assert payload["num_items"] == prepared["num_items"] and payload["config"]["model"] == "sasrec"
    assert "checkpoint/best.pt" in what and own is None
    # a trial stopped before it logged its checkpoint: the module and the run's config params
    without = client.create_run(experiment).info.run_id
    cfg = Config.from_dict(torch.load(best, weights_only=False)["config"])
    for key, value in config_params(cfg).items():
        client.log_param(without, key, value)
    reg = register_best(uri, without, str(best), "tuned", "sweep-y")
    assert reg["version"] == "2" and str(client.get_model_version_by_alias("tuned", "champion").version) == "2"
    assert client.get_model_version("tuned", "2").current_stage in ("None", None)  # aliases, not stages
    payload, what, _ = load_model_payload("models:/tuned@champion", uri)
    assert "module and config" in what and payload["config"]["model"] == "sasrec"


# ---- slow: Ray Data and a real MLflow server ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_served_model_answers_a_real_http_request(prepared, registry, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/rec-test@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow models serve did not come up in 120 s"
            time.sleep(1)
        known = sorted(log_item_ids(prepared))
        body = {"dataframe_records": [{"history": known[:3]}, {"history": [known[4], 999_999]}, {"history": []}],
                "params": {"k": 3}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        rows = answer["predictions"]
        assert [r["source"] for r in rows] == ["model", "model", "popularity"]
        assert [r["dropped"] for r in rows] == [0, 1, 0]
        assert all(len(r["item_ids"]) == 3 and set(r["item_ids"]) <= set(known) for r in rows)
        (tmp_path / "exchange.json").write_text(json.dumps({"request": body, "response": answer}))
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({**body, "params": {"k": 0}}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert err.value.code == 400 and "param k must be an integer" in err.value.read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_ray_pipeline_matches_the_in_process_command(prepared, tmp_path, capsys):
    from diffurec.recommend import read_recommendations

    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "recommend.py"), "--model", str(prepared["diffurec"]),
                           "--data", str(prepared["data"]), "--output", str(tmp_path / "ray"), "--k", "6",
                           "--num-workers", "2", "--batch-size", "64"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["users"] == 200 and summary["rows"] == 1200 and summary["num_workers"] == 2
    assert cli("recommend", "--model", prepared["diffurec"], "--data", prepared["data"], "--output",
               tmp_path / "local", "--k", 6, "--no-progress", capsys=capsys)[0] == 0
    ray_table, local = read_recommendations(tmp_path / "ray"), read_recommendations(tmp_path / "local")
    assert ray_table["user_id"].equals(local["user_id"]) and ray_table["rank"].equals(local["rank"])
    same = np.mean(np.asarray(ray_table["item_id"].to_pylist()) == np.asarray(local["item_id"].to_pylist()))
    assert same >= 0.99, same
    np.testing.assert_allclose(ray_table["score"].to_numpy(), local["score"].to_numpy(), rtol=1e-4, atol=1e-4)
    # a bad K fails before Ray starts, with one line, and writes nothing
    bad = subprocess.run([sys.executable, str(REPO / "pipelines" / "recommend.py"), "--model", str(prepared["sasrec"]),
                          "--data", str(prepared["data"]), "--output", str(tmp_path / "bad"), "--k", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --k") and not (tmp_path / "bad").exists()


# ---- evaluation by segment and beyond accuracy -------------------------------------------------
def test_head_items_and_beyond_accuracy_by_hand():
    from diffurec.metrics import BeyondAccuracyMetrics, head_items

    # counts of items 1..5: 50, 30, 10, 6, 4 (total 100): 20% is reached by item 1 alone
    pop = np.array([0, 50, 30, 10, 6, 4])
    assert head_items(pop, 0.2).tolist() == [False, True, False, False, False, False]
    assert head_items(pop, 0.6).tolist() == [False, True, True, False, False, False]
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    users = np.array([0, 8, 4, 2, 1, 1])
    m = BeyondAccuracyMetrics(pop, users, 8, emb, ks=(2,))
    m.update(torch.tensor([[1, 2], [3, 4]]))
    out = m.compute()
    assert out["coverage@2"] == pytest.approx(4 / 5)
    # self-information: item1 -log2(8/8)=0, item2 1, item3 2, item4 3
    assert out["novelty@2"] == pytest.approx(((0 + 1) / 2 + (2 + 3) / 2) / 2)
    assert out["popularity@2"] == pytest.approx(((50 + 30) / 2 + (10 + 6) / 2) / 2)
    # pairs: (1,2) cosine 1 -> ILD 0; (3,4) cosine 1 -> 0
    assert out["ILD@2"] == pytest.approx(0.0)
    m.update(torch.tensor([[1, 5]]))  # cosine -1 -> ILD 2
    assert m.compute()["ILD@2"] == pytest.approx(2 / 3)


def test_evaluate_reports_segments_and_beyond_accuracy(prepared, tmp_path, capsys):
    import mlflow

    rc, plain, err = cli("evaluate", "--checkpoint", prepared["sasrec"], "--data", prepared["data"], "--no-progress",
                         capsys=capsys)
    assert rc == 0, err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, stdout, err = cli("evaluate", "--checkpoint", prepared["sasrec"], "--data", prepared["data"], "--segments",
                          "--beyond-accuracy", "--track", "--mlflow-uri", uri, "--no-progress", capsys=capsys)
    assert rc == 0, err
    plain, out = json.loads(plain.strip().splitlines()[-1]), json.loads(stdout.strip().splitlines()[-1])
    for key in ("test/HR@10", "test/NDCG@10", "test/MRR"):  # the same pass, the same overall metrics
        assert out[key] == pytest.approx(plain[key])
    seg = {s: out[f"test/segment/{s}/users"] for s in ("short", "long", "head", "tail")}
    assert seg["short"] + seg["long"] == 200 and seg["head"] + seg["tail"] == 200 and min(seg.values()) > 0
    weighted = (out["test/segment/short/NDCG@10"] * seg["short"] + out["test/segment/long/NDCG@10"] * seg["long"]) / 200
    assert weighted == pytest.approx(out["test/NDCG@10"])
    for k in (10, 20):
        assert 0 < out[f"test/coverage@{k}"] <= 1 and out[f"test/novelty@{k}"] > 0
        assert out[f"test/popularity@{k}"] > 0 and 0 <= out[f"test/ILD@{k}"] <= 2
    run = mlflow.MlflowClient(uri).get_run(out["mlflow_run_id"])
    assert {"test/segment/tail/NDCG_at_10", "test/coverage_at_10", "test/ILD_at_20", "test/novelty_at_10",
            "test/popularity_at_10", "test/segment/history_threshold"} <= set(run.data.metrics)
    assert run.data.tags["segments"] == "true" and run.data.tags["beyond_accuracy"] == "true"
    rc, _, err = cli("evaluate", "--checkpoint", prepared["sasrec"], "--data", prepared["data"], "--segments",
                     "--head-share", "1.5", "--no-progress", capsys=capsys)
    assert rc == 2 and "--head-share" in err
