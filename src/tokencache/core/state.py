"""Cache state: what one sampling run keeps between steps, and the tracking of steps and runs.

Everything here is reset at the start of every sampling run, so nothing leaks between pipeline calls,
batch shapes or models (each handle owns its own state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .schedule import fresh_tokens

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
    derivatives: list[torch.Tensor] | None = None
    """With forecasting: finite-difference derivative estimates of each token's output, orders 1..m (B, n, D)."""
    positions: torch.Tensor | None = None
    """With forecasting: the steps (or timesteps) of each token's last m computations, newest first (B, n, m)."""
    uniform: tuple[list[float], int] | None = None
    """With forecasting, while every token shares its positions and history (no partial update since the
    last full step): those positions and that history, for the scalar fast path."""
    history: torch.Tensor | None = None
    """With forecasting: computations of each token so far, capped at m + 1 (which orders are known)."""
    forecast_error: torch.Tensor | None = None
    """With the ``forecast_error`` score: each token's relative forecast error when it was last computed (B, n)."""
    clusters: torch.Tensor | None = None
    """With forecast clusters: each token's k-means cluster from the last full step (B, n)."""
    whole_parts: int = 0
    """For a module cached whole whose output is a tuple: its length (the other parts are cached under
    ``name[i]``); 0 for a single tensor."""

    def nbytes(self) -> int:
        tensors = [self.output, self.steps_since_fresh, self.last_input, self.positions, self.history,
                   self.forecast_error, self.clusters,
                   *(self.derivatives or [])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class OutputState:
    """With ``ForecastConfig(target="output")``: one stream's computed transformer outputs, one cache per output
    tensor, each seen as one token per sample (B, 1, numel / B)."""

    tensors: list[SlotState] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    rebuild: Callable[[list[torch.Tensor]], Any] | None = None
    """Builds an output of the form the transformer returned (tensor, tuple or ``BaseOutput``)."""

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.tensors)


