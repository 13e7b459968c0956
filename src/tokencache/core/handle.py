"""``tc.apply``: attach a cache to a diffusers pipeline or transformer, and the handle it returns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from .engine import CacheEngine, RunRecord
from .hooks import (
    MODULE_HOOK,
    TRANSFORMER_HOOK,
    HookInstaller,
    ModuleCacheHook,
    TransformerHook,
    check_not_compiled,
    invalidate_registry_caches,
    is_applied,
    resolve_target,
)
from .layouts import check_config_fits, find_blocks
from .plan import default_num_tokens
from .processors import scoring_processor, unsupported_reason
from .small_linear import DEFAULT_SMALL_BATCH_LINEAR, SmallBatchLinearConfig, install_small_batch_linear
from .state import ExpertSegment, RunAnnouncer, StepTracker


@dataclass(frozen=True)
class CacheStats:
    """What the last sampling run did."""

    method: str
    num_steps: int
    full_steps: int
    partial_steps: int
    reuse_steps: int
    """Steps that recomputed nothing and copied the cached values."""
    forecast_steps: int
    """Steps that recomputed nothing and extrapolated the cached values (``forecast=`` of order >= 1)."""
    step_kinds: tuple[str, ...]
    model_evaluations: int
    """Transformer evaluations per stream: ``num_steps`` for one-stage schedulers, more for Heun, KDPM2 and
    PNDM, whose steps evaluate the model several times."""
    fresh_fraction: dict[str, float]
    """Per module type, tokens recomputed over tokens a full run computes."""
    flops: int
    flops_full: int
    forecast_flops: int
    """Element-wise work of forecasting stale tokens, included in ``flops``."""
    cache_bytes: int
    """Bytes held by module caches (and frequency counters) at the end of the run."""
    score_bytes: int
    """Bytes held by the score statistics of the last full step."""
    cfg_shared_selection: bool
    """Whether CFG halves shared one token selection in this run."""
    seconds: dict[str, float]
    """Only with ``handle.timing(True)``: wall-clock seconds of full steps, cached steps, and the engine's
    token selection, gather and scatter."""
    experts: dict[str, CacheStats] = field(default_factory=dict)
    """For a two-expert pipeline (Wan 2.2 A14B), each expert's own statistics (``transformer``,
    ``transformer_2``), of which the fields above are the totals; empty otherwise."""

    @property
    def speedup(self) -> float:
        """FLOPs of an uncached run over FLOPs done."""
        return self.flops_full / self.flops if self.flops else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup,
                "experts": {name: part.to_dict() for name, part in self.experts.items()}}

    def __str__(self) -> str:
        fractions = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.fresh_fraction.items()))
        return (
            f"{self.method}: {self.num_steps} steps ({self.full_steps} full, {self.partial_steps} partial, "
            f"{_idle_steps(self)}; {self.model_evaluations} model evaluations)\n"
            f"  tokens recomputed: {fractions}\n"
            f"  FLOPs: {self.flops / 1e9:.2f} G of {self.flops_full / 1e9:.2f} G uncached -> {self.speedup:.2f}x\n"
            f"  cache memory: {self.cache_bytes / 2**20:.2f} MiB, score state: {self.score_bytes / 2**10:.1f} KiB"
        ) + "".join(f"\n  {name}: {part.num_steps} steps ({part.full_steps} full, {part.partial_steps} partial, "
                    f"{_idle_steps(part)}), {part.flops / 1e9:.2f} G of {part.flops_full / 1e9:.2f} G FLOPs "
                    f"-> {part.speedup:.2f}x" for name, part in self.experts.items())


def _idle_steps(stats: CacheStats) -> str:
    """The steps that recomputed nothing: ``3 reuse``, ``3 forecast`` or both."""
    parts = [f"{stats.reuse_steps} reuse"] if stats.reuse_steps or not stats.forecast_steps else []
    return ", ".join(parts + ([f"{stats.forecast_steps} forecast"] if stats.forecast_steps else []))


def _stats_from(method: str, record: RunRecord) -> CacheStats:
    kinds = tuple(record.step_kinds)
    return CacheStats(
        method=method,
        num_steps=record.num_steps,
        full_steps=kinds.count("full"),
        partial_steps=kinds.count("partial"),
        reuse_steps=kinds.count("reuse"),
        forecast_steps=kinds.count("forecast"),
        step_kinds=kinds,
        model_evaluations=record.model_evaluations,
        fresh_fraction={k: record.tokens_computed[k] / record.tokens_total[k] for k in record.tokens_total},
        flops=record.flops,
        flops_full=record.flops_full,
        forecast_flops=record.forecast_flops,
        cache_bytes=record.cache_bytes,
        score_bytes=record.score_bytes,
        cfg_shared_selection=record.cfg_shared,
        seconds=dict(record.seconds),
    )


class CacheHandle:
    """Returned by :func:`apply`: statistics of the last run, run marking for hand-written loops, removal."""

    def __init__(self, engine: CacheEngine, installer: HookInstaller, processors: list[tuple[nn.Module, Any]],
                 transformer: nn.Module, small_batch_linear: SmallBatchLinearConfig | None = None) -> None:
        self._engine = engine
        self._installer = installer
        self._processors = processors
        self.transformer = transformer
        self.config = engine.config
        self.small_batch_linear = small_batch_linear
        """The few-row linear routing installed with the cache (None: none)."""
        self._removed = False

    def stats(self) -> CacheStats:
        """Statistics of the last completed sampling run (or of the run in progress, if none completed)."""
        record = self._engine.last_record
        if self._engine.record.num_steps and (record is None or self._engine.record is not record):
            record = self._engine.record if record is None else record
        if record is None or not record.num_steps:
            raise RuntimeError("no sampling run has been made with this cache yet")
        return _stats_from(type(self.config).__name__.removesuffix("Config"), record)

    @contextlib.contextmanager
    def sampling(self, num_steps: int) -> Iterator[CacheHandle]:
        """Mark one sampling run of ``num_steps`` steps in a hand-written loop over the transformer (one
        timestep per step; repeated calls with the same timestep are further streams, e.g. CFG halves)."""
        self._check_live()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
        self._engine.tracker.start_manual_run(num_steps)
        try:
            yield self
        finally:
            self._engine.tracker.end_manual_run()
            self._engine.finish_run()

    def attach(self, pipeline: Any) -> CacheHandle:
        """Follow the runs of another pipeline that shares this transformer (built from the first one's
        components, or with another scheduler). Runs of a pipeline the cache does not follow raise an error
        instead of reusing a cache across runs."""
        self._check_live()
        transformer, found = resolve_target(pipeline)
        if found is None:
            raise TypeError(f"pipeline must be a diffusers pipeline with a `transformer` and a `scheduler`; "
                            f"got {type(pipeline).__name__}")
        if transformer is not self.transformer:
            raise ValueError("pipeline.transformer is not the transformer this cache is applied to")
        self._engine.tracker.follow(found)
        return self

    def timing(self, enabled: bool = True) -> None:
        """Measure the wall-clock time of steps and of the engine's own work in :meth:`stats` (``seconds``)."""
        self._check_live()
        self._engine.timer.enabled = bool(enabled)

    def remove(self) -> None:
        """Detach every hook and processor: the model is exactly as before :func:`apply` (hooks others
        registered on the same modules keep working)."""
        self._check_live()
        self._installer.remove_all()
        invalidate_registry_caches(self.transformer)
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._engine.reset()
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this cache handle was removed (handle.remove() was called); call tc.apply again "
                               "to cache the model")


