"""Latte (diffusers LatteTransformer3DModel): not supported yet."""

from __future__ import annotations

from ..layouts import register_unsupported_model

register_unsupported_model(
    "LatteTransformer3DModel",
    "its temporal blocks are BasicTransformerBlocks over the frames of each position, not over image tokens, "
    "and the cache does not yet keep token selection consistent between the two layouts",
)
