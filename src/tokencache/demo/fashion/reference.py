"""The Fashion-MNIST classifier and the shipped FD reference statistics of the real test set.

FD here is the Fréchet distance between Gaussian fits of the classifier's penultimate features (the
digits model's FD, :func:`tokencache.metrics.frechet_distance`); the real side comes from stored statistics
(``fd_reference.safetensors``: mean, covariance, count of the 10,000 test images) so that sampling and the
demo need no data set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import train_classifier
from .data import load_fashion, split_test_halves

__all__ = ["FD_REFERENCE", "feature_stats", "fd_to_reference", "frechet_from_stats", "load_reference",
           "real_same_n", "train_fashion_classifier", "write_reference"]

FD_REFERENCE = "fd_reference.safetensors"


@torch.no_grad()
def feature_stats(images: torch.Tensor, classifier: nn.Module, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` (float64) of ``classifier.features`` over ``images``."""
    if len(images) < 2:
        raise ValueError("feature statistics need at least 2 images")
    classifier.eval()
    feats = torch.cat([classifier.features(images[i:i + batch_size].float()) for i in range(0, len(images),
                                                                                           batch_size)]).double()
    return {"mean": feats.mean(0), "cov": torch.cov(feats.T), "count": torch.tensor(len(feats))}


def frechet_from_stats(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b)`` (the trace via eigenvalues of ``S_a S_b``)."""
    diff = a["mean"].double() - b["mean"].double()
    sa, sb = a["cov"].double(), b["cov"].double()
    # S_a S_b has real non-negative eigenvalues (a product of PSD matrices); clip round-off below zero
    eig = torch.linalg.eigvals(sa @ sb).real.clamp(min=0)
    return float(diff @ diff + sa.trace() + sb.trace() - 2 * eig.sqrt().sum())


def fd_to_reference(samples: torch.Tensor, classifier: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """FD between ``samples`` (``(N,1,28,28)`` in [-1, 1]) and the stored real statistics."""
    return frechet_from_stats(feature_stats(samples, classifier), reference)


def write_reference(folder: str | Path, classifier: nn.Module, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the test set's feature statistics to ``folder/fd_reference.safetensors``; return the baselines.

    ``fd_real_halves``: FD between the two stratified halves of the test set (5,000 / 5,000), the
    real-vs-real yardstick of the quality bar; ``fd_train_vs_test``: 10,000 training images vs the test set.
    """
    from safetensors.torch import save_file

    test, _ = load_fashion("test", data_dir)
    ref = feature_stats(test, classifier)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(Path(folder) / FD_REFERENCE))
    a, b = split_test_halves(data_dir)
    train, _ = load_fashion("train", data_dir)
    return {"fd_real_halves": frechet_from_stats(feature_stats(a, classifier), feature_stats(b, classifier)),
            "fd_train10k_vs_test": fd_to_reference(train[:10000], classifier, ref),
            "fd_real_same_n": real_same_n(classifier, ref, data_dir=data_dir),
            "reference": "Fashion-MNIST test set, 10,000 images"}


def real_same_n(classifier: nn.Module, reference: dict[str, torch.Tensor], sizes: tuple[int, ...] = (200, 1000, 5000),
                seed: int = 0, data_dir: str | Path | None = None) -> dict[str, float]:
    """FD of ``n`` real TRAINING images (``n / 10`` per class, seeded) to the test statistics, per ``n``: what a
    perfect model scores with ``n`` samples. FD is biased upwards for small sets: with 1,000 samples real data
    already scores about 3x ``fd_real_halves`` (two sets of 5,000)."""
    images, labels = load_fashion("train", data_dir)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in sizes:
        idx = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                             generator=gen)[: n // 10]]
                         for c in range(10)])
        out[str(n)] = fd_to_reference(images[idx], classifier, reference)
    return out


def load_reference(folder: str | Path) -> dict[str, torch.Tensor]:
    """The statistics written by :func:`write_reference`."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / FD_REFERENCE))


def train_fashion_classifier(out_dir: str | Path, epochs: int = 8, seed: int = 0, num_threads: int | None = 1,
                             data_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the shipped :class:`~tokencache.demo.classifier.DigitClassifier` architecture on the 60,000
    training images (28x28), report its accuracy on the 10,000 test images, and write the FD reference."""
    start = time.perf_counter()
    train = load_fashion("train", data_dir)
    test = load_fashion("test", data_dir)
    summary = train_classifier(out_dir, epochs=epochs, batch_size=128, lr=2e-3, seed=seed, num_threads=num_threads,
                               data=train, heldout=test,
                               extra={"data": "Fashion-MNIST: trained on the 60,000 training images; "
                                              "heldout_accuracy is on the 10,000 test images"})
    from ..classifier import load_classifier_from

    clf = load_classifier_from(out_dir)
    summary.update(write_reference(out_dir, clf, data_dir))
    summary["test_accuracy"] = summary["heldout_accuracy"]
    summary["total_seconds"] = time.perf_counter() - start
    meta_file = Path(out_dir) / "classifier.json"
    meta = json.loads(meta_file.read_text())
    meta.update({k: summary[k] for k in ("fd_real_halves", "fd_train10k_vs_test", "fd_real_same_n", "reference",
                                         "test_accuracy", "total_seconds")})
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return summary
