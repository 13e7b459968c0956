"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``): dual-stream, then single-stream blocks, as FLUX's.

``HunyuanVideoTransformerBlock``: one joint attention over video and text tokens, then a video MLP and a text MLP
(``ff``, ``ff_context``). ``HunyuanVideoSingleTransformerBlock``: video then text tokens concatenated; the MLP
input projection runs on all of them beside the attention (called on the video and text parts, returning both),
and one output projection maps their concatenation. Attentions are computed on full steps and reused (or
forecast) whole on the others; the MLPs are token-wise, in single-stream blocks on the same fresh tokens of the
concatenated sequence (text included). The image-to-video "token replace" blocks are not registered.
"""

from __future__ import annotations

from ..core.flops import joint_attention_flops
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, patch_grid, register_layout, register_model
from ..core.shapes import register_shape
from .flux import DUAL_STREAM_SLOTS, SINGLE_STREAM_MLP_BRANCH, SINGLE_STREAM_OUTPUT

# 720p, 129 frames: a 33x90x160 latent in 1x2x2 patches -> 118,800 tokens; LLaMA prompts of 256 tokens.
register_model(ModelLayout("HunyuanVideoTransformer3DModel", patch_grid, context_tokens=256,
                           num_tokens=33 * 45 * 80))

register_layout(
    BlockLayout(
        block_class_name="HunyuanVideoTransformerBlock",
        slots=DUAL_STREAM_SLOTS,
        text_prefixes=("norm1_context", "norm2_context"),
    )
)

register_layout(
    BlockLayout(
        block_class_name="HunyuanVideoSingleTransformerBlock",
        slots=(
            *SINGLE_STREAM_MLP_BRANCH,
            ModuleSlot("attn", "self_attn", "whole", text_output=True, flops=joint_attention_flops),
            SINGLE_STREAM_OUTPUT,
        ),
        tokens="joint",
    )
)

register_shape("hunyuan-video", "HunyuanVideoTransformer3DModel",
               dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                    rope_theta=256.0, rope_axes_dim=(16, 56, 56)))
