"""Image-quality metrics for comparing cached and full-compute samples (images in [-1, 1]).

``frechet_distance`` and ``class_accuracy`` use a classifier such as :func:`tokencache.demo.load_classifier`
(any ``nn.Module`` with ``features(x) -> (N, F)`` for the Fréchet distance and logits from ``forward``).
Needs the ``demo`` extra (torchmetrics).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["class_accuracy", "frechet_distance", "psnr", "ssim"]

_RANGE = (-1.0, 1.0)


class _PenultimateFeatures(nn.Module):
    """Wrap a classifier's ``features`` method as a frozen feature extractor for torchmetrics' FID."""

    def __init__(self, classifier: nn.Module, batch_size: int) -> None:
        super().__init__()
        if not callable(getattr(classifier, "features", None)):
            raise TypeError("the classifier needs a `features(x) -> (N, F)` method")
        # a plain attribute, not a submodule: the metric must not move, retrain or own the classifier
        self.__dict__["classifier"] = classifier
        self.batch_size = batch_size
        num = getattr(classifier, "num_features", None)
        if not isinstance(num, int):
            param = next(classifier.parameters())
            with torch.no_grad():
                num = int(classifier.features(torch.zeros(1, 1, 16, 16, device=param.device)).shape[-1])
        self.num_features = num

    def train(self, mode: bool = True) -> _PenultimateFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clf = self.classifier
        was_training = clf.training
        clf.eval()
        try:
            device = next(clf.parameters()).device
            chunks = [clf.features(x[i:i + self.batch_size].to(device)) for i in range(0, len(x), self.batch_size)]
        finally:
            clf.train(was_training)
        return torch.cat(chunks).float().cpu()


def frechet_distance(samples_a: torch.Tensor, samples_b: torch.Tensor, classifier: nn.Module,
                     batch_size: int = 500) -> float:
    """Fréchet distance between the classifier's penultimate features of two image sets (each ``(N,1,H,W)``).

    Computed by torchmetrics' ``FrechetInceptionDistance`` with the classifier as the custom feature
    extractor (float64 statistics). The images are fed as they are (float, [-1, 1]); torchmetrics'
    ``normalize`` flag only concerns its built-in Inception net. Needs at least 2 images per set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(samples_a) < 2 or len(samples_b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images in each set")
    fid = FrechetInceptionDistance(feature=_PenultimateFeatures(classifier, batch_size), reset_real_features=True)
    fid.update(samples_a.detach().float(), real=True)
    fid.update(samples_b.detach().float(), real=False)
    return float(fid.compute())


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels: torch.Tensor | list[int], classifier: nn.Module,
                   batch_size: int = 500) -> float:
    """Fraction of ``samples`` (``(N,1,H,W)`` in [-1, 1]) that the classifier assigns to ``labels``."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        preds = torch.cat([classifier(samples[i:i + batch_size].to(device)).argmax(dim=-1).cpu()
                           for i in range(0, len(samples), batch_size)])
    finally:
        classifier.train(was_training)
    return float((preds == labels).float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor,
         reduction: Literal["mean", "pooled", "none"] = "mean") -> float | torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (``data_range=(-1, 1)``: values are clamped).

    ``"mean"``: mean over images of the per-image PSNR; ``"pooled"``: one PSNR from the MSE over all pixels;
    ``"none"``: the per-image PSNR tensor. Identical images give ``float('inf')`` (for ``"mean"`` that is the
    case as soon as one image pair is identical), never ``nan`` or a large finite number.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    if reduction == "pooled":
        if torch.equal(a.clamp(*_RANGE), b.clamp(*_RANGE)):
            return math.inf
        return float(peak_signal_noise_ratio(a, b, data_range=_RANGE))
    dims = tuple(range(1, a.ndim))
    per_image = peak_signal_noise_ratio(a, b, data_range=_RANGE, reduction="none", dim=dims)
    same = (a.clamp(*_RANGE) == b.clamp(*_RANGE)).flatten(1).all(dim=1)
    per_image = torch.where(same, torch.full_like(per_image, math.inf), per_image)
    if reduction == "none":
        return per_image
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'pooled' or 'none', got {reduction!r}")
    return float(per_image.mean())


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> float:
    """Mean structural similarity of images ``(N, C, H, W)`` in [-1, 1] (``data_range=(-1, 1)``).

    torchmetrics' Gaussian-window SSIM (``sigma`` 1.5, i.e. an 11x11 window with reflection padding,
    which fits the 16x16 demo images); 1.0 for identical images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    value = structural_similarity_index_measure(a.detach().double(), b.detach().double(), sigma=sigma,
                                                data_range=_RANGE)
    return float(value)
