"""Cache state: what one sampling run keeps between steps, and the tracking of steps and runs.

Everything here is reset at the start of every sampling run, so nothing leaks between pipeline calls,
batch shapes or models (each handle owns its own state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SlotKey = tuple[int, str]  # (block index, slot name)


@dataclass
class SlotState:
    """One module's cache in one stream."""

    output: torch.Tensor | None = None
    """Module output (B, n, D) in the cache dtype."""
    output_dtype: torch.dtype | None = None
    """The module's own output dtype, restored when the cache is handed back."""
    steps_since_fresh: torch.Tensor | None = None
    """Partial steps since each token was last recomputed (B, n)."""
    last_input: torch.Tensor | None = None
    """Module input when each token was last recomputed (only for the ``similarity`` score)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.output, self.steps_since_fresh, self.last_input)
                   if t is not None)


@dataclass
class StreamState:
    """State of one stream: the ``j``-th transformer call of each step (one stream when CFG is batched,
    two when a pipeline calls the transformer separately for the conditional and unconditional input)."""

    batch: int
    num_tokens: int
    cfg_shared: bool
    """Whether this stream's batch is a CFG batch whose halves share one token selection."""
    slots: dict[SlotKey, SlotState] = field(default_factory=dict)
    raw_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per block, the raw score statistic (B, n) from the last full step."""

    def slot(self, key: SlotKey) -> SlotState:
        if key not in self.slots:
            self.slots[key] = SlotState()
        return self.slots[key]

    def cache_bytes(self) -> int:
        return sum(s.nbytes() for s in self.slots.values())

    def score_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.raw_scores.values())


@dataclass
class StepContext:
    """Where the current transformer call is: read by the module hooks."""

    step: int
    num_steps: int
    is_full: bool
    stream: StreamState
    grid: tuple[int, int]
    tokens: dict[tuple[int, str], int]
    """Fresh tokens per (block, module kind) at this step (``n`` on full steps)."""


class StepTracker:
    """Maps transformer calls to (run, step, stream).

    A new run starts when the pipeline's scheduler gets new timesteps (``set_timesteps`` replaces the
    tensor) or when ``handle.sampling()`` is entered; within a run the step advances whenever the
    timestep changes, and repeated calls with the same timestep are further streams of that step.
    """

    def __init__(self, pipeline: Any | None) -> None:
        self.pipeline = pipeline
        self.manual_steps: int | None = None
        self._manual_new_run = False
        self._timesteps_ref: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.num_steps = 0
        self.step = -1
        self.call = 0
        self._last_timestep: float | None = None

    def start_manual_run(self, num_steps: int) -> None:
        self.manual_steps = num_steps
        self._manual_new_run = True

    def end_manual_run(self) -> None:
        self.manual_steps = None
        self._manual_new_run = False

    def locate(self, timestep: Any) -> bool:
        """Advance for one transformer call; returns True when this call starts a new run."""
        if timestep is None:
            raise RuntimeError("tokencache needs the `timestep` argument of the transformer to track steps")
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        new_run = False
        if self.manual_steps is not None:
            if self._manual_new_run:
                new_run, self._manual_new_run = True, False
                num_steps = self.manual_steps
        elif self.pipeline is not None:
            timesteps = self.pipeline.scheduler.timesteps
            if timesteps is None:
                raise RuntimeError("the pipeline's scheduler has no timesteps; call the pipeline, or wrap a "
                                   "hand-written loop in `with handle.sampling(num_steps=...)`")
            if timesteps is not self._timesteps_ref:
                self._timesteps_ref = timesteps
                new_run = True
                values = timesteps.tolist()
                num_steps = sum(1 for i, v in enumerate(values) if i == 0 or v != values[i - 1])
        else:
            raise RuntimeError("a bare transformer must be called inside `with handle.sampling(num_steps=T):` "
                               "so that tokencache knows where a sampling run starts and how many steps it has")
        if new_run:
            self.reset()
            self.num_steps = num_steps
            self.step, self._last_timestep = 0, t
            return True
        if t != self._last_timestep:
            self.step += 1
            self.call = 0
            self._last_timestep = t
        else:
            self.call += 1
        if self.step >= self.num_steps:
            raise RuntimeError(
                f"the transformer was called for step {self.step + 1} of a {self.num_steps}-step run; "
                "wrap calls outside a pipeline in `with handle.sampling(num_steps=T):` with the right T"
            )
        return False