def _merged(records: list[RunRecord]) -> RunRecord:
    """One record adding up the experts' records of a run, their steps in order."""
    total = RunRecord()
    for record in records:
        total.step_kinds += record.step_kinds
        total.num_steps += record.num_steps
        total.model_evaluations += record.model_evaluations
        for totals, part in ((total.tokens_computed, record.tokens_computed), (total.tokens_total, record.tokens_total),
                             (total.seconds, record.seconds)):
            for key, value in part.items():
                totals[key] = totals.get(key, 0) + value
        total.flops += record.flops
        total.flops_full += record.flops_full
        total.forecast_flops += record.forecast_flops
        total.cache_bytes += record.cache_bytes
        total.score_bytes += record.score_bytes
    total.cfg_shared = bool(records) and all(r.cfg_shared for r in records)
    return total


class ExpertsHandle:
    """Returned by :func:`apply` for a pipeline with two experts (Wan 2.2 A14B: ``transformer`` makes the high-noise
    steps, ``transformer_2`` the low-noise ones): one cache per expert, each with its own engine and state, each laid
    over the steps its expert makes as a run of its own (its first step is full, the config's schedule applies
    within it)."""

    def __init__(self, experts: dict[str, CacheHandle], announcer: RunAnnouncer) -> None:
        self._experts = experts
        self._announcer = announcer
        self.transformers = {name: handle.transformer for name, handle in experts.items()}
        """The cached experts by pipeline attribute: ``transformer``, ``transformer_2``."""
        first = next(iter(experts.values()))
        self.config = first.config
        self.small_batch_linear = first.small_batch_linear
        self._removed = False

    def stats(self) -> CacheStats:
        """Totals over the experts, each expert's own in ``experts``: of the latest run in which an expert completed
        its steps (or of the run in progress, if none has); an expert that run gave no step reports none."""
        engines = {name: handle._engine for name, handle in self._experts.items()}
        completed = [e.last_record.run for e in engines.values() if e.last_record is not None]
        started = [e.record.run for e in engines.values() if e.record.num_steps]
        if not completed and not started:
            raise RuntimeError("no sampling run has been made with this cache yet")
        run = max(completed or started)
        records = {}
        for name, engine in engines.items():
            found = [r for r in (engine.last_record, engine.record) if r is not None and r.num_steps and r.run == run]
            records[name] = found[0] if found else RunRecord(run=run)
        method = type(self.config).__name__.removesuffix("Config")
        total = _stats_from(method, _merged(list(records.values())))
        return replace(total, experts={name: _stats_from(method, r) for name, r in records.items()})

    def sampling(self, num_steps: int) -> contextlib.AbstractContextManager:
        """Not for two experts: which steps each expert makes comes from the pipeline's scheduler."""
        raise RuntimeError("a two-expert pipeline's cache lays each expert over the steps the pipeline's scheduler "
                           "and boundary_ratio give it; in a hand-written loop, apply a cache to each transformer "
                           "(tc.apply(pipe.transformer, config), tc.apply(pipe.transformer_2, config)) and mark "
                           "each one's steps with its own handle.sampling(num_steps=...)")

    def attach(self, pipeline: Any) -> ExpertsHandle:
        """Follow the runs of another pipeline built on the same two experts (see :meth:`CacheHandle.attach`)."""
        self._check_live()
        if any(getattr(pipeline, name, None) is not module for name, module in self.transformers.items()) or (
                not hasattr(pipeline, "scheduler")):
            raise ValueError("pipeline.transformer and pipeline.transformer_2 are not the two transformers this "
                             "cache is applied to")
        self._announcer.follow(pipeline)
        return self

    def timing(self, enabled: bool = True) -> None:
        """Measure wall-clock seconds in :meth:`stats` (``seconds``), in both experts."""
        self._check_live()
        for handle in self._experts.values():
            handle.timing(enabled)

    def remove(self) -> None:
        """Remove both experts' caches: each model is exactly as before :func:`apply`."""
        self._check_live()
        for handle in reversed(list(self._experts.values())):
            handle.remove()
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this cache handle was removed (handle.remove() was called); call tc.apply again "
                               "to cache the models")


