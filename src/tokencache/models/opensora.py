"""OpenSora 1.2 (``STDiT3``, hpcaitech/Open-Sora; not in diffusers): a video DiT of spatial and temporal blocks.

``STDiT3`` holds ``spatial_blocks`` and ``temporal_blocks`` (both ``STDiT3Block``, told apart by the block's
``temporal`` flag) and runs them interleaved: spatial ``i``, then temporal ``i``. Tokens stay (B, T*S, C),
frame-major, between and inside blocks; only the self-attention (``attn``: ``qkv``, ``q_norm``, ``k_norm``,
``proj``; rotary positions in temporal blocks) runs on (B*T, S, C) (spatial) or (B*S, T, C) (temporal).
Then a cross-attention to the caption (``cross_attn``: ``q_linear``, ``kv_linear``, ``proj``; captions packed
as one (1, sum of lengths, C) sequence with a block-diagonal mask) and an MLP (``mlp``: ``fc1``, ``fc2``).
``scale_shift_table`` plus the shared timestep projection modulate ``norm1``/``norm2`` and gate ``attn`` and
``mlp``; the cross-attention is added ungated.

What is cached, as the official OpenSora ToCa code does (Shenyi-Z/ToCa, ``Open-Sora``):
- the self-attentions are computed on full steps and reused (or forecast) whole on the others (the cache
  holds the projected output; the current gate is applied by the block);
- the cross-attention and the MLP are token-wise on the (B, T*S) tokens; the fresh tokens are chosen once per
  step and stream and shared by spatial and temporal blocks (the official code scores each block's MLP tokens
  with its own cross-attention map; tokencache offers ``random`` and ``similarity`` scores here);
- preset ``opensora-rflow30``: the official sampling setting (rectified flow, 30 steps).
The module is matched by class name, so the Open-Sora package need not be importable.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..core.flops import SOFTMAX_FLOPS_PER_ELEMENT, linear_flops
from ..core.layouts import BlockLayout, ModelLayout, ModuleSlot, register_layout, register_model
from ..methods.toca import ToCaConfig


def _self_attention_flops(attn: nn.Module, rows: int, num_tokens: int, context_tokens: int) -> int:
    """One batch row of OpenSora's ``Attention`` over its ``num_tokens`` tokens (a frame's positions or a
    position's frames): ``qkv`` and ``proj``, QKᵀ, softmax and AV. Computed whole only."""
    inner = attn.proj.in_features
    return (linear_flops(attn, num_tokens) + 2 * 2 * num_tokens * num_tokens * inner
            + SOFTMAX_FLOPS_PER_ELEMENT * attn.num_heads * num_tokens * num_tokens)


def _cross_attention_flops(attn: nn.Module, rows: int, num_tokens: int, context_tokens: int) -> int:
    """One sample of OpenSora's ``MultiHeadCrossAttention``: ``rows`` queries against its ``context_tokens``
    caption tokens."""
    inner = attn.q_linear.out_features
    return (linear_flops(attn.q_linear, rows) + linear_flops(attn.kv_linear, context_tokens)
            + 2 * 2 * rows * context_tokens * inner
            + SOFTMAX_FLOPS_PER_ELEMENT * attn.num_heads * rows * context_tokens
            + linear_flops(attn.proj, rows))


def _caption_tokens(arguments: dict) -> int:
    """Caption tokens per sample of a cross-attention call ``(x, cond, mask)``: captions come packed as one
    (1, sum of lengths, C) sequence (their mean length when they differ)."""
    cond = arguments.get("cond")
    if cond is None:
        return 0
    batch = arguments["hidden_states"].shape[0]
    if cond.dim() == 3 and cond.shape[0] == 1:
        return cond.shape[1] // batch
    return cond.shape[-2]


def _attention_rows(block: nn.Module) -> str:
    return "position" if block.temporal else "frame"


def _check(block: nn.Module) -> str | None:
    if not isinstance(getattr(block, "temporal", None), bool):
        return "it has no boolean `temporal` flag saying whether its attention is spatial or temporal"
    return None


register_layout(
    BlockLayout(
        block_class_name="STDiT3Block",
        slots=(
            ModuleSlot("attn", "self_attn", "whole", flops=_self_attention_flops, groups=_attention_rows),
            ModuleSlot("cross_attn", "cross_attn", "rows", flops=_cross_attention_flops, context=_caption_tokens),
            ModuleSlot("mlp", "mlp", "rows"),
        ),
        check=_check,
    )
)


def _token_grid(transformer: nn.Module, arguments: dict) -> tuple[int, ...]:
    """(frames, height, width) of the tokens: the latent ``x`` (B, C, T, H, W) in ``patch_size`` patches (the
    patch embedding pads to whole patches)."""
    latent = arguments.get("x", arguments.get("hidden_states"))
    if latent is None or latent.dim() != 5:
        raise RuntimeError(f"{type(transformer).__name__}: expected a latent of shape (B, C, T, H, W), got "
                           f"{None if latent is None else tuple(latent.shape)}")
    patch = getattr(transformer, "patch_size", None) or getattr(getattr(transformer, "config", None),
                                                                 "patch_size", (1, 2, 2))
    return tuple(math.ceil(size / p) for size, p in zip(latent.shape[2:], patch, strict=True))


def _typical_grid(transformer: nn.Module) -> tuple[int, ...]:
    """The official ToCa VBench setting: 51 frames at 480p 9:16 (480x854), VAE x8 (time x17/5 by micro-frames
    of 17) and 1x2x2 patches: 15 x 30 x 53 tokens."""
    return (15, 30, 53)


# T5 captions padded to 300 tokens.
register_model(ModelLayout(
    "STDiT3", _token_grid, context_tokens=300, block_lists=("spatial_blocks", "temporal_blocks"),
    shared_selection=True, default_grid=_typical_grid,
))


# The official OpenSora 1.2 ToCa setting (scripts/inference.py, cache_functions/force_scheduler.py): fresh_ratio 0.1,
# fresh_threshold 3, soft_fresh_weight 0.25; a module is computed fully when step <= 2 or step % threshold == 0,
# with thresholds 3 (spatial and temporal attention, MLP) and 6 (cross-attention); attentions are reused whole
# between, the MLP recomputes 0.1 * 1.495 of each video's tokens (module factor 1 + 0.33 * 1.5), the same tokens
# for both CFG halves. The official score is the cross-attention entropy of the block's own caption attention;
# here a random draw plus the same staleness term 0.25 * c / 3.
_OPENSORA: dict[str, Any] = dict(
    fresh_ratio=0.1, module_ratio={"mlp": 1.495}, full_step_interval=3, first_full_steps=3,
    full_step_placement="periodic", module_intervals={"cross_attn": 6}, score="random", frequency_weight=0.25,
    cfg_shared_selection=True,
)

ToCaConfig.register_presets({
    "opensora-rflow30": ("OpenSora 1.2 rflow 30 steps (ToCa's official setting): steps 0-2 and every 3rd full, "
                         "cross-attention every 6th; MLP recomputes 14.95% of the tokens; random score + staleness",
                         _OPENSORA),
})
