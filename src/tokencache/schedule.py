"""Step schedules: which steps are full, and how many tokens each module recomputes on the others.

A policy is built once per sampling run (it needs the step count) and is the single source of truth
for both the engine and the planner, so a plan's FLOPs equal a real run's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import FORAConfig, ToCaConfig, TokenCacheConfig


class CachePolicy(Protocol):
    num_steps: int
    num_blocks: int
    full_steps: tuple[bool, ...]

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        """Fraction of tokens a module of type ``kind`` recomputes at a non-full step."""
        ...


def fresh_tokens(ratio: float, num_tokens: int) -> int:
    """``k = floor(clamp(r, 0, 1) * n)``; the tiny epsilon keeps ratios such as 0.3 * 10 from flooring to 2."""
    return int(math.floor(min(max(ratio, 0.0), 1.0) * num_tokens + 1e-9))


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
    """Full steps of ToCa: the leading ``first_full_steps``, then each full step schedules the next one
    ``toca_interval`` steps later (decided once per step, for the whole step)."""
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


class ToCaPolicy:
    def __init__(self, config: ToCaConfig, num_steps: int, num_blocks: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        self.full_steps = toca_full_steps(config, num_steps)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        c = self.config
        module = c.module_ratio.get(kind, 0.0)
        if module == 0.0:
            return 0.0
        r = c.fresh_ratio * c.step_ratio(step, self.num_steps) * c.depth_ratio(block, self.num_blocks) * module
        return min(max(r, 0.0), 1.0)


class FORAPolicy:
    def __init__(self, config: FORAConfig, num_steps: int, num_blocks: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        self.full_steps = tuple(step % config.interval == 0 for step in range(num_steps))

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        return 0.0


class TokenCachePolicy:
    """TPRR full steps; on cached steps block ``l`` recomputes ``1 - ratio_l`` of the tokens in its partial
    modules and reuses the other modules whole."""

    def __init__(self, config: TokenCacheConfig, num_steps: int, num_blocks: int) -> None:
        predictor = config.predictor
        if num_steps != predictor.num_steps:
            raise ValueError(f"this TokenCachePredictor was calibrated for {predictor.num_steps} sampling steps; "
                             f"the run has {num_steps}. Calibrate one for {num_steps} steps")
        if num_blocks != predictor.num_blocks:
            raise ValueError(f"this TokenCachePredictor was calibrated for {predictor.num_blocks} blocks; "
                             f"the model has {num_blocks}")
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        self.full_steps = config.effective_schedule.full_steps(num_steps)
        self.keep = [1.0 - r for r in config.block_ratios()]
        self.partial = set(config.partial_modules)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        return self.keep[block] if kind in self.partial else 0.0
