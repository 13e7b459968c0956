"""Analytic FLOP counts for the work the engine actually does.

Convention (ALGORITHMS.md §1): 2 FLOPs per multiply-accumulate of every linear layer and of attention's
QKᵀ and AV products, 5 FLOPs per softmax element and per LayerNorm element; the embedders, patch embedding
and final layer are excluded. Linear layers of a block outside its cacheable modules (adaLN modulation)
act on one row per sample.
"""

from __future__ import annotations

from torch import nn

from .layouts import BlockEntry, ModuleSlot

SOFTMAX_FLOPS_PER_ELEMENT = 5
LAYERNORM_FLOPS_PER_ELEMENT = 5


def linear_flops(module: nn.Module, rows: int) -> int:
    """FLOPs of every ``nn.Linear`` inside ``module`` applied to ``rows`` rows."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(attn: nn.Module, query_rows: int, kv_rows: int) -> int:
    """One sample of a diffusers ``Attention``: projections, QKᵀ, softmax, AV and output projection."""
    inner = attn.to_q.out_features
    flops = linear_flops(attn.to_q, query_rows)
    flops += linear_flops(attn.to_k, kv_rows) + linear_flops(attn.to_v, kv_rows)
    flops += 2 * 2 * query_rows * kv_rows * inner
    flops += SOFTMAX_FLOPS_PER_ELEMENT * attn.heads * query_rows * kv_rows
    flops += linear_flops(attn.to_out, query_rows)
    return flops


def slot_flops(slot: ModuleSlot, module: nn.Module, rows: int, num_tokens: int, context_tokens: int,
               batch: int) -> int:
    """FLOPs of one call of a cacheable module that recomputes ``rows`` of ``num_tokens`` image tokens.

    ``context_tokens`` is the key/value length of a cross-attention (text tokens).
    """
    if rows == 0:
        return 0
    if slot.kind == "self_attn":
        return batch * attention_flops(module, rows, num_tokens)
    if slot.kind == "cross_attn":
        return batch * attention_flops(module, rows, context_tokens)
    return batch * linear_flops(module, rows)


def block_overhead_flops(block: BlockEntry, num_tokens: int, batch: int) -> int:
    """FLOPs a block spends every step outside its cacheable modules: LayerNorms on all tokens and the
    adaLN modulation projection (one row per sample)."""
    flops = 0
    for _, module in block.overhead_modules():
        if isinstance(module, nn.LayerNorm):
            width = 1
            for d in module.normalized_shape:
                width *= d
            flops += LAYERNORM_FLOPS_PER_ELEMENT * num_tokens * width
        else:
            flops += 2 * module.in_features * module.out_features
    return batch * flops


def output_width(module: nn.Module) -> int:
    """Features of a cacheable module's output: those of its last linear layer (an attention's output
    projection, a feed-forward's second linear)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no linear layer to read its output width from")
    return linears[-1].out_features
