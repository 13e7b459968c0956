"""The scikit-learn ``digits`` data set as 16x16 images in [-1, 1], split deterministically."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "HELDOUT_FRACTION",
    "Split",
    "load_digits_all",
    "load_digits_split",
    "real_halves",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.25
HALVES_SEED = 1

Split = Literal["train", "heldout"]


@lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the 1,797 digits once: (images (N,1,16,16) in [-1,1], labels (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)) / 16.0  # (N, 8, 8) in [0, 1]
    up = F.interpolate(pixels[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (up * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return images, labels


def load_digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images float (N,1,16,16) in [-1,1], labels long (N,)), in sklearn order."""
    images, labels = _load_all()
    return images.clone(), labels.clone()


@lru_cache(maxsize=4)
def _split_indices(test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of the indices 0..N-1 into (first, second)."""
    from sklearn.model_selection import train_test_split

    _, labels = _load_all()
    idx = np.arange(len(labels))
    first, second = train_test_split(idx, test_size=test_size, stratify=labels.numpy(), random_state=seed)
    return np.sort(first), np.sort(second)


def load_digits_split(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of the ``"train"`` (75%) or ``"heldout"`` (25%) split.

    The split is stratified by class and fixed (``random_state=SPLIT_SEED``): 1,347 training and 450
    held-out digits. Images are float32 ``(N, 1, 16, 16)`` in [-1, 1], labels int64 ``(N,)``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train_idx, heldout_idx = _split_indices(HELDOUT_FRACTION, SPLIT_SEED)
    idx = torch.from_numpy(train_idx if split == "train" else heldout_idx)
    images, labels = _load_all()
    return images[idx].clone(), labels[idx].clone()


def real_halves() -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves (A, B) of ALL 1,797 real digits, for a real-vs-real Fréchet-distance baseline.

    Stratified 50/50 split of the full data set with ``random_state=HALVES_SEED`` (898 / 899 images).
    """
    a_idx, b_idx = _split_indices(0.5, HALVES_SEED)
    images, _ = _load_all()
    return images[torch.from_numpy(a_idx)].clone(), images[torch.from_numpy(b_idx)].clone()
