"""The reference code's training protocol and Transformer behaviours, each as a config option."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffurec.config import Config
from diffurec.data.sequences import sequence_data_from_tables
from diffurec.data.split import split_log
from diffurec.data.synthetic import generate_synthetic_log
from diffurec.errors import DiffuRecError
from diffurec.models import approximator, build_model
from diffurec.training import LoopState, fit, make_lr_scheduler, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["hidden_size=32", "num_blocks=2", "num_heads=2", "max_len=20", "diffusion_steps=8", "reverse_steps=4",
        "batch_size=64", "eval_batch_size=256", "lr=0.005"]


def tiny(*sets):
    return Config().with_sets(TINY + list(sets))


@pytest.fixture(scope="module")
def data():
    res = split_log(generate_synthetic_log(num_users=300, num_items=60, mean_length=10, seed=1))
    return sequence_data_from_tables(res.sequences, int(res.items.num_rows), res.stats)


def lrs_by_epoch(cfg, steps_per_epoch):
    model = build_model(tiny(), 10)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_lr_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [lrs[e * steps_per_epoch:(e + 1) * steps_per_epoch] for e in range(cfg.epochs)]


def test_step_schedule_is_steplr_by_epoch():
    cfg = tiny("lr=0.001", "epochs=7", "lr_schedule=step", "lr_step_epochs=3", "lr_gamma=0.1")
    by_epoch = lrs_by_epoch(cfg, steps_per_epoch=4)
    # constant within an epoch, divided by 10 at epochs 3 and 6 (0-based), as StepLR(3, 0.1)
    expected = [0.001 * 0.1 ** (e // 3) for e in range(7)]
    for lrs, want in zip(by_epoch, expected):
        assert all(math.isclose(lr, want, rel_tol=1e-9) for lr in lrs)


@pytest.mark.parametrize("sets,match", [
    (["lr_schedule=exponential"], "lr_schedule"),
    (["lr_step_epochs=0"], "lr_step_epochs"),
    (["lr_gamma=0"], "lr_gamma"),
    (["lr_gamma=1.5"], "lr_gamma"),
    (["stop_on=loss"], "stop_on"),
    (["gelu=relu"], "gelu"),
    (["dropout_placement=everywhere"], "dropout_placement"),
    (["layer_norm_eps=0"], "layer_norm_eps"),
    (["linear_init=kaiming"], "linear_init"),
])
def test_bad_values_name_the_key(sets, match):
    with pytest.raises(DiffuRecError, match=match):
        Config().with_sets(sets)


def test_reference_protocol_preset():
    cfg = Config.from_yaml(ROOT / "configs" / "reference_protocol.yaml")
    assert (cfg.epochs, cfg.eval_every, cfg.patience * cfg.eval_every) == (500, 20, 100)
    assert (cfg.lr_schedule, cfg.lr_step_epochs, cfg.lr_gamma, cfg.stop_on) == ("step", 100, 0.1, "any_metric")
    # the model is left at the defaults
    assert cfg.hidden_size == Config().hidden_size and cfg.lr == Config().lr


def test_ml1m_preset_matches_the_headline_protocols_optimiser_steps():
    """ML-1M's preset is the headline protocol with the epochs scaled by training prefixes
    (982,089 against Beauty's 131,413), the rest of the protocol unchanged."""
    ml1m = Config.from_yaml(ROOT / "configs" / "ml1m_protocol.yaml")
    beauty = Config.from_yaml(ROOT / "configs" / "fast_protocol.yaml")
    assert (ml1m.lr_schedule, ml1m.reverse_steps, ml1m.batch_size) == (beauty.lr_schedule, beauty.reverse_steps, beauty.batch_size)
    assert ml1m.patience * ml1m.eval_every >= ml1m.epochs  # no early stop, as in the headline
    steps = {name: cfg.epochs * -(-prefixes // cfg.batch_size)
             for name, cfg, prefixes in (("ml1m", ml1m, 982_089), ("beauty", beauty, 131_413))}
    assert 0.9 <= steps["ml1m"] / steps["beauty"] <= 1.2


def test_stop_on_any_metric_keeps_training_while_another_metric_improves(data, tmp_path, monkeypatch):
    """NDCG@10 peaks at the first evaluation while HR@20 keeps rising: selection stops after
    `patience` evaluations, any_metric trains on; best.pt stays the NDCG@10 best in both."""
    calls = {"n": 0}

    def fake_valid(model):
        calls["n"] += 1
        n = calls["n"]
        return {"NDCG@10": 0.5 if n == 1 else 0.4, "HR@20": 0.1 * n}

    results = {}
    for rule in ("selection", "any_metric"):
        calls["n"] = 0
        cfg = tiny("epochs=6", "patience=2", f"stop_on={rule}")
        results[rule] = fit(cfg, data, tmp_path / rule, evaluate_valid=fake_valid, progress=False)
    assert results["selection"]["epochs"] == 3 and results["any_metric"]["epochs"] == 6
    assert results["selection"]["best_epoch"] == results["any_metric"]["best_epoch"] == 1


def test_loop_state_of_an_older_checkpoint_resumes():
    # checkpoints written before stop_on existed hold no best_each
    state = LoopState(**{"epoch": 3, "best_metric": 0.1, "best_epoch": 2, "best_valid": {}, "evals_since_best": 1,
                         "seconds": 1.0, "seconds_to_best": 0.5})
    assert state.best_each == {}


def test_reference_block_options():
    opts = approximator.BlockOptions.from_config(
        tiny("gelu=tanh", "dropout_placement=reference", "layer_norm_eps=1e-12", "linear_init=xavier"))
    assert opts == approximator.BlockOptions.reference()
    torch.manual_seed(0)
    block = approximator.Block(hidden=32, heads=4, dropout=0.1, options=opts)
    assert block.norm_attn.eps == block.norm_ffn.eps == 1e-12 and block.extra_dropout is not None
    # Xavier-normal: std sqrt(2 / (fan_in + fan_out)) on the feed-forward and output weights
    for layer, (fan_in, fan_out) in ((block.ffn[0], (32, 128)), (block.ffn[2], (128, 32)), (block.out, (32, 32))):
        want = math.sqrt(2 / (fan_in + fan_out))
        assert abs(layer.weight.std().item() - want) < 0.15 * want
    # the reference block is the default; the project's keeps torch's init (uniform, bound
    # 1/sqrt(fan_in)) and no extra dropout
    assert approximator.BlockOptions() == approximator.BlockOptions.from_config(Config()) == opts
    plain = approximator.Block(hidden=32, heads=4, dropout=0.1, options=approximator.BlockOptions.project())
    assert plain.ffn[0].weight.abs().max() <= 32 ** -0.5 and plain.extra_dropout is None
    assert approximator.BlockOptions.project() == approximator.BlockOptions.from_config(
        tiny("gelu=exact", "dropout_placement=residual", "layer_norm_eps=1e-5", "linear_init=torch"))


def test_tanh_gelu_is_used_in_training_and_inference():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32)
    outs = {}
    for gelu in ("exact", "tanh"):
        torch.manual_seed(1)
        block = approximator.Block(hidden=32, heads=4, dropout=0.0,
                                   options=approximator.BlockOptions(gelu=gelu)).eval()
        with torch.no_grad():
            outs[gelu] = block(x, None)
        # the feed-forward alone against F.gelu with that approximation
        h = block.norm_ffn(x)
        want = F.gelu(block.ffn[0](h), approximate="tanh" if gelu == "tanh" else "none")
        with torch.no_grad():
            got = approximator.linear(h, block.ffn[0], gelu=True, approximate=block.gelu_approximate)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs["exact"], outs["tanh"])


