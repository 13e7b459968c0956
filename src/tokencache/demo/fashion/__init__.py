"""A class-conditional flow-matching transformer on Fashion-MNIST (196 tokens, 8 blocks) and its classifier.

Data: :mod:`.data` (IDX reader); model and pipeline: :mod:`.model`; training (resumable): :mod:`.train`;
classifier and FD reference: :mod:`.reference`; quality bar: :mod:`.quality`.

    from tokencache.demo.fashion import load_model
    pipe = load_model()   # the shipped weights in tokencache/assets/fashion-dit
    images = pipe(class_labels=[0, 7, 9], generator=torch.Generator().manual_seed(0)).images  # (3,1,28,28)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, FashionMNISTMissing, load_fashion, read_idx, split_test_halves
from .model import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_STEPS,
    FashionPipeline,
    FashionPipelineOutput,
    build_transformer,
    make_scheduler,
    predict_velocity,
)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_GUIDANCE",
    "DEFAULT_GUIDANCE_INTERVAL",
    "DEFAULT_STEPS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "FashionMNISTMissing",
    "FashionPipeline",
    "FashionPipelineOutput",
    "assets_dir",
    "build_transformer",
    "load_classifier",
    "load_model",
    "load_pipeline_from",
    "load_fashion",
    "make_scheduler",
    "predict_velocity",
    "read_idx",
    "split_test_halves",
]

ASSET_NAME = "fashion-dit"


def assets_dir() -> Path:
    """The folder of the shipped model: ``<site-packages>/tokencache/assets/fashion-dit``."""
    path = Path(str(resources.files("tokencache").joinpath("assets", ASSET_NAME)))
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"shipped Fashion-MNIST model not found in {path}")
    return path


def load_pipeline_from(folder: str | Path, device: str | torch.device = "cpu") -> FashionPipeline:
    """A :class:`FashionPipeline` from ``folder/transformer`` (DiT or PixArt, per its config) + ``folder/scheduler``."""
    import json

    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

    from ...core.loading import load_kwargs

    folder = Path(folder)
    name = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    cls = PixArtTransformer2DModel if name == "PixArtTransformer2DModel" else DiTTransformer2DModel
    transformer = cls.from_pretrained(folder / "transformer", **load_kwargs())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    return FashionPipeline(transformer=transformer.eval(), scheduler=scheduler).to(device)


def load_model(device: str | torch.device = "cpu") -> FashionPipeline:
    """The shipped Fashion-MNIST transformer as a :class:`FashionPipeline` (flow-matching Euler scheduler)."""
    return load_pipeline_from(assets_dir(), device)


def load_classifier(device: str | torch.device = "cpu"):
    """The shipped Fashion-MNIST classifier (the digits classifier's architecture at 28x28), in eval mode."""
    from ..classifier import load_classifier_from

    return load_classifier_from(assets_dir(), device)
