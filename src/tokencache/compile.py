"""``tc.compile``: torch.compile a cached transformer, region by region.

A cache decides in Python at every call which tokens each module computes: the step, the number of fresh
tokens ``k`` (which varies with the step and the block), the tokens themselves. Traced by dynamo, those
decisions would become guards on Python ints and recompile at nearly every step. So the hooks run the
decisions, the token gather and the scatter eagerly (``torch.compiler.disable``: a graph break, never a
guard), and this compiles what they call: each cached module's own forward (attention, MLP), once per code
path, with the token dimension dynamic so that every ``k`` (and the full ``n``) reuses one graph.

Why not ``transformer.compile()`` in place: diffusers' hooks make each hooked module's ``forward`` an
instance attribute, which dynamo guards by identity, so every block's forward compiles anew (and the
transformer's loop over blocks, which breaks at each cached module, falls back to eager). It runs, but with
one compile per block and code path until ``torch._dynamo.config.recompile_limit`` (8) is hit, after which
the remaining blocks run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .handle import CacheHandle
from .hooks import MODULE_HOOK, ModuleCacheHook, is_applied, resolve_target
from .processors import ScoringAttnProcessor


class CompiledCompute:
    """What a cached module's hook calls to compute it under :func:`compile`: the compiled forward, with the
    token dimension (dim 1 of ``hidden_states``) marked dynamic so that partial steps with any number of fresh
    tokens share the graph of the first one; the eager forward for the calls that report an attention score's
    statistic (full steps of ToCa's attention-based scores: a chunked explicit attention, not worth a graph)."""

    def __init__(self, module: nn.Module, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        processor = getattr(module, "processor", None)
        self.scoring = processor if isinstance(processor, ScoringAttnProcessor) else None
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


def compile(target: Any, **compile_kwargs: Any) -> int:  # noqa: A001 (tc.compile mirrors torch.compile)
    """Compile the cached modules (attention, MLP) of a transformer :func:`tokencache.apply` cached.

    ``target``: the :class:`CacheHandle`, or the pipeline or transformer the cache was applied to.
    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``options``, ``dynamic``...). Call it
    after ``tc.apply`` and again after a new ``tc.apply`` (``handle.remove()`` drops the compiled modules with
    the hooks). Returns how many modules were compiled.

    Each cached module is compiled once per code path (full tokens, fresh queries against all keys, an
    attention score's explicit path on full steps), shared by all blocks, with a dynamic token dimension:
    a run compiles a handful of graphs (see the README's torch.compile section) and the next runs none.
    The cache's decisions, the transformer's embedding, adaLN and gates stay eager.
    """
    transformer = target.transformer if isinstance(target, CacheHandle) else resolve_target(target)[0]
    if isinstance(target, CacheHandle):
        target._check_live()
    if not is_applied(transformer):
        raise ValueError("tc.compile compiles a cached transformer: call tc.apply(pipeline_or_transformer, config) "
                         "first (to compile a model without a cache, use torch.compile or "
                         "transformer.compile() directly)")
    hooks = cached_module_hooks(transformer)
    for module, hook in hooks:
        eager = hook.fn_ref.original_forward
        hook.compute = CompiledCompute(module, eager, torch.compile(eager, **compile_kwargs))
    return len(hooks)