def pipeline_experts(pipeline: Any, transformer: nn.Module) -> list[tuple[ExpertSegment, nn.Module]] | None:
    """The experts of a two-expert pipeline (``transformer_2`` set: Wan 2.2 A14B), or None for one transformer."""
    second = getattr(pipeline, "transformer_2", None) if pipeline is not None else None
    if second is None:
        return None
    if not isinstance(second, nn.Module):
        raise TypeError(f"pipeline.transformer_2 must be a transformer nn.Module or None; got {type(second).__name__}")
    if second is transformer:
        raise ValueError("pipeline.transformer_2 is pipeline.transformer: one model cannot hold a cache for each "
                         "expert. Give each expert its own model, or set transformer_2 to None")
    if not hasattr(pipeline.config, "boundary_ratio"):
        raise ValueError(f"{type(pipeline).__name__} has a transformer_2 but no boundary_ratio: tokencache follows "
                         "two experts where the pipeline switches from transformer to transformer_2 at "
                         "boundary_ratio (Wan 2.2); apply a cache to each transformer and mark its steps with "
                         "handle.sampling()")
    return [(ExpertSegment("transformer", low_noise=False), transformer),
            (ExpertSegment("transformer_2", low_noise=True), second)]


def apply(target: Any, config: Any,
          small_batch_linear: SmallBatchLinearConfig | None = DEFAULT_SMALL_BATCH_LINEAR,
          ) -> CacheHandle | ExpertsHandle:
    """Attach the cache described by ``config`` to a diffusers pipeline (its ``transformer``) or a transformer.

    A pipeline with two experts (``transformer_2`` set, Wan 2.2 A14B) gets a cache on each, each laid over the
    steps the pipeline's ``boundary_ratio`` gives its expert as a run of its own: an :class:`ExpertsHandle`.

    ``small_batch_linear``: also compute the transformer's conditioning linears (outside the attention and
    MLP modules: the per-step adaLN modulation and timestep embedders, one row per sample) as ``W @ xᵀ``
    on the CPU, which a cache makes a large share of each step (see :mod:`tokencache.core.small_linear`);
    ``None`` leaves them to PyTorch.
    """
    if isinstance(config, type) or not hasattr(config, "build_policy"):
        what = f"the class {config.__name__} (call it to build a config)" if isinstance(config, type) else (
            type(config).__name__)
        raise TypeError(f"config must be a tokencache config instance (ToCaConfig(), FORAConfig(), "
                        f"TokenCacheConfig(...)); got {what}")
    if small_batch_linear is not None and not isinstance(small_batch_linear, SmallBatchLinearConfig):
        raise TypeError(f"small_batch_linear must be a SmallBatchLinearConfig or None; "
                        f"got {type(small_batch_linear).__name__}")
    transformer, pipeline = resolve_target(target)
    experts = pipeline_experts(pipeline, transformer)
    if experts is None:
        return _prepare(config, transformer, pipeline).install(small_batch_linear)
    announcer = RunAnnouncer()
    announcer.follow(pipeline)
    prepared = []
    for segment, module in experts:  # every check on both experts before either is touched
        try:
            prepared.append(_prepare(config, module, pipeline, StepTracker([], announcer, segment)))
        except (TypeError, ValueError, RuntimeError) as error:
            if type(error) not in (TypeError, ValueError, RuntimeError):
                raise
            raise type(error)(f"pipeline.{segment.name} ({type(module).__name__}): {error}") from error
    return ExpertsHandle({segment.name: cache.install(small_batch_linear)
                          for (segment, _), cache in zip(experts, prepared, strict=True)}, announcer)


