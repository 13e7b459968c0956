"""Analytic FLOP counts for the work the engine actually does.

Convention (ALGORITHMS.md §1): 2 FLOPs per multiply-accumulate of every linear layer and of attention's
QKᵀ and AV products, 5 FLOPs per softmax element and per LayerNorm element; the embedders, patch embedding
and final layer are excluded. Linear layers of a block outside its cacheable modules (adaLN modulation)
act on one row per sample.

:data:`TOCA_COUNTER` is the other convention a plan can count in: the one of the official DiT-ToCa code's
FLOP counter (``--test-FLOPs``), which produced the ToCa paper's DiT figures (23.74 -> 10.23 TFLOPs on
DDIM-50, 118.68 -> 43.42 on DDPM-250). :data:`TOCA_FLUX_COUNTER` is the official FLUX ToCa code's (the
paper's FLUX.1-dev figures, 1126.76 TFLOPs for ToCa5 and 990.30 for ToCa6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .layouts import BlockEntry, ModuleSlot

SOFTMAX_FLOPS_PER_ELEMENT = 5
LAYERNORM_FLOPS_PER_ELEMENT = 5


@dataclass(frozen=True)
class FlopConvention:
    """What one element or multiply-accumulate of each kind of work counts. The linears of the cacheable
    modules and attention's QKᵀ and AV products always count 2 FLOPs per multiply-accumulate."""

    name: str
    layernorm: int = LAYERNORM_FLOPS_PER_ELEMENT
    """Per element of a LayerNorm."""
    softmax: int = SOFTMAX_FLOPS_PER_ELEMENT
    """Per element of attention's softmax."""
    modulation_mac: int = 2
    """Per multiply-accumulate of a block's linears outside its cacheable modules (adaLN modulation)."""
    modulation_activation: int = 0
    """Per input element of those linears (the SiLU in front of the adaLN modulation)."""
    query_scale: int = 0
    """Per element of the queries, scaled by ``1/sqrt(head_dim)`` before QKᵀ."""
    mlp_activation: int = 0
    """Per element of a feed-forward's hidden activation (the outputs of its linears but the last)."""
    reused_attention_projects_output: bool = False
    """At a step that reuses an attention computed whole, count its output projections (``to_out``,
    ``to_add_out``) on every token: the official FLUX ToCa code recomputes them from the cached attention
    output, which gives the values tokencache reuses."""


ENGINE_COUNTER = FlopConvention("engine")
"""The engine's own count (ALGORITHMS.md §1): the one a real run's statistics report."""

TOCA_COUNTER = FlopConvention("toca", layernorm=1, modulation_mac=1, modulation_activation=1, query_scale=1,
                              mlp_activation=6)
"""The official DiT-ToCa counter: 1 FLOP per LayerNorm element, 1 per multiply-accumulate of the adaLN
modulation linear plus 1 per element of its SiLU, 1 per query element for the scaling, 6 per element of the
MLP's GELU; the rest as :data:`ENGINE_COUNTER`. Like the engine it counts the norms and the modulation of
every block on every step, and attention and MLP on the tokens they compute."""

TOCA_FLUX_COUNTER = FlopConvention("toca-flux", reused_attention_projects_output=True)
"""The official FLUX ToCa code: the engine's prices, plus the output projections of the dual-stream blocks'
joint attention on every token at the steps that reuse that attention."""

FLOP_CONVENTIONS: dict[str, FlopConvention] = {c.name: c for c in (ENGINE_COUNTER, TOCA_COUNTER, TOCA_FLUX_COUNTER)}
Counting = Literal["engine", "toca", "toca-flux"]


def flop_convention(counting: str | FlopConvention) -> FlopConvention:
    if isinstance(counting, FlopConvention):
        return counting
    if counting not in FLOP_CONVENTIONS:
        raise ValueError(f"counting must be one of {sorted(FLOP_CONVENTIONS)}; got {counting!r}")
    return FLOP_CONVENTIONS[counting]


