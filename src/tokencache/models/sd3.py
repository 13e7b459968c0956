"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``): MMDiT joint blocks.

``JointTransformerBlock``: one joint attention over text and image tokens (separate projections per stream),
an optional second self-attention over the image tokens (SD3.5 "dual attention" blocks), then an MLP per
stream; the last block's text stream is "pre-only" (no text MLP). The attentions are computed on full steps
and reused (or forecast) whole on the others; the image and text MLPs are token-wise.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.flops import joint_attention_flops
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, patch_grid, register_layout, register_model
from ..core.shapes import register_shape

# SD3 pipelines pass 77 CLIP tokens followed by 256 T5 tokens (max_sequence_length=256).
register_model(ModelLayout("SD3Transformer2DModel", patch_grid, context_tokens=333))


def _check(block: nn.Module) -> str | None:
    if getattr(block, "_chunk_size", None) is not None:
        return "chunked feed-forward (set_chunk_feed_forward) calls ff once per chunk; disable it"
    return None


register_layout(
    BlockLayout(
        block_class_name="JointTransformerBlock",
        slots=(
            ModuleSlot("attn", "self_attn", "whole", text_output=True, flops=joint_attention_flops),
            ModuleSlot("attn2", "self_attn", "whole", flops=joint_attention_flops),
            ModuleSlot("ff", "mlp", "rows"),
            ModuleSlot("ff_context", "mlp", "rows", tokens="text"),
        ),
        check=_check,
        text_prefixes=("norm1_context", "norm2_context"),
    )
)


def _sd3(layers: int, heads: int, caption: int, **extra: Any) -> dict[str, Any]:
    return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=caption,
                pooled_projection_dim=2048, out_channels=16, **extra)


# 1024x1024: a 128x128 latent in 2x2 patches -> 4096 image tokens.
register_shape("sd3-medium", "SD3Transformer2DModel", _sd3(24, 24, 1536, pos_embed_max_size=192))
register_shape("sd3.5-medium", "SD3Transformer2DModel",
               _sd3(24, 24, 1536, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13))))
register_shape("sd3.5-large", "SD3Transformer2DModel",
               _sd3(38, 38, 2432, pos_embed_max_size=192, qk_norm="rms_norm"))
