"""The one training loop: epochs, validation, early stopping, checkpoints, final test.

``fit`` is used as it is by the CLI and inside each Ray Train worker; Ray only supplies the batch
source of each epoch, the DDP wrapper and a report hook. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffurec import machine
from diffurec.allocator import keep_freed_memory
from diffurec.config import Config
from diffurec.data.batches import batch_order, iterate_batches, num_batches, token_budget_order
from diffurec.data.sequences import SequenceData, eval_examples, train_examples
from diffurec.errors import DiffuRecError
from diffurec.graphs import GraphedTrainStep, eager_step, graphs_unusable
from diffurec.metrics import RankingMetrics, target_ranks
from diffurec.models import build_model
from diffurec.models.approximator import packed_weights

SELECTION_METRIC = "NDCG@10"


# ---- setup ------------------------------------------------------------------------------------
def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffuRecError(f"config key 'device' = {cfg.device!r}: no CUDA device is available")
    return torch.device(cfg.device)


def configure_process(cfg: Config, device: torch.device) -> None:
    """Process-wide runtime settings a training process takes from ``cfg``: torch's threads and,
    on a CPU, the allocator's reuse of freed memory (``diffurec/allocator.py``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # the fused kernel is the same Adam update in one pass over each tensor: on 2 CPU threads it
    # took 2 ms a step against 6-11 ms for the per-tensor and foreach loops
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} or None
    # capturable: Adam's step count stays on the GPU, so a CUDA graph can replay the update
    capturable = cfg.cuda_graphs and devices == {"cuda"}
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused,
                            capturable=capturable)


# DistributedDataParallel options, for Ray Train's prepare_model and benchmarks/throughput.py:
# gradients that are views of the all-reduce buckets skip one copy of every gradient per step
# (about 7% of a 2-worker CPU step on this project's benchmark machine)
DDP_OPTIONS = {"gradient_as_bucket_view": True}


def make_lr_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
    """Per-step schedule. 'step' is the reference's ``StepLR(step_size=lr_step_epochs,
    gamma=lr_gamma)`` stepped once an epoch: the factor changes at epoch boundaries only."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** (step // steps_per_epoch // cfg.lr_step_epochs)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 where it is native: on GPU, and on CPUs with AVX512-BF16 or AMX, where it trains
    about 1.6x faster than fp32 to the same quality (docs/results.md, "Precision"); fp32 on
    other CPUs, which would only emulate it. None: no autocast."""
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and machine.native_bf16_cpu())
        return torch.bfloat16 if native else None
    return torch.bfloat16 if precision == "bf16" else None


def precision_used(device: torch.device, precision: str = "auto") -> str:
    """What ``precision`` trains in on this device, 'bf16' or 'fp32': a tag of every run, since
    ``auto`` means either, by machine."""
    return "bf16" if autocast_dtype(device, precision) is not None else "fp32"


def autocast(device: torch.device, precision: str = "auto", cache_enabled: bool = True):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          cache_enabled=cache_enabled)


def graphed_step(model: nn.Module, optimizer, device: torch.device, cfg: Config) -> GraphedTrainStep | None:
    """The CUDA-graph training step (``diffurec.graphs``) where it is the same step, else None."""
    if not cfg.cuda_graphs or graphs_unusable(model, device, cfg.lr_schedule) is not None:
        return None
    return GraphedTrainStep(model, optimizer, lambda **kw: autocast(device, cfg.precision, **kw),
                            grad_clip=cfg.grad_clip, max_len=cfg.max_len)


def progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=1.0,
                file=sys.stderr, dynamic_ncols=True)


# ---- one epoch --------------------------------------------------------------------------------
def train_epoch(model: nn.Module, batches: Iterable[dict], optimizer, device: torch.device, *,
                scheduler=None, grad_clip: float = 0.0, progress=None, precision: str = "auto",
                graphs: GraphedTrainStep | None = None) -> dict:
    """Forward, backward and optimizer step over ``batches``; returns loss and throughput.
    ``graphs`` (see ``graphed_step``) replays the steps as CUDA graphs."""
    model.train()
    # the loss stays on the device: a .item() per step would stall a GPU every step
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    samples, began = 0, time.perf_counter()
    for step, batch in enumerate(batches, 1):
        history = batch["history"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        if graphs is not None:
            loss = graphs.step(history, target)
        else:
            loss = eager_step(model, optimizer, history, target, lambda: autocast(device, precision), grad_clip)
        if scheduler is not None:
            scheduler.step()
        n = len(target)
        loss_sum += loss.detach() * n
        samples += n
        if progress is not None:
            progress.update(1)
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / samples:.4f}", refresh=False)
    # reading the loss waits for the GPU's queued steps, so the time covers their work too
    loss = loss_sum.item() / max(samples, 1)
    seconds = time.perf_counter() - began
    return {"loss": loss, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0}


