"""DiT and PixArt-alpha/Sigma: diffusers' ``BasicTransformerBlock`` (self-attention, cross-attention to the
caption for PixArt, MLP), on (B, C, H, W) latents patchified by ``patch_size``.

Presets: the official ToCa settings of the DiT and PixArt reference code (``dit-ddim50``, ``dit-ddpm250``,
``pixart-dpm20``); step and depth formulas are in this project's convention: step ``i = 0`` is the first
(noisiest) step, block ``l = 0`` the first block.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.layouts import BlockLayout, ModuleSlot, register_layout, register_unsupported_model
from ..core.shapes import register_shape
from ..methods.toca import DepthRamp, StepRamp, ToCaConfig


def _check_basic_block(block: nn.Module) -> str | None:
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single", "layer_norm"):
        return f"norm_type {block.norm_type!r} is not supported (ada_norm_zero, ada_norm_single, layer_norm)"
    if block.only_cross_attention:
        return "only_cross_attention=True makes attn1 a cross-attention"
    if block.attn2 is not None and block.attn2.is_cross_attention is False:
        return "double_self_attention=True makes attn2 a second self-attention"
    if getattr(block, "_chunk_size", None) is not None:
        return "chunked feed-forward (set_chunk_feed_forward) calls ff once per chunk; disable it"
    if getattr(block, "pos_embed", None) is not None:
        return "per-block positional embeddings are not supported"
    if hasattr(block, "fuser"):
        return "GLIGEN gated attention is not supported"
    return None


# diffusers' BasicTransformerBlock: DiT (ada_norm_zero) and PixArt-alpha/Sigma (ada_norm_single).
register_layout(
    BlockLayout(
        block_class_name="BasicTransformerBlock",
        slots=(
            ModuleSlot("attn1", "self_attn", "queries"),
            ModuleSlot("attn2", "cross_attn", "rows"),
            ModuleSlot("ff", "mlp", "rows"),
        ),
        check=_check_basic_block,
        embedder_prefixes=("norm1.emb",),
    )
)

register_unsupported_model("UNet2DConditionModel", "tokencache caches diffusion transformers, not UNets")


_DIT_XL_2: dict[str, Any] = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _pixart(sample_size: int) -> dict[str, Any]:
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=sample_size, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                use_additional_conditions=sample_size == 128)


register_shape("dit-xl-2", "DiTTransformer2DModel", _DIT_XL_2)
register_shape("pixart-alpha-256", "PixArtTransformer2DModel", _pixart(32))
register_shape("pixart-alpha-512", "PixArtTransformer2DModel", _pixart(64))
register_shape("pixart-alpha-1024", "PixArtTransformer2DModel", _pixart(128))


# DiT-XL/2: attention work moved to the MLP, M(attn) = 1 - (1 - 0.6) * 2.5 = 0 and M(mlp) = 1 + 0.6 * 2.5.
_DIT_COMMON: dict[str, Any] = dict(
    fresh_ratio=0.07,
    module_ratio={"self_attn": 0.0, "mlp": 2.5},
    interval_ramp=StepRamp(0.6, 0.8, offset=1),
    sensitive_window=(0.6, 0.8),
    sensitive_interval=2,
    score="attention",
    frequency_weight=0.25,
    spatial_cell_size=2,
    spatial_bonus=0.6,
    cfg_shared_selection=False,
    # Full steps where the official DiT-ToCa code puts them (count-down index, mixed steps); "relative" gives
    # 10.30 and 43.93 TFLOPs. With tc.plan(..., counting="toca"), which counts as the official code's FLOP
    # counter does, the plan gives the published 23.74 -> 10.23 (2.320x) and 118.68 -> 43.42 (2.733x) to the
    # last digit; the engine's own count of the same schedule is 23.744 -> 10.252 and 118.72 -> 43.52.
    full_step_placement="official",
)

ToCaConfig.register_presets(
    {
        "dit-ddim50": (
            "DiT-XL/2 256, DDIM 50 steps, N=3, R0=0.07 (2.32x FLOPs)",
            dict(_DIT_COMMON, full_step_interval=3, step_ratio=StepRamp(-1.0, 4.0, offset=1),
                 depth_ratio=DepthRamp(0.8, 0.4)),
        ),
        "dit-ddpm250": (
            "DiT-XL/2 256, DDPM 250 steps, N=4, R0=0.07 (2.73x FLOPs)",
            dict(_DIT_COMMON, full_step_interval=4, step_ratio=StepRamp(0.6, 0.8, offset=1),
                 depth_ratio=DepthRamp(1.8, -1.6)),
        ),
        "pixart-dpm20": (
            "PixArt-alpha 256, DPM-Solver 20 steps, N=3, R0=0.30, cross-attention entropy score",
            dict(
                fresh_ratio=0.30,
                step_ratio=StepRamp(1.9, -1.8),
                depth_ratio=DepthRamp(1.6, -1.2),
                module_ratio={"self_attn": 0.0, "cross_attn": 0.6, "mlp": 1.6},
                full_step_interval=3,
                interval_ramp=StepRamp(0.8, 0.4),
                score="cross_attention_entropy",
                frequency_weight=0.25,
                spatial_cell_size=4,
                spatial_bonus=0.4,
                cfg_shared_selection=True,
            ),
        ),
    }
)