def test_reference_dropout_drops_the_block_output_in_training_only():
    torch.manual_seed(0)
    block = approximator.Block(hidden=32, heads=4, dropout=0.5,
                               options=approximator.BlockOptions(reference_dropout=True)).train()
    out = block(torch.randn(4, 6, 32), None)
    # the block's output dropout zeroes whole entries of the residual stream
    assert (out == 0).float().mean() > 0.3
    block.eval()
    assert (block(torch.randn(4, 6, 32), None) == 0).float().mean() < 0.01


@pytest.mark.parametrize("model", ["diffurec", "sasrec"])
def test_ce_padding_column_adds_the_padding_row_to_the_softmax(model):
    torch.manual_seed(0)
    cfg = tiny(f"model={model}", "dropout=0", "emb_dropout=0", "lambda_std=0", "ce_padding_column=false")
    net = build_model(cfg, 20).train()
    rep = torch.randn(6, 32)
    target = torch.randint(1, 21, (6,))
    plain = net.cross_entropy(rep, target)
    with torch.no_grad():
        net.item_embeddings.weight[0] = torch.randn(32)
    net.ce_padding_column = True
    with_pad = net.cross_entropy(rep, target)
    scores = rep @ net.item_embeddings.weight.t()
    torch.testing.assert_close(with_pad, F.cross_entropy(scores, target, reduction="none"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, F.cross_entropy(scores[:, 1:], target - 1, reduction="none"),
                               atol=1e-5, rtol=1e-5)
    # the padding row is trained through this loss
    with_pad.sum().backward()
    assert net.item_embeddings.weight.grad[0].abs().sum() > 0


def test_reference_options_train_end_to_end(data, tmp_path):
    cfg = tiny("epochs=2", "gelu=tanh", "dropout_placement=reference", "layer_norm_eps=1e-12",
               "linear_init=xavier", "ce_padding_column=true", "lr_schedule=step", "lr_step_epochs=1")
    result = fit(cfg, data, tmp_path / "run", progress=False)
    assert result["epochs"] == 2 and math.isfinite(result["best_valid"]["NDCG@10"])
