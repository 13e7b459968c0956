"""Transformers with the shapes of published models, for planning and timing (random or meta weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_DIT_XL_2: dict[str, Any] = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _pixart(sample_size: int) -> dict[str, Any]:
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=sample_size, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                use_additional_conditions=sample_size == 128)


MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "dit-xl-2": ("DiTTransformer2DModel", _DIT_XL_2),
    "pixart-alpha-256": ("PixArtTransformer2DModel", _pixart(32)),
    "pixart-alpha-512": ("PixArtTransformer2DModel", _pixart(64)),
    "pixart-alpha-1024": ("PixArtTransformer2DModel", _pixart(128)),
}


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
    from ._loading import load_kwargs

    return cls.from_pretrained(path, torch_dtype=dtype, **load_kwargs()).to(device).eval()
