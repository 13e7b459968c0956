"""The cache engine: one per handle, shared by the hooks on the transformer and on its block modules.

The transformer hook calls :meth:`CacheEngine.begin_call` (which step, which stream, full or not); each
module hook calls :meth:`CacheEngine.run_module`, which computes, recomputes fresh tokens, or reuses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .flops import (
    ENGINE_COUNTER,
    FlopConvention,
    block_overhead_flops,
    output_projection_flops,
    output_width,
    slot_flops,
)
from .forecast import (
    TokenForecaster,
    cluster_correction,
    forecast_flops,
    kmeans,
    relative_error,
    step_kind_without_compute,
)
from .layouts import BlockEntry, ModuleSlot, bound_arguments, canonical_tokens, flat_rows, group_shape
from .output_forecast import OutputForecaster
from .schedule import CachePolicy, block_is_full, fresh_tokens
from .state import SharedSelection, SlotKey, SlotState, StepContext, StepTracker, StreamState


def ratio_table(policy: CachePolicy, blocks: list[BlockEntry]) -> list[dict[SlotKey, float]]:
    """Per step, the fraction of its tokens each (block, module kind) recomputes: 1 in full blocks."""
    table = []
    for step in range(policy.num_steps):
        row: dict[SlotKey, float] = {}
        for block in blocks:
            full = block_is_full(policy, step, block.index)
            for slot, _ in block.slots():
                row[(block.index, slot.kind)] = 1.0 if full else policy.fresh_ratio(step, block.index, slot.kind)
        table.append(row)
    return table


def slot_tokens(slot: ModuleSlot, num_tokens: int, context_tokens: int) -> int:
    """Tokens a module sees: the image tokens, the text tokens, or both."""
    return {"image": num_tokens, "text": context_tokens, "joint": num_tokens + context_tokens}[slot.tokens]


def _no_cache(block: BlockEntry, slot: ModuleSlot, step: int) -> RuntimeError:
    return RuntimeError(f"module {block.name}.{slot.name} has no cache at step {step}: the first step of a run "
                        "must be full")


@dataclass(frozen=True)
class SlotWork:
    """One cacheable module's work at one step, counted as the engine does it (what ``tc.plan`` adds up)."""

    rows: int
    """Tokens recomputed per sample."""
    tokens: int
    """Tokens the module sees per sample."""
    flops: int
    flops_full: int
    """FLOPs of computing it on every token."""
    forecast_flops: int
    """Element-wise work of forecasting its stale tokens (not in ``flops``)."""


def slot_work(block: BlockEntry, slot: ModuleSlot, module: nn.Module, ratio: float, num_tokens: int,
              grid: tuple[int, ...], context_tokens: int, batch: int, *,
              convention: FlopConvention = ENGINE_COUNTER, forecast: Any = None, score: str | None = None) -> SlotWork:
    """The work of ``slot`` recomputing ``ratio`` of its tokens for ``batch`` samples of ``num_tokens`` image tokens
    (a ``grid``) and ``context_tokens`` text tokens. A video block's module computed on every token runs on its
    own rows (frames or positions, see :attr:`ModuleSlot.groups`); its fresh tokens run as one row per sample."""
    seen = slot_tokens(slot, num_tokens, context_tokens)
    text = context_tokens if slot.kind == "cross_attn" or slot.text_output else 0
    per_sample, per_row = group_shape(block.groups(slot), grid) if block.shared_selection else (1, seen)
    flops_full = slot_flops(slot, module, per_row, per_row, text, batch * per_sample, convention=convention)
    rows = seen if ratio >= 1.0 else (0 if slot.partial == "whole" else fresh_tokens(ratio, seen))
    flops = flops_full if rows >= seen else slot_flops(slot, module, rows, seen, text, batch, convention=convention)
    if (rows == 0 and slot.partial == "whole" and slot.kind == "self_attn"
            and convention.reused_attention_projects_output):
        flops = batch * output_projection_flops(module, num_tokens, text)
    extra = 0
    if forecast is not None and slot.cached:
        cached = (num_tokens, context_tokens) if slot.text_output else (seen,)
        width = output_width(module)
        extra = sum(forecast_flops(forecast, rows >= seen, rows, tokens, width, batch, score,
                                   token_wise=slot.partial != "whole") for tokens in cached)
    return SlotWork(rows, seen, flops, flops_full, extra)


