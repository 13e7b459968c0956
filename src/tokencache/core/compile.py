"""``tc.compile``: torch.compile a cached transformer with a bounded number of compiles.

A cache decides in Python at every call which tokens each module computes: the step, the number of fresh
tokens ``k`` (which varies with the step and the block), the tokens themselves. Traced by dynamo, those
decisions would become guards on Python ints and recompile at nearly every step. So the hooks run the
decisions, the token gather and the scatter eagerly (``torch.compiler.disable``: a graph break, never a
guard), and ``tc.compile`` compiles around them:

* each cached module's own forward (attention, MLP), once per code path, shared by all blocks, with the
  token dimension dynamic so that every ``k`` (and the full ``n``) reuses one graph;
* the rest of the transformer (embedders, adaLN, gates, residuals, final layer) by compiling the transformer
  in place, as ``transformer.compile()`` does: its graphs end at the cache's hooks, and each block reuses the
  first block's graphs.

The second part is skipped while tc.apply's few-row linear route (:mod:`tokencache.core.small_linear`, CPU only)
is on: diffusers' hooks make a hooked module's ``forward`` an instance attribute, which dynamo guards by
identity, so with the route's hooks in every block's adaLN each block's forward would compile anew until
``torch._dynamo.config.recompile_limit`` (8) is hit, and the blocks after that would run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .handle import CacheHandle, ExpertsHandle
from .hooks import MODULE_HOOK, ModuleCacheHook, is_applied, resolve_target
from .processors import FluxScoringAttnProcessor, ScoringAttnProcessor
from .small_linear import SMALL_LINEAR_HOOK


class CompiledCompute:
    """What a cached module's hook calls to compute it under :func:`compile`: the compiled forward, with the
    token dimension (dim 1 of ``hidden_states``) marked dynamic so that partial steps with any number of fresh
    tokens share the graph of the first one; the eager forward for the calls that report an attention score's
    statistic (full steps of ToCa's attention-based scores: a chunked explicit attention, not worth a graph)."""

    def __init__(self, module: nn.Module, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        processor = getattr(module, "processor", None)
        self.scoring = processor if isinstance(processor, (ScoringAttnProcessor, FluxScoringAttnProcessor)) \
            else None
        self.eager = eager
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.scoring is not None and self.scoring.request() is not None:
            return self.eager(*args, **kwargs)
        tokens = args[0] if args else kwargs.get("hidden_states")
        if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
            # maybe_: a single fresh token (k = 1) is specialised by dynamo instead of raising.
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
        return self.compiled(*args, **kwargs)


def cached_module_hooks(transformer: nn.Module) -> list[tuple[nn.Module, ModuleCacheHook]]:
    """The attention and MLP modules a cache hooked in ``transformer``, with their hooks."""
    found = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(MODULE_HOOK) if registry is not None else None
        if isinstance(hook, ModuleCacheHook):
            found.append((module, hook))
    return found


def has_small_batch_linear(transformer: nn.Module) -> bool:
    """Whether some linear of ``transformer`` carries the few-row ``W @ xᵀ`` route's hook."""
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(SMALL_LINEAR_HOOK)
               is not None for m in transformer.modules())


def compile(target: Any, *, model: bool | None = None, **compile_kwargs: Any) -> int:  # noqa: A001 (as torch.compile)
    """Compile a transformer :func:`tokencache.apply` cached, with a bounded number of compiles.

    ``target``: the :class:`CacheHandle`, or the pipeline or transformer the cache was applied to (both experts
    of a two-expert pipeline or :class:`ExpertsHandle`).
    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``options``...). Call it after
    ``tc.apply``, and again after a new ``tc.apply``: ``handle.remove()`` drops the compiled modules with the
    hooks (the in-place compile of the transformer stays, as after ``transformer.compile()``).

    The cached modules are compiled with a dynamic token dimension, at most three graphs per module type (all
    tokens, fresh tokens, a single fresh token), shared by all blocks; calls that report an attention score's
    statistic (full steps of ToCa's attention-based scores) stay eager. ``model``: also compile the rest of
    the transformer in place (its graphs end at the cache's hooks and are shared by all blocks); the default
    does so unless tc.apply's CPU few-row linear route is on, whose per-module hooks would make every block
    compile anew (``tc.apply(..., small_batch_linear=None)`` turns it off). A run compiles a handful of
    graphs (the README's torch.compile section counts them) and the next runs none.

    Returns how many cached modules were compiled.
    """
    if isinstance(target, ExpertsHandle):
        target._check_live()
        return sum(compile(expert, model=model, **compile_kwargs) for expert in target.transformers.values())
    if getattr(target, "transformer_2", None) is not None:  # a two-expert pipeline (Wan 2.2 A14B): both experts
        experts = (resolve_target(target)[0], target.transformer_2)
        return sum(compile(expert, model=model, **compile_kwargs) for expert in experts)
    transformer = target.transformer if isinstance(target, CacheHandle) else resolve_target(target)[0]
    if isinstance(target, CacheHandle):
        target._check_live()
    if not is_applied(transformer):
        raise ValueError("tc.compile compiles a cached transformer: call tc.apply(pipeline_or_transformer, config) "
                         "first (to compile a model without a cache, use torch.compile or "
                         "transformer.compile() directly)")
    routed = has_small_batch_linear(transformer)
    if model and routed:
        raise ValueError("tc.compile(..., model=True) with tc.apply's few-row linear route on would compile every "
                         "block anew (its hooks are guarded per module): apply the cache with "
                         "tc.apply(..., small_batch_linear=None), or leave model to its default")
    hooks = cached_module_hooks(transformer)
    for module, hook in hooks:
        eager = hook.fn_ref.original_forward
        hook.compute = CompiledCompute(module, eager, torch.compile(eager, **compile_kwargs))
    if model if model is not None else not routed:
        transformer.compile(**compile_kwargs)
    return len(hooks)