def linear_flops(module: nn.Module, rows: int) -> int:
    """FLOPs of every ``nn.Linear`` inside ``module`` applied to ``rows`` rows."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(attn: nn.Module, query_rows: int, kv_rows: int, *,
                    convention: FlopConvention = ENGINE_COUNTER) -> int:
    """One sample of a diffusers ``Attention``: projections, QKᵀ, softmax, AV and output projection."""
    inner = attn.to_q.out_features
    flops = linear_flops(attn.to_q, query_rows)
    flops += linear_flops(attn.to_k, kv_rows) + linear_flops(attn.to_v, kv_rows)
    flops += convention.query_scale * query_rows * inner
    flops += 2 * 2 * query_rows * kv_rows * inner
    flops += convention.softmax * attn.heads * query_rows * kv_rows
    flops += linear_flops(attn.to_out, query_rows)
    return flops


def joint_attention_flops(attn: nn.Module, rows: int, num_tokens: int, context_tokens: int) -> int:
    """One sample of an attention over image and text tokens together (FLUX, SD3; Wan's self-attention with
    no text): the image projections on ``num_tokens`` rows, the text projections (``add_*_proj``,
    ``to_add_out``) on ``context_tokens`` rows, QKᵀ, softmax and AV over all of them. Computed whole only."""
    total = num_tokens + context_tokens
    # without text projections of its own (HunyuanVideo's single-stream blocks) the text shares the image's
    shared = total if getattr(attn, "add_q_proj", None) is None else num_tokens
    flops = 0
    for name in ("to_q", "to_k", "to_v"):
        module = getattr(attn, name, None)
        if module is not None:
            flops += linear_flops(module, shared)
    if getattr(attn, "to_out", None) is not None:
        flops += linear_flops(attn.to_out, num_tokens)
    for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        module = getattr(attn, name, None)
        if module is not None and context_tokens:
            flops += linear_flops(module, context_tokens)
    inner = attn.to_q.out_features
    flops += 2 * 2 * total * total * inner
    flops += SOFTMAX_FLOPS_PER_ELEMENT * attn.heads * total * total
    return flops


def output_projection_flops(attn: nn.Module, num_tokens: int, context_tokens: int) -> int:
    """One sample of an attention's output projections alone: ``to_out`` on the image tokens and
    ``to_add_out`` (where it has one) on the text tokens."""
    flops = linear_flops(attn.to_out, num_tokens) if getattr(attn, "to_out", None) is not None else 0
    if getattr(attn, "to_add_out", None) is not None:
        flops += linear_flops(attn.to_add_out, context_tokens)
    return flops


def mlp_flops(mlp: nn.Module, rows: int, *, convention: FlopConvention = ENGINE_COUNTER) -> int:
    """One sample of a feed-forward: its linears, and its hidden activation where the convention counts it."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    hidden = sum(m.out_features for m in linears[:-1])
    return linear_flops(mlp, rows) + convention.mlp_activation * rows * hidden


def slot_flops(slot: ModuleSlot, module: nn.Module, rows: int, num_tokens: int, context_tokens: int,
               batch: int, *, convention: FlopConvention = ENGINE_COUNTER) -> int:
    """FLOPs of one call of a cacheable module that recomputes ``rows`` of the ``num_tokens`` it sees.

    ``context_tokens`` is the length of the text passed to it (a cross-attention's keys and values, a joint
    attention's text stream), 0 if none.
    """
    if rows == 0:
        return 0
    if slot.flops is not None:
        return batch * slot.flops(module, rows, num_tokens, context_tokens)
    if slot.kind == "self_attn":
        return batch * attention_flops(module, rows, num_tokens, convention=convention)
    if slot.kind == "cross_attn":
        return batch * attention_flops(module, rows, context_tokens, convention=convention)
    return batch * mlp_flops(module, rows, convention=convention)


def block_overhead_flops(block: BlockEntry, num_tokens: int, batch: int, context_tokens: int = 0, *,
                         convention: FlopConvention = ENGINE_COUNTER) -> int:
    """FLOPs a block spends every step outside its cacheable modules: LayerNorms on the tokens they see and
    the adaLN modulation projections (one row per sample)."""
    own_tokens = num_tokens + context_tokens if block.layout.tokens == "joint" else num_tokens
    text = block.layout.text_prefixes
    flops = 0
    for name, module in block.overhead_modules():
        if isinstance(module, nn.LayerNorm):
            width = 1
            for d in module.normalized_shape:
                width *= d
            on_text = any(name == p or name.startswith(p + ".") for p in text)
            flops += convention.layernorm * (context_tokens if on_text else own_tokens) * width
        else:
            flops += (convention.modulation_mac * module.in_features * module.out_features
                      + convention.modulation_activation * module.in_features)
    return batch * flops


def output_width(module: nn.Module) -> int:
    """Features of a cacheable module's output: those of its last linear layer (an attention's output
    projection, a feed-forward's second linear)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no linear layer to read its output width from")
    return linears[-1].out_features


FINAL_PROJECTIONS = ("proj_out_2", "proj_out", "final_layer.linear")
"""Names of a transformer's last linear, which maps each image token to its output values (DiT: ``proj_out_2``;
PixArt, FLUX, SD3, Wan, HunyuanVideo: ``proj_out``; OpenSora: ``final_layer.linear``)."""


def output_values_per_token(transformer: nn.Module) -> int:
    """Output values per image token (a patch's channels times its pixels): the width of the final projection."""
    modules = dict(transformer.named_modules())
    for name in FINAL_PROJECTIONS:
        module = modules.get(name)
        if isinstance(module, nn.Linear):
            return module.out_features
    raise ValueError(f"tc.plan cannot size the output of {type(transformer).__name__} for ForecastConfig(target="
                     f"'output'): it has no final projection named one of {FINAL_PROJECTIONS}")
