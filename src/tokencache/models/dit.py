"""DiT and PixArt-alpha/Sigma: diffusers' ``BasicTransformerBlock`` (self-attention, cross-attention to the
caption for PixArt, MLP), on (B, C, H, W) latents patchified by ``patch_size``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layouts import BlockLayout, ModuleSlot, register_layout, register_unsupported_model
from ..shapes import register_shape


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
