"""Block layouts as data: which submodules of a transformer block mix tokens and which are position-wise.

Adding a model means adding a :class:`BlockLayout` entry with :func:`register_layout`; the engine,
the planner and the FLOP counter read only this description, never a hand-copied forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

ModuleKind = Literal["self_attn", "cross_attn", "mlp"]
MODULE_KINDS: tuple[str, ...] = ("self_attn", "cross_attn", "mlp")

PartialMode = Literal["rows", "queries"]


@dataclass(frozen=True)
class ModuleSlot:
    """One cacheable submodule of a block."""

    name: str
    """Attribute name of the submodule on the block (for example ``"ff"``)."""
    kind: ModuleKind
    """Module type, used by the fresh-ratio schedule's module factor."""
    partial: PartialMode
    """How the module runs on a subset of tokens. ``"rows"``: position-wise, output row ``j`` depends
    only on input row ``j`` (MLP, cross-attention with image-token queries). ``"queries"``: self-attention,
    which mixes tokens; fresh tokens are recomputed as queries against keys and values of all tokens."""


@dataclass(frozen=True)
class BlockLayout:
    """How the engine may cache one block class."""

    block_class_name: str
    """Class name of the block (matched by name, so optional model packages need not be importable)."""
    slots: tuple[ModuleSlot, ...]
    """Cacheable submodules in call order. A slot whose attribute is ``None`` on a block is skipped."""
    check: Callable[[nn.Module], str | None] = lambda block: None
    """Returns why a particular block instance cannot be cached (a config variant the layout does not
    describe), or ``None`` when it can."""
    embedder_prefixes: tuple[str, ...] = ()
    """Submodules of the block that embed the timestep or class; excluded from FLOP counts, as in the
    papers' counting convention."""


_LAYOUTS: dict[str, BlockLayout] = {}


def register_layout(layout: BlockLayout) -> None:
    """Add (or replace) the layout for a block class."""
    _LAYOUTS[layout.block_class_name] = layout


def supported_block_classes() -> tuple[str, ...]:
    return tuple(sorted(_LAYOUTS))


def layout_for(block: nn.Module) -> BlockLayout | None:
    return _LAYOUTS.get(type(block).__name__)


@dataclass(frozen=True)
class BlockEntry:
    """A block found in a transformer, with its position in depth order."""

    index: int
    name: str
    module: nn.Module
    layout: BlockLayout

    def slots(self) -> list[tuple[ModuleSlot, nn.Module]]:
        present = []
        for slot in self.layout.slots:
            sub = getattr(self.module, slot.name, None)
            if sub is not None:
                present.append((slot, sub))
        return present


    def overhead_modules(self) -> list[tuple[str, nn.Module]]:
        """The block's LayerNorms and Linears outside its cacheable modules and embedders: the work it does
        every step whatever the cache decides (norms on all tokens, adaLN modulation on one row per sample)."""
        skip = tuple(slot.name for slot in self.layout.slots) + self.layout.embedder_prefixes
        return [(name, module) for name, module in self.module.named_modules()
                if name and not any(name == p or name.startswith(p + ".") for p in skip)
                and isinstance(module, (nn.Linear, nn.LayerNorm))]


_UNSUPPORTED_MODELS: dict[str, str] = {}


def register_unsupported_model(class_name: str, reason: str) -> None:
    """Reject a model class before any work, although its blocks have a layout (their tokens are not
    what the layout assumes)."""
    _UNSUPPORTED_MODELS[class_name] = reason


def find_blocks(transformer: nn.Module) -> list[BlockEntry]:
    """Return the cacheable blocks of ``transformer`` in depth order.

    Raises ``TypeError`` naming the block classes found and the supported ones when none is supported,
    when a supported block is configured in a way its layout does not describe, and for models whose
    blocks do not form the model's own list of transformer blocks (a UNet's sit inside its resolution
    levels, so one step's tokens differ from block to block).
    """
    model_name = type(transformer).__name__
    if model_name in _UNSUPPORTED_MODELS:
        raise TypeError(f"{model_name} is not supported: {_UNSUPPORTED_MODELS[model_name]}")
    entries: list[BlockEntry] = []
    seen_candidates: set[str] = set()
    for name, module in transformer.named_modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                seen_candidates.add(type(child).__name__)
        layout = layout_for(module)
        if layout is None:
            continue
        # A registered block nested inside another registered block is not a separate depth level.
        if any(name.startswith(e.name + ".") for e in entries):
            continue
        reason = layout.check(module)
        if reason is not None:
            raise TypeError(f"block {name!r} ({type(module).__name__}) cannot be cached: {reason}")
        entries.append(BlockEntry(len(entries), name, module, layout))
    nested = [e.name for e in entries if len(e.name.split(".")) != 2]
    if nested:
        raise TypeError(f"{model_name} is not a supported diffusion transformer: its blocks sit inside other "
                        f"modules ({nested[0]!r}), as in a UNet, where token counts change from block to block. "
                        f"tokencache caches transformers whose blocks form a list of the model itself "
                        f"(transformer_blocks.0, ...)")
    if not entries:
        found = ", ".join(sorted(seen_candidates)) or "none"
        raise TypeError(
            f"{type(transformer).__name__} has no supported transformer block. Block classes found: {found}. "
            f"Supported: {', '.join(supported_block_classes())}. Register a BlockLayout to add one."
        )
    return entries


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

register_unsupported_model(
    "LatteTransformer3DModel",
    "its temporal blocks are BasicTransformerBlocks over the frames of each position, not over image tokens, "
    "and the cache does not yet keep token selection consistent between the two layouts",
)
register_unsupported_model("UNet2DConditionModel", "tokencache caches diffusion transformers, not UNets")
