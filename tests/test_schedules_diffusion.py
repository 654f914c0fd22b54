import numpy as np
import pytest
import torch

from diffurec.errors import DiffuRecError
from diffurec.models.diffusion import GaussianDiffusion, LossAwareSampler
from diffurec.models.schedules import SCHEDULES, named_beta_schedule, strided_timesteps


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 8, 32, 100])
def test_schedule_betas_valid_and_alpha_bar_decreasing(name, steps):
    betas = named_beta_schedule(name, steps)
    assert betas.shape == (steps,)
    assert np.all(betas > 0) and np.all(betas < 1)
    alpha_bar = np.cumprod(1 - betas)
    assert np.all(np.diff(alpha_bar) < 0)
    assert alpha_bar[0] < 1


def test_linear_is_scaled_by_1000_over_T():
    betas = named_beta_schedule("linear", 32)
    assert betas[0] == pytest.approx(0.0001 * 1000 / 32)
    assert betas[-1] == pytest.approx(0.02 * 1000 / 32)
    assert named_beta_schedule("trunc_lin", 32)[0] == pytest.approx(betas[0] + 0.01)


def test_unknown_schedule_and_bad_steps():
    with pytest.raises(DiffuRecError, match="unknown noise_schedule 'nope'"):
        named_beta_schedule("nope", 10)
    with pytest.raises(DiffuRecError, match="diffusion_steps"):
        named_beta_schedule("linear", 0)


@pytest.mark.parametrize("S,expected", [(1, [31]), (2, [0, 31]), (32, list(range(32)))])
def test_reverse_subsequence(S, expected):
    assert strided_timesteps(32, S).tolist() == expected


def test_reverse_subsequence_8_is_strided_and_spans():
    steps = strided_timesteps(32, 8)
    assert len(steps) == 8 and steps[0] == 0 and steps[-1] == 31
    assert np.all(np.diff(steps) >= 4)


def test_reverse_subsequence_rejects_S_above_T():
    with pytest.raises(DiffuRecError, match="reverse_steps=33"):
        strided_timesteps(32, 33)
    with pytest.raises(DiffuRecError):
        strided_timesteps(32, 0)


def test_q_sample_moments():
    torch.manual_seed(0)
    diff = GaussianDiffusion("trunc_lin", 32)
    x0 = torch.full((200_000, 2), 1.5)
    for step in (0, 15, 31):
        t = torch.full((x0.shape[0],), step)
        xt = diff.q_sample(x0, t)
        ab = diff.alphas_cumprod[step].item()
        assert xt.mean().item() == pytest.approx(np.sqrt(ab) * 1.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


def test_reverse_runs_S_denoiser_calls_and_returns_x0_hat():
    diff = GaussianDiffusion("trunc_lin", 32)
    seen = []

    def denoise(x_t, t):
        seen.append(int(t[0]))
        return torch.full_like(x_t, 7.0)

    for S in (1, 2, 8, 32):
        seen.clear()
        out = diff.reverse(denoise, torch.randn(3, 4), S)
        assert seen == strided_timesteps(32, S)[::-1].tolist()
        assert torch.allclose(out, torch.full((3, 4), 7.0))


def test_full_reverse_posterior_matches_ddpm_formula():
    """With S = T the respaced schedule is the original one: check coefficients against DDPM."""
    diff = GaussianDiffusion("linear", 16)
    sched = diff.reverse_schedule(16)
    betas = named_beta_schedule("linear", 16)
    ab = np.cumprod(1 - betas)
    t = 9
    coef_x0 = betas[t] * np.sqrt(ab[t - 1]) / (1 - ab[t])
    coef_xt = (1 - ab[t - 1]) * np.sqrt(1 - betas[t]) / (1 - ab[t])
    assert sched.posterior_coef_x0[t].item() == pytest.approx(coef_x0, rel=1e-5)
    assert sched.posterior_coef_xt[t].item() == pytest.approx(coef_xt, rel=1e-5)
    assert sched.noise_std[t].item() == pytest.approx(np.sqrt(betas[t]), rel=1e-5)


def test_deterministic_reverse_is_deterministic():
    diff = GaussianDiffusion("cosine", 8)
    x_T = torch.randn(4, 3)
    denoise = lambda x_t, t: 0.5 * x_t + 0.1  # noqa: E731
    a = diff.reverse(denoise, x_T, 8, deterministic=True)
    b = diff.reverse(denoise, x_T, 8, deterministic=True)
    assert torch.equal(a, b)


def test_loss_aware_sampler_prefers_high_loss_steps():
    sampler = LossAwareSampler(4, history=3)
    for _ in range(3):
        sampler.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0.1, 0.1, 0.1, 5.0]))
    w = sampler.weights()
    assert w[3] > 0.8 and w.sum() == pytest.approx(1.0)
    t, weights = sampler.sample(1000, torch.device("cpu"))
    assert (t == 3).float().mean() > 0.7
    # importance weights keep the loss unbiased: E_p[w * loss] = mean over steps of loss
    assert weights[t == 3][0].item() == pytest.approx(1 / (4 * w[3]), rel=1e-4)
