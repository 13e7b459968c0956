"""The hooks: one on the transformer (marks steps and streams), one on each cacheable module (decides)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .engine import CacheEngine
from .layouts import BlockEntry, ModuleSlot, model_layout

TRANSFORMER_HOOK = "tokencache_transformer"
MODULE_HOOK = "tokencache_module"


class TransformerHook(ModelHook):
    """Tells the engine which run, step and stream each transformer call belongs to."""

    _is_stateful = True

    def __init__(self, engine: CacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self._signature: inspect.Signature | None = None
        self._first = "hidden_states"

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        self._first = list(self._signature.parameters)[1]
        self.model = model_layout(module)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._begin(module, args, kwargs)
        try:
            if self.engine.output_forecaster is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            forecast = self._forecast()
            if forecast is not None:
                return forecast
            output = self.fn_ref.original_forward(*args, **kwargs)
            self._store(output)
            return output
        finally:
            self._end()

    # ForecastConfig(target="output"): a call that recomputes nothing is skipped and its output forecast
    @torch.compiler.disable
    def _forecast(self) -> Any:
        return self.engine.forecast_output() if self.engine.skip_call else None

    @torch.compiler.disable
    def _store(self, output: Any) -> None:
        self.engine.store_output(output)

    # The run/step/stream bookkeeping reads the timestep's value and branches on Python counters: under
    # torch.compile it runs eagerly (one graph break each) instead of being traced, which would guard on the
    # timestep and the step index and recompile at every step.
    @torch.compiler.disable
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(module, *args, **kwargs).arguments
        # the latents: ``hidden_states`` in diffusers, the first argument elsewhere (OpenSora's ``x``)
        hidden_states = bound.get("hidden_states", bound.get(self._first))
        if hidden_states is None:
            raise RuntimeError("tokencache needs the transformer's `hidden_states` argument")
        grid = self.model.token_grid(module, bound)
        context = bound.get("encoder_hidden_states")
        context_tokens = context.shape[1] if torch.is_tensor(context) and context.dim() == 3 else 0
        self.engine.begin_call(hidden_states, bound.get("timestep"), grid, context_tokens)

    @torch.compiler.disable
    def _end(self) -> None:
        self.engine.end_call()

    def reset_state(self, module: nn.Module) -> nn.Module:
        # diffusers resets stateful hooks at the end of a pipeline call: a run whose end the calls could not show
        # (one model evaluation, e.g. a two-expert pipeline's one-step segment) keeps its statistics
        self.engine.finish_run()
        self.engine.reset()
        return module


class ModuleCacheHook(ModelHook):
    """Computes, partially recomputes or reuses one block module, as the engine's step context says."""

    def __init__(self, engine: CacheEngine, block: BlockEntry, slot: ModuleSlot) -> None:
        super().__init__()
        self.engine = engine
        self.block = block
        self.slot = slot
        self.compute: Callable[..., Any] | None = None
        """What computes the module (on all tokens or on the fresh ones) when :func:`tokencache.compile` set a
        compiled one; None: the module's own forward."""

    # The decision (full, partial with k tokens, reuse) and the gather/scatter run eagerly under torch.compile:
    # traced, they would guard on the step and on k and recompile at every step. The module's own compute is
    # ``self.compute``, which tokencache.compile compiles with a dynamic token dimension.
    @torch.compiler.disable
    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        compute = self.compute or self.fn_ref.original_forward
        if self.engine.context is None:  # called outside a transformer call: not ours to cache
            return compute(*args, **kwargs)
        return self.engine.run_module(self.block, self.slot, module, compute, args, kwargs)


class HookInstaller:
    """Registers hooks and restores every touched module exactly on :meth:`remove_all`."""

    def __init__(self) -> None:
        self._installed: list[tuple[nn.Module, str, bool, bool]] = []

    def register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        had_forward = "forward" in module.__dict__
        had_registry = hasattr(module, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name, had_forward, had_registry))

    def remove_all(self) -> None:
        """Remove our hooks; a module keeps the hooks others registered (before or after ours) working."""
        for module, name, had_forward, had_registry in reversed(self._installed):
            registry = module._diffusers_hook
            unlink_hook(registry, name)
            if registry.hooks:
                continue  # the registry's chain (and its patched forward) still serves other hooks
            if not had_registry:
                del module._diffusers_hook
            if not had_forward and "forward" in module.__dict__:
                del module.__dict__["forward"]
        self._installed.clear()


def unlink_hook(registry: HookRegistry, name: str) -> None:
    """Remove hook ``name`` from ``registry`` and re-link the chain around it.

    ``HookRegistry.remove_hook`` hands the removed hook's inner forward to the next hook's ``forward``; when
    that next hook replaces the forward (``new_forward``: PyramidAttentionBroadcast, a user's skipping hook),
    its decision is thereby bypassed and it is silently switched off. The inner forward belongs in its
    ``original_forward`` instead.
    """
    if name not in registry.hooks:
        return
    index = registry._hook_order.index(name)
    removed = registry._fn_refs[index]
    inner = removed.original_forward if removed.original_forward is not None else removed.forward
    if index == len(registry._hook_order) - 1:
        registry._module_ref.forward = inner
    else:
        outer = registry._fn_refs[index + 1]
        if outer.original_forward is not None:
            outer.original_forward = inner
        else:
            outer.forward = inner
    hook = registry.hooks.pop(name)
    registry._module_ref = hook.deinitalize_hook(registry._module_ref)
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def invalidate_registry_caches(module: nn.Module) -> None:
    """diffusers caches which descendants carry hooks; adding or removing ours makes that list stale."""
    registry = getattr(module, "_diffusers_hook", None)
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


def is_applied(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(TRANSFORMER_HOOK) is not None


def check_not_compiled(module: nn.Module) -> None:
    """A ``torch.compile`` wrapper hides the model's forward and modules behind ``_orig_mod``."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("tc.apply got a torch.compile()'d module: apply the cache to the model itself, then "
                        "compile it with tc.compile(handle)")


def resolve_target(target: Any) -> tuple[nn.Module, Any | None]:
    """The transformer of ``target`` (a pipeline or a transformer) and the pipeline, if one was given."""
    if isinstance(target, nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module) and hasattr(target, "scheduler"):
        return transformer, target
    raise TypeError(f"target must be a diffusers pipeline with a `transformer` and a `scheduler`, or a "
                    f"transformer nn.Module; got {type(target).__name__}")
