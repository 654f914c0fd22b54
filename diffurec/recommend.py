"""Top-K recommendations: score every user's full history against all items, keep the K best.

One scorer serves three callers: ``python -m diffurec recommend`` (this process, no Ray),
``pipelines/recommend.py`` (a Ray Data actor pool calls :meth:`Recommender.recommend_table` on
each batch of users) and the MLflow pyfunc model (``diffurec.serving``), which calls
:meth:`Recommender.top_k` on request histories. See docs/recommend.md.

- The history is the user's whole sequence in the prepared dataset (its validation and test items
  included: these are recommendations after the log, not an evaluation), the model seeing the most
  recent ``max_len`` items, exactly as evaluation batches them (token-budget batches by length).
- Output rows hold the log's own ids: ``user_id`` from the sequences, ``item_id`` from
  ``items.parquet``; never dense indices.
- Reproducible: DiffuRec's starting noise x_T of each user is drawn from a counter-based hash of
  (seed, user key, sample), so a user starts from the same x_T in any batch, any worker and any
  run; the later reverse steps draw torch noise seeded per batch. With
  ``deterministic_reverse=true`` (no sampled noise after x_T) a user's list is the same whichever
  path or batching produced it. SASRec is deterministic anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffurec.config import Config
from diffurec.errors import DiffuRecError
from diffurec.metrics import exclude_scores
from diffurec.training import model_from_payload, read_checkpoint

__all__ = [
    "DEFAULT_K",
    "ItemCatalog",
    "Recommender",
    "check_k",
    "check_same_items",
    "load_catalog",
    "load_model_payload",
    "open_recommender",
    "publish_output",
    "read_recommendations",
    "recommend_to_parquet",
    "staging_output",
    "user_keys",
]

DEFAULT_K = 20
META_FILE = "_recommendations.json"  # '_' prefix: parquet readers of the folder skip it
OUTPUT_SCHEMA_DOC = "user_id, rank (1..K), item_id (the log's id), score"
USERS_PER_TABLE = 65_536  # users per output file of the in-process path


# ---- the item id mapping -----------------------------------------------------------------------
@dataclass
class ItemCatalog:
    """The log's item ids in dense order (``item_ids[j]`` is dense id ``j + 1``) and, where
    known, each item's interaction count in the log (for the popularity fallback)."""

    item_ids: pa.Array
    counts: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def id_type(self) -> pa.DataType:
        return self.item_ids.type

    @classmethod
    def read(cls, path: str | os.PathLike) -> ItemCatalog:
        """From ``items.parquet`` (item_id, item[, count]); ``path`` may be a dataset folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "items.parquet"
        if not path.is_file():
            raise DiffuRecError(f"{path}: item id mapping not found (items.parquet)")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001
            raise DiffuRecError(f"{path}: cannot read: {exc}") from None
        for col in ("item_id", "item"):
            if col not in table.column_names:
                raise DiffuRecError(f"{path}: missing column {col!r}")
        table = table.take(pc.sort_indices(table, sort_keys=[("item", "ascending")]))
        dense = table.column("item").to_numpy()
        if len(dense) == 0 or not np.array_equal(dense, np.arange(1, len(dense) + 1)):
            raise DiffuRecError(f"{path}: column 'item' must hold the dense ids 1..N once each")
        counts = table.column("count").to_numpy().astype(np.int64) if "count" in table.column_names else None
        return cls(table.column("item_id").combine_chunks(), counts)

    def write(self, path: str | os.PathLike) -> Path:
        cols = {"item_id": self.item_ids, "item": pa.array(np.arange(1, self.num_items + 1, dtype=np.int64))}
        if self.counts is not None:
            cols["count"] = pa.array(self.counts.astype(np.int64))
        pq.write_table(pa.table(cols), path)
        return Path(path)

    def to_dense(self, ids: pa.Array) -> np.ndarray:
        """Dense ids (int64) of the log's ``ids``; 0 where an id is unknown (or null)."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        ids = pa.array(ids) if not isinstance(ids, pa.Array | pa.ChunkedArray) else ids
        if ids.type != self.id_type:
            try:
                ids = ids.cast(self.id_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DiffuRecError(f"item ids of type {ids.type} given; this model's item ids are "
                                    f"{self.id_type}") from None
        pos = pc.index_in(ids, value_set=self.item_ids)
        return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def log_ids(self, dense: np.ndarray) -> pa.Array:
        """The log's ids of dense ids (1..N)."""
        return self.item_ids.take(pa.array(np.asarray(dense, dtype=np.int64) - 1))

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most interacted-with items (dense ids) and their share of all interactions."""
        if self.counts is None:
            raise DiffuRecError("this item mapping has no interaction counts: no popularity ranking")
        order = np.argsort(-self.counts, kind="stable")[:k]
        return order + 1, (self.counts[order] / max(int(self.counts.sum()), 1)).astype(np.float32)


def load_catalog(data_dir: str | os.PathLike, counts: bool = False) -> ItemCatalog:
    """The item mapping of a prepared dataset; ``counts=True`` adds each item's interaction
    count in the whole log (reads the sequences)."""
    catalog = ItemCatalog.read(data_dir)
    if counts and catalog.counts is None:
        from diffurec.data.sequences import load_sequences

        data = load_sequences(data_dir)
        catalog.counts = np.bincount(data.items, minlength=data.num_items + 1)[1:].astype(np.int64)
    return catalog


def check_k(k: Any, num_items: int, flag: str = "--k") -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= num_items:
        raise DiffuRecError(f"{flag} must be an integer in 1..{num_items} (the number of items), got {k!r}")
    return int(k)


# ---- loading a model ---------------------------------------------------------------------------
def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.startswith(".") or ref.endswith((".pt", ".pth"))


def load_model_payload(ref: str, tracking_uri: str | None = None) -> tuple[dict, str, ItemCatalog | None]:
    """A model reference -> (checkpoint payload, what it was, the model's own id mapping or None).

    ``ref`` is a checkpoint file (or a run folder holding ``best.pt``), an MLflow model folder, an
    MLflow model URI (``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/RUN_ID/recommender``,
    ``models:/m-...``) or a registered model name (its ``champion`` alias, else its latest version).
    MLflow models may be this project's pyfunc (``diffurec.serving``: the checkpoint is one of its
    artifacts) or an ``mlflow.pytorch`` model logged by training, whose run's
    ``checkpoint/best.pt`` (else the pickled module and the run's config params) is used.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and (path / "MLmodel").is_file():
            return _payload_from_model_dir(path, ref)
        if path.is_dir():
            path = path / "best.pt"
            if not path.is_file():
                raise DiffuRecError(f"model {ref}: a folder with neither best.pt nor an MLmodel file")
        return read_checkpoint(path), f"checkpoint {path.resolve()}", None
    if ":/" in ref:
        return _payload_from_mlflow(ref, tracking_uri)
    if _looks_like_path(ref):
        raise DiffuRecError(f"model not found: no such checkpoint file or folder {ref}")
    return _payload_from_mlflow(_registered_uri(ref, tracking_uri), tracking_uri)


def _client(tracking_uri: str | None):
    import mlflow

    from diffurec.tracking import resolve_tracking_uri

    return mlflow.MlflowClient(tracking_uri or resolve_tracking_uri(None))


def _registered_uri(name: str, tracking_uri: str | None) -> str:
    import mlflow

    from diffurec.serving import CHAMPION_ALIAS

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise DiffuRecError(f"model not found: {name!r} is no checkpoint file and no registered model in "
                            f"the MLflow store {client.tracking_uri}") from None
    if CHAMPION_ALIAS in (model.aliases or {}):
        return f"models:/{name}@{CHAMPION_ALIAS}"
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise DiffuRecError(f"registered model {name!r} has no versions")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def _source_run_id(uri: str, client) -> str | None:
    """The run that logged the model at ``uri``, where MLflow can tell."""
    rest = uri.split(":/", 1)[1].lstrip("/")
    try:
        if uri.startswith("runs:/"):
            return rest.split("/", 1)[0]
        if uri.startswith("models:/"):
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            if "/" in rest:
                name, version = rest.split("/", 1)
                return client.get_model_version(name, version).run_id
            return client.get_logged_model(rest).source_run_id
    except Exception:  # noqa: BLE001 - not resolvable: the caller says what is missing
        return None
    return None


def _payload_from_mlflow(uri: str, tracking_uri: str | None) -> tuple[dict, str, ItemCatalog | None]:
    import tempfile

    client = _client(tracking_uri)
    local = Path(tempfile.mkdtemp(prefix="diffurec-model-"))
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return _download_payload(uri, client, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


def _storage_uri(uri: str, client) -> str:
    """Where the model at a ``models:/`` or ``runs:/`` URI is stored, asked of ``client``'s store.

    Resolved here rather than by ``mlflow.artifacts.download_artifacts``: for these schemes
    MLflow 3.17 consults the process-wide tracking/registry URI, not the one it is given."""
    rest = uri.split(":/", 1)[1].lstrip("/")
    if uri.startswith("models:/"):
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_download_uri(name, client.get_model_version_by_alias(name, alias).version)
        if "/" in rest:
            name, version = rest.split("/", 1)
            if version.lower() == "latest":
                version = str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
            return client.get_model_version_download_uri(name, version)
        return client.get_logged_model(rest).artifact_location
    if uri.startswith("runs:/"):
        run_id, _, path = rest.partition("/")
        run = client.get_run(run_id)
        for model in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'"):
            if model.name == path:
                return model.artifact_location
        return f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a model saved among the run's artifacts
    return uri


def _download_payload(uri: str, client, local: Path) -> tuple[dict, str, ItemCatalog | None]:
    import mlflow

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=_storage_uri(uri, client), dst_path=str(local),
                                                        tracking_uri=client.tracking_uri))
    except Exception as exc:  # noqa: BLE001 - unknown name/alias/run, unreachable store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffuRecError(f"model not found: {uri} ({first})") from None
    if not (path / "MLmodel").is_file():
        raise DiffuRecError(f"model {uri}: not an MLflow model (no MLmodel file)")
    flavors = _flavors(path)
    if "python_function" in flavors and (path / "artifacts" / "checkpoint.pt").is_file():
        return _payload_from_model_dir(path, uri)
    if "pytorch" in flavors:
        run_id = _source_run_id(uri, client)
        if run_id:
            try:
                (local / "run").mkdir()
                ckpt = Path(client.download_artifacts(run_id, "checkpoint/best.pt", str(local / "run")))
                return read_checkpoint(ckpt), f"{uri} (checkpoint/best.pt of run {run_id})", None
            except Exception:  # noqa: BLE001 - no checkpoint artifact: rebuild from the module
                pass
            import mlflow.pytorch

            module = mlflow.pytorch.load_model(path.as_uri(), map_location="cpu")
            params = client.get_run(run_id).data.params
            cfg = {k: v for k, v in params.items() if k in Config.keys()}
            return ({"model": module.state_dict(), "config": Config.from_dict(cfg, source=f"run {run_id}").to_dict(),
                     "num_items": module.num_items}, f"{uri} (module and config of run {run_id})", None)
    raise DiffuRecError(f"model {uri}: neither a diffurec pyfunc model nor an mlflow.pytorch model of a "
                        f"diffurec training run (flavors: {', '.join(sorted(flavors)) or 'none'})")


def _flavors(model_dir: Path) -> dict:
    import yaml

    try:
        return (yaml.safe_load((model_dir / "MLmodel").read_text()) or {}).get("flavors") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DiffuRecError(f"{model_dir / 'MLmodel'}: cannot read: {exc}") from None


def _payload_from_model_dir(path: Path, what: str) -> tuple[dict, str, ItemCatalog | None]:
    ckpt = path / "artifacts" / "checkpoint.pt"
    if not ckpt.is_file():
        raise DiffuRecError(f"model {what}: an MLflow model without a diffurec checkpoint artifact")
    items = path / "artifacts" / "items.parquet"
    return read_checkpoint(ckpt), f"{what}", ItemCatalog.read(items) if items.is_file() else None


def check_same_items(model_catalog: ItemCatalog | None, catalog: ItemCatalog, data: str) -> None:
    """A model that carries its own id mapping must agree with the dataset's."""
    if model_catalog is None:
        return
    if model_catalog.num_items != catalog.num_items:
        raise DiffuRecError(f"--data {data} has {catalog.num_items} items but the model was trained on "
                            f"{model_catalog.num_items}: use the dataset the model was trained on")
    if not model_catalog.item_ids.equals(catalog.item_ids):
        raise DiffuRecError(f"--data {data}: its item ids differ from the model's own id mapping: "
                            "use the dataset the model was trained on")


# ---- scoring -----------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def start_noise(keys: np.ndarray, hidden: int, seed: int, sample: int = 0) -> torch.Tensor:
    """[B, hidden] standard normal x_T, a pure function of (seed, sample, key) per row:
    counter-based (splitmix64 over key and position, then Box-Muller), so no RNG state and no
    dependence on which rows share a batch."""
    keys = np.asarray(keys, dtype=np.uint64)
    half = (hidden + 1) // 2
    with np.errstate(over="ignore"):
        stream = _splitmix64(np.array([seed * 1_000_003 + sample], dtype=np.uint64))[0]
        base = _splitmix64(keys ^ stream)
        counters = base[:, None] + np.arange(2 * half, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _splitmix64(counters) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) * (1.0 / 2**53)  # (0, 1)
    u1, u2 = u[:, :half], u[:, half:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return torch.from_numpy(z[:, :hidden].astype(np.float32))


def user_keys(user_ids: pa.Array | np.ndarray) -> np.ndarray:
    """uint64 noise keys of the log's user ids: integers as they are, strings hashed (blake2b)."""
    arr = user_ids if isinstance(user_ids, pa.Array | pa.ChunkedArray) else pa.array(user_ids)
    if pa.types.is_integer(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little")
                     for v in arr.to_pylist()], dtype=np.uint64)


def history_keys(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint64 noise keys of histories themselves (a request's rows): equal histories, equal keys."""
    return np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(flat[a:b], dtype=np.int64).tobytes(),
                                                     digest_size=8).digest(), "little")
                     for a, b in zip(offsets[:-1], offsets[1:])], dtype=np.uint64)


