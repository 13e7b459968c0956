"""Step schedules: which steps are full, and how many tokens each module recomputes on the others.

A policy is built once per sampling run (it needs the step count), by a method's config
(``config.build_policy(num_steps, num_blocks)``; each method's policy lives in its file under ``methods/``),
and is the single source of truth for both the engine and the planner, so a plan's FLOPs equal a real run's.
"""

from __future__ import annotations

import math
from typing import Protocol


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
