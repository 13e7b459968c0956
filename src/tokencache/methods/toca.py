"""Typed, validated configurations for the caching methods.

Every field is checked when the config is built; a bad value raises ``ValueError`` naming the field
and what is allowed, before any model work starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch

from .layouts import MODULE_KINDS

ScoreName = Literal["attention", "cross_attention_entropy", "value_norm", "similarity", "random", "forecast_error",
                    "forecast_term"]
SCORES: tuple[str, ...] = ("attention", "cross_attention_entropy", "value_norm", "similarity", "random",
                           "forecast_error", "forecast_term")
FORECAST_SCORES: tuple[str, ...] = ("forecast_error", "forecast_term")
FULL_STEP_PLACEMENTS: tuple[str, ...] = ("relative", "official", "periodic")
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(cls: type, name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"{cls.__name__}.{name} must be {allowed}; got {value!r}")


def _short(value: Any) -> Any:
    """``value`` for an error message: a huge integer as its magnitude, not hundreds of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return _Magnitude(value)
    return value


class _Magnitude:
    def __init__(self, value: int) -> None:
        self.text = f"{'-' if value < 0 else ''}an integer of {len(str(abs(value)))} digits"

    def __repr__(self) -> str:
        return self.text


def check_number(cls: type, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite (integer) number in the given range."""
    kinds = (int,) if integer else (int, float)
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"<= {hi}")
    allowed = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(cls, name, allowed, value)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float: no field means such a value, and maths on it overflows
        finite = False
    if not finite:
        raise _fail(cls, name, allowed + " (within float range)", _short(value))
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _fail(cls, name, allowed, value)
    if hi is not None and value > hi:
        raise _fail(cls, name, allowed, value)


def check_cache_dtype(cls: type, value: Any) -> None:
    if value is not None and value not in CACHE_DTYPES:
        raise _fail(cls, "cache_dtype", "None (the model's dtype) or one of torch.float32, torch.float16, "
                    "torch.bfloat16", value)


def _check_forecast(cls: type, value: Any) -> None:
    from .forecast import ForecastConfig  # forecast.py reuses this module's checks

    if value is not None and not isinstance(value, ForecastConfig):
        raise _fail(cls, "forecast", "None or a ForecastConfig", value)


@dataclass(frozen=True)
class StepRamp:
    """A linear function of sampling progress: ``start + slope * (i + offset) / T`` at step ``i`` of ``T``."""

    start: float = 1.0
    """Value at progress 0."""
    slope: float = 0.0
    """Change over the whole run."""
    offset: int = 0
    """Added to the step index before dividing by ``T`` (the official DiT schedules use ``i + 1``)."""

    def __post_init__(self) -> None:
        check_number(StepRamp, "start", self.start)
        check_number(StepRamp, "slope", self.slope)
        check_number(StepRamp, "offset", self.offset, 0, 1, integer=True)

    def __call__(self, step: int, num_steps: int) -> float:
        return self.start + self.slope * (step + self.offset) / num_steps


@dataclass(frozen=True)
class DepthRamp:
    """A linear function of depth: ``start + slope * l / (L - 1)`` for block ``l`` of ``L``."""

    start: float = 1.0
    """Value at the first block."""
    slope: float = 0.0
    """Change from the first block to the last."""

    def __post_init__(self) -> None:
        check_number(DepthRamp, "start", self.start)
        check_number(DepthRamp, "slope", self.slope)

    def __call__(self, block: int, num_blocks: int) -> float:
        return self.start + self.slope * (block / (num_blocks - 1) if num_blocks > 1 else 0.0)


@dataclass(frozen=True)
class BlockFactors:
    """One factor per block in depth order, for models whose blocks differ in kind (FLUX: dual-stream, then
    single-stream blocks, each with its own depth ramp)."""

    factors: tuple[float, ...]
    """The factors; their count must equal the model's number of blocks."""

    def __post_init__(self) -> None:
        if not isinstance(self.factors, tuple) or not self.factors:
            raise _fail(BlockFactors, "factors", "a non-empty tuple of numbers >= 0", self.factors)
        for i, value in enumerate(self.factors):
            check_number(BlockFactors, f"factors[{i}]", value, 0.0)

    def __call__(self, block: int, num_blocks: int) -> float:
        if num_blocks != len(self.factors):
            raise ValueError(f"BlockFactors has {len(self.factors)} factors but the model has {num_blocks} blocks")
        return self.factors[block]


class PresetMixin:
    """``Config.preset(name)`` and the listing behind ``tc.presets()``."""

    _PRESETS: ClassVar[dict[str, tuple[str, dict[str, Any]]]]

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The official settings registered under ``name``; keyword arguments override fields."""
        if name not in cls._PRESETS:
            owner = next((c for c in PresetMixin.__subclasses__() if name in getattr(c, "_PRESETS", {})), None)
            hint = (f": {name!r} is a {owner.__name__} preset, use {owner.__name__}.preset({name!r}) or "
                    f"tc.preset({name!r})") if owner is not None else ""
            raise ValueError(f"{cls.__name__}.preset name must be one of {sorted(cls._PRESETS)}; got {name!r}{hint}")
        _, values = cls._PRESETS[name]
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ToCaConfig(PresetMixin):
    """ToCa: training-free token-wise caching (ICLR 2025).

    On a full step every module runs on every token and refreshes its cache. On a partial step each
    module recomputes the ``k = floor(r * n)`` tokens with the highest score and takes the rest from the
    cache, where ``r = fresh_ratio * step_ratio(i) * depth_ratio(l) * module_ratio[kind]`` clamped to [0, 1].
    """

    fresh_ratio: float = 0.1
    """Base fraction of tokens recomputed on partial steps (R0), in [0, 1]."""
    step_ratio: StepRamp = field(default_factory=StepRamp)
    """Factor over sampling progress, S(i)."""
    depth_ratio: DepthRamp | BlockFactors = field(default_factory=DepthRamp)
    """Factor over block depth, Λ(l): a linear ramp, or one factor per block."""
    module_ratio: Mapping[str, float] = field(default_factory=lambda: {"cross_attn": 1.0, "mlp": 1.0})
    """Factor per module type, M(m). A type with factor 0 (or absent) is never partial: it is reused whole
    on non-full steps. Keys: ``self_attn``, ``cross_attn``, ``mlp``."""
    full_step_interval: int = 3
    """Base interval N between full steps."""
    interval_ramp: StepRamp = field(default_factory=StepRamp)
    """Divides N over progress: the interval at step i is ``round(N / interval_ramp(i))``; must stay > 0."""
    sensitive_window: tuple[float, float] | None = None
    """Progress range ``[a, b)`` (fractions of the run) that uses ``sensitive_interval`` instead."""
    sensitive_interval: int = 2
    """Full-step interval inside ``sensitive_window``."""
    first_full_steps: int = 1
    """Number of leading steps that are always full."""
    full_step_placement: Literal["relative", "official", "periodic"] = "relative"
    """Where full steps fall. ``relative``: each full step schedules the next one an interval later, decided
    once per step. ``official``: as the official DiT-ToCa code, a step is full when its count-down index
    ``T - 1 - i`` is a multiple of the current interval (the last step is always full), and a full first block
    re-decides the interval for the rest of its step, which makes a few steps full in block 0 only.
    ``periodic``: as the official OpenSora ToCa code, step ``i`` is full when it is one of the leading
    ``first_full_steps`` or a multiple of the interval."""
    module_intervals: Mapping[str, int] = field(default_factory=dict)
    """Per module type, its own interval between full computations, in place of ``full_step_interval`` (same
    placement and leading full steps): the official OpenSora setting refreshes cross-attention every 6 steps
    and the rest every 3. A step is full when every module type is; on the others a module whose type is due
    is computed on every token, the rest are partial or reused. Keys: ``self_attn``, ``cross_attn``, ``mlp``."""
    score: ScoreName = "attention"
    """Token importance: ``attention`` (attention received, from the last full step), ``cross_attention_entropy``,
    ``value_norm``, ``similarity`` (change of the module input since the token was last computed), ``random``;
    with ``forecast``: ``forecast_error`` (relative error of the token's forecast when it was last computed)
    or ``forecast_term`` (relative size of the last term of its expansion now)."""
    frequency_weight: float = 0.25
    """λ3: weight of ``partial steps since last recomputed / N`` added to the score."""
    spatial_cell_size: int | None = None
    """Side, in tokens, of the square cells of the spatial bonus; ``None`` turns it off."""
    spatial_bonus: float = 0.0
    """The best-scoring token of each cell has its score multiplied by ``1 + spatial_bonus``."""
    cfg_shared_selection: bool = False
    """When the batch is a classifier-free-guidance batch (two equal halves of input), select tokens once
    from the averaged halves and use the selection for both (PixArt). False selects per sample (DiT)."""
    cache_dtype: torch.dtype | None = None
    """Storage dtype of the caches; ``None`` keeps the model's dtype."""
    seed: int = 0
    """Seed of the ``random`` score (re-seeded at every sampling run, so runs repeat)."""
    score_chunk_size: int = 1024
    """Queries per chunk when attention statistics are computed, bounding transient memory."""
    forecast: Any = None
    """A :class:`tokencache.ForecastConfig`: stale tokens get the Taylor expansion of their own history instead
    of their cached value; ``None`` reuses it."""

    _PRESETS: ClassVar[dict[str, tuple[str, dict[str, Any]]]] = {}

    def __post_init__(self) -> None:
        cls = type(self)
        check_number(cls, "fresh_ratio", self.fresh_ratio, 0.0, 1.0)
        for name, kinds in (("step_ratio", (StepRamp,)), ("depth_ratio", (DepthRamp, BlockFactors)),
                            ("interval_ramp", (StepRamp,))):
            if not isinstance(getattr(self, name), kinds):
                names = " or ".join(f"a {k.__name__}" for k in kinds)
                raise _fail(cls, name, names, getattr(self, name))
        if not isinstance(self.module_ratio, Mapping):
            raise _fail(cls, "module_ratio", f"a mapping with keys from {MODULE_KINDS}", self.module_ratio)
        for key, value in self.module_ratio.items():
            if key not in MODULE_KINDS:
                raise _fail(cls, "module_ratio", f"a mapping with keys from {MODULE_KINDS}", dict(self.module_ratio))
            check_number(cls, f"module_ratio[{key!r}]", value, 0.0)
        object.__setattr__(self, "module_ratio", MappingProxyType(dict(self.module_ratio)))
        check_number(cls, "full_step_interval", self.full_step_interval, 1, integer=True)
        if self.sensitive_window is not None:
            window = self.sensitive_window
            ok = isinstance(window, tuple) and len(window) == 2
            if ok:
                try:
                    check_number(cls, "sensitive_window", window[0], 0.0, 1.0)
                    check_number(cls, "sensitive_window", window[1], 0.0, 1.0)
                except ValueError:
                    ok = False
            if not ok or window[0] >= window[1]:
                raise _fail(cls, "sensitive_window", "None or a tuple (a, b) with 0 <= a < b <= 1", window)
        check_number(cls, "sensitive_interval", self.sensitive_interval, 1, integer=True)
        check_number(cls, "first_full_steps", self.first_full_steps, 1, integer=True)
        allowed = f"a mapping from keys of {MODULE_KINDS} to integers >= 1"
        if not isinstance(self.module_intervals, Mapping):
            raise _fail(cls, "module_intervals", allowed, self.module_intervals)
        for key, value in self.module_intervals.items():
            if key not in MODULE_KINDS:
                raise _fail(cls, "module_intervals", allowed, dict(self.module_intervals))
            check_number(cls, f"module_intervals[{key!r}]", value, 1, integer=True)
        object.__setattr__(self, "module_intervals", MappingProxyType(dict(self.module_intervals)))
        if self.full_step_placement not in FULL_STEP_PLACEMENTS:
            raise _fail(cls, "full_step_placement", f"one of {FULL_STEP_PLACEMENTS}", self.full_step_placement)
        if self.score not in SCORES:
            raise _fail(cls, "score", f"one of {SCORES}", self.score)
        if self.score in FORECAST_SCORES and (self.forecast is None or self.forecast.order == 0):
            raise _fail(cls, "score", "a score other than forecast_error / forecast_term when forecast is off "
                        "(they rank tokens by their forecast)", self.score)
        check_number(cls, "frequency_weight", self.frequency_weight, 0.0)
        if self.spatial_cell_size is not None:
            check_number(cls, "spatial_cell_size", self.spatial_cell_size, 1, integer=True)
        check_number(cls, "spatial_bonus", self.spatial_bonus, 0.0)
        if not isinstance(self.cfg_shared_selection, bool):
            raise _fail(cls, "cfg_shared_selection", "True or False", self.cfg_shared_selection)
        check_cache_dtype(cls, self.cache_dtype)
        check_number(cls, "seed", self.seed, 0, integer=True)
        check_number(cls, "score_chunk_size", self.score_chunk_size, 1, integer=True)
        _check_forecast(cls, self.forecast)

    @property
    def partial_modules(self) -> tuple[str, ...]:
        """Module types recomputed on fresh tokens at partial steps (the others are reused whole)."""
        return tuple(k for k in MODULE_KINDS if self.module_ratio.get(k, 0.0) > 0)

    def build_policy(self, num_steps: int, num_blocks: int):
        from .schedule import ToCaPolicy

        return ToCaPolicy(self, num_steps, num_blocks)

    def build_selector(self):
        from .selection import ToCaSelector

        return ToCaSelector(self)


@dataclass(frozen=True)
class FORAConfig(PresetMixin):
    """FORA: a full step every ``interval`` steps; in between every module output is reused whole."""

    interval: int = 3
    """Steps between full steps (1 = no caching)."""
    cache_dtype: torch.dtype | None = None
    """Storage dtype of the caches; ``None`` keeps the model's dtype."""
    forecast: Any = None
    """A :class:`tokencache.ForecastConfig`: between full steps every module's output is forecast from its last
    computations (a module-level TaylorSeer) instead of reused; ``None`` reuses it."""
    first_full_steps: int = 1
    """Leading steps that are always full (warm-up: a forecast needs ``order + 1`` computations)."""
    last_full_steps: int = 0
    """Trailing steps that are always full (the last steps decide the fine detail of the sample)."""

    _PRESETS: ClassVar[dict[str, tuple[str, dict[str, Any]]]] = {}

    def __post_init__(self) -> None:
        check_number(type(self), "interval", self.interval, 1, integer=True)
        check_cache_dtype(type(self), self.cache_dtype)
        _check_forecast(type(self), self.forecast)
        check_number(type(self), "first_full_steps", self.first_full_steps, 1, integer=True)
        check_number(type(self), "last_full_steps", self.last_full_steps, 0, integer=True)

    def build_policy(self, num_steps: int, num_blocks: int):
        from .schedule import FORAPolicy

        return FORAPolicy(self, num_steps, num_blocks)

    def build_selector(self) -> None:
        return None  # FORA recomputes no tokens on cached steps


@dataclass(frozen=True)
class TPRR:
    """Two-Phase Round-Robin step schedule: a full step, then ``early_cached_steps`` cached steps, repeated
    while the progress ``i / T`` is below ``boundary``; after it, ``late_cached_steps`` cached steps per full
    step. Equal phases give a fixed interval. The defaults won the sweep on the shipped digits DiT at ToCa N=4's
    FLOPs (DDIM-50): 41.6 dB PSNR against 38.2 for (5, 2) and 38.9 for a fixed interval (2, 2); (3, 1) and
    (4, 1) cannot reach that speed-up (benchmarks/results/tokencache-ablation.md)."""

    early_cached_steps: int = 3
    """K1: cached steps after each full step in the early (high-noise) phase."""
    late_cached_steps: int = 2
    """K2: cached steps after each full step in the late phase."""
    boundary: float = 0.5
    """Progress at which the late phase starts, in [0, 1]."""

    def __post_init__(self) -> None:
        check_number(TPRR, "early_cached_steps", self.early_cached_steps, 0, integer=True)
        check_number(TPRR, "late_cached_steps", self.late_cached_steps, 0, integer=True)
        check_number(TPRR, "boundary", self.boundary, 0.0, 1.0)

    def full_steps(self, num_steps: int) -> tuple[bool, ...]:
        full: list[bool] = []
        next_full = 0
        for step in range(num_steps):
            is_full = step >= next_full
            if is_full:
                early = step / num_steps < self.boundary
                next_full = step + 1 + (self.early_cached_steps if early else self.late_cached_steps)
            full.append(is_full)
        return tuple(full)


TOKEN_SELECTIONS: tuple[str, ...] = ("predictor", *SCORES)


@dataclass(frozen=True)
class TokenCacheConfig:
    """TokenCache: a learned Cache Predictor picks, per block and step, the tokens whose cached output is
    reused; the others are recomputed. Calibrate a predictor with :func:`tokencache.calibrate`."""

    predictor: Any
    """A calibrated :class:`tokencache.TokenCachePredictor`."""
    budget: float | None = None
    """Mean fraction of tokens taken from the cache on cached steps, in [0, 0.95] (the per-block cap of the
    ratio allocation); ``None`` uses the budget the predictor was calibrated for."""
    schedule: TPRR | None = None
    """Full/cached step schedule; ``None`` uses the one the predictor was calibrated with."""
    adaptive_blocks: bool = True
    """Allocate per-block pruning ratios by measured block sensitivity (calibration); False: the same ratio
    in every block."""
    token_selection: str | None = None
    """``predictor``, or a ToCa score name that replaces the predictor's ranking; ``None`` uses the ranking the
    calibration recorded as the winner (``calibration["token_selection"]``, else ``predictor``)."""
    partial_modules: tuple[str, ...] = ("cross_attn", "mlp")
    """Module types recomputed on the kept tokens; the others (self-attention) are reused whole on cached
    steps."""
    cache_dtype: torch.dtype | None = None
    """Storage dtype of the caches; ``None`` keeps the model's dtype."""
    forecast: Any = None
    """A :class:`tokencache.ForecastConfig`: pruned tokens get the Taylor expansion of their own history
    instead of their cached output; ``None`` reuses it."""

    def __post_init__(self) -> None:
        cls = type(self)
        from .predictor import TokenCachePredictor

        if not isinstance(self.predictor, TokenCachePredictor):
            raise _fail(cls, "predictor", "a TokenCachePredictor (see tokencache.calibrate)", type(self.predictor))
        # what the run will read from the predictor's calibration, checked now rather than mid-run
        self.predictor.check_calibration(budget=self.budget is None, schedule=self.schedule is None,
                                         sensitivity=self.adaptive_blocks is True,
                                         token_selection=self.token_selection is None)
        if self.budget is not None:
            # the run allocates per-block ratios capped at MAX_BUDGET; accept exactly what it accepts
            from .predictor import MAX_BUDGET

            check_number(cls, "budget", self.budget, 0.0, MAX_BUDGET)
        if self.schedule is not None and not isinstance(self.schedule, TPRR):
            raise _fail(cls, "schedule", "None or a TPRR", self.schedule)
        if not isinstance(self.adaptive_blocks, bool):
            raise _fail(cls, "adaptive_blocks", "True or False", self.adaptive_blocks)
        if self.token_selection is not None and self.token_selection not in TOKEN_SELECTIONS:
            raise _fail(cls, "token_selection", f"None or one of {TOKEN_SELECTIONS}", self.token_selection)
        if (not isinstance(self.partial_modules, tuple) or not self.partial_modules
                or any(k not in MODULE_KINDS for k in self.partial_modules)):
            raise _fail(cls, "partial_modules", f"a non-empty tuple of {MODULE_KINDS}", self.partial_modules)
        check_cache_dtype(cls, self.cache_dtype)
        _check_forecast(cls, self.forecast)

    @property
    def effective_budget(self) -> float:
        return self.predictor.calibration["budget"] if self.budget is None else self.budget

    @property
    def effective_schedule(self) -> TPRR:
        return self.schedule if self.schedule is not None else TPRR(**self.predictor.calibration["schedule"])

    @property
    def effective_token_selection(self) -> str:
        if self.token_selection is not None:
            return self.token_selection
        return self.predictor.calibration.get("token_selection", "predictor")

    def block_ratios(self) -> list[float]:
        """Fraction of tokens reused from the cache in each block on cached steps."""
        from .predictor import allocate_block_ratios

        num_blocks = self.predictor.num_blocks
        if not self.adaptive_blocks:
            return [self.effective_budget] * num_blocks
        return allocate_block_ratios(self.predictor.calibration["block_sensitivity"], self.effective_budget)

    def validate_model(self, transformer: torch.nn.Module, num_blocks: int, num_tokens: int | None) -> None:
        self.predictor.check_compatible(transformer, num_blocks, num_tokens)

    def build_policy(self, num_steps: int, num_blocks: int):
        from .schedule import TokenCachePolicy

        return TokenCachePolicy(self, num_steps, num_blocks)

    def build_selector(self):
        from .selection import PredictorSelector, ToCaSelector

        selection = self.effective_token_selection
        if selection == "predictor":
            return PredictorSelector(self.predictor)
        return ToCaSelector(ToCaConfig(score=selection, frequency_weight=0.0))


def config_summary(config: Any) -> dict[str, Any]:
    """A JSON-friendly description of a config (for reports and result files)."""
    out: dict[str, Any] = {"method": type(config).__name__.removesuffix("Config")}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif hasattr(value, "__dataclass_fields__"):
            value = {g.name: getattr(value, g.name) for g in fields(value)}
        elif isinstance(value, torch.nn.Module):
            value = type(value).__name__
        out[f.name] = value
    return out
