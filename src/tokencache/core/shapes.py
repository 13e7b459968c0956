"""Transformers with the shapes of published models, for planning and timing (random or meta weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {}
"""Published model sizes by name: (diffusers class name, constructor arguments). Each model family's module
in :mod:`tokencache.models` registers its own."""

PLAN_DEFAULTS: dict[str, dict[str, int]] = {}
"""Per published size, the token counts ``tc.plan`` uses unless given: ``num_tokens`` (image tokens of one
sample at the published resolution) and ``context_tokens`` (text tokens)."""


def register_shape(name: str, class_name: str, kwargs: dict[str, Any], **plan_defaults: int) -> None:
    MODEL_SHAPES[name] = (class_name, kwargs)
    if plan_defaults:
        PLAN_DEFAULTS[name] = plan_defaults


def build_transformer(name_or_path: str, device: str | torch.device = "meta",
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformer named in :data:`MODEL_SHAPES`, or the architecture of a local diffusers checkpoint
    directory (its ``config.json``; weights are loaded unless ``device`` is ``meta``)."""
    import diffusers

    if name_or_path in MODEL_SHAPES:
        class_name, kwargs = MODEL_SHAPES[name_or_path]
        cls = getattr(diffusers, class_name)
        with torch.device(device):
            model = cls(**kwargs).eval()
        return model if dtype == torch.float32 else model.to(dtype)
    path = Path(name_or_path)
    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    if not (path / "config.json").exists():
        raise ValueError(f"model must be one of {sorted(MODEL_SHAPES)} or a diffusers checkpoint directory with a "
                         f"config.json; got {name_or_path!r}")
    config = diffusers.ConfigMixin._dict_from_json_file(path / "config.json")
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"{path / 'config.json'} names no diffusers model class ({config.get('_class_name')!r})")
    if str(device) == "meta":
        with torch.device("meta"):
            model = cls.from_config(config).eval()
        return model if dtype == torch.float32 else model.to(dtype)
    from .loading import load_kwargs

    return cls.from_pretrained(path, torch_dtype=dtype, **load_kwargs()).to(device).eval()
