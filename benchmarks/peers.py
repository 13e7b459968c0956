"""Peer caches on the shipped models (the digits DiT and the Fashion-MNIST PixArt-style transformer), applied
through their own packages (the ``bench`` extra).

Each peer is a :class:`Peer`: ``peer.attach(pipe)`` installs its cache on ``pipe.transformer`` the way a user of
that package would and returns a remover; the remover records what the peer reports about the last run
(``peer.stats``: steps computed / skipped) and takes the cache off, leaving the model as it was (outputs bitwise
equal to before, no attribute left behind). ``peer.check(pipe)`` returns why the peer cannot run on this model
(a concrete reason string), or None; it tries the peer on a 2-step call where that is what finds out.

How each peer is applied (diffusers 0.42.1, cache-dit 1.5.3):

* diffusers hooks (``FirstBlockCacheConfig`` / ``apply_first_block_cache`` and ``TaylorSeerCacheConfig`` /
  ``apply_taylorseer_cache``, the public functions) on ``pipe.transformer``. Both hooks are stateful: every
  denoiser call must run inside a ``CacheContext``, which a ``CacheMixin`` model opens with
  ``transformer.cache_context(name)`` from its pipeline, and ``maybe_free_model_hooks`` resets their state after a
  run. Neither ``DiTTransformer2DModel`` nor ``PixArtTransformer2DModel`` is a ``CacheMixin`` (no
  ``enable_cache``/``cache_context``) and their pipelines (diffusers' ``DiTPipeline`` and ``PixArtAlphaPipeline``,
  our ``DigitsPipeline`` and ``FashionPipeline``) open no context, so :class:`CacheContextHooks`
  does what ``cache_context`` does, from torch forward hooks on the transformer: before each call it sets
  ``CacheContext("cond_uncond", step_index, num_inference_steps, timestep)`` with
  ``diffusers.hooks.hooks._set_cache_context`` (the function ``cache_context`` calls; one context because the CFG
  batch runs cond and uncond in one call), clears it after, and resets the hooks' state
  (``HookRegistry.reset_stateful_hooks``) when a call is the first step of a run (its timestep is the
  scheduler's first; ``FashionPipeline`` passes ``t / 1000 * 1000``, matched within float32 rounding). Neither
  hook reads anything but the context's name: FirstBlockCache compares the first
  block's residual with the last computed one, TaylorSeer counts calls.
* FirstBlockCache: hooks every block of ``transformer_blocks`` (``BasicTransformerBlock`` is in diffusers' block
  registry); knob ``threshold`` (relative L1 change of block 0's residual below which the other blocks are
  skipped).
* TaylorSeer: its default ``cache_identifiers`` (``^transformer_blocks.*attn`` etc., ``re.fullmatch``) match no
  module of a DiT or PixArt, whose attention modules are named ``attn1`` (and ``attn2``): recorded as unavailable
  with that reason. Lite mode caches ``proj_out``, which DiT does not have (``proj_out_1``/``proj_out_2``;
  unavailable there), while PixArt has one: there lite mode runs (on predicted steps the blocks return zeros and
  ``proj_out`` returns the forecast of its output, so the model's output is forecast whole). The main setting
  passes ``cache_identifiers`` for each block's attentions (``attn1``, PixArt's cross-attention ``attn2``) and
  ``ff`` (the attention and MLP outputs TaylorSeer forecasts in the paper), ``max_order=1``,
  ``disable_cache_before_step=3`` (default) and
  ``taylor_factors_dtype=torch.float32`` (the docs' example; the bfloat16 default loses precision on the CPU);
  knob ``cache_interval``.
* cache-dit DBCache: ``cache_dit.enable_cache(pipe, ...)`` refuses ``DigitsPipeline`` and ``FashionPipeline``
  (its adapters are matched by class-name prefix and neither matches), so we pass a ``cache_dit.BlockAdapter``
  built exactly like cache-dit's own adapter for the transformer (``transformer_blocks``,
  ``ForwardPattern.Pattern_3``; the ``DiT`` adapter adds ``DiTPatchFunctor``, the ``PixArt`` one nothing) with our
  pipeline; cache-dit then wraps the pipeline class's ``__call__`` to open and reset its context per
  call, and ``cache_dit.disable_cache(pipe)`` removes everything. The default ``DBCacheConfig`` (F8B0) needs at
  least 8 blocks (the digits DiT has 6: recorded as unavailable with cache-dit's own assertion); on the Fashion
  model's 8 blocks it runs, but its 8 "first" blocks are every block, so its "cached" steps still compute all of
  them (output bitwise equal to the uncached run; cache-dit still counts them as cached): the row measures its
  overhead. The sweep uses
  ``Fn_compute_blocks=1, Bn_compute_blocks=0`` and the other defaults (8 warm-up steps, CFG in one batch);
  knob ``residual_diff_threshold``. "+TaylorSeer" adds ``TaylorSeerCalibratorConfig(taylorseer_order=1)``.

What the peers' own removal leaves behind, and :class:`ModelSnapshot` undoes: diffusers' ``remove_hook`` leaves an
empty ``_diffusers_hook`` registry and an instance ``forward`` on every hooked module (harmless); cache-dit's
``disable_cache`` leaves the transformer patched by ``DiTPatchFunctor`` (its own ``forward``, ``_is_patched`` and
``_norm1_emb``, a second reference to block 0's embedding registered as a submodule, so ``state_dict()`` gains
``_norm1_emb.*`` keys), its statistics attributes on ``transformer_blocks``, and ``transformer_blocks`` moved to
the end of the transformer's children (``unittest.mock.patch.object`` re-inserts it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Remover = Callable[[], None]

CONTEXT_NAME = "cond_uncond"
DBCACHE_BLOCKS = dict(Fn_compute_blocks=1, Bn_compute_blocks=0)


class ModelSnapshot:
    """The instance attributes and child modules (and their order) of the transformer's modules and the pipeline
    (and its class) before a peer is attached; :meth:`restore` undoes whatever a peer's own removal left behind."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.modules = list(pipe.transformer.modules())
        self.attrs = [set(vars(m)) for m in self.modules]
        self.children = [list(m._modules) for m in self.modules]
        self.pipe_attrs = set(vars(pipe))
        self.class_attrs = dict(vars(type(pipe)))

    def restore(self) -> list[str]:
        """Remove attributes added since the snapshot; returns their names (empty when the peer cleaned up)."""
        left = []
        for module, attrs, children in zip(self.modules, self.attrs, self.children, strict=True):
            for name in set(module._modules) - set(children):
                del module._modules[name]
                left.append(f"{type(module).__name__}.{name}")
            if list(module._modules) != children:  # e.g. mock.patch.object re-inserts a patched child at the end
                order = [(name, module._modules[name]) for name in children if name in module._modules]
                module._modules.clear()
                module._modules.update(order)
                left.append(f"{type(module).__name__}._modules order")
            for name in set(vars(module)) - attrs:
                del module.__dict__[name]
                left.append(f"{type(module).__name__}.{name}")
        for name in set(vars(self.pipe)) - self.pipe_attrs:
            del self.pipe.__dict__[name]
            left.append(f"pipe.{name}")
        cls = type(self.pipe)
        for name in set(vars(cls)) - set(self.class_attrs):
            delattr(cls, name)
            left.append(f"{cls.__name__}.{name}")
        for name, value in self.class_attrs.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)
                left.append(f"{cls.__name__}.{name}")
        return left