def _context_tokens(slot: ModuleSlot, arguments: dict) -> int:
    if slot.context is not None:
        return slot.context(arguments)
    context = arguments.get("encoder_hidden_states")
    return context.shape[1] if context is not None else 0


def _fresh_call(args: tuple, kwargs: dict, fresh: torch.Tensor, rows_batch: int,
                per_sample: int) -> tuple[tuple, dict]:
    """The module's arguments with the fresh tokens in place of its tokens; with one fresh row per sample for a
    module whose batch has ``per_sample`` rows per sample, its other per-row tensors keep each sample's first."""
    args, kwargs = ((fresh, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": fresh})
    if per_sample == 1:
        return args, kwargs

    def first_of_sample(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows_batch and value is not fresh:
            return value[::per_sample]
        return value

    return (tuple(first_of_sample(a) for a in args),
            {name: first_of_sample(value) for name, value in kwargs.items()})


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, k) of each sample of ``x`` (B, N, ...): (B, k, ...). Advanced indexing rather than
    ``gather`` with an expanded index, which is about twice as slow on the CPU for wide rows."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


def put_rows(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (B, k, ...) into rows ``index`` (B, k) of ``x`` (B, N, ...) in place; returns ``x``."""
    x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index] = values
    return x


class SectionTimer:
    """Optional wall-clock accounting of the engine's own work (token selection, gather, scatter).

    Off by default: the benchmarks turn it on to report the cache's overhead; on CUDA it synchronises
    around each section, which is why it is not always on."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RunRecord:
    """Accumulated during a sampling run; turned into :class:`tokencache.CacheStats`."""

    num_steps: int = 0
    model_evaluations: int = 0
    """Transformer evaluations per stream (more than ``num_steps`` for multi-stage schedulers: Heun, KDPM2)."""
    step_kinds: list[str] = field(default_factory=list)
    tokens_computed: dict[str, int] = field(default_factory=dict)
    tokens_total: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    flops_full: int = 0
    forecast_flops: int = 0
    """Element-wise work of forecasting stale tokens (included in ``flops``)."""
    cfg_shared: bool = False
    cache_bytes: int = 0
    score_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    """With timing on: seconds spent in full and cached steps, and in the engine's selection, gather and
    scatter."""
    run: int = 0
    """The announced run this record belongs to (:attr:`tokencache.core.state.StepTracker.run`)."""


class CacheEngine:
    def __init__(self, config: Any, transformer: nn.Module, blocks: list[BlockEntry], pipeline: Any | None,
                 selector: Any | None, tracker: StepTracker | None = None) -> None:
        self.config = config
        self.transformer = transformer
        self.blocks = blocks
        self.selector = selector
        self.tracker = tracker if tracker is not None else StepTracker([pipeline] if pipeline is not None else [])
        self.cache_dtype: torch.dtype | None = getattr(config, "cache_dtype", None)
        forecast = getattr(config, "forecast", None)
        whole_output = forecast is not None and forecast.target == "output"
        self.output_forecaster = OutputForecaster(forecast, self.cache_dtype) if whole_output else None
        """With ``target="output"``: the steps that recompute nothing skip the transformer, and the modules keep
        no cache (the other steps are full)."""
        self.skip_call = False
        """Whether the current transformer call is skipped and its output forecast."""
        self.forecast = forecast if forecast is not None and forecast.order > 0 and not whole_output else None
        self.forecaster = TokenForecaster(forecast) if self.forecast is not None else None
        self.forecast_axis = forecast.axis if forecast is not None else "step"
        self.clusters = self.forecast.clusters if self.forecast is not None else 0
        self.track_errors = getattr(config, "score", None) == "forecast_error"
        self.idle_step_kind = step_kind_without_compute(forecast)
        """What a step that recomputes nothing does: ``forecast`` (an expansion of order >= 1) or ``reuse``."""
        self.context: StepContext | None = None
        self.streams: list[StreamState] = []
        self.policy: CachePolicy | None = None
        self.table: list[dict[SlotKey, float]] = []
        self.record = RunRecord()
        self.last_record: RunRecord | None = None
        self.timer = SectionTimer()
        self._call_started = 0.0
        self._call_rows = 0
        self._flop_memo: dict[tuple, int] = {}
        self._skipped_memo: dict[tuple, tuple[int, dict[str, int]]] = {}
        self._call_indices: dict[str, tuple[int, torch.Tensor]] = {}
        """Rows each slot of the current block call recomputed, for later slots with ``index_from``."""
        self.shared_selection = bool(blocks) and blocks[0].shared_selection
        """Fresh tokens are chosen once per call for every block (video models, see ``ModelLayout``)."""
        self._step_selection: dict[tuple[int, int], tuple[int, bool]] = {}

    # ---- runs -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cache and statistic (start of a sampling run)."""
        self.streams = []
        self.context = None
        self.policy = None
        self.table = []
        self.record = RunRecord()
        self.timer.seconds = self.record.seconds
        self._step_selection = {}
        if self.selector is not None:
            self.selector.reset(None)

    def finish_run(self) -> None:
        """Record the run's statistics and free its caches (a finished run's cache is never read again)."""
        if self.policy is not None and self.record.num_steps:
            self.record.cache_bytes = sum(s.cache_bytes() for s in self.streams)
            self.record.score_bytes = sum(s.score_bytes() for s in self.streams)
            self.last_record = self.record
        self.streams = []
        self.context = None
        self.policy = None  # the run is over: a second finish (sampling() exit) records nothing new

    # ---- transformer calls ------------------------------------------------------------------------
    def begin_call(self, hidden_states: torch.Tensor, timestep: Any, grid: tuple[int, ...],
                   context_tokens: int = 0) -> StepContext:
        batch = hidden_states.shape[0]
        num_tokens = 1
        for size in grid:
            num_tokens *= size
        tracker = self.tracker
        if tracker.locate(timestep):
            self.finish_run()
            self.reset()
            self.record.run = tracker.run
            self._check_run(num_tokens, grid)
            self.policy = self.config.build_policy(tracker.num_steps, len(self.blocks))
            self.table = ratio_table(self.policy, self.blocks)
        step, call = tracker.step, tracker.call
        if call == len(self.streams):
            shared = bool(getattr(self.config, "cfg_shared_selection", False)) and batch % 2 == 0 and bool(
                torch.equal(hidden_states[: batch // 2], hidden_states[batch // 2:]))
            self.streams.append(StreamState(batch, num_tokens, shared))
        stream = self.streams[call]
        if (stream.batch, stream.num_tokens) != (batch, num_tokens):
            raise RuntimeError(f"batch/token shape changed within a sampling run: stream {call} started with "
                               f"batch {stream.batch} and {stream.num_tokens} tokens, now {batch} and {num_tokens}")
        full_blocks = self.policy.full_blocks[step]
        position = float(tracker.evaluation) if self.forecast_axis == "step" else tracker.timestep
        self.context = StepContext(step, self.policy.num_steps, full_blocks >= len(self.blocks), stream, grid,
                                   self.table[step], position, full_blocks)
        self._call_rows = 0
        self._call_indices = {}
        self.skip_call = self.output_forecaster is not None and not self.context.is_full
        if self.skip_call:
            self._account_skipped(num_tokens, grid, context_tokens, batch)
            self._start_timer(hidden_states.device)
            return self.context
        if self.shared_selection and self.selector is not None:
            self._begin_shared(self.context, hidden_states.device)
        overhead = self._overhead(num_tokens, context_tokens, batch)
        self.record.flops += overhead
        self.record.flops_full += overhead
        self.record.cfg_shared = self.streams[0].cfg_shared
        self._start_timer(hidden_states.device)
        return self.context

    def _overhead(self, num_tokens: int, context_tokens: int, batch: int) -> int:
        """FLOPs every call of the blocks spends outside their cacheable modules (norms, adaLN)."""
        return self._memo(("overhead", num_tokens, context_tokens, batch),
                          lambda: sum(block_overhead_flops(b, num_tokens, batch, context_tokens)
                                      for b in self.blocks))

    def _start_timer(self, device: torch.device) -> None:
        if self.timer.enabled:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._call_started = time.perf_counter()

    def _account_skipped(self, num_tokens: int, grid: tuple[int, ...], context_tokens: int, batch: int) -> None:
        """A skipped call saves what computing it would have cost (its forecast is counted when it is made)."""
        def full_call() -> tuple[int, dict[str, int]]:
            flops = self._overhead(num_tokens, context_tokens, batch)
            tokens: dict[str, int] = {}
            for block in self.blocks:
                for slot, module in block.slots():
                    work = slot_work(block, slot, module, 1.0, num_tokens, grid, context_tokens, batch)
                    flops += work.flops_full
                    tokens[slot.kind] = tokens.get(slot.kind, 0) + work.tokens * batch
            return flops, tokens

        key = ("skipped", num_tokens, grid, context_tokens, batch)
        if key not in self._skipped_memo:
            self._skipped_memo[key] = full_call()
        flops, tokens = self._skipped_memo[key]
        rec = self.record
        rec.flops_full += flops
        for kind, count in tokens.items():
            rec.tokens_total[kind] = rec.tokens_total.get(kind, 0) + count

    # With target="output": the transformer hook asks whether to run the model, and hands over what it returned.
    def forecast_output(self) -> Any:
        """The forecast output of the current (skipped) call."""
        output, work = self.output_forecaster.forecast(self.context.stream.output, self.context.position)
        self.record.flops += work
        self.record.forecast_flops += work
        return output

    def store_output(self, output: Any) -> None:
        """Keep the output of a computed call for the forecasts of the skipped ones."""
        work = self.output_forecaster.store(self.context.stream.output, output, self.context.position)
        self.record.flops += work
        self.record.forecast_flops += work

    def _selection_plan(self, ctx: StepContext) -> tuple[int, bool]:
        """(most tokens any token-wise module recomputes at this step, whether one is computed on every token)."""
        count = ctx.stream.num_tokens
        key = (ctx.step, count)
        found = self._step_selection.get(key)
        if found is None:
            most, full = 0, False
            for block in self.blocks:
                for slot, _ in block.slots():
                    if slot.partial != "rows" or slot.index_from is not None:
                        continue
                    ratio = ctx.ratios[(block.index, slot.kind)]
                    if ratio >= 1.0 or ctx.block_full(block.index):
                        full = True
                    else:
                        most = max(most, fresh_tokens(ratio, count))
            found = self._step_selection[key] = (most, full)
        return found

    def _begin_shared(self, ctx: StepContext, device: torch.device) -> None:
        """A new call of a model with one selection per call: forget the last call's ranking; a step that
        recomputes no token part-way counts as one more partial step for every token, or refreshes them all."""
        stream = ctx.stream
        if stream.shared is None:
            rows = stream.batch // 2 if stream.cfg_shared else stream.batch
            stream.shared = SharedSelection(torch.zeros(rows, stream.num_tokens, dtype=torch.int32, device=device))
        shared = stream.shared
        shared.ranking = None
        most, full = self._selection_plan(ctx)
        if most == 0:
            if full:
                shared.steps_since_fresh.zero_()
            else:
                shared.steps_since_fresh += 1

    def _shared_ranking(self, ctx: StepContext, state: SlotState, tokens: torch.Tensor, groups: str) -> torch.Tensor:
        """This call's ranking of each sample's canonical tokens (B, k_max), chosen by the first module that
        needs it (from its input, for the ``similarity`` score) and read by all the others."""
        shared = ctx.stream.shared
        if shared.ranking is None:
            most, _ = self._selection_plan(ctx)
            current = last = None
            if self.selector.keeps_inputs:
                batch = ctx.stream.batch
                current = canonical_tokens(tokens, groups, batch, ctx.grid)
                last = canonical_tokens(state.last_input, groups, batch, ctx.grid)
            shared.ranking = self.selector.rank_shared(ctx, shared, current, last, most)
        return shared.ranking

    def _check_run(self, num_tokens: int, grid: tuple[int, ...]) -> None:
        """Before the first step of a run: does the config fit this run's token count?"""
        if getattr(self.config, "spatial_cell_size", None) is not None and len(grid) != 2:
            raise ValueError(f"spatial_cell_size needs a 2-D grid of image tokens; this model's tokens form a "
                             f"{len(grid)}-D grid {grid}: set spatial_cell_size=None")
        check = getattr(self.config, "validate_model", None)
        if check is None:
            return
        try:
            check(self.transformer, len(self.blocks), num_tokens)
        except ValueError as error:
            shape = "x".join(str(g) for g in grid)
            raise ValueError(f"this sampling run has {num_tokens} tokens (a {shape} grid), which the "
                             f"config cannot cache: {error}. Sample at the calibrated resolution (with PixArt, "
                             "resolution binning can change it) or calibrate for this one") from None

    def end_call(self) -> None:
        ctx = self.context
        self.context = None
        self.skip_call = False
        if ctx is None:
            return
        rec = self.record
        tracker = self.tracker
        if self.timer.enabled:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            name = "full_steps" if ctx.is_full else "cached_steps"
            rec.seconds[name] = rec.seconds.get(name, 0.0) + time.perf_counter() - self._call_started
        if tracker.call == 0:
            rec.model_evaluations += 1
        if tracker.first_call_of_step:
            kind = "full" if ctx.is_full else ("partial" if self._call_rows > 0 else self.idle_step_kind)
            rec.step_kinds.append(kind)
            rec.num_steps = len(rec.step_kinds)
        if tracker.run_complete:
            self.finish_run()

    # ---- module calls -----------------------------------------------------------------------------
    def _memo(self, key: tuple, compute: Callable[[], int]) -> int:
        value = self._flop_memo.get(key)
        if value is None:
            value = self._flop_memo[key] = compute()
        return value

    def _account(self, block: BlockEntry, slot: ModuleSlot, module: nn.Module, rows: int, num_tokens: int,
                 context_tokens: int, batch: int, full: bool = True, stored: tuple[torch.Tensor, ...] = (),
                 full_shape: tuple[int, int] | None = None) -> None:
        """Count a call that recomputed ``rows`` of the ``num_tokens`` tokens of each of ``batch`` rows;
        ``full_shape``: (tokens, batch) of the module's full computation when it runs on other rows (a video
        block's frames or positions, whose fresh tokens run as one row per sample)."""
        def cost(r: int, n: int, b: int) -> int:
            return self._memo((block.index, slot.name, r, n, context_tokens, b),
                              lambda: slot_flops(slot, module, r, n, context_tokens, b))

        full_tokens, full_batch = full_shape if full_shape is not None else (num_tokens, batch)
        rec = self.record
        rec.flops += cost(rows, num_tokens, batch)
        rec.flops_full += cost(full_tokens, full_tokens, full_batch)
        rec.tokens_computed[slot.kind] = rec.tokens_computed.get(slot.kind, 0) + rows * batch
        rec.tokens_total[slot.kind] = rec.tokens_total.get(slot.kind, 0) + full_tokens * full_batch
        self._call_rows += rows
        if self.forecast is not None and slot.cached:
            # per cached tensor (b, n, D), b rows of n tokens (one row of all tokens for a flattened video cache)
            score = getattr(self.config, "score", None)
            extra = sum(forecast_flops(self.forecast, full, rows * batch // t.shape[0], t.shape[1], t.shape[-1],
                                       t.shape[0], score, token_wise=slot.partial != "whole") for t in stored)
            rec.flops += extra
            rec.forecast_flops += extra

    def statistic_sink(self, block: int) -> Callable[[Any], None] | None:
        """Where an attention processor of ``block`` sends its score statistic now, or None."""
        ctx = self.context
        if ctx is None or not ctx.block_full(block):
            return None
        raw_scores = ctx.stream.raw_scores

        def sink(value: Any) -> None:  # (B, n), or a dict of them per token pool
            raw_scores[block] = value

        return sink

    def run_module(self, block: BlockEntry, slot: ModuleSlot, module: nn.Module,
                   original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        ctx = self.context
        arguments = bound_arguments(module, args, kwargs)
        tokens = arguments["hidden_states"]
        batch, num_tokens = tokens.shape[0], tokens.shape[1]
        context_tokens = _context_tokens(slot, arguments)
        if self.output_forecaster is not None:  # every call that runs is full: the modules need no cache
            output = original(*args, **kwargs)
            self._account(block, slot, module, num_tokens, num_tokens, context_tokens, batch)
            return output
        if slot.partial == "whole":
            return self._run_whole(ctx, block, slot, module, original, args, kwargs, tokens, context_tokens)
        if block.shared_selection:
            return self._run_shared_rows(ctx, block, slot, module, original, args, kwargs, tokens, context_tokens)
        key = (block.index, slot.name)
        state = ctx.stream.slot(key)
        block_full = ctx.slot_full(block.index, slot.kind)
        rows = num_tokens if block_full else ctx.rows(block.index, slot.kind, num_tokens)
        if slot.index_from is not None and not block_full:
            self._check_source_rows(block, slot, rows)

        if block_full or rows >= num_tokens or (slot.cached and state.output is None):
            if state.output is None and slot.cached and not block_full:
                raise _no_cache(block, slot, ctx.step)
            output = original(*args, **kwargs)
            if slot.cached:
                if self.forecaster is not None:
                    self._measure_full(state, output.detach(), ctx.position)
                    self.forecaster.update_all(state, output.detach(), ctx.position)
                self._store_all(state, tokens if slot.index_from is None else None, output)
            else:
                self._store_inputs(state, tokens, keep_input=slot.index_from is None)
            self._account(block, slot, module, num_tokens, num_tokens, context_tokens, batch, stored=(output,))
            return output

        if slot.cached and state.output.shape[:2] != (batch, num_tokens):
            raise RuntimeError(f"cache of {block.name}.{slot.name} holds shape {tuple(state.output.shape[:2])} "
                               f"but the call has ({batch}, {num_tokens})")
        forecaster = self.forecaster if slot.cached else None
        # The expansion is taken before this step's fresh tokens update the cache: it is the stale tokens' value.
        result = forecaster.predict(state, ctx.position) if forecaster is not None else None
        if rows > 0 or not slot.cached:
            timer, device = self.timer, tokens.device
            if slot.index_from is not None:
                index = self._call_indices[slot.index_from][1]
            elif rows == 0:  # an uncached slot with nothing to recompute: its consumer reuses every row
                index = torch.empty(batch, 0, dtype=torch.long, device=tokens.device)
            else:
                with timer.section("select", device):
                    index = self.selector.select(ctx, block.index, state, tokens, rows, slot.tokens)
            self._call_indices[slot.name] = (rows, index)
            with timer.section("gather", device):
                fresh = gather_rows(tokens, index)
            if slot.partial == "queries":
                if arguments.get("encoder_hidden_states") is not None:
                    raise RuntimeError(f"{block.name}.{slot.name} is a self-attention but received "
                                       "encoder_hidden_states")
                kwargs = {**kwargs, "encoder_hidden_states": tokens}
            args, kwargs = ((fresh, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": fresh})
            fresh_out = original(*args, **kwargs)
            with timer.section("scatter", device):
                if not slot.cached:
                    # Only the fresh rows are ever read (by the slot that takes this one's index): the others
                    # stay uninitialised rather than paying a memset of the whole (FLUX: 4608 x 12288) tensor.
                    empty = fresh_out.new_empty(batch, num_tokens, fresh_out.shape[-1])
                    self._mark_fresh(state, index, fresh, batch, num_tokens, tokens.device)
                    self._account(block, slot, module, rows, num_tokens, context_tokens, batch, full=False)
                    return put_rows(empty, index, fresh_out)  # in place: a tensor of our own
                if forecaster is not None:
                    estimate = gather_rows(result, index)
                    if self.track_errors:
                        state.forecast_error.scatter_(1, index, relative_error(fresh_out.detach(), estimate))
                    if self.clusters and state.clusters is not None and rows > 0:
                        error = fresh_out.detach().float() - estimate.float()
                        shift = cluster_correction(state.clusters, index, error, self.clusters)
                        result = (result.float() + self.forecast.cluster_weight * shift).to(result.dtype)
                    forecaster.update_rows(state, index, fresh_out.detach(), ctx.position)
                    result = put_rows(result.clone(), index, fresh_out.to(result.dtype))
                # Out of place: a tensor handed to the block (or a user's hook) is never modified afterwards.
                state.output = put_rows(state.output.clone(), index, fresh_out.to(state.output.dtype))
                self._mark_fresh(state, index, fresh, batch, num_tokens, tokens.device)
        else:
            state.steps_since_fresh += 1
        self._account(block, slot, module, rows, num_tokens, context_tokens, batch, full=False,
                      stored=(state.output,))
        return result if result is not None else state.output.to(state.output_dtype)

    def _run_shared_rows(self, ctx: StepContext, block: BlockEntry, slot: ModuleSlot, module: nn.Module,
                         original: Callable[..., Any], args: tuple, kwargs: dict, tokens: torch.Tensor,
                         context_tokens: int) -> Any:
        """A position-wise module of a model whose fresh tokens are chosen once per call over each sample's
        canonical tokens. Its rows (frames, positions or whole samples) are flattened to one row of all tokens:
        the cache is (1, B*N, D), the fresh tokens are gathered at their place in that row, recomputed as a
        (B, k) batch and scattered back."""
        stream = ctx.stream
        samples, count = stream.batch, stream.num_tokens
        groups = block.groups(slot)
        per_sample, per_row = group_shape(groups, ctx.grid)
        rows_batch, width = tokens.shape[0], tokens.shape[-1]
        if (rows_batch, tokens.shape[1]) != (samples * per_sample, per_row):
            raise RuntimeError(f"{block.name}.{slot.name} runs on {groups} rows of the {ctx.grid} token grid: "
                               f"for a batch of {samples} it should see ({samples * per_sample}, {per_row}) tokens, "
                               f"it sees {tuple(tokens.shape[:2])}")
        state = stream.slot((block.index, slot.name))
        full = ctx.slot_full(block.index, slot.kind)
        rows = count if full else ctx.rows(block.index, slot.kind, count)
        if slot.index_from is not None and not full:
            self._check_source_rows(block, slot, rows)
        flat = tokens.reshape(1, samples * count, width)
        if full or rows >= count or (slot.cached and state.output is None):
            if state.output is None and slot.cached and not full:
                raise _no_cache(block, slot, ctx.step)
            output = original(*args, **kwargs)
            stored = output.reshape(1, samples * count, output.shape[-1])
            if slot.cached:
                if self.forecaster is not None:
                    self.forecaster.update_all(state, stored.detach(), ctx.position)
                self._store_all(state, flat if slot.index_from is None else None, stored)
            else:
                self._store_inputs(state, flat, keep_input=slot.index_from is None)
            self._account(block, slot, module, per_row, per_row, context_tokens, rows_batch, stored=(stored,))
            return output

        if slot.cached and state.output.shape[:2] != (1, samples * count):
            raise RuntimeError(f"cache of {block.name}.{slot.name} holds {state.output.shape[1]} tokens but the "
                               f"call has {samples * count}")
        forecaster = self.forecaster if slot.cached else None
        result = forecaster.predict(state, ctx.position) if forecaster is not None else None
        if rows > 0 or not slot.cached:
            timer, device = self.timer, tokens.device
            if slot.index_from is not None:
                index = self._call_indices[slot.index_from][1]
            elif rows == 0:
                index = torch.empty(1, 0, dtype=torch.long, device=device)
            else:
                with timer.section("select", device):
                    ranking = self._shared_ranking(ctx, state, tokens, groups)
                    index = flat_rows(ranking[:, :rows], groups, ctx.grid)
            self._call_indices[slot.name] = (rows, index)
            with timer.section("gather", device):
                fresh = gather_rows(flat, index)
            call_args, call_kwargs = _fresh_call(args, kwargs, fresh.view(samples, rows, width), rows_batch,
                                                 per_sample)
            fresh_out = original(*call_args, **call_kwargs)
            fresh_out = fresh_out.reshape(1, samples * rows, fresh_out.shape[-1])
            with timer.section("scatter", device):
                self._mark_fresh(state, index, fresh, 1, samples * count, device)
                if not slot.cached:
                    empty = fresh_out.new_empty(1, samples * count, fresh_out.shape[-1])  # only fresh rows read
                    self._account(block, slot, module, rows, count, context_tokens, samples, full=False,
                                  full_shape=(per_row, rows_batch))
                    return put_rows(empty, index, fresh_out).view(rows_batch, per_row, -1)
                if forecaster is not None:
                    forecaster.update_rows(state, index, fresh_out.detach(), ctx.position)
                    result = put_rows(result.clone(), index, fresh_out.to(result.dtype))
                state.output = put_rows(state.output.clone(), index, fresh_out.to(state.output.dtype))
        else:
            state.steps_since_fresh += 1
        self._account(block, slot, module, rows, count, context_tokens, samples, full=False,
                      stored=(state.output,), full_shape=(per_row, rows_batch))
        value = result if result is not None else state.output.to(state.output_dtype)
        return value.view(rows_batch, per_row, -1)

    def _run_whole(self, ctx: StepContext, block: BlockEntry, slot: ModuleSlot, module: nn.Module,
                   original: Callable[..., Any], args: tuple, kwargs: dict, tokens: torch.Tensor,
                   context_tokens: int) -> Any:
        """A module computed on full steps of its block (or of its module type) and reused (or forecast) whole on
        the others; its output may be a tuple of tensors (a joint attention's image and text outputs), each
        cached. Counted on the rows it runs on (a video block's frames or positions)."""
        first = ctx.stream.slot((block.index, slot.name))
        batch, num_tokens = tokens.shape[0], tokens.shape[1]
        if ctx.slot_full(block.index, slot.kind):
            output = original(*args, **kwargs)
            tensors = output if isinstance(output, tuple) else (output,)
            for i, tensor in enumerate(tensors):
                state = first if i == 0 else ctx.stream.slot((block.index, f"{slot.name}[{i}]"))
                if tensor is None:
                    state.output = None
                    continue
                if self.forecaster is not None:
                    self.forecaster.update_all(state, tensor.detach(), ctx.position)
                self._store_all(state, None, tensor)
            first.whole_parts = len(tensors) if isinstance(output, tuple) else 0
            self._account(block, slot, module, num_tokens, num_tokens, context_tokens, batch,
                          stored=tuple(t for t in tensors if t is not None))
            return output
        if first.output is None and not first.whole_parts:
            raise _no_cache(block, slot, ctx.step)
        count = first.whole_parts or 1
        results = []
        for i in range(count):
            state = first if i == 0 else ctx.stream.slot((block.index, f"{slot.name}[{i}]"))
            if state.output is None:
                results.append(None)
                continue
            state.steps_since_fresh += 1
            value = self.forecaster.predict(state, ctx.position) if self.forecaster is not None else None
            results.append(value if value is not None else state.output.to(state.output_dtype))
        self._account(block, slot, module, 0, num_tokens, context_tokens, batch, full=False,
                      stored=tuple(r for r in results if r is not None))
        return tuple(results) if first.whole_parts else results[0]

    def _check_source_rows(self, block: BlockEntry, slot: ModuleSlot, rows: int) -> None:
        """A slot that recomputes the rows of another (``index_from``) must need as many as that one recomputed."""
        source_rows = self._call_indices.get(slot.index_from, (0, None))[0]
        if source_rows != rows:
            raise RuntimeError(f"{block.name}.{slot.name} recomputes the rows of {slot.index_from}, which "
                               f"recomputed {source_rows} of them; this call needs {rows}")

    def _measure_full(self, state: SlotState, output: torch.Tensor, position: float) -> None:
        """At a full computation: the forecast-error score's errors (the forecast it replaces against the
        value), and the clusters of the cluster correction."""
        if self.track_errors:
            if state.derivatives is not None and state.output is not None and state.output.shape == output.shape:
                state.forecast_error = relative_error(output, self.forecaster.predict(state, position))
            else:
                state.forecast_error = torch.zeros(output.shape[:2], device=output.device)
        if self.clusters:
            state.clusters = kmeans(output, self.clusters)

    def _mark_fresh(self, state: SlotState, index: torch.Tensor, fresh: torch.Tensor, batch: int,
                    num_tokens: int, device: torch.device) -> None:
        if state.steps_since_fresh is None or state.steps_since_fresh.shape != (batch, num_tokens):
            state.steps_since_fresh = torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)
        state.steps_since_fresh += 1
        state.steps_since_fresh.scatter_(1, index, 0)
        if state.last_input is not None:
            put_rows(state.last_input, index, fresh.to(state.last_input.dtype))

    def _store_inputs(self, state: SlotState, tokens: torch.Tensor, keep_input: bool = True) -> None:
        """A full computation of an uncached slot: every token is fresh. A slot that takes another's rows
        (``index_from``) scores nothing, so its input is not kept (FLUX: a 12,288-wide hidden per token)."""
        if state.steps_since_fresh is None or state.steps_since_fresh.shape != tokens.shape[:2]:
            state.steps_since_fresh = torch.zeros(tokens.shape[:2], dtype=torch.int32, device=tokens.device)
        else:
            state.steps_since_fresh.zero_()
        if keep_input and self.selector is not None and self.selector.keeps_inputs:
            state.last_input = tokens.detach().to(self.cache_dtype or tokens.dtype).clone()

    def _store_all(self, state: SlotState, tokens: torch.Tensor | None, output: torch.Tensor) -> None:
        state.output = output.detach().to(self.cache_dtype or output.dtype)
        state.output_dtype = output.dtype
        if state.steps_since_fresh is None or state.steps_since_fresh.shape != output.shape[:2]:
            state.steps_since_fresh = torch.zeros(output.shape[:2], dtype=torch.int32, device=output.device)
        else:
            state.steps_since_fresh.zero_()
        if tokens is not None and self.selector is not None and self.selector.keeps_inputs:
            state.last_input = tokens.detach().to(self.cache_dtype or tokens.dtype).clone()
