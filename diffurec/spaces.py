"""Search spaces for ``pipelines/tune.py``, as plain YAML data (no Python, no Ray).

A space file (``tune_spaces/*.yaml``) is a mapping with these top-level keys::

    description: free text (optional)
    num_samples: 8            # optional default for --num-samples
    fixed:                    # optional: Config overrides applied to every trial
      epochs: 20
    params:                   # required: what the search samples
      noise_schedule: {choice: [trunc_lin, linear, cosine, sqrt, trunc_cos, pw_lin]}
      diffusion_steps: {int: [8, 64]}            # integers, both ends included
      reverse_steps_fraction: {uniform: [0.1, 1.0]}
      lambda_mean: {loguniform: [1.0e-4, 1.0e-1]}
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      dropout: {uniform: [0.0, 0.5]}

Distributions: ``choice: [v, ...]``, ``uniform: [low, high]``, ``loguniform: [low, high]``
(low > 0), ``int: [low, high]`` and ``logint: [low, high]`` (integers, both ends included,
logint needs low >= 1). A bare scalar under ``params`` is a constant.

Keys are :class:`~diffurec.config.Config` keys, plus the documented special key
``reverse_steps_fraction`` (in (0, 1]): each trial derives
``reverse_steps = clamp(round(fraction * diffusion_steps), 1, diffusion_steps)``, so a sampled pair
is never invalid. Sampling ``reverse_steps`` itself is allowed only when it can never exceed
``diffusion_steps`` (its high end <= the lowest possible ``diffusion_steps``).

:func:`load_space` checks the file's shape and every range on its own; :func:`check_space` then
checks that every corner of the space gives a valid Config on top of the sweep's base config
(``fixed`` + ``--set``). Both raise :class:`~diffurec.errors.DiffuRecError` naming the file and
key, before any trial starts.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from diffurec.config import Config
from diffurec.errors import DiffuRecError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "logint")
TOP_LEVEL_KEYS = ("description", "num_samples", "fixed", "params")
REVERSE_FRACTION = "reverse_steps_fraction"
SPECIAL_KEYS = (REVERSE_FRACTION,)
# keys that say where/how a trial runs, not what it learns: fixed (or --set) only, never sampled
RUNTIME_KEYS = ("device", "threads", "output_dir", "keep_freed_memory")
# more corner combinations than this are checked key by key only
MAX_CORNERS = 4096

_TYPES = {f.name: f.type for f in fields(Config)}


def _ptype(key: str) -> str:
    if key == REVERSE_FRACTION:
        return "float"
    t = _TYPES[key]
    return t if isinstance(t, str) else t.__name__


@dataclass(frozen=True)
class Dist:
    """One sampled key: ``kind`` in DISTRIBUTIONS (or ``const``), with bounds or choices."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice{list(self.choices)}"
        if self.kind == "const":
            return f"const({self.choices[0]!r})"
        return f"{self.kind}[{self.low}, {self.high}]"

    def corners(self) -> list:
        """The values at the edges of the range (every value for a choice)."""
        if self.kind in ("choice", "const"):
            return list(self.choices)
        return [self.low] if self.low == self.high else [self.low, self.high]

    def sample(self, rng: random.Random):
        if self.kind in ("choice", "const"):
            return rng.choice(self.choices)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "int":
            return rng.randint(self.low, self.high)
        if self.kind == "logint":
            v = round(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1))) - 0.5)
            return int(min(max(v, self.low), self.high))
        raise AssertionError(self.kind)


