import numpy as np
import pytest
import torch

from diffurec.config import Config
from diffurec.data.batches import (
    BUCKET_WINDOW,
    iterate_batches,
    iterate_window_batches,
    pad_histories,
    token_budget_order,
)
from diffurec.data.sequences import eval_examples, sequence_data_from_tables, train_examples
from diffurec.data.split import split_log
from diffurec.data.synthetic import generate_synthetic_log
from diffurec.errors import DiffuRecError
from diffurec.metrics import RankingMetrics, target_ranks
from diffurec.models import build_model
from diffurec.training import (
    EVAL_BATCHING,
    autocast,
    bucketing_rng,
    eval_batch_order,
    eval_batching,
    evaluate,
    fit,
    load_checkpoint,
)
from diffurec.training import test_best as evaluate_best

TINY = ["hidden_size=32", "num_blocks=2", "num_heads=2", "max_len=20", "diffusion_steps=8", "reverse_steps=8",
        "batch_size=64", "eval_batch_size=256", "lr=0.005"]


@pytest.fixture(scope="module")
def data():
    res = split_log(generate_synthetic_log(num_users=600, num_items=100, mean_length=12, seed=0))
    return sequence_data_from_tables(res.sequences, int(res.items.num_rows), res.stats)


def tiny(*sets):
    return Config().with_sets(TINY + list(sets))


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
@pytest.mark.parametrize("positional", [False, True])
def test_padding_invariance(data, model, positional):
    """The same history padded to 10 or to 50 gives the same scores (eval, deterministic reverse)."""
    cfg = tiny(f"model={model}", f"positional_embedding={positional}", "max_len=50")
    torch.manual_seed(0)
    net = build_model(cfg, data.num_items).eval()
    ex = eval_examples(data, "test", 8)
    start, end = ex.start[:16], ex.end[:16]
    x_T = torch.randn(16, cfg.hidden_size)
    scores = []
    for pad in (10, 50):
        history = torch.from_numpy(pad_histories(data.items, start, end, pad_to=pad))
        assert history.shape == (16, pad) and (history[:, 0] == 0).all()
        kwargs = {"deterministic": True, "x_T": x_T} if model == "diffurec" else {}
        scores.append(net.score(net.predict(history, **kwargs)))
    assert torch.allclose(scores[0], scores[1], atol=1e-5)


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
def test_bucketed_and_unbucketed_batches_give_the_same_loss(data, model):
    """Quality guard for the length bucketing: same examples, same loss (eval mode, fixed noise)."""
    cfg = tiny(f"model={model}", "lambda_std=0")
    torch.manual_seed(0)
    net = build_model(cfg, data.num_items).eval()
    ex = train_examples(data, cfg.max_len)
    idx = np.arange(256)
    t = torch.randint(0, cfg.diffusion_steps, (len(idx),))
    noise = torch.randn(len(idx), cfg.hidden_size)

    def total_loss(bucket, pad_to):
        losses = torch.zeros(len(idx))
        for batch in iterate_batches(data.items, ex.start[idx], ex.end[idx], 64, rng=np.random.default_rng(1),
                                     bucket=bucket, pad_to=pad_to, with_index=True):
            i = torch.from_numpy(batch["index"])
            extra = {"t": t[i], "noise": noise[i]} if model == "diffurec" else {}
            with torch.no_grad():
                losses[i] = net(batch["history"], batch["target"], **extra)["losses"]
        return losses

    bucketed = total_loss(True, None)
    padded_to_max = total_loss(False, cfg.max_len)
    assert torch.allclose(bucketed, padded_to_max, atol=1e-4)


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
def test_label_smoothing_is_the_models_training_loss(data, model):
    """Both models' losses follow label_smoothing: torch's smoothed cross-entropy of their scores
    over every softmax column (the padding id's row included, as ce_padding_column keeps it)."""
    torch.manual_seed(0)
    net = build_model(tiny(f"model={model}", "lambda_std=0"), data.num_items).eval()
    smoothed = build_model(tiny(f"model={model}", "lambda_std=0", "label_smoothing=0.3"), data.num_items).eval()
    smoothed.load_state_dict(net.state_dict())
    ex = train_examples(data, 20)
    history = torch.from_numpy(pad_histories(data.items, ex.start[:32], ex.end[:32], pad_to=20))
    target = torch.from_numpy(data.items[ex.end[:32]]).long()
    extra = {"t": torch.randint(0, 8, (32,)), "noise": torch.randn(32, 32)} if model == "diffurec" else {}
    with torch.no_grad():
        plain = net(history, target, **extra)["losses"]
        got = smoothed(history, target, **extra)["losses"]
    rep = smoothed.approximator(*smoothed.embed_history(history), smoothed.diffusion.q_sample(
        smoothed.item_embeddings(target), extra["t"], extra["noise"]), extra["t"]) if model == "diffurec" \
        else smoothed.encode(history)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(rep @ smoothed.item_embeddings.weight.t(), target,
                                                 reduction="none", label_smoothing=0.3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(got, plain)


def test_attend_to_padding_changes_scores(data):
    """The reference's attention to padding is kept as an option (for the ablation)."""
    torch.manual_seed(0)
    net = build_model(tiny(), data.num_items).eval()
    ref = build_model(tiny("attend_to_padding=true"), data.num_items).eval()
    ref.load_state_dict(net.state_dict())
    history = torch.from_numpy(pad_histories(data.items, np.array([0]), np.array([3]), pad_to=10))
    x_T = torch.randn(1, 32)
    a = net.score(net.predict(history, deterministic=True, x_T=x_T))
    b = ref.score(ref.predict(history, deterministic=True, x_T=x_T))
    assert not torch.allclose(a, b)


def test_reverse_steps_fewer_steps_and_averaged_samples(data):
    torch.manual_seed(0)
    net = build_model(tiny(), data.num_items).eval()
    calls = []
    original = net.approximator.forward
    net.approximator.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    history = torch.from_numpy(pad_histories(data.items, np.array([0, 5]), np.array([4, 9])))
    for S in (1, 2, 8):
        calls.clear()
        out = net.predict(history, reverse_steps=S)
        assert out.shape == (2, 32) and len(calls) == S


def test_token_budget_batches_cover_every_user_once_within_budget():
    # many short histories, a spread, and a block at the length cap
    lengths = np.concatenate([np.full(3000, 2), np.random.default_rng(0).integers(1, 51, size=2000), np.full(300, 50)])
    for max_users, max_tokens, pad_to in [(2048, 6144, None), (100, 6144, None), (2048, 30, None),
                                          (2048, 6144, 50)]:
        batches = token_budget_order(lengths, max_users, max_tokens, pad_to)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(lengths)))
        padded = [max(int(lengths[b].max()), pad_to or 0) for b in batches]
        assert padded == sorted(padded)  # ascending lengths: each batch pads only to its own longest
        for b, L in zip(batches, padded):
            assert 1 <= len(b) <= max_users
            assert len(b) == 1 or len(b) * L <= max_tokens
        sizes = [len(b) for b in batches]
        assert sum(sizes) == len(lengths)
    # short histories share big batches, long ones small ones
    batches = token_budget_order(lengths, 2048, 6144)
    assert len(batches[0]) == 2048
    assert max(len(b) for b in batches if lengths[b].max() == 50) == 6144 // 50