@dataclass(frozen=True)
class _PreparedCache:
    """One transformer's cache, checked and built, before any hook is registered."""

    engine: CacheEngine
    scoring: list[tuple[int, nn.Module, str]]
    """(block index, attention module, statistic) of each block whose attention reports the score."""

    def install(self, small_batch_linear: SmallBatchLinearConfig | None) -> CacheHandle:
        """Register the hooks and scoring processors on the transformer."""
        engine = self.engine
        transformer, blocks, selector = engine.transformer, engine.blocks, engine.selector
        installer = HookInstaller()
        processors: list[tuple[nn.Module, Any]] = []
        for index, attn, statistic in self.scoring:
            processors.append((attn, attn.processor))
            attn.set_processor(scoring_processor(attn, statistic, lambda i=index: engine.statistic_sink(i),
                                                 selector.config.score_chunk_size))
        installer.register(transformer, TransformerHook(engine), TRANSFORMER_HOOK)
        for block in blocks:
            for slot, module in block.slots():
                installer.register(module, ModuleCacheHook(engine, block, slot), MODULE_HOOK)
        if small_batch_linear is not None:
            install_small_batch_linear(transformer, small_batch_linear, installer, blocks)
        invalidate_registry_caches(transformer)
        return CacheHandle(engine, installer, processors, transformer, small_batch_linear)


def _prepare(config: Any, transformer: nn.Module, pipeline: Any | None,
             tracker: StepTracker | None = None) -> _PreparedCache:
    """Check that ``config`` can cache ``transformer`` and build its engine; touches no module."""
    check_not_compiled(transformer)
    if is_applied(transformer):
        raise RuntimeError(f"a tokencache cache is already applied to this {type(transformer).__name__}; "
                           "call handle.remove() first, or handle.attach(pipeline) to share it with another "
                           "pipeline")
    blocks = find_blocks(transformer)
    check_config_fits(config, blocks)
    if hasattr(config, "validate_model"):
        try:
            num_tokens = default_num_tokens(transformer)
        except ValueError:
            num_tokens = None
        config.validate_model(transformer, len(blocks), num_tokens)
    selector = config.build_selector()
    engine = CacheEngine(config, transformer, blocks, pipeline, selector, tracker)

    scoring: list[tuple[int, nn.Module, str]] = []
    needs = selector.attention_statistic if selector is not None else None
    if needs is not None:
        kind, statistic = needs
        score = selector.config.score
        for block in blocks:
            modules = [m for slot, m in block.slots() if slot.kind == kind]
            if not modules:
                raise ValueError(f"score {score!r} needs a {kind} module, and block {block.name!r} "
                                 f"({type(block.module).__name__}) has none; choose another score")
            reason = unsupported_reason(modules[0], statistic)
            if reason is not None:
                raise ValueError(f"score {score!r}: {reason} ({block.name})")
            scoring.append((block.index, modules[0], statistic))
    return _PreparedCache(engine, scoring)
