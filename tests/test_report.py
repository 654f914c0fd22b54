import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffurec.config import Config
from diffurec.report import write_report, write_report_from_export
from diffurec.runs_export import export_runs
from diffurec.tracking import MLflowRun, config_params

ROOT = Path(__file__).resolve().parents[1]


def fake_run(uri, dataset, model, seed, test_ndcg, tags=None, **sets):
    cfg = Config().with_overrides({"model": model, "seed": seed, **sets})
    run = MLflowRun(uri, experiment="results", run_name=f"{dataset}-{model}-{seed}",
                    tags={"dataset": dataset, "model": model, **(tags or {})})
    run.log_params(config_params(cfg))
    run.log_metrics({"valid/NDCG@10": test_ndcg + 0.001, "test/NDCG@10": test_ndcg, "test/HR@10": 2 * test_ndcg,
                     "test/HR@20": 3 * test_ndcg, "test/NDCG@20": 1.2 * test_ndcg, "seconds_to_best": 60.0})
    run.finish()
    return run.run_id


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A store with three seeds of one config, a SASRec run, a second config, four ablations and a
    failed run; returns (uri, the three seeds' run ids, the SASRec run id)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ids = [fake_run(uri, "beauty", "diffurec", s, v) for s, v in ((1, 0.04), (2, 0.05), (3, 0.06))]
    sas = fake_run(uri, "beauty", "sasrec", 1, 0.03)
    fake_run(uri, "beauty", "diffurec", 1, 0.02, lr=0.01)  # a second config: its own row, not the headline
    for S, v in ((1, 0.02), (4, 0.045), (32, 0.05)):
        fake_run(uri, "beauty", "diffurec", 1, v, tags={"budget": "5 epochs", "ablation": "reverse_steps"}, reverse_steps=S)
    for sched in ("linear", "cosine"):
        fake_run(uri, "beauty", "diffurec", 1, 0.03, tags={"budget": "5 epochs", "ablation": "noise_schedule"}, noise_schedule=sched)
    fake_run(uri, "beauty", "diffurec", 1, 0.03, tags={"budget": "5 epochs", "ablation": "positional_embedding"}, positional_embedding=True)
    # one default-config run is the shared baseline point of two ablations
    fake_run(uri, "beauty", "diffurec", 1, 0.035, tags={"budget": "5 epochs", "ablation": "noise_schedule, positional_embedding"})
    for lam in (0.0, 0.001, 0.1):  # a sweep through 0 spanning decades, plus a labelled variant
        fake_run(uri, "beauty", "diffurec", 1, 0.03, tags={"budget": "5 epochs", "ablation": "lambda_mean"}, lambda_mean=lam)
    fake_run(uri, "beauty", "diffurec", 1, 0.028, tags={"budget": "5 epochs", "ablation": "lambda_mean", "ablation_value": "0.001",
                                                      "ablation_label": "0.001 fixed"}, lambda_std=0.0)
    failed = MLflowRun(uri, experiment="results", tags={"dataset": "beauty"})
    failed.finish("FAILED")
    return uri, ids, sas


def test_report_from_a_tiny_store(tmp_path, tiny_store):
    uri, ids, sas = tiny_store
    out = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "report.py"), "--mlflow-uri", uri,
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ablations"] == {"lambda_mean": 4, "noise_schedule": 3, "positional_embedding": 2,
                                    "reverse_steps": 3}

    results = json.loads((out / "results.json").read_text())
    d = results["beauty"]["diffurec"]
    assert sorted(d["runs"]) == sorted(ids)
    assert d["test/NDCG@10"]["n"] == 3
    assert d["test/NDCG@10"]["mean"] == pytest.approx(0.05)
    assert d["test/NDCG@10"]["std"] == pytest.approx(0.01)
    assert d["config"]["hidden_size"] == 128 and Config.from_dict(d["config"]).model == "diffurec"
    assert results["beauty"]["sasrec"]["runs"] == [sas]
    assert [p["value"] for p in results["_ablations"]["reverse_steps"]] == [1, 4, 32]
    assert [p["value"] for p in results["_ablations"]["noise_schedule"]] == ["cosine", "linear", "trunc_lin"]
    assert [p["value"] for p in results["_ablations"]["positional_embedding"]] == [False, True]
    lam = results["_ablations"]["lambda_mean"]
    assert [(p["value"], p["label"], p.get("labelled", False)) for p in lam] == [
        (0.0, "0.0", False), (0.001, "0.001", False), (0.001, "0.001 fixed", True), (0.1, "0.1", False)]
    assert (out / "ablation_lambda_mean.png").stat().st_size > 1000

    md = (out / "results.md").read_text()
    assert "5.00 ± 1.00" in md and "7.91" in md and ids[0][:8] in md
    # the paper and the published re-runs of the reference code beside the runs
    assert "| beauty | diffurec (published re-runs of the reference code) | - | - | 7.36-7.83 | 4.34-4.73 |" in md
    assert results["beauty"]["diffurec"]["published_reruns"]["test/NDCG@10"] == pytest.approx([0.0434, 0.0473])
    assert "| beauty | diffurec | headline | 3 |" in md and "| beauty | diffurec | lr=0.01 | 1 |" in md
    assert "Spread across the 3 points (max - min, percentage points): valid/NDCG@10 3.00" in md
    assert (out / "ablation_reverse_steps.png").stat().st_size > 1000
    assert (out / "ablation_noise_schedule.png").is_file()
    # the headline rows' validation curves: drawn and shown on the page
    assert (out / "validation_curves.png").stat().st_size > 1000
    assert "![validation curves](validation_curves.png)" in md


