"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``): a video DiT over (frames, height, width) tokens.

``WanTransformerBlock``: self-attention over all video tokens with 3-D rotary embeddings, cross-attention to
the umT5 caption (plus CLIP image tokens for image-to-video), then an FFN. The self-attention is computed on
full steps and reused (or forecast) whole on the others (its queries carry rotary positions); the
cross-attention and the FFN are token-wise (each output token depends only on its own input token). Wan
pipelines call the transformer twice per step for classifier-free guidance: two streams, each with its cache.
"""

from __future__ import annotations

from typing import Any

from ..core.flops import joint_attention_flops
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, patch_grid, register_layout, register_model
from ..core.shapes import register_shape

# 480p, 81 frames: a 21x60x104 latent in 1x2x2 patches -> 32,760 tokens; captions padded to 512 tokens.
register_model(ModelLayout("WanTransformer3DModel", patch_grid, context_tokens=512, num_tokens=21 * 30 * 52))

register_layout(
    BlockLayout(
        block_class_name="WanTransformerBlock",
        slots=(
            ModuleSlot("attn1", "self_attn", "whole", flops=joint_attention_flops),
            ModuleSlot("attn2", "cross_attn", "rows"),
            ModuleSlot("ffn", "mlp", "rows"),
        ),
    )
)


def _wan(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


register_shape("wan2.1-t2v-1.3b", "WanTransformer3DModel", _wan(12, 8960, 30))
register_shape("wan2.1-t2v-14b", "WanTransformer3DModel", _wan(40, 13824, 40))