@dataclass
class SearchSpace:
    path: str
    params: dict[str, Dist]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    num_samples: int | None = None

    def describe(self) -> dict[str, str]:
        return {k: d.describe() for k, d in self.params.items()}

    def sample(self, rng: random.Random | int | None = None) -> dict[str, Any]:
        """One Ray-free random draw (tests, dry runs); Tune samples through OptunaSearch."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        return {k: d.sample(rng) for k, d in self.params.items()}

    def base_config(self, base: Config | None = None, sets: dict[str, Any] | None = None) -> Config:
        """``base`` (default: Config()) with this file's ``fixed`` values, then ``sets`` on top
        (special keys stay out: they are applied per trial by :func:`trial_config`)."""
        cfg = base or Config()
        merged = {**self.fixed, **(sets or {})}
        plain = {k: v for k, v in merged.items() if k not in SPECIAL_KEYS}
        try:
            return cfg.with_overrides(plain, source=f"{self.path}: fixed")
        except DiffuRecError as exc:
            # a sampled key may be what makes the fixed values valid (hidden_size 30 with
            # num_heads sampled from [2, 5]): hold the sampled keys at a corner and retry
            sampled = {k: d.corners()[0] for k, d in self.params.items() if k not in SPECIAL_KEYS}
            if "reverse_steps" in self.params:
                sampled["reverse_steps"] = min(self.params["reverse_steps"].corners())
            if "diffusion_steps" in self.params:
                sampled["diffusion_steps"] = max(self.params["diffusion_steps"].corners())
            if REVERSE_FRACTION in self.params or REVERSE_FRACTION in merged:
                sampled.setdefault("reverse_steps", 1)
            try:
                return cfg.with_overrides({**plain, **sampled}, source=f"{self.path}: fixed")
            except DiffuRecError:
                raise DiffuRecError(f"{self.path}: fixed/--set values give an invalid config: {exc}") from None

    def specials(self, sets: dict[str, Any] | None = None) -> dict[str, Any]:
        merged = {**self.fixed, **(sets or {})}
        return {k: v for k, v in merged.items() if k in SPECIAL_KEYS}


# ---- loading ----------------------------------------------------------------------------------
def _num(path: str, key: str, value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise DiffuRecError(f"{path}: key '{key}': {what} must be a number, got {value!r}")
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    raise DiffuRecError(f"{path}: key '{key}': {what} must be a finite number, got {value!r}")


def _check_key(path: str, key: Any, section: str) -> str:
    if not isinstance(key, str):
        raise DiffuRecError(f"{path}: {section}: key {key!r} is not a string")
    if key not in _TYPES and key not in SPECIAL_KEYS:
        raise DiffuRecError(
            f"{path}: {section}: unknown key '{key}' (use a Config key, or one of the special keys "
            f"{', '.join(SPECIAL_KEYS)}; known Config keys: {', '.join(sorted(_TYPES))})")
    return key


def _coerce_value(path: str, key: str, value: Any, section: str) -> Any:
    """Coerce one value with Config's own rules (type only; ranges are checked later)."""
    if key == REVERSE_FRACTION:
        return float(_num(path, key, value, "value"))
    try:
        return _coerce_only(key, value)
    except DiffuRecError as exc:
        raise DiffuRecError(f"{path}: {section}: key '{key}': {_strip_source(exc)}") from None


def _coerce_only(key: str, value: Any) -> Any:
    from diffurec.config import _coerce

    return _coerce(key, value, _TYPES[key], "value")


def _strip_source(exc: Exception) -> str:
    msg = str(exc)
    return msg.split(": ", 1)[1] if msg.startswith(("value: ", "override: ")) else msg