class Recommender:
    """A model ready to produce top-K lists: model, config, device, item mapping and options.

    ``reverse_steps`` (DiffuRec; None = the config's) and ``exclude_history`` (drop every item of
    the user's known history from the list) default to the config's values.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, catalog: ItemCatalog, *,
                 device: torch.device | str = "cpu", k: int = DEFAULT_K, exclude_history: bool | None = None,
                 reverse_steps: int | None = None):
        if catalog.num_items != model.num_items:
            raise DiffuRecError(f"the item mapping has {catalog.num_items} items but the model was trained on "
                                f"{model.num_items}: use the dataset the model was trained on")
        if reverse_steps is not None:
            cfg = cfg.with_overrides({"reverse_steps": reverse_steps}, source="--reverse-steps")
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = torch.device(device)
        self.catalog = catalog
        self.k = check_k(k, catalog.num_items)
        self.exclude_history = cfg.exclude_history if exclude_history is None else bool(exclude_history)
        self.diffusion = hasattr(model, "diffusion")

    @classmethod
    def from_payload(cls, payload: dict, catalog: ItemCatalog, *, device: torch.device | str | None = None,
                     sets: list[str] | None = None, **options) -> Recommender:
        """``sets``: evaluation-time config keys (``key=value``), e.g. ``reverse_samples=4``."""
        if int(payload["num_items"]) != catalog.num_items:
            raise DiffuRecError(f"the data has {catalog.num_items} items but the model was trained on "
                                f"{payload['num_items']}: use the dataset the model was trained on")
        model, cfg = model_from_payload(payload, "cpu")
        model.eval()
        cfg = cfg.with_sets(sets)
        if device is None:
            from diffurec.training import resolve_device

            device = resolve_device(cfg)
        return cls(model, cfg, catalog, device=device, **options)

    # -- the core: dense histories -> dense top-K ---------------------------------------------------
    @torch.no_grad()
    def top_k(self, flat: np.ndarray, offsets: np.ndarray, keys: np.ndarray, *, k: int | None = None,
              exclude_history: bool | None = None, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-K of B histories in CSR form (``flat[offsets[b]:offsets[b+1]]``: dense ids, oldest
        first, at least one each). Returns (dense ids [B, K] int64, scores [B, K] float32); with
        ``exclude_history`` a user with fewer than K other items gets id 0 and score -inf there."""
        from diffurec.data.batches import pad_histories
        from diffurec.models.approximator import packed_weights
        from diffurec.training import SCORE_ROWS, autocast, autocast_dtype, eval_batch_order, pad_to

        k = self.k if k is None else check_k(k, self.catalog.num_items)
        exclude = self.exclude_history if exclude_history is None else exclude_history
        cfg, device = self.cfg, self.device
        flat = np.asarray(flat, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        ids = np.zeros((n, k), dtype=np.int64)
        scores_out = np.full((n, k), -np.inf, dtype=np.float32)
        if n == 0:
            return ids, scores_out
        lengths = np.diff(offsets)
        if lengths.min() < 1:
            raise DiffuRecError("every history needs at least one known item")
        ends = offsets[1:]
        starts = np.maximum(offsets[:-1], ends - cfg.max_len)
        dtype = autocast_dtype(device, cfg.precision)
        items = self.model.item_matrix()  # float32, as evaluation ranks
        hidden = items.shape[1]  # the model's own width, whatever an inference-time --set says
        kwargs = {"reverse_steps": cfg.reverse_steps, "deterministic": cfg.deterministic_reverse} \
            if self.diffusion else {}
        with autocast(device, cfg.precision), packed_weights(self.model, dtype or torch.float32):
            for idx in eval_batch_order(ends - starts, cfg, device):
                history = torch.from_numpy(pad_histories(flat, starts[idx], ends[idx], pad_to(cfg))).to(device)
                reps = []
                # the reverse steps' noise: seeded per batch, the caller's RNG left as it was
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(int(_splitmix64(np.array([keys[idx[0]] ^ np.uint64(cfg.seed)],
                                                               dtype=np.uint64))[0] >> np.uint64(1)))
                    for sample in range(cfg.reverse_samples):
                        if self.diffusion:
                            x_T = start_noise(keys[idx], hidden, cfg.seed, sample).to(device)
                            reps.append(self.model.predict(history, x_T=x_T, **kwargs))
                        else:
                            reps.append(self.model.predict(history))
                full = None
                if exclude:
                    full = torch.from_numpy(pad_histories(flat, offsets[:-1][idx], ends[idx])).to(device)
                for lo in range(0, len(idx), SCORE_ROWS):
                    rows = slice(lo, lo + SCORE_ROWS)
                    s = None
                    for rep in reps:
                        part = self.model.score(rep[rows], items)
                        s = part if s is None else s + part
                    if full is not None:
                        s = exclude_scores(s, full[rows])
                    top = torch.topk(s, k, dim=1)
                    where = idx[rows]
                    values = top.values.cpu().numpy()
                    ids[where] = np.where(np.isfinite(values), top.indices.cpu().numpy() + 1, 0)
                    scores_out[where] = values
                if on_batch is not None:
                    on_batch(len(idx))
        return ids, scores_out

    # -- tables of the log's ids ------------------------------------------------------------------
    def recommend_csr(self, user_ids: pa.Array, flat: np.ndarray, offsets: np.ndarray, *,
                      on_batch=None) -> pa.Table:
        """Long-format lists (``user_id, rank, item_id, score``) of users whose dense sequences
        are in CSR form; input order kept, ranks ascending."""
        ids, scores = self.top_k(flat, offsets, user_keys(user_ids), on_batch=on_batch)
        return self._long_table(user_ids, ids, scores)

    def recommend_table(self, table: pa.Table) -> pa.Table:
        """A batch of ``Table(user_id, items)`` (dense ids, as in ``sequences/``) -> long-format
        lists. What each Ray Data actor calls."""
        for col in ("user_id", "items"):
            if col not in table.column_names:
                raise DiffuRecError(f"recommendation input: missing column {col!r}")
        lists = table.column("items").combine_chunks()
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        if len(flat) and (flat.min() < 1 or flat.max() > self.catalog.num_items):
            raise DiffuRecError(f"recommendation input: dense item ids must lie in 1..{self.catalog.num_items}")
        return self.recommend_csr(table.column("user_id").combine_chunks(), flat, offsets)

    def _long_table(self, user_ids: pa.Array, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
        n, k = ids.shape
        keep = (ids > 0).reshape(-1)
        rows = np.repeat(np.arange(n, dtype=np.int64), k)[keep]
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), n)[keep]
        flat_ids = ids.reshape(-1)[keep]
        return pa.table({
            "user_id": user_ids.take(pa.array(rows)),
            "rank": pa.array(rank),
            "item_id": self.catalog.log_ids(flat_ids),
            "score": pa.array(scores.reshape(-1)[keep].astype(np.float32)),
        })


