"""A class-conditional flow-matching transformer on Fashion-MNIST (196 tokens, 8 blocks) and its classifier.

Data: :mod:`.data` (IDX reader); model and pipeline: :mod:`.model`; training (resumable): :mod:`.train`.
"""

from __future__ import annotations

from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, FashionMNISTMissing, load_fashion, read_idx, test_halves
from .model import (
    DEFAULT_GUIDANCE,
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
    "DEFAULT_STEPS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "FashionMNISTMissing",
    "FashionPipeline",
    "FashionPipelineOutput",
    "build_transformer",
    "load_fashion",
    "make_scheduler",
    "predict_velocity",
    "read_idx",
    "test_halves",
]
