"""Gaussian diffusion over item embeddings: forward noising and the strided reverse posterior.

Schedule tensors are computed once (float64 in numpy, then stored as float32 buffers) so nothing
is converted inside the step loop. A reverse pass with S < T steps uses the respaced schedule of
improved-diffusion: the alpha-bars of the visited steps define new betas, and the denoiser is still
told the original training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffurec.models.schedules import named_beta_schedule, strided_timesteps


@dataclass
class ReverseSchedule:
    """Per reverse step i (ascending order of the visited training steps)."""

    timesteps: torch.Tensor  # the original training step t_i, long
    posterior_coef_x0: torch.Tensor
    posterior_coef_xt: torch.Tensor
    noise_std: torch.Tensor  # 0 at the final step


def _posterior(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    coef_x0 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef_xt = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # the reference samples with the "fixed large" variance: beta_t, with the first step's
    # posterior variance in place of beta_0
    if len(betas) > 1:
        variance = np.append(posterior_variance[1], betas[1:])
    else:
        variance = posterior_variance.copy()
    noise_std = np.sqrt(variance)
    noise_std[0] = 0.0  # the last reverse step returns the mean, i.e. x0-hat
    return coef_x0, coef_xt, noise_std


class GaussianDiffusion(nn.Module):
    def __init__(self, noise_schedule: str, diffusion_steps: int):
        super().__init__()
        betas = named_beta_schedule(noise_schedule, diffusion_steps)
        self.noise_schedule = noise_schedule
        self.num_steps = diffusion_steps
        alphas_cumprod = np.cumprod(1.0 - betas)
        self._alphas_cumprod = alphas_cumprod  # float64 master copy for respacing
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("betas", f32(betas), persistent=False)
        self.register_buffer("alphas_cumprod", f32(alphas_cumprod), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", f32(np.sqrt(alphas_cumprod)), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", f32(np.sqrt(1.0 - alphas_cumprod)), persistent=False
        )
        self._reverse_cache: dict[tuple[int, torch.device], ReverseSchedule] = {}

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) for x0 of shape [B, H]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.sqrt_alphas_cumprod[t].unsqueeze(-1) * x0 + self.sqrt_one_minus_alphas_cumprod[
            t
        ].unsqueeze(-1) * noise

    def reverse_schedule(self, reverse_steps: int) -> ReverseSchedule:
        device = self.betas.device
        key = (reverse_steps, device)
        if key not in self._reverse_cache:
            steps = strided_timesteps(self.num_steps, reverse_steps)
            used_ab = self._alphas_cumprod[steps]
            respaced_betas = 1.0 - used_ab / np.append(1.0, used_ab[:-1])
            coef_x0, coef_xt, noise_std = _posterior(respaced_betas)
            f32 = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            self._reverse_cache[key] = ReverseSchedule(
                timesteps=torch.tensor(steps, dtype=torch.long, device=device),
                posterior_coef_x0=f32(coef_x0),
                posterior_coef_xt=f32(coef_xt),
                noise_std=f32(noise_std),
            )
        return self._reverse_cache[key]

    def reverse(
        self,
        denoise,
        x_T: torch.Tensor,
        reverse_steps: int,
        deterministic: bool = False,
    ) -> torch.Tensor:
        """Iterate x_{t-1} ~ q(x_{t-1} | x_t, x0-hat) over S strided steps; return the final x0-hat.

        ``denoise(x_t, t)`` maps a noisy target [B, H] and step tensor [B] to x0-hat [B, H].
        """
        schedule = self.reverse_schedule(reverse_steps)
        x_t = x_T
        batch = x_T.shape[0]
        for i in range(len(schedule.timesteps) - 1, -1, -1):
            t = schedule.timesteps[i].expand(batch)
            x0_hat = denoise(x_t, t)
            if i == 0:
                return x0_hat
            mean = schedule.posterior_coef_x0[i] * x0_hat + schedule.posterior_coef_xt[i] * x_t
            x_t = mean if deterministic else mean + schedule.noise_std[i] * torch.randn_like(mean)
        raise AssertionError("unreachable: at least one reverse step")

    def _apply(self, fn, recurse=True):
        # moving the module invalidates cached per-device reverse schedules
        self._reverse_cache = {}
        return super()._apply(fn, recurse)


class UniformSampler:
    """Draws training steps uniformly; importance weights are all 1."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_steps, (batch,), device=device)
        return t, torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """improved-diffusion's LossSecondMomentResampler: p(t) ~ sqrt(E[loss_t^2]), once every step
    has a history of losses; uniform before that. Weights 1 / (T p(t)) keep the loss unbiased."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_steps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_steps, history), dtype=np.float64)
        self.counts = np.zeros(num_steps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not (self.counts == self.history).all():
            return np.ones(self.num_steps, dtype=np.float64) / self.num_steps
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.tensor(self.weights(), dtype=torch.float32)
        t = torch.multinomial(p, batch, replacement=True)
        weights = 1.0 / (self.num_steps * p[t])
        return t.to(device), weights.to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for step, loss in zip(t.tolist(), losses.detach().float().tolist()):
            if self.counts[step] == self.history:
                self.loss_history[step, :-1] = self.loss_history[step, 1:]
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = np.asarray(state["loss_history"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.int64)


def make_timestep_sampler(name: str, num_steps: int) -> UniformSampler:
    return LossAwareSampler(num_steps) if name == "loss_aware" else UniformSampler(num_steps)
