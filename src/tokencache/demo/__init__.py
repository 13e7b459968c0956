"""The small class-conditional DiT on 16x16 digits that ships with tokencache, and its digit classifier.

    from tokencache.demo import load_model, load_classifier
    pipe = load_model()
    images = pipe(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0)).images  # (3,1,16,16)

``load_model`` / ``load_classifier`` read the shipped assets in ``tokencache/assets/digits-dit/``;
training code is in :mod:`tokencache.demo.train` (needs the ``demo`` extra: scikit-learn).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .classifier import DigitClassifier, load_classifier_from
from .data import load_digits_all, load_digits_split, real_halves
from .pipeline import DEFAULT_GUIDANCE, DigitsPipeline, DigitsPipelineOutput, to_unit_range

__all__ = [
    "DEFAULT_GUIDANCE",
    "DigitClassifier",
    "DigitsPipeline",
    "DigitsPipelineOutput",
    "assets_dir",
    "load_classifier",
    "load_digits_all",
    "load_digits_split",
    "load_model",
    "load_pipeline_from",
    "real_halves",
    "to_unit_range",
]

ASSET_NAME = "digits-dit"


def assets_dir() -> Path:
    """The folder of the shipped model: ``<site-packages>/tokencache/assets/digits-dit``."""
    folder = resources.files("tokencache").joinpath("assets", ASSET_NAME)
    path = Path(str(folder))
    if not path.is_dir():
        raise FileNotFoundError(f"shipped demo model not found in {path}")
    return path


def load_pipeline_from(folder: str | Path, device: str | torch.device = "cpu") -> DigitsPipeline:
    """Build a :class:`DigitsPipeline` from ``folder/transformer`` and ``folder/scheduler`` (DDIM)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from ..core.loading import load_kwargs

    folder = Path(folder)
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer", **load_kwargs())
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = DigitsPipeline(transformer=transformer.eval(), scheduler=scheduler)
    return pipe.to(device)


def load_model(device: str | torch.device = "cpu") -> DigitsPipeline:
    """The shipped digits DiT as a :class:`DigitsPipeline` with its 50-step-ready DDIM scheduler."""
    return load_pipeline_from(assets_dir(), device)


def load_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped digit classifier (``classifier.safetensors``), in eval mode."""
    return load_classifier_from(assets_dir(), device)