def pad_to(cfg: Config) -> int | None:
    """The length every batch is padded to: max_len for the reference's attention to padding,
    else None (each batch to its own longest history)."""
    return cfg.max_len if cfg.attend_to_padding else None


def bucketing_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that shuffles and length-buckets an epoch's batches.

    It takes no rank on purpose: every DDP worker buckets its own shard with the same stream,
    so step k of every worker holds the same length quantile of its window and the workers
    finish each step together. Drawn per rank, a short batch on one worker waits at the
    gradient all-reduce for a long one on another: on 2 CPU workers that idled each about 30%
    of the epoch (Beauty, ``pipelines/train.py --num-workers 2``).
    """
    return np.random.default_rng([seed, epoch, 1])


def training_batches(data: SequenceData, cfg: Config, epoch: int, *, shard: tuple[int, int] = (0, 1),
                     batch_size: int | None = None) -> tuple[Iterable[dict], int]:
    """This epoch's shuffled, length-bucketed batches (of this shard), and how many there are.

    The permutation depends only on (seed, epoch), so a resumed run replays the same order, and
    shard k of n takes every n-th example of it: n workers with batch B/n see the same examples
    per step as one worker with batch B.
    """
    ex = train_examples(data, cfg.max_len)
    rank, world = shard
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(ex.end))
    per_worker = batch_size or cfg.batch_size
    # cut whole global batches first so every worker gets the same number of steps
    global_batch = per_worker * world
    usable = (len(order) // global_batch) * global_batch if world > 1 else len(order)
    mine = order[:usable][rank::world]
    batches = iterate_batches(data.items, ex.start[mine], ex.end[mine], per_worker,
                              rng=bucketing_rng(cfg.seed, epoch), pad_to=pad_to(cfg))
    return batches, num_batches(len(mine), per_worker)


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sums(model: nn.Module, data: SequenceData, split: str, cfg: Config, device: torch.device, *,
                  reverse_steps: int | None = None, users: slice | None = None,
                  progress: bool = False) -> tuple[dict[str, float], int]:
    """Metric sums and user count over ``split`` (optionally a slice of users, for sharding)."""
    ex = eval_examples(data, split, cfg.max_len)
    start, end = ex.start, ex.end
    if users is not None:
        start, end = start[users], end[users]
    if len(end) == 0:
        return RankingMetrics().sums, 0
    batches, count = eval_batches(data, start, end, cfg, device)
    bar = progress_bar(count, f"eval {split}", progress)
    metrics = rank_batches(model, batches, cfg, device, reverse_steps=reverse_steps, on_batch=bar.update)
    bar.close()
    return metrics.sums, metrics.count


SCORE_ROWS = 256  # users scored against all items at once


# (eval_batch_size, eval_batch_tokens) where the config leaves them to the device (0 and -1).
# CPU: about 6,000 history tokens was the best batch at every history length on 2 Zen 4 cores (the
# activations stay in cache). GPU: fixed 4,096-user batches ran at 1.7-3.3x the users/s of that
# budget on an H100 (S=32 and S=4). docs/performance.md, "Design choices behind the speed".
EVAL_BATCHING = {"cpu": (2048, 6144), "cuda": (4096, 0)}


def eval_batching(cfg: Config, device: torch.device) -> tuple[int, int]:
    """The (users, history tokens) per evaluation batch on ``device``."""
    users, tokens = EVAL_BATCHING.get(device.type, EVAL_BATCHING["cpu"])
    return cfg.eval_batch_size or users, tokens if cfg.eval_batch_tokens < 0 else cfg.eval_batch_tokens


def eval_batch_order(lengths: np.ndarray, cfg: Config, device: torch.device) -> list[np.ndarray]:
    """The evaluation batches' indices: by token budget, or a fixed number of users each."""
    users, tokens = eval_batching(cfg, device)
    if tokens == 0:
        return batch_order(lengths, users, rng=None)
    return token_budget_order(lengths, users, tokens, pad_to(cfg))


def eval_batches(data: SequenceData, start: np.ndarray, end: np.ndarray, cfg: Config,
                 device: torch.device) -> tuple[Iterator[dict], int]:
    """The evaluation batches of these users (``start``/``end`` into ``data.items``) for
    ``device``, and their count."""
    order = eval_batch_order(end - start, cfg, device)
    users = eval_batching(cfg, device)[0]
    return iterate_batches(data.items, start, end, users, pad_to=pad_to(cfg), order=order), len(order)


