"""Dry runs of a cache schedule: which modules are full, partial or reused, and the FLOPs, without
running the model (a transformer on the ``meta`` device works)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .engine import ratio_table, slot_work
from .flops import Counting, FlopConvention, block_overhead_flops, flop_convention, output_values_per_token
from .forecast import describe_forecast, step_kind_without_compute
from .layouts import check_config_fits, find_blocks, grid_size, model_layout
from .output_forecast import OutputForecaster


def default_num_tokens(transformer: nn.Module) -> int:
    """Image tokens of one sample, from the transformer's ``config.sample_size`` and ``patch_size`` (all frames'
    tokens of a video model with a typical grid)."""
    model = model_layout(transformer)
    if model.default_grid is not None:
        return grid_size(model.default_grid(transformer))
    if model.num_tokens is not None:
        return model.num_tokens
    cfg = getattr(transformer, "config", None)
    if cfg is None or not hasattr(cfg, "get"):
        raise ValueError(f"num_tokens is missing: {type(transformer).__name__} has no diffusers config to read "
                         "its sample size from; pass num_tokens (image tokens per sample)")
    size = cfg.get("sample_size")
    patch = cfg.get("patch_size") or 1
    if size is None:
        raise ValueError(f"num_tokens is missing: {type(transformer).__name__}'s config has no sample_size; pass "
                         "num_tokens (image tokens per sample)")
    height, width = (size, size) if isinstance(size, int) else size
    tokens = (height // patch) * (width // patch)
    if tokens < 1:
        raise ValueError(f"{type(transformer).__name__}'s config gives no token (sample_size {size!r}, patch_size "
                         f"{patch!r}); pass num_tokens (image tokens per sample)")
    return tokens


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"tc.plan: {name} must be an integer >= {minimum}; got {value!r}")


@dataclass(frozen=True)
class Plan:
    """The schedule of one sampling run, step by step and block by block."""

    method: str
    num_steps: int
    num_blocks: int
    num_tokens: int
    batch_size: int
    step_kinds: tuple[str, ...]
    """``full``, ``partial`` (some module recomputes some tokens), ``reuse`` (nothing recomputed, cached values
    copied) or ``forecast`` (nothing recomputed, cached values extrapolated) per step."""
    fresh_fraction: tuple[tuple[float, ...], ...]
    """Per step and block, the largest fraction of tokens any of its modules recomputes."""
    flops: int
    flops_full: int
    step_flops: tuple[int, ...]
    """FLOPs of each step; an uncached step costs ``flops_full / num_steps``."""
    forecast_flops: int = 0
    """Element-wise work of forecasting stale tokens, included in ``flops``."""
    forecast: str = ""
    """The forecast, e.g. ``newton order 2 (output)``; empty when cached values are reused as they are."""
    counting: str = "engine"
    """The FLOP convention of ``flops`` (:mod:`tokencache.core.flops`): ``engine``, ``toca`` (the official
    DiT-ToCa counter) or ``toca-flux`` (the official FLUX ToCa code's)."""

    @property
    def speedup(self) -> float:
        return self.flops_full / self.flops

    def count(self, kind: str) -> int:
        return self.step_kinds.count(kind)

    def __str__(self) -> str:
        forecast = f" + forecast: {self.forecast}" if self.forecast else ""
        stale = "forecast" if self.forecast else "reused"
        lines = [
            f"{self.method}{forecast}: {self.num_steps} steps x {self.num_blocks} blocks, {self.num_tokens} tokens, "
            f"batch {self.batch_size}",
            f"grid: one row per step, one column per block; F full, . {stale}, 1-9 partial (tenths of tokens "
            "recomputed by the freshest module)",
        ]
        for step, (kind, row) in enumerate(zip(self.step_kinds, self.fresh_fraction, strict=True)):
            cells = "".join("F" if kind == "full" or f >= 1.0
                            else ("." if f == 0 else str(min(9, max(1, math.ceil(10 * f))))) for f in row)
            lines.append(f"{step:4d} {kind:<7} {cells}")
        idle = f"{self.count('forecast')} forecast" if self.forecast else f"{self.count('reuse')} reuse"
        lines.append(f"steps: {self.count('full')} full, {self.count('partial')} partial, {idle}")
        counter = "" if self.counting == "engine" else f" ({self.counting} counter)"
        lines.append(f"FLOPs{counter}: {self.flops / 1e12:.3f} T of {self.flops_full / 1e12:.3f} T uncached "
                     f"-> {self.speedup:.2f}x")
        return "\n".join(lines)


def _plan_grid(transformer: nn.Module, num_tokens: int, num_frames: int | None) -> tuple[int, ...]:
    """(frames, tokens per frame) of a planned sample: ``num_frames``, or the model's typical frame count."""
    typical = model_layout(transformer).default_grid
    if num_frames is None:
        if typical is None:
            return (num_tokens,)
        num_frames = typical(transformer)[0]
    if num_tokens % num_frames:
        raise ValueError(f"tc.plan: num_tokens ({num_tokens}, all frames' tokens of a sample) must be a multiple of "
                         f"num_frames ({num_frames})")
    return (num_frames, num_tokens // num_frames)


def plan(config: Any, transformer: nn.Module, num_steps: int, batch_size: int = 2, num_tokens: int | None = None,
         context_tokens: int | None = None, counting: Counting | FlopConvention = "engine",
         num_frames: int | None = None) -> Plan:
    """Plan ``config`` on ``transformer`` for ``num_steps`` steps and a transformer batch of ``batch_size``.

    The default 2 is one image with classifier-free guidance, the batch the DiT and PixArt pipelines pass the
    transformer; give 1 for an unguided sample (FLUX-dev: guidance is an embedding). ``num_tokens`` (image
    tokens per sample) defaults to the one the model's ``sample_size`` gives; ``context_tokens`` (text tokens)
    to the model family's usual caption length (PixArt-alpha 120, FLUX 512). ``counting="engine"`` counts FLOPs
    as a real run's statistics do; ``"toca"`` as the official DiT-ToCa code's counter, the one behind the ToCa
    paper's DiT figures (same schedule, other per-element costs: see :data:`tokencache.core.flops.TOCA_COUNTER`);
    ``"toca-flux"`` as the official FLUX ToCa code, which also recomputes the joint attention's output
    projections at partial steps (:data:`tokencache.core.flops.TOCA_FLUX_COUNTER`).
    Video models: ``num_tokens`` counts every frame's tokens and ``num_frames`` (default: the model's typical
    latent frames) splits them, for blocks that run on frames or on positions (Latte, OpenSora)."""
    _check_count("num_steps", num_steps, 1)
    _check_count("batch_size", batch_size, 1)
    if num_tokens is not None:
        _check_count("num_tokens", num_tokens, 1)
    if num_frames is not None:
        _check_count("num_frames", num_frames, 1)
    if context_tokens is None:
        context_tokens = model_layout(transformer).context_tokens
    _check_count("context_tokens", context_tokens, 0)
    convention = flop_convention(counting)
    blocks = find_blocks(transformer)
    check_config_fits(config, blocks)
    n = num_tokens if num_tokens is not None else default_num_tokens(transformer)
    grid = _plan_grid(transformer, n, num_frames)
    policy = config.build_policy(num_steps, len(blocks))
    table = ratio_table(policy, blocks)
    overhead = sum(block_overhead_flops(b, n, batch_size, context_tokens, convention=convention) for b in blocks)
    forecast = getattr(config, "forecast", None)
    idle_kind = step_kind_without_compute(forecast)
    label = describe_forecast(forecast)
    whole_output = OutputForecaster(forecast) if forecast is not None and forecast.target == "output" else None
    if whole_output is not None:  # the modules keep no cache; the transformer's output is forecast
        forecast = None
        output_values = n * output_values_per_token(transformer) * batch_size
    flops = flops_full = extra_flops = 0
    kinds, fractions, step_flops = [], [], []
    for step in range(num_steps):
        before = flops
        computed = 0
        row = []
        full = policy.full_steps[step]
        skipped = whole_output is not None and not full
        for block in blocks:
            largest = 0.0
            for slot, module in block.slots():
                work = slot_work(block, slot, module, table[step][(block.index, slot.kind)], n, grid,
                                 context_tokens, batch_size, convention=convention, forecast=forecast,
                                 score=getattr(config, "score", None))
                computed += work.rows
                largest = max(largest, work.rows / work.tokens if work.tokens else 0.0)
                flops += 0 if skipped else work.flops + work.forecast_flops
                flops_full += work.flops_full
                extra_flops += work.forecast_flops
            row.append(largest)
        flops += 0 if skipped else overhead
        flops_full += overhead
        if whole_output is not None:  # an output stored after a computed step, or forecast on a skipped one
            work = whole_output.flops(output_values, full=not skipped)
            flops += work
            extra_flops += work
        step_flops.append(flops - before)
        kinds.append("full" if full else ("partial" if computed else idle_kind))
        fractions.append(tuple(row))
    method = type(config).__name__.removesuffix("Config")
    return Plan(method, num_steps, len(blocks), n, batch_size, tuple(kinds), tuple(fractions), flops, flops_full,
                tuple(step_flops), extra_flops, label, convention.name)

