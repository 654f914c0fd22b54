"""The CPU fast paths compute what the plain torch ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffurec.models import approximator
from diffurec.models.approximator import attend, attention_mask
from diffurec.models.dropout import Dropout, dropout, keep_mask, scaled_keep_mask
from diffurec.models.losses import full_cross_entropy


@pytest.mark.parametrize("length", [1, 5, 20, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_sdpa(length, dtype):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(6, 2, length, 8, generator=g).to(dtype) for _ in range(3))
    valid = torch.ones(6, length, dtype=torch.bool)
    valid[0, : length - 1] = False  # left padding, one real item
    valid[1, : length // 2] = False
    mask = attention_mask(valid, causal=False, length=length, device="cpu")
    got = attend(q, k, v, mask, 0.0)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # the last query row alone (the final block) gives the same row
    last = attend(q[:, :, -1:], k, v, mask[:, :, -1:], 0.0)
    torch.testing.assert_close(last.float(), got[:, :, -1:].float(), atol=tol, rtol=tol)


def test_keep_mask_rate_and_seeding():
    torch.manual_seed(0)
    a = keep_mask(torch.Size([400, 500]), 0.3)
    torch.manual_seed(0)
    b = keep_mask(torch.Size([400, 500]), 0.3)
    c = keep_mask(torch.Size([400, 500]), 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)  # fixed by torch's seed, fresh per call
    assert abs(a.float().mean().item() - 0.7) < 0.005  # 200k draws: std 0.001


def test_dropout_forward_backward_and_eval():
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert 0.6 < kept.float().mean().item() < 0.9
    m = Dropout(0.25).eval()
    assert m(x) is x  # identity in eval
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_scaled_mask_matches_keep_mask_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(3)
        keep = keep_mask(torch.Size([30, 40]), 0.2)
        torch.manual_seed(3)
        scaled = scaled_keep_mask(torch.Size([30, 40]), 0.2, dtype)
        assert scaled.dtype == dtype
        assert torch.equal(scaled != 0, keep)
        torch.testing.assert_close(scaled[keep].float(), torch.full((int(keep.sum()),), 1 / 0.8),
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.5, True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, y != 0)  # gradient flows exactly where the input was kept


def _ce_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    rep = (torch.randn(64, 16, generator=g) * 2).to(dtype).requires_grad_()
    items = torch.randn(300, 16, generator=g).to(dtype).requires_grad_()
    target = torch.randint(0, 300, (64,), generator=g)
    weights = torch.rand(64, generator=g)  # per-example upstream gradients, as a sampler gives
    return rep, items, target, weights


def test_full_cross_entropy_matches_autograd_float32():
    rep, items, target, weights = _ce_inputs(torch.float32)
    got = full_cross_entropy(rep, items, target)
    (got * weights).mean().backward()
    got_grads = rep.grad.clone(), items.grad.clone()
    rep.grad = items.grad = None
    want = F.cross_entropy(rep @ items.t(), target, reduction="none")
    (want * weights).mean().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads, (rep.grad, items.grad), atol=1e-6, rtol=1e-5)


def test_full_cross_entropy_bf16_matches_float32_log_softmax_path():
    # the path it replaced: bf16 scores, log-softmax upcast to float32, nll_loss
    rep, items, target, weights = _ce_inputs(torch.bfloat16)
    got = full_cross_entropy(rep, items, target)
    assert got.dtype == torch.float32
    (got * weights).mean().backward()
    got_grads = rep.grad.clone(), items.grad.clone()
    rep.grad = items.grad = None
    want = F.nll_loss(F.log_softmax(rep @ items.t(), -1, dtype=torch.float32), target, reduction="none")
    (want * weights).mean().backward()
    # losses from the bf16-stored softmax: p within 2^-9 relative, so -log p within ~0.004
    torch.testing.assert_close(got, want, atol=5e-3, rtol=0)
    for a, b in zip(got_grads, (rep.grad, items.grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_full_cross_entropy_label_smoothing_matches_torch(smoothing):
    rep, items, target, weights = _ce_inputs(torch.float32)
    got = full_cross_entropy(rep, items, target, smoothing)
    (got * weights).mean().backward()
    got_grads = rep.grad.clone(), items.grad.clone()
    rep.grad = items.grad = None
    want = F.cross_entropy(rep @ items.t(), target, reduction="none", label_smoothing=smoothing)
    (want * weights).mean().backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_grads, (rep.grad, items.grad), atol=1e-6, rtol=1e-5)
    # and it is a different objective from the one-hot one
    assert not torch.allclose(got, F.cross_entropy(rep @ items.t(), target, reduction="none"))


def test_full_cross_entropy_label_smoothing_bf16_gradients_track_float32():
    rep, items, target, weights = _ce_inputs(torch.bfloat16)
    got = full_cross_entropy(rep, items, target, 0.2)
    (got * weights).mean().backward()
    got_grads = rep.grad.clone(), items.grad.clone()
    rep32, items32 = rep.detach().float().requires_grad_(), items.detach().float().requires_grad_()
    want = F.cross_entropy(rep32 @ items32.t(), target, reduction="none", label_smoothing=0.2)
    (want * weights).mean().backward()
    # bf16 scores: within 2^-8 relative of float32's, and the losses here are about 10-20 nats
    torch.testing.assert_close(got, want, atol=5e-3, rtol=8e-3)
    for a, b in zip(got_grads, (rep32.grad, items32.grad)):
        torch.testing.assert_close(a.float(), b, atol=1e-3, rtol=2e-2)


def test_full_cross_entropy_rejects_bad_label_smoothing():
    rep, items, target, _ = _ce_inputs(torch.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        full_cross_entropy(rep, items, target, 1.0)


def test_full_cross_entropy_rejects_mixed_dtypes():
    rep, items, target, _ = _ce_inputs(torch.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        full_cross_entropy(rep, items.detach().bfloat16(), target)


def test_full_cross_entropy_refuses_a_second_backward():
    rep, items, target, _ = _ce_inputs(torch.float32)
    loss = full_cross_entropy(rep, items, target).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.skipif(not approximator._HAS_FUSED_LINEAR, reason="this torch build has no oneDNN fused linear")
def test_fused_inference_linear_matches_plain_path(monkeypatch):
    torch.manual_seed(0)
    block = approximator.Block(hidden=32, heads=4, dropout=0.1).eval()
    x = torch.randn(5, 7, 32)
    valid = torch.ones(5, 7, dtype=torch.bool)
    valid[0, :4] = False
    mask = attention_mask(valid, causal=False, length=7, device="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_fused = torch.bfloat16 in approximator.FUSED_DTYPES
        assert approximator._fusable(x) == (torch.bfloat16 if bf16_fused else None)
        fused = block(x, mask, last_only=True)
        monkeypatch.setattr(approximator, "_HAS_FUSED_LINEAR", False)
        plain = block(x, mask, last_only=True)
    # both round to bf16 at the same points; the fused op keeps the pre-GELU sum in float32
    torch.testing.assert_close(fused.float(), plain.float(), atol=3e-2, rtol=3e-2)
    assert (fused.float() - plain.float()).abs().mean() < 2e-3
    # float32 inference is fused too, and agrees to float32 rounding (another summation order)
    monkeypatch.setattr(approximator, "_HAS_FUSED_LINEAR", True)
    with torch.no_grad():
        assert approximator._fusable(x) == torch.float32
        fused32 = block(x, mask, last_only=True)
        monkeypatch.setattr(approximator, "_HAS_FUSED_LINEAR", False)
        plain32 = block(x, mask, last_only=True)
    torch.testing.assert_close(fused32, plain32, atol=1e-5, rtol=1e-5)
    # training (an autograd graph) always takes the plain path
    monkeypatch.setattr(approximator, "_HAS_FUSED_LINEAR", True)
    assert approximator._fusable(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert approximator._fusable(x) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_weights_give_the_same_outputs_and_are_dropped_on_exit(dtype):
    if dtype not in approximator.FUSED_DTYPES:
        pytest.skip(f"oneDNN's fused linear does not run in {dtype} on this CPU or torch build")
    torch.manual_seed(0)
    stack = approximator.TransformerStack(hidden=32, heads=4, blocks=2, dropout=0.1).eval()
    x = torch.randn(6, 5, 32)
    linears = [m for m in stack.modules() if isinstance(m, torch.nn.Linear)]
    region = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), region:
        plain = stack(x, None)
        with approximator.packed_weights(stack, dtype, rows=4):
            assert all(layer.__dict__["_packed"][0] == dtype for layer in linears)
            packed = stack(x, None)
    assert packed.dtype == plain.dtype
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=1e-6)
    assert not any("_packed" in layer.__dict__ for layer in linears)
    # a failure inside the block drops them too; other dtypes pack nothing
    with pytest.raises(ValueError), approximator.packed_weights(stack, dtype):
        raise ValueError
    assert not any("_packed" in layer.__dict__ for layer in linears)
    with approximator.packed_weights(stack, torch.float16):
        assert not any("_packed" in layer.__dict__ for layer in linears)
    # weights packed for another dtype are not used: bf16 copies under float32 inference
    with torch.no_grad():
        unpacked = stack(x, None)
        with approximator.packed_weights(stack, torch.bfloat16):
            assert torch.equal(stack(x, None), unpacked)


def test_fused_dtypes_leave_out_a_dtype_the_cpu_cannot_run(monkeypatch):
    """On a CPU without AVX512 (AVX2 only) oneDNN's bf16 linear raises: bf16 inference must then
    take the plain path, not fail in evaluation after an epoch of training."""
    if not approximator._HAS_FUSED_LINEAR:
        pytest.skip("this torch build has no oneDNN fused linear")
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def reorder_without_bf16(weight, *args):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")
        return reorder(weight, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder_without_bf16)
    dtypes = approximator._fused_linear_dtypes()
    assert torch.bfloat16 not in dtypes and torch.float32 in dtypes
    monkeypatch.setattr(approximator, "FUSED_DTYPES", dtypes)
    stack = approximator.TransformerStack(hidden=32, heads=4, blocks=2, dropout=0.1).eval()
    x = torch.randn(6, 5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert approximator._fusable(x) is None
        plain = stack(x, None)
        with approximator.packed_weights(stack, torch.bfloat16):
            assert torch.equal(stack(x, None), plain)


def test_last_block_computes_the_last_query_row_only_with_the_same_result():
    """Training's last block projects the query of the last row only; outputs and gradients
    are those of the full block's last row."""
    torch.manual_seed(0)
    block = approximator.Block(hidden=32, heads=4, dropout=0.0).train()
    x = torch.randn(5, 7, 32, requires_grad=True)
    valid = torch.ones(5, 7, dtype=torch.bool)
    valid[0, :4] = False
    mask = attention_mask(valid, causal=False, length=7, device="cpu")
    last = block(x, mask, last_only=True)
    assert last.shape == (5, 1, 32)
    last_grads = torch.autograd.grad(last.square().sum(), [x, block.qkv.weight, block.qkv.bias])
    full = block(x, mask, last_only=False)[:, -1:]
    full_grads = torch.autograd.grad(full.square().sum(), [x, block.qkv.weight, block.qkv.bias])
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(last_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_step_embedding_of_a_batch_gathers_a_table_of_the_same_values():
    torch.manual_seed(0)
    embed = approximator.StepEmbedding(hidden=16, diffusion_steps=10)
    t = torch.randint(0, 10, (64,))
    direct = embed.mlp(approximator.timestep_embedding(t * embed.scale, 16))
    direct_grads = torch.autograd.grad(direct.square().sum(), list(embed.parameters()))
    gathered = embed(t)  # 64 rows > 10 steps: the table path
    gathered_grads = torch.autograd.grad(gathered.square().sum(), list(embed.parameters()))
    torch.testing.assert_close(gathered, direct, atol=1e-6, rtol=1e-6)
    for a, b in zip(gathered_grads, direct_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # fractional steps, and batches with fewer rows than steps, embed directly
    torch.testing.assert_close(embed(t[:3].float()), direct[:3])
    torch.testing.assert_close(embed(t[:3]), direct[:3])
