"""ToCa: training-free token-wise caching (ICLR 2025), with its configuration, its full-step schedules (the
relative one, and the official DiT and OpenSora placements), its fresh-ratio policy and its token selection.

The official settings of the papers' code for a model family are registered by that family's file in
``models/`` (DiT and PixArt: ``models/dit.py``); step and depth formulas are in this project's convention: step
``i = 0`` is the first (noisiest) step, block ``l = 0`` the first block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..core.forecast import TokenForecaster, check_forecast, last_term_size, spread_over_clusters
from ..core.layouts import MODULE_KINDS
from ..core.presets import PresetMixin, Presets
from ..core.schedule import whole_steps
from ..core.scores import (
    FORECAST_SCORES,
    SCORES,
    SCORES_FROM_ATTENTION,
    ScoreName,
    frequency_term,
    score_from_raw,
    spatial_bonus,
    topk_tokens,
)
from ..core.state import SharedSelection, SlotState, StepContext, StreamState
from ..core.validation import check_cache_dtype, check_number, field_error

FULL_STEP_PLACEMENTS: tuple[str, ...] = ("relative", "official", "periodic")


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
            raise field_error(BlockFactors, "factors", "a non-empty tuple of numbers >= 0", self.factors)
        for i, value in enumerate(self.factors):
            check_number(BlockFactors, f"factors[{i}]", value, 0.0)

    def __call__(self, block: int, num_blocks: int) -> float:
        if num_blocks != len(self.factors):
            raise ValueError(f"BlockFactors has {len(self.factors)} factors but the model has {num_blocks} blocks")
        return self.factors[block]


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

    _PRESETS: ClassVar[Presets] = {}

    def __post_init__(self) -> None:
        cls = type(self)
        check_number(cls, "fresh_ratio", self.fresh_ratio, 0.0, 1.0)
        for name, kinds in (("step_ratio", (StepRamp,)), ("depth_ratio", (DepthRamp, BlockFactors)),
                            ("interval_ramp", (StepRamp,))):
            if not isinstance(getattr(self, name), kinds):
                names = " or ".join(f"a {k.__name__}" for k in kinds)
                raise field_error(cls, name, names, getattr(self, name))
        if not isinstance(self.module_ratio, Mapping):
            raise field_error(cls, "module_ratio", f"a mapping with keys from {MODULE_KINDS}", self.module_ratio)
        for key, value in self.module_ratio.items():
            if key not in MODULE_KINDS:
                raise field_error(cls, "module_ratio", f"a mapping with keys from {MODULE_KINDS}",
                                  dict(self.module_ratio))
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
                raise field_error(cls, "sensitive_window", "None or a tuple (a, b) with 0 <= a < b <= 1", window)
        check_number(cls, "sensitive_interval", self.sensitive_interval, 1, integer=True)
        check_number(cls, "first_full_steps", self.first_full_steps, 1, integer=True)
        allowed = f"a mapping from keys of {MODULE_KINDS} to integers >= 1"
        if not isinstance(self.module_intervals, Mapping):
            raise field_error(cls, "module_intervals", allowed, self.module_intervals)
        for key, value in self.module_intervals.items():
            if key not in MODULE_KINDS:
                raise field_error(cls, "module_intervals", allowed, dict(self.module_intervals))
            check_number(cls, f"module_intervals[{key!r}]", value, 1, integer=True)
        object.__setattr__(self, "module_intervals", MappingProxyType(dict(self.module_intervals)))
        if self.full_step_placement not in FULL_STEP_PLACEMENTS:
            raise field_error(cls, "full_step_placement", f"one of {FULL_STEP_PLACEMENTS}", self.full_step_placement)
        if self.score not in SCORES:
            raise field_error(cls, "score", f"one of {SCORES}", self.score)
        if self.score in FORECAST_SCORES and (self.forecast is None or self.forecast.order == 0):
            raise field_error(cls, "score", "a score other than forecast_error / forecast_term when forecast is off "
                        "(they rank tokens by their forecast)", self.score)
        check_number(cls, "frequency_weight", self.frequency_weight, 0.0)
        if self.spatial_cell_size is not None:
            check_number(cls, "spatial_cell_size", self.spatial_cell_size, 1, integer=True)
        check_number(cls, "spatial_bonus", self.spatial_bonus, 0.0)
        if not isinstance(self.cfg_shared_selection, bool):
            raise field_error(cls, "cfg_shared_selection", "True or False", self.cfg_shared_selection)
        check_cache_dtype(cls, self.cache_dtype)
        check_number(cls, "seed", self.seed, 0, integer=True)
        check_number(cls, "score_chunk_size", self.score_chunk_size, 1, integer=True)
        check_forecast(cls, self.forecast)

    @property
    def partial_modules(self) -> tuple[str, ...]:
        """Module types recomputed on fresh tokens at partial steps (the others are reused whole)."""
        return tuple(k for k in MODULE_KINDS if self.module_ratio.get(k, 0.0) > 0)

    def build_policy(self, num_steps: int, num_blocks: int) -> ToCaPolicy:
        return ToCaPolicy(self, num_steps, num_blocks)

    def build_selector(self) -> ToCaSelector:
        return ToCaSelector(self)


def toca_interval(config: ToCaConfig, step: int, num_steps: int) -> int:
    """Steps from a full step at ``step`` to the next one: ``round(N / interval_ramp(i))``, or
    ``sensitive_interval`` inside ``sensitive_window``."""
    divisor = config.interval_ramp(step, num_steps)
    if divisor <= 0:
        raise ValueError(f"ToCaConfig.interval_ramp must stay > 0 over the run; it is {divisor:.3g} at step "
                         f"{step} of {num_steps}")
    window = config.sensitive_window
    if window is not None and window[0] <= step / num_steps < window[1]:
        return config.sensitive_interval
    return max(1, round(config.full_step_interval / divisor))


def toca_full_steps(config: ToCaConfig, num_steps: int) -> tuple[bool, ...]:
    """Full steps of ToCa with ``full_step_placement="relative"``: the leading ``first_full_steps``, then each
    full step schedules the next one ``toca_interval`` steps later (decided once per step, for the whole step)."""
    for step in (0, num_steps - 1):  # the ramp is linear: its ends bound it
        toca_interval(config, step, num_steps)
    full: list[bool] = []
    next_full = 0
    for step in range(num_steps):
        is_full = step < config.first_full_steps or step >= next_full
        if is_full:
            next_full = step + toca_interval(config, step, num_steps)
        full.append(is_full)
    return tuple(full)


def toca_official_full_blocks(config: ToCaConfig, num_steps: int, num_blocks: int) -> tuple[int, ...]:
    """Full blocks per step with ``full_step_placement="official"``, as the official DiT-ToCa code places them.

    That code counts steps down, ``s = T - 1 - i``, and a block is full when ``s`` is a multiple of the interval
    last computed (so full steps sit at fixed positions and the last step is always full). Each full block
    recomputes the interval from the current step, and the next block tests ``s`` against the new value: when
    block 0 is full but ``s`` is no multiple of the new interval, the other blocks of that step are partial
    (a "mixed" step)."""
    for step in (0, num_steps - 1):
        toca_interval(config, step, num_steps)
    interval = config.full_step_interval
    full_blocks: list[int] = []
    for step in range(num_steps):
        countdown = num_steps - 1 - step
        full = 0
        for _ in range(num_blocks):
            if not (step < config.first_full_steps or countdown % interval == 0):
                break
            interval = toca_interval(config, step, num_steps)
            full += 1
        full_blocks.append(full)
    return tuple(full_blocks)


def toca_periodic_full_steps(config: ToCaConfig, num_steps: int) -> tuple[bool, ...]:
    """Full steps with ``full_step_placement="periodic"``, as the official OpenSora ToCa code places them: the
    leading ``first_full_steps``, and every step ``i`` that is a multiple of the interval."""
    return tuple(step < config.first_full_steps or step % toca_interval(config, step, num_steps) == 0
                 for step in range(num_steps))


def toca_full_blocks(config: ToCaConfig, num_steps: int, num_blocks: int) -> tuple[int, ...]:
    """Full blocks per step under ``config.full_step_placement`` with ``config.full_step_interval``."""
    if config.full_step_placement == "official":
        return toca_official_full_blocks(config, num_steps, num_blocks)
    if config.full_step_placement == "periodic":
        return whole_steps(toca_periodic_full_steps(config, num_steps), num_blocks)
    return whole_steps(toca_full_steps(config, num_steps), num_blocks)


class ToCaPolicy:
    def __init__(self, config: ToCaConfig, num_steps: int, num_blocks: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        base = toca_full_blocks(config, num_steps, num_blocks)
        self.kind_full_blocks: dict[str, tuple[int, ...]] = {
            kind: toca_full_blocks(dataclasses.replace(config, full_step_interval=interval), num_steps, num_blocks)
            for kind, interval in config.module_intervals.items()}
        """Full blocks per step of the module types with an interval of their own."""
        self.base_full_blocks = base
        # A step (block) is full when every module type is: the other types' own full steps come as ratio 1.
        self.full_blocks = tuple(min([base[step], *(f[step] for f in self.kind_full_blocks.values())])
                                 for step in range(num_steps))
        self.full_steps = tuple(f >= num_blocks for f in self.full_blocks)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        """The fraction of tokens recomputed at a non-full step; 1 where the module type's own interval (or the
        base interval, for the other types) makes it full."""
        c = self.config
        if block < self.kind_full_blocks.get(kind, self.base_full_blocks)[step]:
            return 1.0
        module = c.module_ratio.get(kind, 0.0)
        if module == 0.0:
            return 0.0
        r = c.fresh_ratio * c.step_ratio(step, self.num_steps) * c.depth_ratio(block, self.num_blocks) * module
        return min(max(r, 0.0), 1.0)


class ToCaSelector:
    """Scores tokens as configured and returns the top ``k`` per sample (shared across CFG halves when the
    stream is a CFG batch with ``cfg_shared_selection``)."""

    def __init__(self, config: ToCaConfig) -> None:
        self.config = config
        self.generator: torch.Generator | None = None
        self.forecaster = TokenForecaster(config.forecast) if config.forecast is not None else None

    @property
    def attention_statistic(self) -> tuple[str, str] | None:
        """(module kind, statistic) that attention processors must report on full steps, if any."""
        score = self.config.score
        if score not in SCORES_FROM_ATTENTION:
            return None
        statistic = {"attention": "received", "value_norm": "value_norm",
                     "cross_attention_entropy": "entropy"}[score]
        return SCORES_FROM_ATTENTION[score], statistic

    @property
    def keeps_inputs(self) -> bool:
        return self.config.score == "similarity"

    def reset(self, device: torch.device) -> None:
        self.generator = None
        self._device = device

    def _random(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        return torch.rand(batch, num_tokens, generator=self.generator, device=device)

    def select(self, ctx: StepContext, block: int, slot: SlotState, tokens: torch.Tensor, k: int,
               token_set: str = "image") -> torch.Tensor:
        """Indices (B, k) of the tokens to recompute; ``tokens`` is the module input (B, n, D), ``token_set`` which
        of the block's token pools they are (a processor may report a statistic per pool)."""
        c = self.config
        stream: StreamState = ctx.stream
        batch, num_tokens = tokens.shape[0], tokens.shape[1]
        rows = batch // 2 if stream.cfg_shared else batch
        if c.score == "random":
            raw = self._random(rows, num_tokens, tokens.device)
        elif c.score in ("forecast_error", "forecast_term"):
            if c.score == "forecast_error":
                raw = slot.forecast_error
            else:
                raw = last_term_size(self.forecaster, slot, ctx.position)
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        else:
            if c.score == "similarity":
                raw = F.cosine_similarity(tokens.float(), slot.last_input.float(), dim=-1)
            else:
                raw = stream.raw_scores.get(block)
                if isinstance(raw, dict):
                    raw = raw.get(token_set)
                if raw is None:
                    raise RuntimeError(f"no {c.score!r} statistic was recorded for the {token_set} tokens of block "
                                       f"{block} at the last full step")
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        score = score_from_raw(c.score, raw)
        if c.frequency_weight > 0:
            score = score + frequency_term(slot.steps_since_fresh[:rows], c.full_step_interval, c.frequency_weight)
        if c.spatial_cell_size is not None:
            score = spatial_bonus(score, ctx.grid, c.spatial_cell_size, c.spatial_bonus)
        clusters = c.forecast.clusters if c.forecast is not None else 0
        if clusters and slot.clusters is not None:
            index = spread_over_clusters(score, slot.clusters[:rows], k, min(clusters, num_tokens))
        else:
            index = topk_tokens(score, k)
        if stream.cfg_shared:
            index = torch.cat([index, index], dim=0)
        return index


    def rank_shared(self, ctx: StepContext, shared: SharedSelection, tokens: torch.Tensor | None,
                    last_input: torch.Tensor | None, k: int) -> torch.Tensor:
        """The ``k`` best tokens of each sample (B, k), best first, chosen once per call for every block of a
        model with a shared selection: the score over the canonical tokens plus the staleness term of the
        shared counters, which then count this partial step (0 for the chosen tokens). ``tokens`` and
        ``last_input`` (B, N, D) are the choosing module's input now and when each token was last recomputed
        (the ``similarity`` score)."""
        c = self.config
        stream = ctx.stream
        rows = stream.batch // 2 if stream.cfg_shared else stream.batch
        counters = shared.steps_since_fresh
        if c.score == "random":
            raw = self._random(rows, stream.num_tokens, counters.device)
        elif c.score == "similarity":
            raw = F.cosine_similarity(tokens.float(), last_input.float(), dim=-1)
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        else:
            raise ValueError(f"ToCaConfig.score {c.score!r} cannot choose tokens shared by every block; use "
                             "'random' or 'similarity'")
        score = score_from_raw(c.score, raw)
        if c.frequency_weight > 0:
            score = score + frequency_term(counters, c.full_step_interval, c.frequency_weight)
        index = torch.topk(score, k, dim=-1, sorted=True).indices
        counters += 1
        counters.scatter_(1, index, 0)
        if stream.cfg_shared:
            index = torch.cat([index, index], dim=0)
        return index
