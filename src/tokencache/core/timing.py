"""Timings that survive a busy machine: process CPU time, the spread over rounds, and a flag when rounds disagree.

Wall-clock time counts every moment another process held the CPU, so on a shared machine a speed-up taken from it
can be off by any factor (a loaded 2-core machine gave 14.7x for a 3.2x-FLOPs method, and 0.66x for an uncached
run timed against itself). The process CPU time counts only the cycles this process ran, which load barely
changes (with one torch thread; with several, threads that wait for a descheduled peer still spin, so some
noise remains). Speed-ups are therefore taken from CPU time, and their spread over interleaved rounds is kept:
rounds that disagree by more than :data:`TOLERANCE`, or an uncached run that does not come out at 1x against
itself, mark the numbers as unreliable instead of printing one a user would believe.

The clocks are injectable (:class:`Clocks`), so the logic is tested with a fake clock, never by timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

TOLERANCE = 0.15
"""Largest relative spread ``(max - min) / median`` of a speed-up over rounds (and largest distance of an uncached
run's speed-up from 1) accepted as a consistent measurement. Quiet-machine CPU-time rounds of the demo agree within
a few per cent; 15 % leaves room for that and flags the multi-fold errors of a busy machine."""


@dataclass(frozen=True)
class Clocks:
    """Where the seconds come from: a wall clock and a process CPU clock (replaced by fakes in tests)."""

    wall: Callable[[], float] = time.perf_counter
    cpu: Callable[[], float] = time.process_time


DEFAULT_CLOCKS = Clocks()


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU seconds of one timed call."""

    wall: float
    cpu: float


def timed(fn: Callable[[], T], clocks: Clocks | None = None) -> tuple[T, Timing]:
    """Run ``fn()`` and return its result with the wall and CPU seconds it took."""
    clocks = clocks or DEFAULT_CLOCKS
    wall, cpu = clocks.wall(), clocks.cpu()
    result = fn()
    return result, Timing(clocks.wall() - wall, clocks.cpu() - cpu)


@dataclass(frozen=True)
class Spread:
    """A quantity measured over rounds: its median, range and whether the rounds agree within ``tolerance``."""

    median: float
    low: float
    high: float
    rounds: int
    tolerance: float = TOLERANCE

    @property
    def relative(self) -> float:
        """``(high - low) / median``; 0 for a single round (no spread can be seen)."""
        return (self.high - self.low) / self.median if self.median > 0 else float("inf")

    @property
    def consistent(self) -> bool:
        """True when the rounds agree within the tolerance (a single round counts as agreeing, see ``rounds``)."""
        return self.relative <= self.tolerance

    def text(self, unit: str = "x") -> str:
        """``2.38x (2.30-2.45)``, or ``2.38x`` for a single round."""
        if self.rounds < 2:
            return f"{self.median:.2f}{unit}"
        return f"{self.median:.2f}{unit} ({self.low:.2f}-{self.high:.2f})"

    def to_dict(self) -> dict[str, float | int | bool]:
        return dict(median=self.median, low=self.low, high=self.high, rounds=self.rounds,
                    relative_spread=self.relative, consistent=self.consistent, tolerance=self.tolerance)


def spread(values: Sequence[float], tolerance: float = TOLERANCE) -> Spread:
    """The :class:`Spread` of per-round values."""
    if not values:
        raise ValueError("spread needs at least one round")
    return Spread(statistics.median(values), min(values), max(values), len(values), tolerance)


def speedup_spread(pairs: Sequence[tuple[Timing, Timing]], clock: str = "cpu",
                   tolerance: float = TOLERANCE) -> Spread:
    """Per-round speed-ups ``reference / method`` of ``(reference, method)`` timings taken in the same round."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall'; got {clock!r}")
    return spread([getattr(ref, clock) / max(getattr(own, clock), 1e-12) for ref, own in pairs], tolerance)


def timing_problems(name: str, speedup: Spread, uncached: bool) -> list[str]:
    """Why the speed-up of ``name`` should not be believed (empty when nothing is wrong)."""
    problems = []
    if not speedup.consistent:
        problems.append(f"{name}: rounds disagree ({speedup.text()}, spread {speedup.relative:.0%} > "
                        f"{speedup.tolerance:.0%})")
    if uncached and abs(speedup.median - 1.0) > speedup.tolerance:
        problems.append(f"{name}: the uncached run timed against itself gives {speedup.median:.2f}x, not 1x "
                        f"(more than {speedup.tolerance:.0%} off)")
    return problems