def _parse_dist(path: str, key: str, spec: Any) -> Dist:
    where = f"{path}: params: key '{key}'"
    if key in RUNTIME_KEYS:
        raise DiffuRecError(f"{where}: '{key}' says where a trial runs and cannot be searched; "
                            f"put it under 'fixed' or pass --set {key}=...")
    ptype = _ptype(key)
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise DiffuRecError(f"{where}: a list is ambiguous; write {{choice: {spec}}}")
        return Dist(key, "const", choices=(_coerce_value(path, key, spec, "params"),))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise DiffuRecError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)}, "
                            f"got {sorted(map(str, spec))}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise DiffuRecError(f"{where}: choice needs a non-empty list, got {arg!r}")
        values = tuple(_coerce_value(path, key, v, "params") for v in arg)
        if len(set(map(repr, values))) != len(values):
            raise DiffuRecError(f"{where}: choice has duplicate values {list(values)}")
        return Dist(key, "choice", choices=values)
    if not isinstance(arg, list) or len(arg) != 2:
        raise DiffuRecError(f"{where}: {kind} needs [low, high], got {arg!r}")
    low, high = (_num(path, key, v, f"{kind} bound") for v in arg)
    if kind in ("int", "logint"):
        if ptype != "int":
            raise DiffuRecError(f"{where}: {kind} samples integers but '{key}' is a {ptype}; "
                                "use uniform or loguniform")
        if not (float(low).is_integer() and float(high).is_integer()):
            raise DiffuRecError(f"{where}: {kind} bounds must be integers, got [{low}, {high}]")
        low, high = int(low), int(high)
    elif ptype != "float":
        raise DiffuRecError(f"{where}: {kind} samples floats but '{key}' is a {ptype}; "
                            + ("use int or logint" if ptype == "int" else "use choice"))
    else:
        low, high = float(low), float(high)
    if low > high:
        raise DiffuRecError(f"{where}: impossible range {kind}[{low}, {high}]: low > high")
    if kind in ("loguniform",) and low <= 0:
        raise DiffuRecError(f"{where}: impossible range loguniform[{low}, {high}]: low must be > 0")
    if kind == "logint" and low < 1:
        raise DiffuRecError(f"{where}: impossible range logint[{low}, {high}]: low must be >= 1")
    return Dist(key, kind, low, high)


