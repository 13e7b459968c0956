"""The hooks: one on the transformer (marks steps and streams), one on each cacheable module (decides)."""

from __future__ import annotations

import inspect
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .engine import CacheEngine
from .layouts import BlockEntry, ModuleSlot

TRANSFORMER_HOOK = "tokencache_transformer"
MODULE_HOOK = "tokencache_module"


class TransformerHook(ModelHook):
    """Tells the engine which run, step and stream each transformer call belongs to."""

    _is_stateful = True

    def __init__(self, engine: CacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind_partial(module, *args, **kwargs).arguments
        hidden_states = bound.get("hidden_states")
        if hidden_states is None:
            raise RuntimeError("tokencache needs the transformer's `hidden_states` argument")
        self.engine.begin_call(hidden_states, bound.get("timestep"))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.engine.end_call()

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.engine.reset()
        return module


class ModuleCacheHook(ModelHook):
    """Computes, partially recomputes or reuses one block module, as the engine's step context says."""

    def __init__(self, engine: CacheEngine, block: BlockEntry, slot: ModuleSlot) -> None:
        super().__init__()
        self.engine = engine
        self.block = block
        self.slot = slot

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.engine.context is None:  # called outside a transformer call: not ours to cache
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.engine.run_module(self.block, self.slot, module, self.fn_ref.original_forward, args, kwargs)


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
        for module, name, had_forward, had_registry in reversed(self._installed):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
            if not had_forward and "forward" in module.__dict__:
                del module.__dict__["forward"]
        self._installed.clear()


def is_applied(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(TRANSFORMER_HOOK) is not None


def resolve_target(target: Any) -> tuple[nn.Module, Any | None]:
    """The transformer of ``target`` (a pipeline or a transformer) and the pipeline, if one was given."""
    if isinstance(target, nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module) and hasattr(target, "scheduler"):
        return transformer, target
    raise TypeError(f"target must be a diffusers pipeline with a `transformer` and a `scheduler`, or a "
                    f"transformer nn.Module; got {type(target).__name__}")
