"""Block layouts as data: which submodules of a transformer block mix tokens and which are position-wise.

Adding a model means adding a :class:`BlockLayout` entry with :func:`register_layout`; the engine,
the planner and the FLOP counter read only this description, never a hand-copied forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

ModuleKind = Literal["self_attn", "cross_attn", "mlp"]
MODULE_KINDS: tuple[str, ...] = ("self_attn", "cross_attn", "mlp")

PartialMode = Literal["rows", "queries", "whole"]
TokenSet = Literal["image", "text", "joint"]
TokenGroups = Literal["sample", "frame", "position"]
TOKEN_GROUPS: tuple[str, ...] = ("sample", "frame", "position")
SHARED_SELECTION_SCORES: tuple[str, ...] = ("random", "similarity")

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
    steps its fresh rows are computed and the others are left uninitialised (never read), and nothing is
    cached."""
    text_output: bool = False
    """The module also returns the text stream's output (a joint attention): cached whole with the image
    output."""
    flops: FlopRule | None = None
    """FLOPs of one sample, for modules the default rules (diffusers ``Attention``, linear layers) do not
    describe."""
    groups: TokenGroups | Callable[[nn.Module], TokenGroups] = "sample"
    """How the module's (batch, tokens) rows lie over a video's tokens (frames x positions, frame-major):
    ``"sample"``, one batch row per sample holding all its tokens; ``"frame"``, one batch row per frame of a
    sample holding that frame's positions (a spatial block's (B*F, S)); ``"position"``, one batch row per
    spatial position holding its frames (a temporal block's (B*S, F)). A callable takes the block (a block
    class whose attention is spatial or temporal by a flag). With ``"frame"`` or ``"position"``, the module's
    other per-row arguments (a spatial cross-attention's caption, repeated per frame) must be the same for
    every row of a sample: fresh tokens are recomputed as one (B, k) batch and get the first."""
    context: Callable[[dict], int] | None = None
    """Text tokens per sample passed to the module, from its call arguments by name (``hidden_states`` is
    its first argument), for FLOP counting; ``None``: ``encoder_hidden_states.shape[1]``."""


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
    block_lists: tuple[str, ...] = ()
    """The model's lists of blocks that run interleaved, in the order each depth runs them (block ``i`` of
    each list, then block ``i + 1``: a spatial-temporal video DiT); blocks are indexed in that execution
    order. Empty: blocks run in the order the model holds them."""
    block_layouts: Mapping[str, BlockLayout] = field(default_factory=dict)
    """Per block list (``"temporal_transformer_blocks"``), a layout used for its blocks instead of the one
    registered for their class (Latte's ``BasicTransformerBlock``s cache differently from DiT's)."""
    shared_selection: bool = False
    """Choose the fresh tokens once per transformer call (step and stream) over each sample's whole token
    grid, and recompute those tokens in every block, whatever its rows are (frames, positions, all tokens):
    spatial and temporal blocks of a video model then refresh the same tokens. Token-wise slots must be
    ``rows``; scores must be ``random`` or ``similarity``."""
    default_grid: Callable[[nn.Module], tuple[int, ...]] | None = None
    """The token grid (frames, height, width) of a typical call, the default of ``tc.plan`` for video
    models whose blocks see frames or positions."""


_LAYOUTS: dict[str, BlockLayout] = {}
_MODELS: dict[str, ModelLayout] = {}


def register_model(layout: ModelLayout) -> None:
    """Add (or replace) how a transformer class lays out its tokens."""
    _MODELS[layout.class_name] = layout


def model_layout(transformer: nn.Module) -> ModelLayout:
    return _MODELS.get(type(transformer).__name__, DEFAULT_MODEL)


def grid_size(grid: tuple[int, ...]) -> int:
    count = 1
    for size in grid:
        count *= size
    return count


