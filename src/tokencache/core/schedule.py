"""Step schedules: which steps are full, and how many tokens each module recomputes on the others.

A policy is built once per sampling run (it needs the step count) and is the single source of truth
for both the engine and the planner, so a plan's FLOPs equal a real run's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import FORAConfig, ToCaConfig, TokenCacheConfig


class CachePolicy(Protocol):
    num_steps: int
    num_blocks: int
    full_steps: tuple[bool, ...]
    """Per step, whether every block is full."""
    full_blocks: tuple[int, ...]
    """Per step, how many leading blocks are full (``num_blocks`` on full steps, 0 on cached steps; in
    between on the official DiT schedule's mixed steps)."""

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        """Fraction of tokens a module of type ``kind`` recomputes at a non-full step."""
        ...


def block_is_full(policy: CachePolicy, step: int, block: int) -> bool:
    return block < policy.full_blocks[step]


def whole_steps(full_steps: tuple[bool, ...], num_blocks: int) -> tuple[int, ...]:
    """``full_blocks`` of a schedule that decides once per step."""
    return tuple(num_blocks if full else 0 for full in full_steps)


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


class FORAPolicy:
    def __init__(self, config: FORAConfig, num_steps: int, num_blocks: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        # the warm-up steps, then every ``interval`` steps counted from the last of them
        last_warmup = config.first_full_steps - 1
        first_trailing = num_steps - config.last_full_steps
        self.full_steps = tuple(step <= last_warmup or step >= first_trailing
                                or (step - last_warmup) % config.interval == 0 for step in range(num_steps))
        self.full_blocks = whole_steps(self.full_steps, num_blocks)

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
        self.full_blocks = whole_steps(self.full_steps, num_blocks)
        self.keep = [1.0 - r for r in config.block_ratios()]
        self.partial = set(config.partial_modules)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        return self.keep[block] if kind in self.partial else 0.0