@torch.no_grad()
def rank_batches(model: nn.Module, batches: Iterable[dict], cfg: Config, device: torch.device, *,
                 reverse_steps: int | None = None, on_batch: Callable[[int], object] | None = None) -> RankingMetrics:
    """Full-ranking metrics of eval batches ({"history", "target"}): the pass ``evaluate_sums``
    makes, and what ``benchmarks/throughput.py`` times."""
    model.eval()
    metrics = RankingMetrics()
    kwargs = {} if reverse_steps is None else {"reverse_steps": reverse_steps}
    # one autocast region for the whole pass: it caches the bf16 casts of the weights it casts;
    # on CPU the Transformer's linears take weights cast and packed once for the pass
    # (packed_weights); the scores against all items are float32 whatever the precision
    # (SequenceEncoderBase.score: bf16 scores tie the target with its neighbours)
    dtype = autocast_dtype(device, cfg.precision)
    items = model.item_matrix()
    with autocast(device, cfg.precision), packed_weights(model, dtype or torch.float32):
        for batch in batches:
            history = batch["history"].to(device)
            target = batch["target"].to(device)
            reps = [model.predict(history, **kwargs) for _ in range(cfg.reverse_samples)]
            # score and rank SCORE_ROWS users at a time: a token-budget batch of short histories
            # holds up to thousands of users, whose [users, items] scores would leave the cache
            for rows in (slice(i, i + SCORE_ROWS) for i in range(0, len(target), SCORE_ROWS)):
                scores = None
                for rep in reps:
                    s = model.score(rep[rows], items)
                    scores = s if scores is None else scores + s
                exclude = history[rows] if cfg.exclude_history else None
                metrics.update(target_ranks(scores, target[rows], exclude))
            if on_batch is not None:
                on_batch(1)
    return metrics


def evaluate(model: nn.Module, data: SequenceData, split: str, cfg: Config, device: torch.device, *,
             reverse_steps: int | None = None, progress: bool = False) -> dict[str, float]:
    sums, count = evaluate_sums(model, data, split, cfg, device, reverse_steps=reverse_steps, progress=progress)
    metrics = RankingMetrics()
    metrics.merge(sums, count)
    return metrics.compute()


# ---- checkpoints ------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def model_payload(model: nn.Module, cfg: Config, num_items: int, **extra) -> dict:
    model = unwrap(model)
    payload = {"model": model.state_dict(), "config": cfg.to_dict(), "num_items": num_items, **extra}
    if hasattr(model, "timestep_sampler"):
        payload["timestep_sampler"] = model.timestep_sampler.state_dict()
    return payload


