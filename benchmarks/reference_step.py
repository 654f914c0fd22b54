"""The reference DiffuRec code's per-step work, timed in the same run as ours (``throughput.py --reference``).

The issue's reference figures (about 170 training samples/s and 35 users/s at S = 32 on a quiet
2-core machine) cannot be re-measured here: the reference code is not part of this project and
nothing is downloaded at run time. This module is a timing stand-in written for this project: a
model that does the same tensor work per step as the published reference implementation, so
speed-ups can be read as ratios measured in one run, as the issue asks, instead of against a
figure taken on another day on a shared machine. It is not used for training and its quality is
never read. Timed beside the reference's own model classes (run from a scratch copy outside the
project, same process, same batches), it trained at 0.90-1.04x their speed and evaluated at 1.00x
on a Zen 4 VM, and at 0.93-1.38x and 1.03x on a Zen 5 VM (``docs/performance.md``, "Current
figures by device").

What it reproduces, per training step (batch 512, hidden 128, 4 blocks, 4 heads, T = 32):
- a per-example Dataset + DataLoader that slices each prefix, left-pads it to max_len = 50 in
  Python lists and collates LongTensors (batches are random draws from all training prefixes);
- float32 everywhere (no autocast);
- item embeddings, embedding dropout, then a TF-style LayerNorm written out in elementwise ops;
- the target's noising with the schedule gathered from numpy arrays at every call;
- the step embedding (sinusoid, Linear-SiLU-Linear), a full-size lambda tensor drawn with
  ``torch.normal`` from two full-size mean/std tensors;
- 4 post-dropout Transformer blocks over all 50 positions, each: separate q, k, v linears,
  matmul attention with a [B, heads, L, L] mask built by ``repeat`` and ``masked_fill``, softmax,
  attention dropout, the output linear; a feed-forward with the tanh GELU written out in
  elementwise ops; three dropouts and two written-out LayerNorms per block;
- cross-entropy over every item plus the padding row (``F.cross_entropy``), Adam (default
  implementation).

Evaluation: batches of 512 users padded to 50, 32 reverse steps (each a full Approximator pass
and the posterior with the schedule gathered from numpy), scores against every item, and the
HR and NDCG top-k each computed on a CPU copy of the scores, as the reference's metric code does.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffurec.config import Config
from diffurec.data.sequences import eval_examples, train_examples
from diffurec.models.diffusion import _posterior
from diffurec.models.schedules import named_beta_schedule


class TFLayerNorm(nn.Module):
    """LayerNorm written out in elementwise ops (epsilon inside the square root)."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias


class PaddedBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.norm_attn, self.norm_ffn = TFLayerNorm(hidden), TFLayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.drop_attn, self.drop_ffn, self.drop_res1, self.drop_res2 = (nn.Dropout(dropout) for _ in range(4))

    def attention(self, x, query_valid):
        B, L, H = x.shape
        q, k, v = (lin(x).view(B, -1, self.heads, H // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # the reference's mask: per query row, repeated over heads and keys
        mask = query_valid.unsqueeze(1).repeat([1, self.heads, 1]).unsqueeze(-1).repeat([1, 1, 1, L])
        scores = scores.masked_fill(mask == 0, -1e9)
        out = torch.matmul(self.drop_attn(F.softmax(scores, dim=-1)), v)
        return self.out(out.transpose(1, 2).contiguous().view(B, -1, H))

    def ffn(self, x):
        h = self.ffn_in(x)
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))
        return self.ffn_out(self.drop_ffn(h))

    def forward(self, x, query_valid):
        x = x + self.drop_res1(self.attention(self.norm_attn(x), query_valid))
        x = x + self.drop_res2(self.ffn(self.norm_ffn(x)))
        return self.drop(x)


