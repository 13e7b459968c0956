"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``): MMDiT dual-stream blocks, as FLUX's.

``QwenImageTransformerBlock``: one joint attention over text and image tokens (rotary embeddings on both), then
an image MLP and a text MLP. The attention is computed on full steps and reused (or forecast) whole on the others;
both MLPs are token-wise. The transformer takes packed latents (B, N, C); the token grid comes from ``img_shapes``.
"""

from __future__ import annotations

import math

from torch import nn

from ..core.flops import joint_attention_flops
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, register_layout, register_model
from ..core.shapes import register_shape


def _token_grid(transformer: nn.Module, arguments: dict) -> tuple[int, ...]:
    """(height, width) of one generated image from ``img_shapes`` (per sample, a list of (frames, height,
    width) per image); a flat grid when the sequence holds several images (editing: the reference image's)."""
    count = arguments["hidden_states"].shape[1]
    shapes = arguments.get("img_shapes")
    if shapes:
        first = shapes[0]
        images = [first] if isinstance(first, tuple) else list(first)
        if len(images) == 1 and math.prod(images[0]) == count and images[0][0] == 1:
            return (int(images[0][1]), int(images[0][2]))
    return (1, count)


# 1328x1328: a 166x166 latent in 2x2 patches -> 6889 image tokens; prompts vary, plans assume 256 text tokens.
register_model(ModelLayout("QwenImageTransformer2DModel", _token_grid, context_tokens=256, num_tokens=83 * 83))

register_layout(
    BlockLayout(
        block_class_name="QwenImageTransformerBlock",
        slots=(
            ModuleSlot("attn", "self_attn", "whole", text_output=True, flops=joint_attention_flops),
            ModuleSlot("img_mlp", "mlp", "rows"),
            ModuleSlot("txt_mlp", "mlp", "rows", tokens="text"),
        ),
        text_prefixes=("txt_mod", "txt_norm1", "txt_norm2"),
    )
)

register_shape("qwen-image", "QwenImageTransformer2DModel",
               dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)))
