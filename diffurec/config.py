"""One dataclass for every hyper-parameter.

Defaults are the reference DiffuRec setup (hidden 128, 4 blocks, 4 heads, max_len 50, batch 512,
Adam 1e-3, T=32, ``trunc_lin``, lambda ~ N(0.001, 0.001), dropout 0.1 / 0.3 on embeddings, no
positional embedding). Key names are shared by YAML configs, ``--set key=value``, MLflow params
and the tune spaces: a key means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diffurec.errors import DiffuRecError

MODELS = ("diffurec", "sasrec")
NOISE_SCHEDULES = ("trunc_lin", "linear", "cosine", "sqrt", "trunc_cos", "pw_lin")
TIMESTEP_SAMPLERS = ("uniform", "loss_aware")
LR_SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")
STOP_ON = ("selection", "any_metric")
GELUS = ("exact", "tanh")
DROPOUT_PLACEMENTS = ("residual", "reference")
LINEAR_INITS = ("torch", "xavier")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class Config:
    # what to train
    model: str = "diffurec"
    seed: int = 42
    # optimisation
    epochs: int = 500
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    # constant; step (lr x lr_gamma every lr_step_epochs epochs: the reference's StepLR);
    # cosine (to 0 at `epochs`); warmup_cosine (linear warmup over warmup_epochs, then cosine)
    lr_schedule: str = "constant"
    lr_step_epochs: int = 100
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    # early stopping, counted in evaluations: stop after `patience` evaluations in a row without
    # an improvement of validation NDCG@10 (selection) or of any validation metric (any_metric,
    # the reference's rule). best.pt is always the best validation NDCG@10
    eval_every: int = 1
    patience: int = 10
    stop_on: str = "selection"
    # architecture
    hidden_size: int = 128
    num_blocks: int = 4
    num_heads: int = 4
    dropout: float = 0.1
    emb_dropout: float = 0.3
    max_len: int = 50
    positional_embedding: bool = False
    # std of the initial item embeddings: 0 = hidden_size ** -0.5 (unit-norm rows); 1.0 is
    # torch's nn.Embedding default
    embedding_init_std: float = 0.0
    # std of the initial position embeddings: 1.0 is torch's nn.Embedding default (an 11x larger
    # scale than the default items', so position swamps the item signal early on; the
    # SASRec runs used it); 0 = the item embeddings' std
    position_init_std: float = 1.0
    # the reference attends to padded positions; kept only for the ablation
    attend_to_padding: bool = False
    # the reference Transformer's block, the default since it validated better on Beauty than
    # this project's earlier block (docs/results.md, ablation reference_transformer; that block:
    # exact, residual, 1e-5, torch, false): tanh-approximated GELU in the feed-forward; dropout
    # also on the feed-forward's hidden activation and on every block's output (reference, against
    # residual: the residual branches and attention weights only); LayerNorm epsilon 1e-12
    # everywhere; Xavier-normal weights for the feed-forward and attention-output linears; the
    # padding id's row in the training cross-entropy's softmax
    gelu: str = "tanh"
    dropout_placement: str = "reference"
    layer_norm_eps: float = 1e-12
    linear_init: str = "xavier"
    ce_padding_column: bool = True
    # the training target mixes the one-hot item with e / (columns) on every column, as
    # torch's cross_entropy(label_smoothing=e); 0 (the reference) trains on the one-hot alone
    label_smoothing: float = 0.0
    # diffusion
    diffusion_steps: int = 32
    reverse_steps: int = 32
    # S for the per-epoch validation only (0 = reverse_steps): early stopping at S=4 costs 1/8
    valid_reverse_steps: int = 0
    noise_schedule: str = "trunc_lin"
    lambda_mean: float = 0.001
    lambda_std: float = 0.001  # 0 gives a fixed lambda = lambda_mean
    timestep_sampler: str = "uniform"
    deterministic_reverse: bool = False
    reverse_samples: int = 1
    # evaluation
    # batches of users sorted by history length, each up to eval_batch_tokens history tokens
    # (users x padded length) and eval_batch_size users: many short histories per batch, few long
    # ones (data/batches.py token_budget_order); 0 tokens = always eval_batch_size users. Speed
    # only: metrics do not depend on the batches beyond the reverse process's random draws.
    # The defaults (0 and -1) are by device (training.EVAL_BATCHING): a CPU wants batches that stay in
    # its caches, a GPU wide ones (on an H100, 1.7-3.3x the users/s of the CPU's token budget)
    eval_batch_size: int = 0
    eval_batch_tokens: int = -1
    exclude_history: bool = False
    # data (used when --data is a raw log that must be split first)
    min_user: int = 5
    min_item: int = 5
    # runtime
    device: str = "auto"
    # auto: bf16 autocast on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere
    # (training.autocast_dtype); fp32 / bf16 force either
    precision: str = "auto"
    # on a GPU, replay each training step as a CUDA graph (diffurec/graphs.py): speed only, and
    # where it is the same step (see graphs_unusable). On an H100 batch-512 training ran at 4.3-6.2x
    # the eager steps' samples/s, the GPU 97% busy instead of 26% (docs/performance.md)
    cuda_graphs: bool = True
    threads: int = 0  # 0 leaves torch's default
    # on a CPU, have glibc keep freed memory for reuse instead of unmapping it (diffurec/allocator.py):
    # the step's 10-50 MB activations otherwise return as fresh zero-filled pages, thousands of
    # page faults a step. Speed only: 1.04-1.19x bf16 training samples/s in one process on a 2-core VM
    keep_freed_memory: bool = True
    output_dir: str = "outputs"

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        return cfg.with_overrides(values, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise DiffuRecError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DiffuRecError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise DiffuRecError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def with_overrides(self, values: dict[str, Any], source: str = "override") -> Config:
        types = {f.name: f.type for f in fields(self)}
        changes = {}
        for key, value in values.items():
            if key not in types:
                raise DiffuRecError(
                    f"{source}: unknown config key '{key}' (known keys: {', '.join(sorted(types))})"
                )
            changes[key] = _coerce(key, value, types[key], source)
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def with_sets(self, assignments: list[str] | None) -> Config:
        """Apply ``key=value`` strings from the command line (values parsed as YAML scalars)."""
        import yaml

        values = {}
        for item in assignments or []:
            if "=" not in item:
                raise DiffuRecError(f"--set expects key=value, got '{item}'")
            key, raw = item.split("=", 1)
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
        return self.with_overrides(values, source="--set")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> Config:
        def need(cond: bool, key: str, allowed: str) -> None:
            if not cond:
                raise DiffuRecError(f"config key '{key}' = {getattr(self, key)!r} is invalid: {allowed}")

        need(self.model in MODELS, "model", f"one of {', '.join(MODELS)}")
        need(self.embedding_init_std >= 0, "embedding_init_std", "must be >= 0 (0: hidden_size ** -0.5)")
        need(self.position_init_std >= 0, "position_init_std", "must be >= 0 (0: the item embeddings' std)")
        need(self.noise_schedule in NOISE_SCHEDULES, "noise_schedule", f"one of {', '.join(NOISE_SCHEDULES)}")
        need(self.timestep_sampler in TIMESTEP_SAMPLERS, "timestep_sampler", f"one of {', '.join(TIMESTEP_SAMPLERS)}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be a positive integer")
        need(self.eval_batch_size >= 0, "eval_batch_size", "must be >= 0 (0: by device)")
        need(self.eval_batch_tokens >= -1, "eval_batch_tokens",
             "must be >= -1 (0: eval_batch_size users per batch; -1: by device)")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        need(self.lr_step_epochs >= 1, "lr_step_epochs", "must be >= 1")
        need(0 < self.lr_gamma <= 1, "lr_gamma", "must be in (0, 1]")
        need(self.stop_on in STOP_ON, "stop_on", f"one of {', '.join(STOP_ON)}")
        need(self.gelu in GELUS, "gelu", f"one of {', '.join(GELUS)}")
        need(self.dropout_placement in DROPOUT_PLACEMENTS, "dropout_placement",
             f"one of {', '.join(DROPOUT_PLACEMENTS)}")
        need(0 < self.layer_norm_eps < 1, "layer_norm_eps", "must be in (0, 1)")
        need(self.linear_init in LINEAR_INITS, "linear_init", f"one of {', '.join(LINEAR_INITS)}")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(self.patience >= 1, "patience", "must be >= 1")
        need(self.hidden_size >= 1, "hidden_size", "must be >= 1")
        need(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        need(self.num_heads >= 1, "num_heads", "must be >= 1")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be divisible by num_heads={self.num_heads}")
        need(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(0 <= self.emb_dropout < 1, "emb_dropout", "must be in [0, 1)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.max_len >= 1, "max_len", "must be >= 1")
        need(self.diffusion_steps >= 1, "diffusion_steps", "must be >= 1")
        need(
            1 <= self.reverse_steps <= self.diffusion_steps,
            "reverse_steps",
            f"must be in [1, diffusion_steps={self.diffusion_steps}]",
        )
        need(
            0 <= self.valid_reverse_steps <= self.diffusion_steps,
            "valid_reverse_steps",
            f"must be in [0, diffusion_steps={self.diffusion_steps}] (0 = reverse_steps)",
        )
        need(self.lambda_mean >= 0, "lambda_mean", "must be >= 0")
        need(self.lambda_std >= 0, "lambda_std", "must be >= 0 (0 gives a fixed lambda)")
        need(self.reverse_samples >= 1, "reverse_samples", "must be >= 1")
        need(self.min_user >= 0, "min_user", "must be >= 0 (0 disables the filter)")
        need(self.min_item >= 0, "min_item", "must be >= 0 (0 disables the filter)")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(self.threads >= 0, "threads", "must be >= 0 (0 leaves torch's default)")
        need(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            "one of auto, cpu, cuda, cuda:N",
        )
        return self


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    raise DiffuRecError(f"{source}: config key '{key}' expects {typ.__name__}, got {value!r}")
