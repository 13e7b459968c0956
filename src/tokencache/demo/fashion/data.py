"""Fashion-MNIST from its original IDX files (gzipped or plain), as 28x28 images in [-1, 1].

The Debian package ``dataset-fashion-mnist`` installs the four files under ``/usr/share/datasets/fashion-mnist``;
``TOKENCACHE_FASHION_MNIST`` (environment) or the ``data_dir`` argument point elsewhere.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATA_DIR",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "FashionMNISTMissing",
    "IDXFormatError",
    "data_dir",
    "load_fashion",
    "read_idx",
    "split_test_halves",
]

IMAGE_SIZE = 28
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TOKENCACHE_FASHION_MNIST"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
HALVES_SEED = 1

Split = Literal["train", "test"]
_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type byte -> numpy dtype (big-endian, as the format stores them)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNISTMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where we looked."""


class IDXFormatError(ValueError):
    """A file is not a valid IDX file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain, recognised by content) into a numpy array of its stored shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise IDXFormatError(f"{path}: not an IDX file (bad magic {raw[:4].hex()!r}; expected 0000 + type + ndim)")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise IDXFormatError(f"{path}: IDX payload is {len(raw) - header} bytes, shape {shape} needs "
                             f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def data_dir(folder: str | Path | None = None) -> Path:
    """``folder``, else ``$TOKENCACHE_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FashionMNISTMissing(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}. Install the data set with "
        f"`{INSTALL_HINT}` (it puts the IDX files in {DEFAULT_DATA_DIR}), or set {ENV_VAR} to a folder holding "
        f"them.")


@lru_cache(maxsize=4)
def _load(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lab_stem = _STEMS[split]
    pixels = read_idx(_find(Path(folder), img_stem))
    labels = read_idx(_find(Path(folder), lab_stem))
    if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
        raise IDXFormatError(f"{folder}: {split} images {pixels.shape} and labels {labels.shape} do not match")
    images = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)[:, None]
    return images.contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_fashion(split: Split = "train", folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float (N,1,28,28) in [-1,1], labels long (N,))`` of the ``"train"`` (60k) or ``"test"`` (10k) set."""
    if split not in _STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load(str(data_dir(folder).resolve()), split)
    return images.clone(), labels.clone()


def split_test_halves(folder: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, class-stratified halves (A, B) of the real test set, for the real-vs-real FD baseline.

    Per class, a ``torch.randperm`` seeded with ``HALVES_SEED`` splits its images 50/50 (5,000 / 5,000).
    """
    images, labels = load_fashion("test", folder)
    gen = torch.Generator().manual_seed(HALVES_SEED)
    a_idx, b_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        half = len(idx) // 2
        a_idx.append(idx[:half])
        b_idx.append(idx[half:])
    return images[torch.cat(a_idx).sort().values], images[torch.cat(b_idx).sort().values]