def group_shape(groups: str, grid: tuple[int, ...]) -> tuple[int, int]:
    """(batch rows per sample, tokens per batch row) of a module whose rows are laid out as ``groups`` over a
    sample's token ``grid`` (frames first)."""
    count = grid_size(grid)
    if groups == "sample":
        return 1, count
    if len(grid) < 2:
        raise ValueError(f"a {groups!r} layout needs a (frames, ...) token grid; got {grid}")
    frames = grid[0]
    return (frames, count // frames) if groups == "frame" else (count // frames, frames)


def flat_rows(index: torch.Tensor, groups: str, grid: tuple[int, ...]) -> torch.Tensor:
    """Canonical token indices (B, k) (frame-major ``f * S + s`` within each sample) -> indices (1, B * k) of
    the same tokens in a module's rows flattened to (1, batch rows * tokens)."""
    batch = index.shape[0]
    count = grid_size(grid)
    offset = torch.arange(batch, device=index.device).unsqueeze(1) * count
    if groups == "position":
        frames = grid[0]
        positions = count // frames
        index = (index % positions) * frames + index // positions
    return (index + offset).reshape(1, -1)


def canonical_tokens(rows: torch.Tensor, groups: str, batch: int, grid: tuple[int, ...]) -> torch.Tensor:
    """A module's rows (any shape holding batch rows x tokens x C) as (B, N, C) in canonical token order."""
    count = grid_size(grid)
    channels = rows.shape[-1]
    if groups == "position":
        frames = grid[0]
        return rows.reshape(batch, count // frames, frames, channels).transpose(1, 2).reshape(batch, count, channels)
    return rows.reshape(batch, count, channels)


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
    shared_selection: bool = False
    """Whether the model chooses fresh tokens once per call for all blocks (:attr:`ModelLayout.shared_selection`)."""

    def groups(self, slot: ModuleSlot) -> str:
        """How ``slot``'s rows lie over the video's tokens in this block (see :attr:`ModuleSlot.groups`)."""
        groups = slot.groups(self.module) if callable(slot.groups) else slot.groups
        if groups not in TOKEN_GROUPS:
            raise ValueError(f"{type(self.module).__name__}.{slot.name}: groups must be one of {TOKEN_GROUPS}; "
                             f"got {groups!r}")
        return groups

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
    if blocks and blocks[0].shared_selection:
        _check_shared_selection(config, blocks[0])
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


def _check_shared_selection(config: Any, block: BlockEntry) -> None:
    """A model that chooses fresh tokens once per call over the video's tokens: the scores that need no
    per-block attention map, no 2-D spatial bonus, no learned predictor."""
    name = type(config).__name__
    where = f"{type(block.module).__name__} blocks choose their fresh tokens once per step over the video's tokens"
    if hasattr(config, "predictor"):
        raise ValueError(f"{name} is not supported on this model: {where}, which a TokenCache predictor "
                         "calibrated per block does not do; use ToCaConfig or FORAConfig")
    score = getattr(config, "score", None)
    if score is not None and score not in SHARED_SELECTION_SCORES:
        raise ValueError(f"{name}.score {score!r} is not supported on this model: {where}, shared by spatial and "
                         f"temporal blocks, and the attention-map scores are per block. Use one of "
                         f"{SHARED_SELECTION_SCORES}")
    if getattr(config, "spatial_cell_size", None) is not None:
        raise ValueError(f"{name}.spatial_cell_size needs a 2-D grid of image tokens; this model's tokens form a "
                         "(frames, height, width) grid: set spatial_cell_size=None")
    forecast = getattr(config, "forecast", None)
    if forecast is not None and getattr(forecast, "clusters", 0):
        raise ValueError(f"ForecastConfig.clusters is not supported on this model: {where}, and the clusters are "
                         "per module; set clusters=0")


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
    model = model_layout(transformer)
    entries: list[BlockEntry] = []
    seen_candidates: set[str] = set()
    for name, module in transformer.named_modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                seen_candidates.add(type(child).__name__)
        layout = model.block_layouts.get(name.rsplit(".", 1)[0]) if "." in name else None
        if layout is None or layout.block_class_name != type(module).__name__:
            layout = layout_for(module)
        if layout is None:
            continue
        # A registered block nested inside another registered block is not a separate depth level.
        if any(name.startswith(e.name + ".") for e in entries):
            continue
        reason = layout.check(module)
        if reason is not None:
            raise TypeError(f"block {name!r} ({type(module).__name__}) cannot be cached: {reason}")
        entries.append(BlockEntry(len(entries), name, module, layout, model.shared_selection))
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
    if model.block_lists:
        entries = _interleaved(model_name, model.block_lists, entries)
    if model.shared_selection:
        for entry in entries:
            for slot, _ in entry.slots():
                if slot.partial == "queries" or slot.tokens != "image":
                    raise TypeError(f"{model_name} chooses fresh tokens once per step over its image tokens; "
                                    f"{entry.name}.{slot.name} must be a 'rows' or 'whole' slot over image tokens")
    return entries


def _interleaved(model_name: str, lists: tuple[str, ...], entries: list[BlockEntry]) -> list[BlockEntry]:
    """The blocks in execution order: block ``i`` of each list in ``lists``, then block ``i + 1``."""
    order: list[tuple[int, int, BlockEntry]] = []
    for entry in entries:
        parent, _, position = entry.name.partition(".")
        if parent not in lists:
            raise TypeError(f"{model_name}: block {entry.name!r} is in none of the interleaved block lists {lists}")
        order.append((int(position), lists.index(parent), entry))
    order.sort(key=lambda item: item[:2])
    return [BlockEntry(i, e.name, e.module, e.layout, e.shared_selection) for i, (_, _, e) in enumerate(order)]