# ---- output folders ----------------------------------------------------------------------------
def _is_recommendations(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


def staging_output(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check ``output`` (refused if it exists, unless ``overwrite`` and it is an earlier
    recommendations folder) and return a fresh staging folder beside it (same filesystem)."""
    from diffurec.data.sequences import check_target, staging_dir

    out = Path(output).expanduser().absolute()
    check_target(out, overwrite, _is_recommendations, "a recommendations folder")
    return staging_dir(out)


def publish_output(staging: Path, output: str | os.PathLike, meta: dict, overwrite: bool = False) -> Path:
    """Write ``_recommendations.json`` into ``staging`` and rename it to ``output``."""
    from diffurec.data.sequences import publish_dataset

    (staging / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return publish_dataset(staging, Path(output).expanduser(), overwrite, _is_recommendations,
                           "a recommendations folder")


def read_recommendations(path: str | os.PathLike) -> pa.Table:
    """A recommendations folder as one table sorted by (user_id, rank)."""
    files = sorted(p for p in Path(path).glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DiffuRecError(f"{path}: no parquet files")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.take(pc.sort_indices(table, sort_keys=[("user_id", "ascending"), ("rank", "ascending")]))


def run_meta(rec: Recommender, model: str, data: str | os.PathLike, users: int, rows: int, seconds: float,
             **extra) -> dict:
    return {"model": model, "data": str(Path(data).resolve()), "k": rec.k, "exclude_history": rec.exclude_history,
            "reverse_steps": rec.cfg.reverse_steps if rec.diffusion else None, "model_type": rec.cfg.model,
            "users": users, "rows": rows, "columns": OUTPUT_SCHEMA_DOC, "seconds": round(seconds, 3),
            "users_per_s": round(users / seconds, 1) if seconds > 0 else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}


def recommend_to_parquet(rec: Recommender, data_dir: str | os.PathLike, output: str | os.PathLike, *,
                         model: str = "", overwrite: bool = False, progress: bool = True,
                         users_per_file: int = USERS_PER_TABLE) -> dict:
    """The in-process path: every user of the prepared dataset ``data_dir``, written to ``output``
    (parquet files plus ``_recommendations.json``) through a staging folder: a failure leaves
    nothing behind. Returns the run's summary (also the JSON file's content)."""
    from diffurec.data.sequences import load_sequences
    from diffurec.training import progress_bar

    staging = staging_output(output, overwrite)
    try:
        data = load_sequences(data_dir)
        if data.num_items != rec.catalog.num_items:
            raise DiffuRecError(f"--data {data_dir} has {data.num_items} items but the model was trained on "
                                f"{rec.catalog.num_items}: use the dataset the model was trained on")
        began = time.perf_counter()
        bar = progress_bar(len(data), "recommend users", progress)
        user_ids = pa.array(data.user_ids)
        rows = 0
        for part, lo in enumerate(range(0, len(data), users_per_file)):
            hi = min(len(data), lo + users_per_file)
            offsets = data.offsets[lo:hi + 1]
            flat = data.items[offsets[0]:offsets[-1]]
            table = rec.recommend_csr(user_ids.slice(lo, hi - lo), flat, offsets - offsets[0], on_batch=bar.update)
            pq.write_table(table, staging / f"part-{part:05d}.parquet")
            rows += table.num_rows
        bar.close()
        seconds = time.perf_counter() - began
        meta = run_meta(rec, model, data_dir, len(data), rows, seconds, path="in-process")
        out = publish_output(staging, output, meta, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"output": str(out), **meta}


def open_recommender(model: str, data_dir: str | os.PathLike, *, k: int = DEFAULT_K,
                     exclude_history: bool | None = None, reverse_steps: int | None = None,
                     sets: list[str] | None = None, tracking_uri: str | None = None,
                     device: torch.device | str | None = None) -> tuple[Recommender, dict, str]:
    """Everything both recommend commands check before any work: the dataset, K, the model and
    its agreement with the dataset. Returns (recommender, checkpoint payload, what the model was)."""
    from diffurec.data.sequences import is_prepared_dataset

    if reverse_steps is not None and reverse_steps < 1:
        raise DiffuRecError(f"--reverse-steps must be >= 1, got {reverse_steps}")
    if not is_prepared_dataset(data_dir):
        raise DiffuRecError(f"--data {data_dir}: not a prepared dataset (expected sequences/, items.parquet, "
                            "stats.json); prepare the log first (pipelines/prepare.py or python -m diffurec split)")
    catalog = load_catalog(data_dir)
    check_k(k, catalog.num_items)
    payload, what, own = load_model_payload(model, tracking_uri)
    check_same_items(own, catalog, str(data_dir))
    rec = Recommender.from_payload(payload, catalog, device=device, sets=sets, k=k, exclude_history=exclude_history,
                                   reverse_steps=reverse_steps)
    return rec, payload, what
