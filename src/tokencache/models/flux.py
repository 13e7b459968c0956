"""FLUX.1 (diffusers ``FluxTransformer2DModel``): dual-stream blocks, then single-stream blocks.

Dual-stream block (``FluxTransformerBlock``): one joint attention over text and image tokens (separate
projections per stream, rotary embeddings on both), then an MLP per stream. Single-stream block
(``FluxSingleTransformerBlock``): text and image tokens concatenated; the attention and the MLP input
projection run in parallel on the normed tokens, and one output projection maps their concatenation.

What is cached, as in the official ToCa FLUX code (Shenyi-Z/ToCa, ``flux-ToCa``):
- the joint attentions are computed on full steps and reused (or forecast) whole on the others: a fresh
  query would need every key, rotated by its own position, through a processor tokencache does not own;
- the image MLP and the text MLP of a dual-stream block are token-wise: each recomputes its own fresh
  tokens (the text stream has few: 512 for FLUX.1-dev);
- in a single-stream block the MLP input projection and the output projection are token-wise on the same
  fresh tokens of the concatenated sequence, text included; the output projection of a fresh token reads the
  cached attention output of that token.
The transformer takes packed latents (B, N, C); the token grid comes from ``img_ids``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.flops import joint_attention_flops
from ..core.forecast import ForecastConfig
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, register_layout, register_model
from ..core.shapes import register_shape
from ..methods.fora import FORAConfig
from ..methods.toca import BlockFactors, ToCaConfig


def _token_grid(transformer: nn.Module, arguments: dict) -> tuple[int, ...]:
    """(height, width) of the image tokens from ``img_ids`` (row, column in axes 1 and 2); a flat grid when the
    sequence holds more than one image (FLUX Kontext appends the reference image's tokens)."""
    hidden_states = arguments["hidden_states"]
    count = hidden_states.shape[1]
    ids = arguments.get("img_ids")
    if ids is not None:
        ids = ids[0] if ids.dim() == 3 else ids
        if ids.shape[0] == count and ids.shape[-1] >= 3:
            height = int(ids[:, 1].max()) + 1
            width = int(ids[:, 2].max()) + 1
            if height * width == count:
                return (height, width)
    return (1, count)


register_model(ModelLayout("FluxTransformer2DModel", _token_grid, context_tokens=512, num_tokens=4096))


def _check_dual(block: nn.Module) -> str | None:
    if getattr(block.attn, "added_kv_proj_dim", None) is None:
        return "its attention has no text-stream projections"
    return None


# A dual-stream block's joint attention and its image and text MLPs (HunyuanVideo's use the same names).
DUAL_STREAM_SLOTS = (
    ModuleSlot("attn", "self_attn", "whole", text_output=True, flops=joint_attention_flops),
    ModuleSlot("ff", "mlp", "rows"),
    ModuleSlot("ff_context", "mlp", "rows", tokens="text"),
)

#: Single-stream blocks' MLP branch: input projection and activation on the fresh tokens only, the other rows
#: left zero (the output projection reads the same rows), nothing cached for the 4x-wide hidden.
SINGLE_STREAM_MLP_BRANCH = (
    ModuleSlot("proj_mlp", "mlp", "rows", tokens="joint", cached=False),
    ModuleSlot("act_mlp", "mlp", "rows", tokens="joint", cached=False, index_from="proj_mlp"),
)
#: The output projection of [attention output, MLP hidden] on those tokens.
SINGLE_STREAM_OUTPUT = ModuleSlot("proj_out", "mlp", "rows", tokens="joint", index_from="act_mlp")

register_layout(
    BlockLayout(
        block_class_name="FluxTransformerBlock",
        slots=DUAL_STREAM_SLOTS,
        check=_check_dual,
        text_prefixes=("norm1_context", "norm2_context"),
    )
)

register_layout(
    BlockLayout(
        block_class_name="FluxSingleTransformerBlock",
        slots=(
            *SINGLE_STREAM_MLP_BRANCH,
            ModuleSlot("attn", "self_attn", "whole", tokens="joint", flops=joint_attention_flops),
            SINGLE_STREAM_OUTPUT,
        ),
        tokens="joint",
    )
)


def _flux(guidance: bool) -> dict[str, Any]:
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))


# 1024x1024: a 128x128 latent packed 2x2 -> 4096 image tokens; T5 captions of 512 tokens.
register_shape("flux-dev", "FluxTransformer2DModel", _flux(True), num_tokens=4096, context_tokens=512)
register_shape("flux-schnell", "FluxTransformer2DModel", _flux(False), num_tokens=4096, context_tokens=256)


def official_block_factors(num_dual: int = 19, num_single: int = 38) -> BlockFactors:
    """The official FLUX ToCa ratio factors per block: a depth ramp ``1.5 - j / 27`` over each stream's own
    index ``j`` (27 is the DiT depth the official code keeps), times 0.4 in dual-stream and 1.6 in
    single-stream blocks (the single-stream MLP is recomputed more)."""
    return BlockFactors(tuple(0.4 * (1.5 - j / 27) for j in range(num_dual))
                        + tuple(1.6 * (1.5 - j / 27) for j in range(num_single)))


def _toca(interval: int) -> dict[str, Any]:
    # The official code scores tokens by the attention they receive; FLUX's joint attention runs fused here,
    # so the presets rank by a random draw plus the same staleness term (DuCa reports random selection on par).
    return dict(fresh_ratio=0.1, depth_ratio=official_block_factors(), module_ratio={"mlp": 1.0},
                full_step_interval=interval, first_full_steps=3, score="random", frequency_weight=0.25,
                full_step_placement="relative")


ToCaConfig.register_presets({
    f"flux-dev-toca{n}": (f"FLUX.1-dev 50 steps, ToCa{n}-01: first 3 steps full, then every {n}, R0=0.1 "
                          f"(published {speedup} FLOPs)", _toca(n))
    for n, speedup in ((4, "-"), (5, "3.30x"), (6, "3.76x"))
})
FORAConfig.register_presets({
    f"flux-dev-forecast-n{n}": (f"FLUX.1-dev: first 3 steps full, then every {n}; Newton forecast of order {order} "
                                "in between (TaylorSeer's FLUX setting is N=6 order 2)",
                                dict(interval=n, first_full_steps=3, last_full_steps=1,
                                     forecast=ForecastConfig(order=order, expansion="newton")))
    for n, order in ((4, 2), (5, 2), (6, 2), (8, 2))
})