def test_validation_curve_keeps_one_point_per_epoch_in_epoch_order():
    from diffurec.report import run_dict

    # a resumed run validates epoch 4 again: the later value stands
    points = {"valid/NDCG_at_10": [(4, 0.05), (2, 0.03), (4, 0.06), (6, 0.07)]}
    run = run_dict("r", "e", "FINISHED", 0, {"dataset": "beauty"}, {"model": "diffurec"},
                   {"best_epoch": 6.0}, lambda key: points.get(key, []))
    assert run["valid_curve"] == [(2, 0.03), (4, 0.06), (6, 0.07)]
    assert run_dict("r", "e", "FINISHED", 0, {}, {}, {})["valid_curve"] == []


def test_report_on_empty_store_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "report.py"), "--mlflow-uri",
                           f"sqlite:///{tmp_path / 'none.db'}", "--experiment", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no MLflow experiments" in proc.stderr


def test_report_from_the_export_equals_the_report_from_the_store(tmp_path, tiny_store):
    uri = tiny_store[0]
    repo = tmp_path / "repo"
    runs_dir = repo / "results" / "runs"
    export_runs(uri, runs_dir, root=repo)
    from_store = write_report(uri, tmp_path / "store", root=repo)
    from_export = write_report_from_export(runs_dir, tmp_path / "export", root=repo)
    assert from_store["rows"] == from_export["rows"] and from_store["ablations"] == from_export["ablations"]
    store_md = (tmp_path / "store" / "results.md").read_text().splitlines()
    export_md = (tmp_path / "export" / "results.md").read_text().splitlines()
    # only the line naming the source differs, and it names no machine path
    assert [i for i, (a, b) in enumerate(zip(store_md, export_md)) if a != b] == [2]
    assert len(store_md) == len(export_md)
    assert export_md[2] == ("Generated by `python pipelines/report.py` from the exported runs in "
                            "`results/runs/`; do not edit by hand.")
    assert str(tmp_path) not in store_md[2]
    assert ((tmp_path / "store" / "results.json").read_bytes()
            == (tmp_path / "export" / "results.json").read_bytes())
    # the plots are byte-stable too: same data, same PNG
    for png in sorted((tmp_path / "store").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "export" / png.name).read_bytes(), png.name


def test_report_regenerates_the_committed_pages(tmp_path):
    """``python pipelines/report.py`` on the repository's exported runs gives the committed
    docs/results.md and docs/results.json byte for byte (the PNGs are not compared)."""
    if not any((ROOT / "results" / "runs").rglob("*.json")):
        pytest.skip("results/runs holds no exported runs yet (`python pipelines/runs.py export` writes them)")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "report.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.md", "results.json"):
        assert (tmp_path / name).read_bytes() == (ROOT / "docs" / name).read_bytes(), (
            f"docs/{name} is not what results/runs gives: run `python pipelines/report.py`")