def parse_space(data: Any, path: str = "<space>") -> SearchSpace:
    """A :class:`SearchSpace` from already-loaded YAML data (shape and per-key checks)."""
    if not isinstance(data, dict):
        raise DiffuRecError(f"{path}: expected a mapping with 'params', got {type(data).__name__}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise DiffuRecError(f"{path}: unknown top-level key '{key}' (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise DiffuRecError(f"{path}: key 'params' must be a non-empty mapping of keys to distributions")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise DiffuRecError(f"{path}: key 'fixed' must be a mapping of Config keys to values")
    fixed = {_check_key(path, k, "fixed"): _coerce_value(path, k, v, "fixed") for k, v in fixed.items()}
    dists = {}
    for key, spec in params.items():
        _check_key(path, key, "params")
        if key in fixed:
            raise DiffuRecError(f"{path}: key '{key}' is both under 'fixed' and under 'params'")
        dists[key] = _parse_dist(path, key, spec)
    num_samples = data.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise DiffuRecError(f"{path}: key 'num_samples' must be a positive integer, got {num_samples!r}")
    description = data.get("description") or ""
    space = SearchSpace(path=path, params=dists, fixed=fixed, description=str(description),
                        num_samples=num_samples)
    _check_reverse_steps(space)
    return space


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (see the module docstring for the format)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DiffuRecError(f"space file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise DiffuRecError(f"{p}: not valid YAML ({exc})") from None
    return parse_space(data, str(path))


def _check_reverse_steps(space: SearchSpace) -> None:
    path = space.path
    frac = space.params.get(REVERSE_FRACTION)
    frac_values = frac.corners() if frac else ([space.fixed[REVERSE_FRACTION]] if REVERSE_FRACTION in space.fixed else [])
    for v in frac_values:
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise DiffuRecError(f"{path}: key '{REVERSE_FRACTION}': impossible value {v!r}: "
                                "the fraction of diffusion_steps must be in (0, 1]")
    has_fraction = REVERSE_FRACTION in space.params or REVERSE_FRACTION in space.fixed
    has_reverse = "reverse_steps" in space.params or "reverse_steps" in space.fixed
    if has_fraction and has_reverse:
        raise DiffuRecError(f"{path}: key 'reverse_steps': give either reverse_steps or "
                            f"{REVERSE_FRACTION}, not both")


# ---- per-trial config -------------------------------------------------------------------------
def derive_reverse_steps(fraction: float, diffusion_steps: int) -> int:
    return int(min(diffusion_steps, max(1, round(fraction * diffusion_steps))))


def trial_config(base: Config, sampled: dict[str, Any], source: str = "trial") -> Config:
    """The Config of one trial: ``base`` + the sampled values, with ``reverse_steps`` derived
    from ``reverse_steps_fraction`` when that key is present."""
    values = {k: v for k, v in sampled.items() if k not in SPECIAL_KEYS}
    frac = sampled.get(REVERSE_FRACTION)
    if frac is not None:
        steps = int(values.get("diffusion_steps", base.diffusion_steps))
        values["reverse_steps"] = derive_reverse_steps(float(frac), steps)
    return base.with_overrides(values, source=source)


# ---- whole-space checks -----------------------------------------------------------------------
def _blame(space: SearchSpace, message: str, fallback: str) -> str:
    """The sampled key that an error message names, else ``fallback``."""
    for key in space.params:
        if f"'{key}'" in message:
            return key
    if "'reverse_steps'" in message and REVERSE_FRACTION in space.params:
        return REVERSE_FRACTION
    return fallback


def check_space(space: SearchSpace, base: Config) -> None:
    """Every corner of the space must give a valid Config on top of ``base`` (which already holds
    ``fixed`` and ``--set``): first each key alone, then all corners together."""
    specials = space.specials()
    if REVERSE_FRACTION in space.params:  # the key-by-key pass keeps reverse_steps derived
        specials[REVERSE_FRACTION] = space.params[REVERSE_FRACTION].corners()[-1]
    # key by key, the pair (diffusion_steps, reverse_steps) is held at its most lenient corner;
    # the pair itself is checked right after
    lenient = {}
    if "reverse_steps" in space.params:
        lenient["reverse_steps"] = min(space.params["reverse_steps"].corners())
    if "diffusion_steps" in space.params:
        lenient["diffusion_steps"] = max(space.params["diffusion_steps"].corners())
    path = space.path
    for key, dist in space.params.items():
        others = {k: v for k, v in lenient.items() if k != key}
        for value in dist.corners():
            try:
                trial_config(base, {**specials, **others, key: value})
            except DiffuRecError as exc:
                msg = str(exc).split(": ", 1)[-1] if str(exc).startswith("trial: ") else str(exc)
                hint = ""
                if "'reverse_steps'" in msg and key == "diffusion_steps":
                    hint = f"; sample {REVERSE_FRACTION} so reverse_steps follows diffusion_steps"
                raise DiffuRecError(f"{path}: key '{key}': impossible range {dist.describe()}: "
                                    f"{key}={value!r} gives an invalid config ({msg}){hint}") from None
    if "reverse_steps" in space.params:
        rs = space.params["reverse_steps"]
        ds = space.params.get("diffusion_steps")
        lowest_t = min(ds.corners()) if ds else base.diffusion_steps
        highest_r = max(rs.corners())
        if highest_r > lowest_t:
            raise DiffuRecError(
                f"{path}: key 'reverse_steps': impossible range {rs.describe()}: reverse_steps={highest_r} "
                f"exceeds diffusion_steps={lowest_t}, which the space can also sample; sample "
                f"{REVERSE_FRACTION} instead (reverse_steps = fraction * diffusion_steps)")
    corners = [d.corners() for d in space.params.values()]
    if math.prod(len(c) for c in corners) > MAX_CORNERS:
        return
    keys = list(space.params)
    for combo in itertools.product(*corners):
        sampled = dict(zip(keys, combo))
        try:
            trial_config(base, {**specials, **sampled})
        except DiffuRecError as exc:
            msg = str(exc).split(": ", 1)[-1] if str(exc).startswith("trial: ") else str(exc)
            key = _blame(space, msg, keys[0])
            raise DiffuRecError(f"{path}: key '{key}': impossible range {space.params[key].describe()}: "
                                f"the combination {sampled} gives an invalid config ({msg})") from None


def max_value(space: SearchSpace, base: Config, key: str) -> Any:
    """The largest value ``key`` can take in a trial (e.g. epochs, for ASHA's max_t)."""
    if key in space.params:
        return max(space.params[key].corners())
    return getattr(base, key)
