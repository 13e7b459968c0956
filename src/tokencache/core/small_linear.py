"""Linears on a few rows, computed as ``W @ xᵀ`` on the CPU.

A diffusion transformer runs some linears on one row per sample at every step: DiT's adaLN modulation
(1152 -> 6912 in each of its 28 blocks) and timestep embedders. With a token cache most of a step's token
work is skipped, so these become a large share of a cached step (62 % of a DiT-XL/2 reuse step, see
``benchmarks/step_profile.py``). PyTorch's CPU ``F.linear`` (``x @ Wᵀ``) is 3-4x slower on 2-4 rows than
the same product taken as ``W @ xᵀ``, which reads the weight as the BLAS prefers; the result is the same
up to float32 rounding. The hook below reroutes only CPU float32 inputs with at most ``max_rows`` rows
(on bfloat16/float16 the rerouted product measured slower) and leaves every other call to the module.
Only linears outside the blocks' cacheable modules get the hook: inside them the rows are tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .hooks import HookInstaller, resolve_target
from .layouts import BlockEntry, find_blocks
from .validation import check_number

SMALL_LINEAR_HOOK = "tokencache_small_linear"


@dataclass(frozen=True)
class SmallBatchLinearConfig:
    """Which linear calls take the ``W @ xᵀ`` route."""

    max_rows: int = 4
    """Largest number of input rows (all input dimensions but the last, multiplied) rerouted. Measured on
    a 2-thread AMD EPYC: 3-4x faster at 2 and 4 rows, no gain from 8 rows up (see the module docstring)."""

    def __post_init__(self) -> None:
        check_number(type(self), "max_rows", self.max_rows, lo=1, integer=True)


DEFAULT_SMALL_BATCH_LINEAR = SmallBatchLinearConfig()


class SmallBatchLinearHook(ModelHook):
    """Computes an ``nn.Linear`` as ``W @ xᵀ`` when its input is a few CPU float32 rows."""

    def __init__(self, config: SmallBatchLinearConfig) -> None:
        super().__init__()
        self.max_rows = config.max_rows

    def new_forward(self, module: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (Linear's name)
        x = input
        weight = module.weight
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if (not 0 < rows <= self.max_rows or x.device.type != "cpu" or x.dtype != torch.float32
                or weight.dtype != torch.float32):
            return self.fn_ref.original_forward(input)
        flat = x.reshape(rows, x.shape[-1]).T
        out = torch.mm(weight, flat) if module.bias is None else torch.addmm(module.bias[:, None], weight, flat)
        return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


def token_path_linears(blocks: list[BlockEntry]) -> set[int]:
    """ids of the linears inside the blocks' cacheable modules: their rows are tokens, so the route never
    applies to them in an uncached call, and they are left without a hook (no per-call cost)."""
    return {id(m) for block in blocks for _, module in block.slots() for m in module.modules()
            if isinstance(m, nn.Linear)}


def install_small_batch_linear(transformer: nn.Module, config: SmallBatchLinearConfig, installer: HookInstaller,
                               blocks: list[BlockEntry]) -> int:
    """Register the hook on the float32 CPU ``nn.Linear`` of ``transformer`` outside its ``blocks``' cacheable
    modules (the per-step conditioning path: adaLN modulation, embedders) that have none yet; returns how
    many. Linears on a GPU get no hook, so such a model pays no per-call Python cost for it."""
    skip = token_path_linears(blocks)
    count = 0
    for module in transformer.modules():
        if not isinstance(module, nn.Linear) or id(module) in skip or module.weight.device.type != "cpu" \
                or module.weight.dtype != torch.float32:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(SMALL_LINEAR_HOOK) is not None:
            continue  # already routed by another handle; that handle removes it
        installer.register(module, SmallBatchLinearHook(config), SMALL_LINEAR_HOOK)
        count += 1
    return count


class SmallBatchLinearHandle:
    """Returned by :func:`apply_small_batch_linear`; :meth:`remove` restores every linear exactly."""

    def __init__(self, installer: HookInstaller, num_linears: int) -> None:
        self._installer = installer
        self.num_linears = num_linears
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            raise RuntimeError("this small-batch linear handle was removed")
        self._installer.remove_all()
        self._removed = True


def apply_small_batch_linear(target: Any, config: SmallBatchLinearConfig | None = None) -> SmallBatchLinearHandle:
    """Route the few-row linears of a pipeline's transformer (or a transformer) through ``W @ xᵀ`` on the
    CPU, without a cache. :func:`tokencache.apply` does this by default (its ``small_batch_linear``)."""
    config = SmallBatchLinearConfig() if config is None else config
    if not isinstance(config, SmallBatchLinearConfig):
        raise TypeError(f"config must be a SmallBatchLinearConfig or None; got {type(config).__name__}")
    transformer, _ = resolve_target(target)
    try:
        blocks = find_blocks(transformer)
    except TypeError:  # no registered block layout: every linear is a candidate
        blocks = []
    installer = HookInstaller()
    return SmallBatchLinearHandle(installer, install_small_batch_linear(transformer, config, installer, blocks))

