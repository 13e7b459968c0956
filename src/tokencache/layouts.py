"""Block layouts as data: which submodules of a transformer block mix tokens and which are position-wise.

Adding a model means adding a :class:`BlockLayout` entry with :func:`register_layout`; the engine,
the planner and the FLOP counter read only this description, never a hand-copied forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

ModuleKind = Literal["self_attn", "cross_attn", "mlp"]
MODULE_KINDS: tuple[str, ...] = ("self_attn", "cross_attn", "mlp")

PartialMode = Literal["rows", "queries", "whole"]
TokenSet = Literal["image", "text", "joint"]

# (module, rows recomputed, tokens the module sees, text tokens passed to it) -> FLOPs of one sample
FlopRule = Callable[[nn.Module, int, int, int], int]


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
    which mixes tokens; fresh tokens are recomputed as queries against keys and values of all tokens.
    ``"whole"``: never partial (a joint attention over text and image tokens, an attention with rotary
    embeddings); computed on full steps of its block and reused (or forecast) whole on the others."""
    tokens: TokenSet = "image"
    """Which tokens the module's rows are: the image tokens, the text tokens (the text stream of a
    dual-stream block), or text then image tokens concatenated (a single-stream block)."""
    index_from: str | None = None
    """Recompute the rows that the named earlier slot of the block recomputed in this call (modules in
    series on the same rows, like a single-stream block's MLP input and its output projection)."""
    cached: bool = True
    """``False`` for a module whose output only feeds a later slot with ``index_from`` naming it: on partial
    steps its fresh rows are computed and the others are left zero (never read), and nothing is cached."""
    text_output: bool = False
    """The module also returns the text stream's output (a joint attention): cached whole with the image
    output."""
    flops: FlopRule | None = None
    """FLOPs of one sample, for modules the default rules (diffusers ``Attention``, linear layers) do not
    describe."""


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
    tokens: TokenSet = "image"
    """The tokens the block's own norms run on (``joint`` for a single-stream block)."""
    text_prefixes: tuple[str, ...] = ()
    """Submodules outside the slots that run on the text tokens (a dual-stream block's context norms)."""


@dataclass(frozen=True)
class ModelLayout:
    """What the engine needs to know of a transformer class beyond its blocks."""

    class_name: str
    token_grid: Callable[[nn.Module, dict], tuple[int, ...]]
    """The grid of image tokens of one call, from the model and its bound forward arguments."""
    context_tokens: int = 120
    """Text tokens of a typical call, the default of ``tc.plan`` (PixArt-alpha pads captions to 120)."""
    num_tokens: int | None = None
    """Image tokens of a typical call, the default of ``tc.plan`` when the model's config has no
    ``sample_size`` to derive it from."""


_LAYOUTS: dict[str, BlockLayout] = {}
_MODELS: dict[str, ModelLayout] = {}


def register_model(layout: ModelLayout) -> None:
    """Add (or replace) how a transformer class lays out its tokens."""
    _MODELS[layout.class_name] = layout


def model_layout(transformer: nn.Module) -> ModelLayout:
    return _MODELS.get(type(transformer).__name__, DEFAULT_MODEL)


def patch_grid(transformer: nn.Module, arguments: dict) -> tuple[int, ...]:
    """Image latents (B, C, H, W) or video latents (B, C, F, H, W), patchified by ``config.patch_size``."""
    hidden_states = arguments["hidden_states"]
    config = getattr(transformer, "config", None)
    patch = config.get("patch_size", 1) if config is not None and hasattr(config, "get") else 1
    spatial = hidden_states.shape[2:]
    if hidden_states.dim() not in (4, 5):
        raise RuntimeError(f"{type(transformer).__name__}: expected hidden_states of shape (B, C, H, W) or "
                           f"(B, C, F, H, W), got {tuple(hidden_states.shape)}")
    patches = tuple(patch) if isinstance(patch, (tuple, list)) else (1,) * (len(spatial) - 2) + (patch, patch)
    patches = tuple(int(p or 1) for p in patches[-len(spatial):])
    return tuple(size // p for size, p in zip(spatial, patches, strict=True))


DEFAULT_MODEL = ModelLayout("", patch_grid)


def register_layout(layout: BlockLayout) -> None:
    """Add (or replace) the layout for a block class."""
    names = [slot.name for slot in layout.slots]
    for i, slot in enumerate(layout.slots):
        if slot.index_from is not None and slot.index_from not in names[:i]:
            raise ValueError(f"{layout.block_class_name}.{slot.name}: index_from={slot.index_from!r} must name an "
                             f"earlier slot of the block ({names[:i]})")
        if not slot.cached and slot.name not in [s.index_from for s in layout.slots]:
            raise ValueError(f"{layout.block_class_name}.{slot.name}: an uncached slot must feed a later slot "
                             "whose index_from names it")
        if slot.partial == "whole" and (slot.index_from is not None or not slot.cached):
            raise ValueError(f"{layout.block_class_name}.{slot.name}: a whole slot is cached and selects no rows")
    _LAYOUTS[layout.block_class_name] = layout


def supported_block_classes() -> tuple[str, ...]:
    return tuple(sorted(_LAYOUTS))


_SIGNATURES: dict[type, tuple[inspect.Signature, str]] = {}


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A module call's arguments by name; its first argument (the tokens) is also under ``hidden_states``
    (an ``nn.Linear`` calls it ``input``)."""
    cls = type(module)
    entry = _SIGNATURES.get(cls)
    if entry is None:
        signature = inspect.signature(cls.forward)
        entry = _SIGNATURES[cls] = (signature, list(signature.parameters)[1])
    signature, first = entry
    arguments = signature.bind_partial(module, *args, **kwargs).arguments
    arguments["hidden_states"] = arguments.get(first)
    return arguments


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


def check_config_fits(config: object, blocks: list[BlockEntry]) -> None:
    """Before any work: per-block factors must match the blocks, and a config that recomputes some tokens of
    a module type must not meet a module the layout reuses whole."""
    factors = getattr(getattr(config, "depth_ratio", None), "factors", None)
    if factors is not None and len(factors) != len(blocks):
        raise ValueError(f"{type(config).__name__}.depth_ratio has {len(factors)} per-block factors but "
                         f"the model has {len(blocks)} blocks")
    partial = getattr(config, "partial_modules", ())
    for block in blocks:
        for slot, _ in block.slots():
            if slot.partial == "whole" and slot.kind in partial:
                field = "module_ratio" if hasattr(config, "module_ratio") else "partial_modules"
                raise ValueError(
                    f"{type(config).__name__}.{field} makes {slot.kind} modules partial, but "
                    f"{type(block.module).__name__}.{slot.name} ({block.name}) is computed whole or reused whole "
                    f"(it mixes tokens in a way fresh-token recomputation does not reproduce: joint text-image "
                    f"attention or rotary embeddings). Give {slot.kind} a ratio of 0 (leave it out of {field})")


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
