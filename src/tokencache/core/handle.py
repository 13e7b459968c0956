"""``tc.apply``: attach a cache to a diffusers pipeline or transformer, and the handle it returns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class CacheStats:
    """What the last sampling run did."""

    method: str
    num_steps: int
    full_steps: int
    partial_steps: int
    reuse_steps: int
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

    @property
    def speedup(self) -> float:
        """FLOPs of an uncached run over FLOPs done."""
        return self.flops_full / self.flops if self.flops else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}

    def __str__(self) -> str:
        fractions = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.fresh_fraction.items()))
        return (
            f"{self.method}: {self.num_steps} steps ({self.full_steps} full, {self.partial_steps} partial, "
            f"{self.reuse_steps} reuse; {self.model_evaluations} model evaluations)\n"
            f"  tokens recomputed: {fractions}\n"
            f"  FLOPs: {self.flops / 1e9:.2f} G of {self.flops_full / 1e9:.2f} G uncached -> {self.speedup:.2f}x\n"
            f"  cache memory: {self.cache_bytes / 2**20:.2f} MiB, score state: {self.score_bytes / 2**10:.1f} KiB"
        )


def _stats_from(method: str, record: RunRecord) -> CacheStats:
    kinds = tuple(record.step_kinds)
    return CacheStats(
        method=method,
        num_steps=record.num_steps,
        full_steps=kinds.count("full"),
        partial_steps=kinds.count("partial"),
        reuse_steps=kinds.count("reuse"),
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


def apply(target: Any, config: Any,
          small_batch_linear: SmallBatchLinearConfig | None = DEFAULT_SMALL_BATCH_LINEAR) -> CacheHandle:
    """Attach the cache described by ``config`` to a diffusers pipeline (its ``transformer``) or a transformer.

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
    engine = CacheEngine(config, transformer, blocks, pipeline, selector)

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

    installer = HookInstaller()
    processors: list[tuple[nn.Module, Any]] = []
    for index, attn, statistic in scoring:
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