def save_atomic(payload: dict, path: str | Path) -> Path:
    """Write then rename, so a crash mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint file's payload (``model_payload``), checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise DiffuRecError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise DiffuRecError(f"{path}: not a diffurec checkpoint ({exc})") from None
    if not isinstance(payload, dict) or not {"model", "config", "num_items"} <= set(payload):
        raise DiffuRecError(f"{path}: not a diffurec checkpoint (no model state, config and item count)")
    return payload


def model_from_payload(payload: dict, device: torch.device | str = "cpu",
                       source: str = "checkpoint") -> tuple[nn.Module, Config]:
    """The model and config of a checkpoint payload, on ``device``."""
    cfg = Config.from_dict(payload["config"], source=source)
    model = build_model(cfg, int(payload["num_items"])).to(device)
    model.load_state_dict(payload["model"])
    if "timestep_sampler" in payload and hasattr(model, "timestep_sampler"):
        model.timestep_sampler.load_state_dict(payload["timestep_sampler"])
    return model, cfg


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    payload = read_checkpoint(path, device)
    model, cfg = model_from_payload(payload, device, source=str(path))
    return model, cfg, payload


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    best_metric: float = -1.0
    best_epoch: int = 0
    best_valid: dict = field(default_factory=dict)
    # the best value of every validation metric so far (for stop_on = any_metric)
    best_each: dict = field(default_factory=dict)
    evals_since_best: int = 0
    seconds: float = 0.0
    seconds_to_best: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fit(cfg: Config, data: SequenceData, run_dir: str | Path, *,
        model: nn.Module | None = None,
        device: torch.device | None = None,
        batches_for_epoch: Callable[[int], tuple[Iterable[dict], int]] | None = None,
        evaluate_valid: Callable[[nn.Module], dict] | None = None,
        on_epoch_end: Callable[[int, dict, LoopState, dict], None] | None = None,
        resume_from: dict | None = None,
        is_main: bool = True,
        progress: bool = True) -> dict:
    """Train with early stopping on validation NDCG@10; return the best model's metrics.

    Every epoch writes ``latest.pt`` (full state, for resume) and, on improvement, ``best.pt``
    (model + config, for export) under ``run_dir``, so a crash loses no finished epoch.
    ``batches_for_epoch`` and ``evaluate_valid`` let Ray Train plug in its sharded data and
    distributed evaluation; ``on_epoch_end(epoch, metrics, state, paths)`` is its report hook.
    """
    run_dir = Path(run_dir)
    device = device or resolve_device(cfg)
    configure_process(cfg, device)
    seed_everything(cfg.seed)
    model = model if model is not None else build_model(cfg, data.num_items).to(device)
    optimizer = make_optimizer(model, cfg)
    batches_for_epoch = batches_for_epoch or (lambda epoch: training_batches(data, cfg, epoch))
    steps_per_epoch = batches_for_epoch(0)[1]
    scheduler = make_lr_scheduler(optimizer, cfg, steps_per_epoch)
    evaluate_valid = evaluate_valid or (
        lambda m: evaluate(unwrap(m), data, "valid", cfg, device, reverse_steps=cfg.valid_reverse_steps or None,
                           progress=progress and is_main))
    graphs = graphed_step(model, optimizer, device, cfg)
    if graphs is None and cfg.cuda_graphs and device.type == "cuda" and is_main:
        # on by default: say why this run takes the slower eager steps
        print(f"CUDA graphs not used ({graphs_unusable(model, device, cfg.lr_schedule)}): "
              "training with eager steps", file=sys.stderr, flush=True)
    if cfg.precision == "bf16" and device.type == "cpu" and not machine.native_bf16_cpu() and is_main:
        # allowed (the results match fp32's), but PyTorch emulates bf16 on this CPU
        print("precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): PyTorch emulates it, "
              "which trains slower than fp32; precision=auto picks fp32 here", file=sys.stderr, flush=True)
    state = LoopState()
    if resume_from is not None:
        unwrap(model).load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if "timestep_sampler" in resume_from and hasattr(unwrap(model), "timestep_sampler"):
            unwrap(model).timestep_sampler.load_state_dict(resume_from["timestep_sampler"])
        state = LoopState(**resume_from["loop"])
        torch.set_rng_state(resume_from["torch_rng"])
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(run_dir / "config.yaml")

    while state.epoch < cfg.epochs and state.evals_since_best < cfg.patience:
        epoch = state.epoch + 1
        batches, total = batches_for_epoch(epoch)
        bar = progress_bar(total, f"epoch {epoch}/{cfg.epochs}", progress and is_main)
        stats = train_epoch(model, batches, optimizer, device, scheduler=scheduler,
                            grad_clip=cfg.grad_clip, progress=bar, precision=cfg.precision, graphs=graphs)
        bar.close()
        state.epoch = epoch
        state.seconds += stats["seconds"]
        metrics = {"train/loss": stats["loss"], "train/samples_per_s": stats["samples_per_s"],
                   "train/seconds": stats["seconds"]}
        improved = False
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            valid = evaluate_valid(model)
            metrics.update({f"valid/{k}": v for k, v in valid.items()})
            any_improved = any(v > state.best_each.get(k, -1.0) for k, v in valid.items())
            state.best_each = {k: max(v, state.best_each.get(k, -1.0)) for k, v in valid.items()}
            if valid.get(SELECTION_METRIC, 0.0) > state.best_metric:
                improved = True
                state.best_metric = valid[SELECTION_METRIC]
                state.best_epoch = epoch
                state.best_valid = valid
                state.seconds_to_best = state.seconds
            if improved or (cfg.stop_on == "any_metric" and any_improved):
                state.evals_since_best = 0
            else:
                state.evals_since_best += 1
        paths = {}
        if is_main:
            if improved:
                paths["best"] = save_atomic(model_payload(model, cfg, data.num_items, epoch=epoch,
                                                          valid=state.best_valid), run_dir / "best.pt")
            paths["latest"] = save_atomic(
                model_payload(model, cfg, data.num_items, optimizer=optimizer.state_dict(),
                              scheduler=scheduler.state_dict(), loop=state.to_dict(),
                              torch_rng=torch.get_rng_state()),
                run_dir / "latest.pt")
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
            if progress:
                shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("train/loss", "valid/"))}
                print(f"epoch {epoch}: {shown}", file=sys.stderr, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, state, paths)

    return {"epochs": state.epoch, "best_epoch": state.best_epoch,
            "best_valid": state.best_valid, "seconds": state.seconds,
            "seconds_to_best": state.seconds_to_best, "run_dir": str(run_dir)}


def test_best(run_dir: str | Path, data: SequenceData, device: torch.device,
              reverse_steps: int | None = None, progress: bool = False) -> dict[str, float]:
    model, cfg, _ = load_checkpoint(Path(run_dir) / "best.pt", device)
    return evaluate(model, data, "test", cfg, device, reverse_steps=reverse_steps, progress=progress)