class PaddedDiffuRec(nn.Module):
    def __init__(self, cfg: Config, num_items: int):
        super().__init__()
        H = cfg.hidden_size
        self.hidden, self.lam = H, cfg.lambda_mean
        self.item_embeddings = nn.Embedding(num_items + 1, H)
        self.emb_dropout, self.emb_norm = nn.Dropout(cfg.emb_dropout), TFLayerNorm(H)
        self.time_embed = nn.Sequential(nn.Linear(H, 4 * H), nn.SiLU(), nn.Linear(4 * H, H))
        self.blocks = nn.ModuleList(PaddedBlock(H, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))
        self.out_dropout, self.out_norm = nn.Dropout(cfg.dropout), TFLayerNorm(H)
        betas = named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps).astype(np.float64)
        self.T = len(betas)
        ab = np.cumprod(1 - betas)
        self.sqrt_ab, self.sqrt_1mab = np.sqrt(ab), np.sqrt(1 - ab)
        # numpy arrays, as the reference keeps them (each call gathers from them again)
        self.coef_x0, self.coef_xt, noise_std = _posterior(betas)
        # the reference takes the log of its variance at every reverse step; step 0 draws no noise
        # (masked by t != 0), so its entry only has to keep the log finite
        self.variance = np.square(noise_std)
        self.variance[0] = 1.0

    @staticmethod
    def gather(arr, t, shape):
        out = torch.from_numpy(arr).to(t.device)[t].float()
        while out.dim() < len(shape):
            out = out[..., None]
        return out.expand(shape)

    def encode(self, history):
        return self.emb_norm(self.emb_dropout(self.item_embeddings(history))), (history > 0).float()

    def approximator(self, rep, query_valid, x_t, t):
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = (t.float() * 1000.0 / self.T)[:, None] * freqs[None]
        x_t = x_t + self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        lam = torch.normal(mean=torch.full(rep.shape, self.lam), std=torch.full(rep.shape, self.lam))
        h = rep + lam * x_t.unsqueeze(1)
        for block in self.blocks:
            h = block(h, query_valid)
        return self.out_norm(self.out_dropout(h))[:, -1, :]

    def loss(self, history, target):
        rep, valid = self.encode(history)
        x0 = self.item_embeddings(target)
        t = torch.from_numpy(np.random.choice(self.T, size=(len(target),)))
        noise = torch.randn_like(x0)
        x_t = self.gather(self.sqrt_ab, t, x0.shape) * x0 + self.gather(self.sqrt_1mab, t, x0.shape) * noise
        x0_hat = self.approximator(rep, valid, x_t, t)
        return F.cross_entropy(x0_hat @ self.item_embeddings.weight.t(), target)

    @torch.no_grad()
    def predict(self, history):
        rep, valid = self.encode(history)
        x_t = torch.randn_like(rep[:, -1, :])
        for i in reversed(range(self.T)):
            t = torch.tensor([i] * len(history))
            x0_hat = self.approximator(rep, valid, x_t, t)
            log_var = self.gather(np.log(self.variance), t, x_t.shape)
            mean = self.gather(self.coef_x0, t, x_t.shape) * x0_hat + self.gather(self.coef_xt, t, x_t.shape) * x_t
            x_t = mean + (t != 0).float().view(-1, 1) * torch.exp(0.5 * log_var) * torch.randn_like(x_t)
        return x_t


class PrefixDataset(Dataset):
    """One training prefix per item: Python slicing and left-padding, as the reference's loader does."""

    def __init__(self, sequences: list[list[int]], max_len: int):
        self.sequences, self.max_len = sequences, max_len

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        seq = self.sequences[i]
        tokens = seq[:-1][-self.max_len:]
        return torch.LongTensor([0] * (self.max_len - len(tokens)) + tokens), torch.LongTensor([seq[-1]])


def _top_metrics(scores, target, ks=(5, 10, 20)):
    """HR@k and NDCG@k, each from its own top-k over a CPU copy of the scores."""
    label = target[:, None]
    _, top = torch.topk(scores.clone().detach().cpu(), k=max(ks), dim=-1)
    hit = (label == top).int()
    log2 = torch.log2(torch.arange(1, max(ks) + 1) + 1).unsqueeze(0)
    ndcg = [((hit[:, :k] / log2[:, :k]).sum(-1)).mean().item() for k in ks]
    _, top = torch.topk(scores.clone().detach().cpu(), k=max(ks), dim=-1)
    hr = [(label == top)[:, :k].sum().item() / len(label) for k in ks]
    return hr, ndcg


def time_reference(cfg: Config, data, train_batches: int = 6, eval_batches: int = 2, warmup: int = 1,
                   seed: int = 0) -> dict:
    """Training samples/s and S = T evaluation users/s of the reference's per-step work
    (``eval_batches=0``: training only)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = PaddedDiffuRec(cfg, data.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ex = train_examples(data, cfg.max_len)
    items = data.items
    picks = np.random.default_rng(seed).choice(len(ex.end), size=(warmup + train_batches) * cfg.batch_size,
                                               replace=False)
    # whole prefixes (the reference keeps each prefix and cuts max_len in __getitem__)
    begin = data.offsets[np.searchsorted(data.offsets, ex.end[picks], side="right") - 1]
    sequences = [items[b:e + 1].tolist() for b, e in zip(begin, ex.end[picks])]
    loader = DataLoader(PrefixDataset(sequences, cfg.max_len), batch_size=cfg.batch_size, shuffle=True)
    model.train()
    began, samples = None, 0
    for i, (history, target) in enumerate(loader):
        if i == warmup:
            began = time.perf_counter()
        optimizer.zero_grad()
        model.loss(history, target.squeeze(-1)).backward()
        optimizer.step()
        samples += len(target) if i >= warmup else 0
    train = samples / (time.perf_counter() - began)
    if not eval_batches:
        return {"train_samples_per_s": round(train, 1), "eval_users_per_s": {}}

    model.eval()
    ev = eval_examples(data, "valid", cfg.max_len)
    users = np.random.default_rng(seed).choice(len(ev.end), size=eval_batches * cfg.batch_size, replace=False)
    users.sort()  # the reference's validation loader goes through users in id order
    seqs = [items[s:e].tolist() for s, e in zip(ev.start[users], ev.end[users])]
    history = torch.LongTensor([[0] * (cfg.max_len - len(s)) + s for s in seqs])
    target = torch.from_numpy(items[ev.end[users]].astype(np.int64))
    with torch.no_grad():
        model.predict(history[:64])  # warm-up
        began = time.perf_counter()
        for rows in torch.split(torch.arange(len(users)), cfg.batch_size):
            _top_metrics(model.predict(history[rows]) @ model.item_embeddings.weight.t(), target[rows])
    return {"train_samples_per_s": round(train, 1),
            "eval_users_per_s": {str(cfg.diffusion_steps): round(len(users) / (time.perf_counter() - began), 1)}}
