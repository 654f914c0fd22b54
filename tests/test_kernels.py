"""The CPU fast paths compute what the plain torch ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffurec.models.approximator import attend, attention_mask
from diffurec.models.dropout import Dropout, dropout, keep_mask, scaled_keep_mask


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