@pytest.mark.parametrize("model,exclude_history", [("diffurec", False), ("diffurec", True), ("sasrec", False)])
def test_evaluation_metrics_do_not_depend_on_the_batching(data, model, exclude_history):
    """Token-budget batches (several sizes), fixed batches, and scoring in row chunks all give
    the same metrics when the reverse process draws nothing."""
    torch.manual_seed(0)
    cfg = tiny(f"model={model}", "deterministic_reverse=true", "lambda_std=0", f"exclude_history={exclude_history}")
    net = build_model(cfg, data.num_items).eval()
    results = [evaluate(net, data, "valid", cfg.with_overrides(sets), torch.device("cpu"))
               for sets in ({"eval_batch_tokens": 0, "eval_batch_size": 1000},
                            {"eval_batch_tokens": 0, "eval_batch_size": 7},
                            {"eval_batch_tokens": 40, "eval_batch_size": 2048},
                            {"eval_batch_tokens": 6144, "eval_batch_size": 2048})]
    for got in results[1:]:
        assert got == pytest.approx(results[0], abs=1e-9)
    assert results[0]["HR@20"] > 0


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
def test_bf16_evaluation_ranks_on_float32_scores(data, model):
    """Under bf16 autocast the scores against all items stay float32: an item 0.01 above the
    target outranks it. In bf16 both scores round to 10.0, and the tie would count for the target."""
    net = build_model(tiny(f"model={model}"), data.num_items).eval()
    with torch.no_grad():
        net.item_embeddings.weight.zero_()
        net.item_embeddings.weight[1, 0] = 10.0  # item 1, the target
        net.item_embeddings.weight[2, 0] = 10.01
    rep = torch.zeros(1, net.item_embeddings.weight.shape[1])
    rep[0, 0] = 1.0
    target = torch.tensor([1])
    items = net.item_matrix()
    with autocast(torch.device("cpu"), "bf16"):
        scores = net.score(rep, items)
    assert scores.dtype == torch.float32
    assert target_ranks(scores, target).item() == 2
    in_bf16 = (rep.bfloat16() @ items.bfloat16().t()).float()  # the tie this guards against
    assert target_ranks(in_bf16, target).item() == 1