@dataclass
class SharedSelection:
    """With :attr:`tokencache.core.layouts.ModelLayout.shared_selection`: the fresh tokens of one stream, chosen once
    per transformer call over each sample's canonical tokens (frame-major for video) and read by every block."""

    steps_since_fresh: torch.Tensor
    """Partial steps since each canonical token was last recomputed (B, N) (B/2 rows for a shared CFG batch)."""
    ranking: torch.Tensor | None = None
    """This call's tokens, best first (B, k_max): a module recomputing ``k`` tokens takes the first ``k``."""

    def nbytes(self) -> int:
        tensors = (self.steps_since_fresh, self.ranking)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class StreamState:
    """State of one stream: the ``j``-th transformer call of each step (one stream when CFG is batched,
    two when a pipeline calls the transformer separately for the conditional and unconditional input)."""

    batch: int
    num_tokens: int
    cfg_shared: bool
    """Whether this stream's batch is a CFG batch whose halves share one token selection."""
    slots: dict[SlotKey, SlotState] = field(default_factory=dict)
    raw_scores: dict[int, torch.Tensor | dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per block, the raw score statistic (B, n) from the last full step, or one per token pool (``image``,
    ``text``, ``joint``) when the block's attention covers several."""
    shared: SharedSelection | None = None
    """The selection shared by all blocks, for models that choose fresh tokens once per call."""
    output: OutputState = field(default_factory=OutputState)
    """The transformer's outputs, with ``ForecastConfig(target="output")``."""

    def slot(self, key: SlotKey) -> SlotState:
        if key not in self.slots:
            self.slots[key] = SlotState()
        return self.slots[key]

    def cache_bytes(self) -> int:
        shared = self.shared.nbytes() if self.shared is not None else 0
        return shared + self.output.nbytes() + sum(s.nbytes() for s in self.slots.values())

    def score_bytes(self) -> int:
        tensors = [t for v in self.raw_scores.values() for t in (v.values() if isinstance(v, dict) else (v,))]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StepContext:
    """Where the current transformer call is: read by the module hooks."""

    step: int
    num_steps: int
    is_full: bool
    """Whether every block is full at this step."""
    stream: StreamState
    grid: tuple[int, ...]
    """The grid of image tokens (height, width; frames, height, width for video)."""
    ratios: dict[tuple[int, str], float]
    """Fraction of tokens each (block, module kind) recomputes at this step (1 in full blocks)."""
    position: float = 0.0
    """Where this call lies on the forecasting axis: the model evaluation's index, or its timestep."""
    full_blocks: int | None = None
    """Leading blocks that are full at this step (1 on the official DiT schedule's mixed steps, where block 0
    re-decides the interval); ``None``: all when ``is_full``, none otherwise."""

    def block_full(self, block: int) -> bool:
        return self.is_full if self.full_blocks is None else block < self.full_blocks

    def slot_full(self, block: int, kind: str) -> bool:
        """Whether a module of ``kind`` in ``block`` is computed on every token at this step (its block is full,
        or its module type's own interval makes it full)."""
        return self.block_full(block) or self.ratios[(block, kind)] >= 1.0

    def rows(self, block: int, kind: str, num_tokens: int) -> int:
        """Tokens a module of ``kind`` in ``block`` recomputes at this step, of the ``num_tokens`` it sees."""
        return fresh_tokens(self.ratios[(block, kind)], num_tokens)


@dataclass(frozen=True)
class RunLayout:
    """How the model evaluations of one sampling run map to scheduler steps.

    Multi-stage schedulers evaluate the model more than once per step (Heun and KDPM2: twice, PNDM: a
    warm-up of Runge-Kutta stages), sometimes at repeated timesteps. A step here is what diffusers'
    pipelines count as one (their progress bar): ``scheduler.num_inference_steps`` steps, each made of
    ``scheduler.order`` evaluations after ``len(timesteps) - num_inference_steps * order`` warm-up ones.
    """

    num_steps: int
    """Scheduler steps in the run (what the cache schedule is laid over)."""
    eval_steps: tuple[int, ...] | None
    """Per model evaluation, the step it belongs to; ``None`` in hand-written loops, where every new
    timestep is a new step."""
    repeats: tuple[bool, ...] | None
    """Per model evaluation, whether its timestep equals the previous evaluation's (checked against the
    transformer's calls, so a call pattern that does not fit the scheduler raises instead of drifting)."""

    @property
    def num_evaluations(self) -> int | None:
        return None if self.eval_steps is None else len(self.eval_steps)

    @classmethod
    def from_scheduler(cls, scheduler: Any, keep: list[bool] | None = None) -> RunLayout:
        """The run's layout; ``keep``: per model evaluation, whether this transformer makes it (one expert of a
        two-expert pipeline): its evaluations then form a run of their own, its steps numbered from 0."""
        values = [float(v) for v in scheduler.timesteps.reshape(-1).tolist()]
        count = len(values)
        order = getattr(scheduler, "order", 1)
        steps = getattr(scheduler, "num_inference_steps", None)
        eval_steps: list[int] = list(range(count))
        if isinstance(order, int) and order >= 1 and isinstance(steps, int) and 1 <= steps <= count:
            warmup = count - steps * order
            grouped, step = [], 0
            for i in range(count):
                grouped.append(step)
                if i == count - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                    step += 1
            if step == steps:
                eval_steps = grouped
        if keep is not None:
            kept = [i for i in range(count) if keep[i]]
            renumbered = {step: n for n, step in enumerate(dict.fromkeys(eval_steps[i] for i in kept))}
            eval_steps = [renumbered[eval_steps[i]] for i in kept]
            values = [values[i] for i in kept]
            count = len(kept)
        repeats = tuple(i > 0 and values[i] == values[i - 1] for i in range(count))
        return cls(eval_steps[-1] + 1 if eval_steps else 0, tuple(eval_steps), repeats)


@dataclass(frozen=True)
class ExpertSegment:
    """The model evaluations one expert of a two-expert pipeline makes in each run.

    Wan 2.2 A14B (diffusers' ``WanPipeline`` and ``WanImageToVideoPipeline`` with ``transformer_2``) runs
    ``transformer`` (high noise) at the timesteps ``t >= boundary_ratio * num_train_timesteps`` and ``transformer_2``
    (low noise) below them; without a ``boundary_ratio``, ``transformer`` alone. The rule is read from the pipeline
    that announces each run, with the pipeline's own comparison, so the split is the pipeline's to the last step.
    """

    name: str
    """The pipeline attribute holding the expert: ``transformer`` or ``transformer_2``."""
    low_noise: bool

    def keep(self, pipeline: Any) -> list[bool]:
        """Per model evaluation of the run ``pipeline``'s scheduler has set, whether this expert makes it."""
        scheduler = pipeline.scheduler
        timesteps = scheduler.timesteps.reshape(-1)
        ratio = getattr(pipeline.config, "boundary_ratio", None)
        if ratio is None:
            high = torch.ones(timesteps.shape, dtype=torch.bool)
        else:
            high = (timesteps >= ratio * scheduler.config.num_train_timesteps).cpu()
        return (~high if self.low_noise else high).tolist()

    def check_first_call(self, pipeline: Any, timestep: float) -> None:
        """Raise unless ``timestep`` is where this expert's part of the run begins."""
        timesteps = pipeline.scheduler.timesteps.reshape(-1).tolist()
        values = [float(v) for v, kept in zip(timesteps, self.keep(pipeline), strict=True) if kept]
        if values and values[0] == timestep:
            return
        ratio = getattr(pipeline.config, "boundary_ratio", None)
        rule = ("the pipeline has no boundary_ratio, so transformer runs every step" if ratio is None else
                f"the pipeline's boundary_ratio {ratio:g} gives transformer the timesteps >= "
                f"{ratio * pipeline.scheduler.config.num_train_timesteps:g} and transformer_2 the others")
        where = f"its first is {values[0]:g}" if values else "none of this run's timesteps is its own"
        raise RuntimeError(f"pipeline.{self.name} was called at timestep {timestep:g}, but {rule}: {where}. "
                           "tokencache lays each expert's cache over the steps this rule gives it")


class RunAnnouncer:
    """Watches the schedulers of the pipelines a cache follows: a new ``timesteps`` tensor (``set_timesteps``
    replaces it) announces a sampling run. The trackers of a two-expert pipeline's transformers share one, so
    they count the same runs."""

    def __init__(self) -> None:
        self.pipelines: list[Any] = []
        self._timesteps_seen: dict[int, Any] = {}
        self.run = 0
        """Runs announced so far."""
        self.source: Any = None
        """The pipeline whose scheduler announced the latest run."""

    def follow(self, pipeline: Any) -> None:
        """Announce runs from this pipeline's scheduler too (timesteps set before now are not a run)."""
        if any(p is pipeline for p in self.pipelines):
            return
        self.pipelines.append(pipeline)
        self._timesteps_seen[id(pipeline)] = pipeline.scheduler.timesteps

    def poll(self) -> None:
        announced = None
        for pipeline in self.pipelines:
            timesteps = pipeline.scheduler.timesteps
            if timesteps is not None and timesteps is not self._timesteps_seen.get(id(pipeline)):
                self._timesteps_seen[id(pipeline)] = timesteps
                announced = announced or pipeline
        if announced is not None:
            self.run += 1
            self.source = announced


class StepTracker:
    """Maps transformer calls to (run, step, model evaluation, stream).

    A run starts when the scheduler of a pipeline the cache follows gets new timesteps (``set_timesteps``
    replaces the tensor; every pipeline that owns the transformer can be followed, see
    ``CacheHandle.attach``) or when ``handle.sampling()`` is entered. Within a run, calls are laid over the
    scheduler's timesteps: the calls with the first timestep are the streams of the first evaluation
    (one when CFG is batched, two for separate conditional and unconditional calls), and every
    evaluation after it has as many. A call that does not fit (more or fewer calls than that, a timestep
    that changes where the scheduler repeats it, a new run no followed scheduler announced) raises: the
    cache is never carried into a run it does not belong to. One expert of a two-expert pipeline (Wan 2.2
    A14B, see :class:`ExpertSegment`) lays its calls over its own evaluations of each run only: they are its run.
    """

    def __init__(self, pipelines: list[Any], announcer: RunAnnouncer | None = None,
                 segment: ExpertSegment | None = None) -> None:
        self.announcer = announcer if announcer is not None else RunAnnouncer()
        self.segment = segment
        """For one expert of a two-expert pipeline: its evaluations of each run, which form its own run."""
        for pipeline in pipelines:
            self.follow(pipeline)
        self.run = self.announcer.run
        """The announced run the current layout belongs to (the announcer's count)."""
        self.manual_steps: int | None = None
        self._manual_new_run = False
        self.reset()

    @property
    def pipelines(self) -> list[Any]:
        return self.announcer.pipelines

    def follow(self, pipeline: Any) -> None:
        """Announce runs from this pipeline's scheduler too (timesteps set before now are not a run)."""
        self.announcer.follow(pipeline)

    def reset(self) -> None:
        self.layout: RunLayout | None = None
        self.evaluation = -1
        self.call = 0
        self.calls_per_evaluation: int | None = None
        self._last_timestep: float | None = None

    @property
    def num_steps(self) -> int:
        return self.layout.num_steps if self.layout is not None else 0

    @property
    def timestep(self) -> float | None:
        """The timestep value of the current call."""
        return self._last_timestep

    @property
    def step(self) -> int:
        layout = self.layout
        if layout is None or self.evaluation < 0:
            return -1
        return layout.eval_steps[self.evaluation] if layout.eval_steps is not None else self.evaluation

    @property
    def first_call_of_step(self) -> bool:
        """Whether the current call is the first of its step (its first evaluation, first stream)."""
        layout = self.layout
        if self.call != 0 or layout is None:
            return False
        e = self.evaluation
        return layout.eval_steps is None or e == 0 or layout.eval_steps[e - 1] != layout.eval_steps[e]

    @property
    def run_complete(self) -> bool:
        """Whether the current call is the last one of the run (known once the streams are counted)."""
        layout = self.layout
        if layout is None or self.calls_per_evaluation is None:
            return False
        last_evaluation = (layout.num_evaluations or layout.num_steps) - 1
        return self.evaluation == last_evaluation and self.call == self.calls_per_evaluation - 1

    def start_manual_run(self, num_steps: int) -> None:
        if self.manual_steps is not None:
            raise RuntimeError("handle.sampling() is already active: sampling runs cannot be nested")
        self.manual_steps = num_steps
        self._manual_new_run = True

    def end_manual_run(self) -> None:
        self.manual_steps = None
        self._manual_new_run = False

    def _announced_layout(self) -> RunLayout | None:
        """The layout of a run that starts now, if a pipeline's scheduler or ``sampling()`` announced one."""
        if self.manual_steps is not None:
            if not self._manual_new_run:
                return None
            self._manual_new_run = False
            return RunLayout(self.manual_steps, None, None)
        announcer = self.announcer
        announcer.poll()
        if announcer.run == self.run:
            return None
        self.run = announcer.run
        keep = self.segment.keep(announcer.source) if self.segment is not None else None
        return RunLayout.from_scheduler(announcer.source.scheduler, keep)

    def locate(self, timestep: Any) -> bool:
        """Advance for one transformer call; returns True when this call starts a new run."""
        if timestep is None:
            raise RuntimeError("tokencache needs the `timestep` argument of the transformer to track steps")
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        layout = self._announced_layout()
        if layout is not None:
            if self.segment is not None and self.manual_steps is None:
                self.segment.check_first_call(self.announcer.source, t)
            if layout.num_steps < 1:
                raise RuntimeError("the scheduler's timesteps are empty: there is no step to run")
            self.reset()
            self.layout = layout
            self.evaluation, self._last_timestep = 0, t
            return True
        if self.layout is None:
            if self.manual_steps is None and not self.pipelines:
                raise RuntimeError("a bare transformer must be called inside `with handle.sampling(num_steps=T):` "
                                   "so that tokencache knows where a sampling run starts and how many steps it has")
            raise RuntimeError("the transformer was called outside a sampling run: no pipeline tokencache follows "
                               "set new timesteps. If another pipeline shares this transformer, call "
                               "`handle.attach(pipeline)`; wrap hand-written loops in "
                               "`with handle.sampling(num_steps=T):`")
        self._advance(t)
        return False

    def _unannounced(self, why: str) -> RuntimeError:
        if self.manual_steps is not None:
            return RuntimeError(f"{why}; a `handle.sampling(num_steps={self.manual_steps})` run has "
                                f"{self.manual_steps} steps with one timestep each")
        return RuntimeError(
            f"{why}. If this is a new sampling run, no pipeline tokencache follows announced it: a transformer "
            "shared by several pipelines needs `handle.attach(pipeline)` for each of them, and hand-written loops "
            "need `with handle.sampling(num_steps=T):`")

    def _advance(self, t: float) -> None:
        layout = self.layout
        changed = t != self._last_timestep
        previous = self._last_timestep
        self._last_timestep = t
        if self.calls_per_evaluation is None:  # still counting the streams of the first evaluation
            repeats_next = layout.repeats is not None and len(layout.repeats) > 1 and layout.repeats[1]
            if not changed and not repeats_next:
                self.call += 1
                return
            self.calls_per_evaluation = self.call + 1
            self.evaluation, self.call = 1, 0
        elif self.call + 1 < self.calls_per_evaluation:
            if changed:
                raise self._unannounced(
                    f"the timestep changed from {previous:g} to {t:g} after {self.call + 1} of the "
                    f"{self.calls_per_evaluation} transformer calls each step of this run makes")
            self.call += 1
            return
        else:
            self.evaluation, self.call = self.evaluation + 1, 0
        count = layout.num_evaluations if layout.num_evaluations is not None else layout.num_steps
        if self.evaluation >= count:
            raise self._unannounced(
                f"the transformer was called again after the last of the {count} model evaluations of this run")
        if layout.repeats is not None:
            if changed == layout.repeats[self.evaluation]:
                expected = "the same timestep" if layout.repeats[self.evaluation] else "a new timestep"
                raise self._unannounced(
                    f"model evaluation {self.evaluation} of this run should come with {expected} (the "
                    f"scheduler's timesteps), but the timestep went from {previous:g} to {t:g} with "
                    f"{self.calls_per_evaluation} call(s) per evaluation")
        elif not changed:
            raise self._unannounced(
                f"the transformer was called {self.calls_per_evaluation + 1} times with timestep {t:g}, but "
                f"{self.calls_per_evaluation} times at the first step of this run")
        if t > previous and layout.repeats is not None:
            # Timesteps only fall within a run; a rise is a new run that no followed scheduler announced.
            raise self._unannounced(f"the timestep rose from {previous:g} to {t:g}")
