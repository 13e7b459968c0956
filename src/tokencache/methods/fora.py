"""FORA: a full step every ``interval`` steps; in between every module output is reused whole (or, with
``forecast``, forecast from its last computations: a module-level TaylorSeer). Its configuration, its policy and
its model-agnostic presets; FLUX's are registered by ``models/flux.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.forecast import ForecastConfig, check_forecast
from ..core.presets import PresetMixin, Presets
from ..core.schedule import whole_steps
from ..core.validation import check_cache_dtype, check_number


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
    first_interval: int | None = None
    """Steps from the last warm-up step to the first full step after it (``None``: ``interval``); the full steps
    then follow every ``interval`` steps. diffusers' TaylorSeer hook computes one step after its warm-up: 2."""

    _PRESETS: ClassVar[Presets] = {}

    def __post_init__(self) -> None:
        check_number(type(self), "interval", self.interval, 1, integer=True)
        check_cache_dtype(type(self), self.cache_dtype)
        check_forecast(type(self), self.forecast, output_target=True)
        check_number(type(self), "first_full_steps", self.first_full_steps, 1, integer=True)
        check_number(type(self), "last_full_steps", self.last_full_steps, 0, integer=True)
        if self.first_interval is not None:
            check_number(type(self), "first_interval", self.first_interval, 1, integer=True)

    def build_policy(self, num_steps: int, num_blocks: int) -> FORAPolicy:
        return FORAPolicy(self, num_steps, num_blocks)

    def build_selector(self) -> None:
        return None  # FORA recomputes no tokens on cached steps


class FORAPolicy:
    def __init__(self, config: FORAConfig, num_steps: int, num_blocks: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        # the warm-up steps, then ``first_interval`` steps after the last of them, then every ``interval`` steps
        last_warmup = config.first_full_steps - 1
        first_after = last_warmup + (config.first_interval or config.interval)
        first_trailing = num_steps - config.last_full_steps
        self.full_steps = tuple(step <= last_warmup or step >= first_trailing
                                or (step >= first_after and (step - first_after) % config.interval == 0)
                                for step in range(num_steps))
        self.full_blocks = whole_steps(self.full_steps, num_blocks)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        return 0.0


FORAConfig.register_presets(
    {
        "fora": ("FORA, full step every 3 steps (the ToCa paper's comparison setting)", dict(interval=3)),
        "fora-n2": ("FORA, full step every 2 steps", dict(interval=2)),
        "fora-n4": ("FORA, full step every 4 steps", dict(interval=4)),
        "fora-n6": ("FORA, full step every 6 steps", dict(interval=6)),
    }
)

# Forecasting between full steps (a module-level TaylorSeer with Newton's form) and the last step full: the
# settings that won on the shipped digits DiT (DDIM-50; benchmarks/results/frontier.md). Newton order 3 gave
# 48.2 dB PSNR at N=5 against 43.5 for TaylorSeer's form and 41.8 for order 1; at N=7 order 2 did best.
FORAConfig.register_presets(
    {
        f"forecast-n{n}": (
            f"FORA schedule, full step every {n} steps and the last one; Newton forecast of order {order} in between",
            dict(interval=n, last_full_steps=1, forecast=ForecastConfig(order=order, expansion="newton")),
        )
        for n, order in ((3, 3), (4, 3), (5, 3), (6, 2), (7, 2))
    }
)

# The same schedules with the transformer's output forecast whole (target="output"), with forecast-n*'s orders: a
# step between full steps skips the transformer. On the digits DiT (benchmarks/results/frontier.md) N=5 kept 47.7 dB
# at 4.55x FLOPs and 5.02x CPU time, where the module-level forecast-n5 kept 49.1 dB at 4.32x and 3.02x.
FORAConfig.register_presets(
    {
        f"forecast-output-n{n}": (
            f"FORA schedule, full step every {n} steps and the last one; the transformer skipped in between, its "
            f"output forecast (Newton, order {order})",
            dict(interval=n, last_full_steps=1, forecast=ForecastConfig(order=order, expansion="newton",
                                                                         target="output")),
        )
        for n, order in ((3, 3), (4, 3), (5, 3), (6, 2), (7, 2), (8, 2))
    }
)