def test_evaluation_batching_defaults_by_device_and_keeps_what_is_set(data):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # the rule reads the device type only
    default = Config()
    assert eval_batching(default, cpu) == (2048, 6144)  # token budget: batches that fit the caches
    assert eval_batching(default, cuda) == (4096, 0)  # wide fixed batches for a GPU
    for sets in ({"eval_batch_size": 300}, {"eval_batch_tokens": 0}, {"eval_batch_tokens": 500, "eval_batch_size": 9}):
        cfg = default.with_overrides(sets)
        for device in (cpu, cuda):
            users, tokens = eval_batching(cfg, device)
            assert users == sets.get("eval_batch_size", EVAL_BATCHING[device.type][0])
            assert tokens == sets.get("eval_batch_tokens", EVAL_BATCHING[device.type][1])
    # the GPU's batches: 4,096 users each (the last one the rest), whatever their lengths; the
    # CPU's: fewer users where histories are long
    lengths = np.random.default_rng(0).integers(1, 51, 10000)
    assert [len(b) for b in eval_batch_order(lengths, default, cuda)] == [4096, 4096, 1808]
    assert max(len(b) for b in eval_batch_order(lengths, default, cpu) if lengths[b].max() == 50) == 6144 // 50
    with pytest.raises(DiffuRecError, match="eval_batch_tokens"):
        default.with_overrides({"eval_batch_tokens": -2})
    with pytest.raises(DiffuRecError, match="eval_batch_size"):
        default.with_overrides({"eval_batch_size": -1})


def popularity_metrics(data):
    ex = train_examples(data, 20)
    counts = np.bincount(data.items[ex.end], minlength=data.num_items + 1)[1:]
    test = eval_examples(data, "test", 20)
    m = RankingMetrics()
    scores = torch.tensor(counts, dtype=torch.float).expand(len(test.end), -1)
    m.update(target_ranks(scores, torch.from_numpy(data.items[test.end])))
    return m.compute()


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
def test_short_training_beats_popularity(data, model, tmp_path):
    cfg = tiny(f"model={model}", "epochs=6", "patience=3")
    result = fit(cfg, data, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "latest.pt").is_file()
    test = evaluate_best(tmp_path / "run", data, torch.device("cpu"))
    popular = popularity_metrics(data)
    assert result["best_epoch"] >= 1
    assert test["HR@10"] > popular["HR@10"] + 0.2, (test, popular)


def test_training_is_seeded_and_reproducible(data, tmp_path):
    cfg = tiny("epochs=2")
    a = fit(cfg, data, tmp_path / "a", progress=False)
    b = fit(cfg, data, tmp_path / "b", progress=False)
    assert a["best_valid"] == b["best_valid"]
    ma, _, _ = load_checkpoint(tmp_path / "a")
    mb, _, _ = load_checkpoint(tmp_path / "b")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_continues_from_latest(data, tmp_path):
    cfg = tiny("epochs=3")
    full = fit(cfg, data, tmp_path / "full", progress=False)
    fit(tiny("epochs=2"), data, tmp_path / "part", progress=False)
    latest = torch.load(tmp_path / "part" / "latest.pt", weights_only=False)
    resumed = fit(cfg, data, tmp_path / "part", resume_from=latest, progress=False)
    assert resumed["epochs"] == 3
    assert resumed["best_valid"]["NDCG@10"] == pytest.approx(full["best_valid"]["NDCG@10"], abs=1e-6)