@dataclass
class Peer:
    """One setting of a peer cache: a row of the frontier."""

    name: str
    family: str
    knob: dict[str, Any]
    install: Callable[[Any, dict[str, Any]], Remover] | None = None
    """``install(pipe, stats) -> remover``: attaches the peer; the remover fills ``stats`` and takes it off."""
    reason: str | None = None
    """Known without trying: why the peer cannot run (e.g. its package is missing)."""
    probe: Callable[[Any], str | None] | None = None
    """Finds out by trying whether the peer works on ``pipe``; returns the reason if not."""
    stats: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)

    def attach(self, pipe: Any) -> Remover:
        """Attach the peer to ``pipe``; returns the remover (``Method.attach`` of ``tokencache.demo.compare``)."""
        if self.install is None:
            raise RuntimeError(f"{self.name} cannot run: {self.reason}")
        snapshot = ModelSnapshot(pipe)
        self.stats.clear()
        remove = self.install(pipe, self.stats)

        def remover() -> None:
            try:
                remove()
            finally:
                self.leftovers = snapshot.restore()

        return remover

    def check(self, pipe: Any) -> str | None:
        """Why this peer cannot run on ``pipe``, or None."""
        if self.reason is not None:
            return self.reason
        return self.probe(pipe) if self.probe is not None else None