def test_report_without_exported_runs_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "report.py"), "--from", str(tmp_path),
                           "--out", str(tmp_path / "docs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no exported runs in" in proc.stderr
    assert not (tmp_path / "docs").exists()


def test_full_protocol_ablation_points_are_main_rows_with_validation_at_the_best_epoch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {}
    # the baseline is a point of two ablations, one of them over a bundle of keys
    baseline_tags = {"ablation": "reference_transformer,gelu", "ablation_value.reference_transformer": "ours"}
    for value, sets, curve, tags in (
            ("ours", {"gelu": "exact"}, (0.040, 0.050, 0.045), baseline_tags),
            ("reference", {}, (0.030, 0.055, 0.052),
             {"ablation": "reference_transformer", "ablation_value": "reference"})):
        cfg = Config().with_overrides({"seed": 1, **sets})
        run = MLflowRun(uri, experiment="results", run_name=value,
                        tags={"dataset": "beauty", "model": "diffurec", "machine": "Some CPU, 2 cpus", **tags})
        run.log_params(config_params(cfg))
        for epoch, v in enumerate(curve, 1):
            run.log_metrics({"valid/NDCG@10": v, "valid/HR@10": 2 * v}, step=epoch)
        run.log_metrics({"test/NDCG@10": 0.04, "test/HR@10": 0.08, "best_epoch": 2, "seconds_to_best": 30.0},
                        step=3)
        run.finish()
        ids[value] = run.run_id
    write_report(uri, tmp_path / "docs")
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    points = {p["value"]: p for p in results["_ablations"]["reference_transformer"]}
    # validation at the best epoch (2), not at the last (3)
    assert points["ours"]["valid/NDCG@10"] == pytest.approx(0.050)
    assert points["reference"]["valid/NDCG@10"] == pytest.approx(0.055)
    assert [p["value"] for p in results["_ablations"]["gelu"]] == ["exact"]
    md = (tmp_path / "docs" / "results.md").read_text()
    # both are main rows (no budget tag); the better one on validation is the headline
    assert results["beauty"]["diffurec"]["runs"] == [ids["reference"]]
    assert "| beauty | diffurec | gelu=exact | 1 |" in md and "| beauty | diffurec | headline | 1 |" in md
    assert "| 5.50 | 2 | 30 |" in md
    assert "Machines: Some CPU, 2 cpus" in md


def test_segment_and_beyond_accuracy_evaluations_get_their_tables(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake_run(uri, "beauty", "diffurec", 1, 0.04)
    run = MLflowRun(uri, experiment="results", run_name="eval-x",
                    tags={"kind": "evaluation", "dataset": "beauty", "model": "diffurec", "segments": "true",
                          "beyond_accuracy": "true", "checkpoint": "/somewhere/runs/beauty-x/best.pt"})
    run.log_params(config_params(Config()))
    metrics = {"test/NDCG@10": 0.04, "test/segment/history_threshold": 6.0, "test/segment/head_items": 300.0}
    for i, seg in enumerate(("short", "long", "head", "tail")):
        metrics.update({f"test/segment/{seg}/HR@10": 0.1 + i / 100, f"test/segment/{seg}/NDCG@10": 0.05,
                        f"test/segment/{seg}/users": 100.0 + i})
    metrics.update({"test/coverage@10": 0.9, "test/novelty@10": 11.5, "test/popularity@10": 42.0, "test/ILD@10": 0.8})
    run.log_metrics(metrics)
    run.finish()
    write_report(uri, tmp_path / "docs")
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "## Segments and beyond accuracy" in md
    assert "| beauty | diffurec | beauty-x | 10.00 / 5.00 (100) | 11.00 / 5.00 (101) |" in md
    assert "beauty: short histories have at most 6 items; the head is 300 items." in md
    assert "| beauty | diffurec | beauty-x | 0.9 | 11.5 | 42 | 0.8 | - |" in md
    # an evaluation run is no main row
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert results["_segments_and_beyond_accuracy"][0]["trained_run"] == "beauty-x"
    assert len(results["beauty"]["diffurec"]["runs"]) == 1


def test_a_sweep_gets_its_importances_table_plot_and_trials(tmp_path):
    """A sweep parent with nested trials (as pipelines/tune.py logs them): the report weighs each
    knob of the space with fANOVA and PED-ANOVA over the trials' best validation NDCG@10."""
    import random

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowRun(uri, experiment="sweeps", run_name="s", tags={"kind": "sweep", "sweep": "s"})
    parent.log_params({"space.lr": "loguniform[0.0003, 0.003]", "space.noise_schedule": "choice['linear', 'cosine']",
                       "space.epochs": "const(4)", "sweep.data": "data/beauty"})
    rng = random.Random(0)
    for i in range(12):
        lr = 10 ** rng.uniform(-3.5, -2.53)
        cfg = Config().with_overrides({"lr": lr, "noise_schedule": rng.choice(["linear", "cosine"])})
        child = MLflowRun(uri, experiment="sweeps", parent_run_id=parent.run_id,
                          tags={"trial_id": f"t{i}", "trial_status": "completed" if i % 2 else "stopped_by_asha"})
        child.log_params(config_params(cfg))
        child.log_metrics({"best/valid/NDCG@10": 10 * lr, "epoch": 4 if i % 2 else 2}, step=1)
        child.finish("FINISHED" if i % 2 else "KILLED")
    parent.set_tags({"trials.completed": 6, "trials.stopped_by_asha": 6})
    parent.finish()
    write_report(uri, tmp_path / "docs")
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "## Sweep: s (beauty)" in md and "12 trials with a validation metric (6 completed, 6 stopped by asha)" in md
    table = md.split("| knob | fANOVA | PED-ANOVA |")[1].split("\n\n")[0]
    assert table.splitlines()[2].startswith("| lr |"), table  # the knob that drives the metric first
    assert "| epochs |" not in table  # a constant is not weighed
    assert (tmp_path / "docs" / "importances_s.png").is_file()
    sweep = json.loads((tmp_path / "docs" / "results.json").read_text())["_sweeps"][0]
    assert sweep["best"]["valid/NDCG@10"] == max(float(r["params"]["lr"]) * 10 for r in [sweep["best"]])
    assert sum(r["fanova"] for r in sweep["importances"]) == pytest.approx(1.0)


def test_the_lambda_ablation_says_whether_the_diffusion_input_helps():
    from diffurec.report import _ablation_finding

    def point(value, valid, test_hr):
        return {"value": value, "label": str(value), "valid/NDCG@10": valid, "test/NDCG@10": valid - 0.01,
                "test/HR@10": test_hr}

    flat = [point(0.0, 0.058, 0.080), point(0.1, 0.057, 0.081), point(1.0, 0.055, 0.085)]
    text = " ".join(_ablation_finding("lambda_mean", flat))
    assert "Best on validation NDCG@10: 0.0 (5.80" in text
    assert "does not improve the ranking" in text and "0.30 points lower" in text and "8.00 to 8.50" in text
    helps = [point(0.0, 0.055, 0.080), point(0.1, 0.058, 0.081), point(1.0, 0.054, 0.085)]
    text = " ".join(_ablation_finding("lambda_mean", helps))
    assert "helps on validation: lambda 0.1" in text and "does not improve" not in text
    assert _ablation_finding("gelu", [point(0.0, 0.05, 0.08)]) == []  # one point: nothing to compare


def test_epochs_split_rows_only_where_they_shape_the_schedule():
    from diffurec.report import main_groups, run_dict

    def run(i, schedule, epochs):
        params = {k: str(v) for k, v in {"model": "diffurec", "lr_schedule": schedule, "epochs": epochs,
                                          "seed": i}.items()}
        return run_dict(f"r{i}", "beauty", "FINISHED", i, {"dataset": "beauty"}, params,
                        {"test/NDCG_at_10": 0.05})

    cosine = main_groups([run(1, "cosine", 12), run(2, "cosine", 40), run(3, "cosine", 40)])
    assert sorted(len(row["runs"]) for row in cosine) == [1, 2]
    # under a constant rate ``epochs`` is only early stopping's cap: one config
    constant = main_groups([run(1, "constant", 12), run(2, "constant", 40)])
    assert [len(row["runs"]) for row in constant] == [2]


def test_bf16_ranked_runs_are_marked_and_never_the_headline(tmp_path):
    """bf16 runs without the float32-ranking tag (their ties counted for the target) get their own
    rows, marked, and lose the headline to float32-ranked runs even with more seeds and a higher
    (inflated) validation."""
    from diffurec.report import headline, main_groups, run_dict, write_report_from_runs
    from diffurec.tracking import RUN_TAGS

    def run(i, tags, valid, precision="bf16"):
        params = {"model": "diffurec", "precision": precision, "seed": str(i)}
        return run_dict(f"r{i}", "beauty", "FINISHED", i, {"dataset": "beauty", **tags}, params,
                        {"test/NDCG_at_10": 0.05, "valid/NDCG_at_10": valid})

    runs = [run(i, {}, 0.06) for i in (1, 2, 3)] + [run(i, RUN_TAGS, 0.05) for i in (4, 5)]
    runs.append(run(6, {}, 0.04, precision="fp32"))  # float32 scores whatever its tags
    rows = main_groups(runs)
    assert sorted((len(r["runs"]), r["bf16_ranked"]) for r in rows) == [(1, False), (2, False), (3, True)]
    assert headline(rows)["beauty"]["diffurec"]["runs"] == ["r4", "r5"]
    write_report_from_runs(runs, tmp_path, "test runs")
    page = (tmp_path / "results.md").read_text()
    marked = [line for line in page.splitlines() if "bf16-ranked †" in line]
    assert len(marked) == 1 and "r1" in marked[0] and "the headline's config" in marked[0]
    assert "† bf16-ranked: evaluated on bf16 scores" in page


def test_rows_differing_only_in_precision_are_compared(tmp_path):
    """bf16 and fp32 rows of one config get a comparison: the difference of the means against the
    larger seed std, and fp32's time per epoch over bf16's. bf16-ranked rows and rows differing in
    another key are left out."""
    from diffurec.report import main_groups, precision_comparisons, run_dict, write_report_from_runs
    from diffurec.tracking import RUN_TAGS

    def run(i, precision, ndcg, seconds, tags=RUN_TAGS, **params):
        p = {"model": "diffurec", "precision": precision, "seed": str(i), **{k: str(v) for k, v in params.items()}}
        return run_dict(f"r{i}", "beauty", "FINISHED", i, {"dataset": "beauty", **tags}, p,
                        {"test/NDCG_at_10": ndcg, "seconds_to_best": seconds, "best_epoch": 10.0})

    bf16 = [run(1, "bf16", 0.045, 700.0), run(2, "bf16", 0.047, 700.0), run(3, "bf16", 0.046, 700.0)]
    fp32 = [run(4, "fp32", 0.0462, 1100.0), run(5, "fp32", 0.0458, 1200.0)]
    others = [run(6, "bf16", 0.06, 1.0, tags={}),  # bf16-ranked: not a comparison
              run(7, "fp32", 0.01, 1.0, lr=0.01)]  # differs in lr too
    rows = main_groups(bf16 + fp32 + others)
    (c,) = precision_comparisons(rows)
    assert c["bf16_runs"] == ["r1", "r2", "r3"] and c["fp32_runs"] == ["r4", "r5"]
    assert c["test_ndcg10_difference"] == pytest.approx(0.046 - 0.046)
    assert c["within_spread"] and c["larger_std"] == pytest.approx(0.001)
    assert c["fp32_over_bf16_time"] == pytest.approx(115.0 / 70.0)
    # a gap larger than both stds is not within the spread
    (far,) = precision_comparisons(main_groups(bf16 + [run(4, "fp32", 0.050, 1100.0), run(5, "fp32", 0.0502, 1100.0)]))
    assert far["within_spread"] is False
    (one,) = precision_comparisons(main_groups(bf16 + fp32[:1]))
    assert one["within_spread"] is None  # one fp32 seed: no spread to be within
    write_report_from_runs(bf16 + fp32 + others, tmp_path, "test runs")
    page = (tmp_path / "results.md").read_text()
    assert "## Precision: bf16 autocast against fp32" in page
    line = next(ln for ln in page.splitlines() if ln.startswith("| beauty | diffurec | 4.60"))
    assert "| yes |" in line and "| 1.64x |" in line
    assert json.loads((tmp_path / "results.json").read_text())["_precision"][0]["within_spread"] is True
    # with metric histories, time per epoch is each run's median epoch: an epoch slowed by a
    # neighbour on the machine does not move it
    seconds = {"train/seconds": [(1, 100.0), (2, 300.0), (3, 110.0), (4, 120.0)]}
    timed = run_dict("r9", "beauty", "FINISHED", 9, {"dataset": "beauty"}, {"model": "diffurec"},
                     {"test/NDCG_at_10": 0.05}, lambda key: seconds.get(key, []))
    assert timed["metrics"]["epoch_seconds_median"] == 115.0


def test_rows_differing_only_in_training_protocol_are_compared_for_time_to_quality(tmp_path):
    """A shorter protocol is set against a longer one of the same config: the difference of the
    mean test NDCG@10 against the larger seed std, and the epochs each trained (from the runs'
    histories). The goal is met within one std in at most a third of the epochs."""
    from diffurec.report import main_groups, protocol_comparisons, run_dict, write_report_from_runs
    from diffurec.tracking import RUN_TAGS

    def run(i, ndcg, epochs_trained, best_epoch, **params):
        p = {"model": "diffurec", "precision": "bf16", "seed": str(i), **{k: str(v) for k, v in params.items()}}
        seconds = {"train/seconds": [(e, 60.0) for e in range(1, epochs_trained + 1)]}
        return run_dict(f"r{i}", "beauty", "FINISHED", i, {"dataset": "beauty", **RUN_TAGS}, p,
                        {"test/NDCG_at_10": ndcg, "seconds_to_best": 60.0 * best_epoch, "best_epoch": float(best_epoch)},
                        lambda key: seconds.get(key, []))

    cosine = dict(epochs=40, lr_schedule="cosine", eval_every=2, patience=100, reverse_steps=4)
    step = dict(epochs=500, lr_schedule="step", lr_step_epochs=100, lr_gamma=0.1, eval_every=20, patience=5,
                stop_on="any_metric")
    fast = [run(1, 0.0458, 40, 34, **cosine), run(2, 0.0462, 40, 30, **cosine), run(3, 0.0460, 40, 38, **cosine)]
    reference = [run(4, 0.0465, 220, 120, **step), run(5, 0.0470, 240, 140, **step), run(6, 0.0460, 320, 220, **step)]
    other = [run(7, 0.01, 40, 40, lr=0.01, **cosine)]  # differs in lr too: not a protocol comparison
    (c,) = protocol_comparisons(main_groups(fast + reference + other))
    assert c["short_runs"] == ["r1", "r2", "r3"] and c["long_runs"] == ["r4", "r5", "r6"]
    assert c["epochs_trained"] == {"short": 40.0, "long": pytest.approx(260.0)}
    assert c["long_over_short_epochs"] == pytest.approx(6.5)
    assert c["test_ndcg10_difference"] == pytest.approx(0.046 - 0.0465)
    assert c["within_one_std"] is True and c["meets_goal"] is True
    assert c["seconds_to_best"] == {"short": pytest.approx(60.0 * 34), "long": pytest.approx(60.0 * 160)}
    # more than one std below the longer protocol: not the same quality
    worse = [run(1, 0.0400, 40, 34, **cosine), run(2, 0.0402, 40, 30, **cosine)]
    (c,) = protocol_comparisons(main_groups(worse + reference))
    assert c["within_one_std"] is False and c["meets_goal"] is False
    # the same quality but not a third of the epochs
    long_cosine = dict(cosine, epochs=120)
    slow = [run(1, 0.0460, 120, 100, **long_cosine), run(2, 0.0462, 120, 110, **long_cosine)]
    (c,) = protocol_comparisons(main_groups(slow + reference))
    assert c["within_one_std"] is True and c["meets_goal"] is False
    write_report_from_runs(fast + reference + other, tmp_path, "test runs")
    page = (tmp_path / "results.md").read_text()
    assert "## Time to quality: training protocols" in page
    line = next(ln for ln in page.splitlines() if ln.startswith("| beauty | diffurec | cosine to 0 at epoch 40")
                and "x0.1 every 100 epochs" in ln)
    assert "| -0.05 |" in line and "| 6.5x | yes |" in line
    assert json.loads((tmp_path / "results.json").read_text())["_protocols"][0]["meets_goal"] is True
