"""Latte (diffusers ``LatteTransformer3DModel``): a video DiT of spatial and temporal blocks.

Both kinds are diffusers ``BasicTransformerBlock``s (PixArt-alpha's ``ada_norm_single``), run interleaved
(spatial 0, temporal 0, spatial 1, ...): a spatial block sees the S = H x W tokens of each frame (batch
B*F) and attends to the caption; a temporal block sees the F frames of each position (batch B*S) and has no
cross-attention.

What is cached, as ToCa's official OpenSora code does for its spatial-temporal blocks:
- the self-attentions of both kinds are computed on full steps and reused (or forecast) whole on the others;
- the cross-attention and the MLP are token-wise. The fresh tokens are chosen once per step (and stream) over
  each video's F*S tokens and recomputed in every block, spatial or temporal, at their place in its rows, so
  both layouts refresh the same tokens. The spatial cross-attention of the fresh tokens runs once per video on
  its caption (Latte repeats the caption for every frame).
Scores: ``random`` or ``similarity`` (the attention-map scores are per block).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, patch_grid, register_model
from ..core.shapes import register_shape
from .dit import _check_basic_block


def _typical_grid(transformer: nn.Module) -> tuple[int, ...]:
    config = transformer.config
    side = config.sample_size // config.patch_size
    return (config.video_length, side, side)


_SPATIAL = BlockLayout(
    block_class_name="BasicTransformerBlock",
    slots=(
        ModuleSlot("attn1", "self_attn", "whole", groups="frame"),
        ModuleSlot("attn2", "cross_attn", "rows", groups="frame"),
        ModuleSlot("ff", "mlp", "rows", groups="frame"),
    ),
    check=_check_basic_block,
)

_TEMPORAL = BlockLayout(
    block_class_name="BasicTransformerBlock",
    slots=(
        ModuleSlot("attn1", "self_attn", "whole", groups="position"),
        ModuleSlot("attn2", "cross_attn", "rows", groups="position"),
        ModuleSlot("ff", "mlp", "rows", groups="position"),
    ),
    check=_check_basic_block,
)

# Captions: T5 embeddings of up to 120 tokens (PixArt-alpha's length).
register_model(ModelLayout(
    "LatteTransformer3DModel", patch_grid, context_tokens=120,
    block_lists=("transformer_blocks", "temporal_transformer_blocks"),
    block_layouts={"transformer_blocks": _SPATIAL, "temporal_transformer_blocks": _TEMPORAL},
    shared_selection=True, default_grid=_typical_grid,
))


_LATTE_1: dict[str, Any] = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                num_layers=28, attention_bias=True, sample_size=64, patch_size=2,
                                activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                cross_attention_dim=1152, caption_channels=4096, video_length=16)

# Latte-1 (maxin-cn/Latte-1): 512x512, 16 frames -> 16 x 32 x 32 tokens.
register_shape("latte-1", "LatteTransformer3DModel", _LATTE_1)