def _try_run(peer: Peer, pipe: Any) -> str | None:
    """Attach, sample one image in 2 steps, remove; the error as a reason, or None."""
    remover = peer.attach(pipe)
    try:
        with torch.no_grad():
            pipe(class_labels=[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    except Exception as error:  # the peer's own failure on this model is the reason we record
        return f"{type(error).__name__}: {error}".strip()
    finally:
        remover()
    return None


# --------------------------------------------------------------------------------------------------- diffusers


def call_timestep(args: tuple, kwargs: dict) -> Any:
    """The ``timestep`` argument of a transformer call (keyword or second positional), or None."""
    return kwargs.get("timestep", args[1] if len(args) > 1 else None)


def step_index(pipe: Any, timestep: Any, previous: int) -> tuple[int, int | None]:
    """The step of a transformer call (from its timestep's place in the scheduler's timesteps; ``previous + 1``
    when it cannot be found) and the run's step count (None if unknown)."""
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    if timesteps is None or timestep is None:
        return previous + 1, None
    t = torch.as_tensor(timestep).reshape(-1)[0].to(timesteps.device, timesteps.dtype)
    found = (timesteps == t).nonzero()
    if not len(found):  # a pipeline that passes the model a rescaled timestep (t / 1000 * 1000) may round it
        found = torch.isclose(timesteps, t, rtol=1e-5, atol=1e-4).nonzero()
    return (int(found[0, 0]) if len(found) else previous + 1), len(timesteps)


class CacheContextHooks:
    """What a ``CacheMixin`` pipeline gives diffusers' stateful cache hooks, from forward hooks on the transformer:
    a ``CacheContext`` around every call, and a reset of the hooks' state at the first step of every run."""

    def __init__(self, pipe: Any, after_call: Callable[[], None] | None = None) -> None:
        from diffusers.hooks import HookRegistry

        self.pipe = pipe
        self.transformer = pipe.transformer
        self.after_call = after_call
        self.step = -1
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.invalidate_child_registries_cache()  # the apply_* functions just hooked the blocks
        self.registry = registry
        self._handles = [
            self.transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            self.transformer.register_forward_hook(self._after, always_call=True),
        ]

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = call_timestep(args, kwargs)
        self.step, num_steps = step_index(self.pipe, timestep, self.step)
        if self.step == 0:
            self.registry.reset_stateful_hooks(recurse=True)
        context = CacheContext(CONTEXT_NAME, step_index=self.step, num_inference_steps=num_steps,
                               timestep=timestep)
        _set_cache_context(module, context)

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        try:
            if self.after_call is not None:
                self.after_call()
        finally:
            _set_cache_context(module, None)

    def remove(self, hook_names: tuple[str, ...]) -> None:
        """Remove the context hooks and the named diffusers hooks (as ``CacheMixin.disable_cache`` does)."""
        for handle in self._handles:
            handle.remove()
        self.registry.reset_stateful_hooks(recurse=True)
        for name in hook_names:
            self.registry.remove_hook(name, recurse=True)
        self.registry.invalidate_child_registries_cache()


def _install_first_block_cache(threshold: float) -> Callable[[Any, dict[str, Any]], Remover]:
    def install(pipe: Any, stats: dict[str, Any]) -> Remover:
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        transformer = pipe.transformer
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
        head = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
        manager = head.get_hook(_FBC_LEADER_BLOCK_HOOK).state_manager
        counts = {"computed": 0, "skipped": 0}

        def after_call() -> None:
            counts["computed" if manager.get_state().should_compute else "skipped"] += 1

        context = CacheContextHooks(pipe, after_call)  # counts add up over the calls of one attachment

        def remove() -> None:
            stats.update(computed_steps=counts["computed"], skipped_steps=counts["skipped"],
                         skipped_blocks_per_skipped_step=len(transformer.transformer_blocks) - 1)
            context.remove((_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK))

        return remove

    return install


# every attention (DiT: attn1; PixArt: attn1 and the cross-attention attn2) and MLP output of every block
TAYLORSEER_TARGETS = [r"transformer_blocks\.\d+\.attn\d", r"transformer_blocks\.\d+\.ff"]


def _taylorseer_config(cache_interval: int, variant: str) -> Any:
    from diffusers.hooks import TaylorSeerCacheConfig

    common = dict(cache_interval=cache_interval, max_order=1, disable_cache_before_step=3,
                  taylor_factors_dtype=torch.float32)
    if variant == "default":
        return TaylorSeerCacheConfig(**common)
    if variant == "lite":
        return TaylorSeerCacheConfig(**common, use_lite_mode=True)
    return TaylorSeerCacheConfig(**common, cache_identifiers=list(TAYLORSEER_TARGETS))


def _taylorseer_hooks(transformer: torch.nn.Module) -> list[tuple[str, Any]]:
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    found = []
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_TAYLORSEER_CACHE_HOOK) if registry is not None else None
        if hook is not None:
            found.append((name, hook))
    return found


def _install_taylorseer(cache_interval: int, variant: str) -> Callable[[Any, dict[str, Any]], Remover]:
    def install(pipe: Any, stats: dict[str, Any]) -> Remover:
        from diffusers.hooks import apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        transformer = pipe.transformer
        apply_taylorseer_cache(transformer, _taylorseer_config(cache_interval, variant))
        hooks = _taylorseer_hooks(transformer)
        counts = {"computed": 0, "predicted": 0}

        def after_call() -> None:
            if not hooks:
                return
            state = hooks[0][1].state_manager.get_state()
            counts["computed" if state.last_update_step == state.current_step else "predicted"] += 1

        context = CacheContextHooks(pipe, after_call)  # counts add up over the calls of one attachment

        def remove() -> None:
            stats.update(computed_steps=counts["computed"], predicted_steps=counts["predicted"],
                         hooked_modules=len(hooks))
            context.remove((_TAYLORSEER_CACHE_HOOK,))

        return remove

    return install


def _probe_taylorseer(variant: str) -> Callable[[Any], str | None]:
    def probe(pipe: Any) -> str | None:
        from diffusers.hooks import apply_taylorseer_cache
        from diffusers.hooks.hooks import HookRegistry
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        transformer = pipe.transformer
        snapshot = ModelSnapshot(pipe)
        config = _taylorseer_config(2, variant)
        try:
            apply_taylorseer_cache(transformer, config)
            hooks = _taylorseer_hooks(transformer)
        finally:
            HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(_TAYLORSEER_CACHE_HOOK, recurse=True)
            snapshot.restore()
        active = [name for name, hook in hooks if not hook.state_manager._init_kwargs["is_inactive"]]
        kind = type(transformer).__name__
        if variant == "lite" and not active:
            inactive = len(hooks) - len(active)
            return (f"lite mode caches modules matching ^proj_out$ and zeroes {inactive} block(s) on predicted steps; "
                    f"{kind} has no proj_out (it has proj_out_1/proj_out_2), so nothing downstream would be cached "
                    "and the output would be computed from zeros")
        if not hooks:
            attention = sorted({n.rsplit(".", 1)[-1] for n, m in transformer.named_modules()
                                if type(m).__name__ == "Attention"})
            return (f"the default cache_identifiers (^transformer_blocks.*attn etc., re.fullmatch) match no module "
                    f"of {kind} (its attention modules are named {', '.join(attention)}): nothing would be cached")
        return None

    return probe


# --------------------------------------------------------------------------------------------------- cache-dit


def cache_dit_version() -> str | None:
    """The installed cache-dit version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cache-dit")
    except PackageNotFoundError:
        return None


def _import_cache_dit() -> Any:
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


def _dbcache_adapter_extras(transformer: torch.nn.Module) -> dict[str, Any]:
    """What cache-dit's own adapter for the transformer's class adds to the common ``BlockAdapter`` fields (its
    registered adapters are matched by the pipeline's class name, which ours do not match): the "DiT" adapter
    patches the transformer with ``DiTPatchFunctor``, the "PixArt" one needs nothing more."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if isinstance(transformer, DiTTransformer2DModel):
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        return dict(patch_functor=DiTPatchFunctor())
    if isinstance(transformer, PixArtTransformer2DModel):
        return {}
    raise TypeError(f"no cache-dit adapter is known for {type(transformer).__name__} (DiT and PixArt only)")


def _install_dbcache(threshold: float, taylorseer: bool, blocks: dict[str, int] | None
                     ) -> Callable[[Any, dict[str, Any]], Remover]:
    def install(pipe: Any, stats: dict[str, Any]) -> Remover:
        cache_dit = _import_cache_dit()
        adapter = cache_dit.BlockAdapter(pipe=pipe, transformer=pipe.transformer,
                                         blocks=pipe.transformer.transformer_blocks,
                                         forward_pattern=cache_dit.ForwardPattern.Pattern_3,
                                         check_forward_pattern=True, **_dbcache_adapter_extras(pipe.transformer))
        config = cache_dit.DBCacheConfig(residual_diff_threshold=threshold, **(blocks or {}))
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
        # cache-dit's summary holds the counts of the last finished pipeline call: add them up at the first step
        # of every call after the first, and at removal
        totals = {"computed_steps": 0, "skipped_steps": 0}
        last_step = [-1]

        def add_last_call() -> None:
            summary = cache_dit.summary(pipe, logging=False)
            if summary and summary[0].accumulated_executed_steps:
                cached = summary[0].accumulated_cached_steps
                totals["computed_steps"] += summary[0].accumulated_executed_steps - cached
                totals["skipped_steps"] += cached

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            step, _ = step_index(pipe, call_timestep(args, kwargs), last_step[0])
            if step == 0 and last_step[0] != 0:
                add_last_call()
            last_step[0] = step

        hook = pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)

        def remove() -> None:
            hook.remove()
            try:
                add_last_call()
                if totals["computed_steps"] + totals["skipped_steps"]:
                    stats.update(totals)
            finally:
                cache_dit.disable_cache(pipe)

        return remove

    return install


# --------------------------------------------------------------------------------------------------- the sweep

FBC_THRESHOLDS = (0.04, 0.07, 0.1, 0.2)
TAYLORSEER_INTERVALS = (2, 3, 4, 6)
DBCACHE_THRESHOLDS = (0.04, 0.08, 0.12, 0.2)


def diffusers_peers(quick: bool = False) -> list[Peer]:
    """diffusers' FirstBlockCache and TaylorSeer hooks."""
    fbc = FBC_THRESHOLDS[2:3] if quick else FBC_THRESHOLDS
    intervals = (3,) if quick else TAYLORSEER_INTERVALS
    peers = [Peer(f"diffusers FBCache t={t}", "diffusers FBCache", dict(threshold=t),
                  install=_install_first_block_cache(t)) for t in fbc]
    peers += [Peer(f"diffusers TaylorSeer N={n}", "diffusers TaylorSeer", dict(cache_interval=n),
                   install=_install_taylorseer(n, "blocks")) for n in intervals]
    if not quick:
        for variant in ("default", "lite"):
            peers.append(Peer(f"diffusers TaylorSeer ({variant} identifiers)", "diffusers TaylorSeer",
                              dict(cache_interval=2, variant=variant), install=_install_taylorseer(2, variant),
                              probe=_probe_taylorseer(variant)))
    return peers


def cache_dit_peers(quick: bool = False) -> list[Peer]:
    """cache-dit's DBCache, with and without its TaylorSeer calibrator (unavailable rows if not installed)."""
    missing = None if cache_dit_version() else "cache-dit is not installed (pip install 'tokencache[bench]')"
    peers = []
    for family, taylorseer in (("cache-dit DBCache", False), ("cache-dit DBCache+TaylorSeer", True)):
        for t in DBCACHE_THRESHOLDS[1:2] if quick else DBCACHE_THRESHOLDS:
            peers.append(Peer(f"{family} F1B0 r={t}", family, dict(residual_diff_threshold=t, **DBCACHE_BLOCKS),
                              install=None if missing else _install_dbcache(t, taylorseer, DBCACHE_BLOCKS),
                              reason=missing))
    if not quick:
        default = Peer("cache-dit DBCache (default config)", "cache-dit DBCache", dict(residual_diff_threshold=0.08),
                       install=None if missing else _install_dbcache(0.08, False, None), reason=missing)
        default.probe = lambda pipe: _try_run(default, pipe)
        peers.append(default)
    return peers


def all_peers(quick: bool = False) -> list[Peer]:
    """Every peer setting of the frontier sweep."""
    return diffusers_peers(quick) + cache_dit_peers(quick)