def test_position_init_std(data):
    default = build_model(tiny("positional_embedding=true"), data.num_items).position_embeddings.weight
    items_scale = build_model(tiny("positional_embedding=true", "position_init_std=0"), data.num_items)
    assert abs(default.std().item() - 1.0) < 0.05  # torch's nn.Embedding draw, as older runs had
    assert abs(items_scale.position_embeddings.weight.std().item() - 32**-0.5) < 0.02
    from diffurec.errors import DiffuRecError
    with pytest.raises(DiffuRecError, match="position_init_std"):
        tiny("position_init_std=-1")


def test_workers_bucketing_with_the_shared_rng_finish_each_step_together():
    """DDP workers bucket different shards; with ``bucketing_rng`` (no rank in it) step k of every
    worker holds the same length quantile of its window, so no worker waits at the all-reduce
    for a much longer batch. Per-rank streams (what the Ray worker used to draw) do not."""
    g = np.random.default_rng(0)
    lengths = np.minimum(1 + g.geometric(0.12, size=2 * 16 * BUCKET_WINDOW * 3), 50)  # long tail
    ends = np.cumsum(lengths)
    items = np.arange(1, ends[-1] + 2)
    shards = [(ends[r::2] - lengths[r::2], ends[r::2]) for r in range(2)]

    def step_lengths(rngs):
        return np.array([[b["history"].shape[1] for b in iterate_window_batches(
            items, [(start[i:i + 16 * BUCKET_WINDOW], end[i:i + 16 * BUCKET_WINDOW])
                    for i in range(0, len(end), 16 * BUCKET_WINDOW)], 16, rng=rng)]
            for (start, end), rng in zip(shards, rngs)])

    shared = step_lengths([bucketing_rng(42, 3), bucketing_rng(42, 3)])
    per_rank = step_lengths([np.random.default_rng([42, 3, r, 1]) for r in range(2)])
    # time of a step ~ its longest batch: the slowest worker's sum over the mean worker's
    waste = lambda L: L.max(0).sum() / L.mean(0).sum() - 1  # noqa: E731
    assert shared.shape == per_rank.shape == (2, 3 * BUCKET_WINDOW)
    assert waste(shared) < 0.05 < 0.3 < waste(per_rank)


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_native_bf16(monkeypatch):
    """``precision=auto`` autocasts to bf16 where bf16 is native (a GPU; AVX512-BF16 or AMX on a
    CPU), where it trains to the same quality as fp32 (docs/results.md, "Precision"), and keeps
    fp32 on CPUs that would only emulate bf16; explicit precisions are kept everywhere."""
    from diffurec import machine
    from diffurec.training import autocast_dtype, precision_used

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(machine, "native_bf16_cpu", lambda native=native: native)
        assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
        assert precision_used(cpu) == ("bf16" if native else "fp32")
        assert autocast_dtype(cuda, "auto") == torch.bfloat16
        assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cuda, "fp32") is None
        assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.undo()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the detection against")
    if "avx512_bf16" in flags:
        assert machine.native_bf16_cpu()
    if not any(f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile")):
        assert not machine.native_bf16_cpu()


def test_bf16_on_a_cpu_without_native_bf16_trains_evaluates_and_says_it_is_emulated(data, tmp_path, monkeypatch,
                                                                                  capsys):
    """An explicit ``precision=bf16`` is kept on a CPU that only emulates bf16 (AVX2): training
    and the best checkpoint's evaluation both run, and the run says why it is slow. The fused
    oneDNN linear of inference is used only in dtypes this CPU runs it in (test_kernels)."""
    from diffurec import machine

    monkeypatch.setattr(machine, "native_bf16_cpu", lambda: False)
    fit(tiny("epochs=1", "precision=bf16"), data, tmp_path / "run", progress=False)
    assert "PyTorch emulates it" in capsys.readouterr().err
    test = evaluate_best(tmp_path / "run", data, torch.device("cpu"))
    assert 0 < test["HR@10"] <= 1
    fit(tiny("epochs=1", "precision=fp32"), data, tmp_path / "fp32", progress=False)
    assert "emulates" not in capsys.readouterr().err
