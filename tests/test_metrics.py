"""Tests of tokencache.metrics with the shipped digit classifier and the real digits."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")

from tokencache import metrics  # noqa: E402
from tokencache.demo import load_classifier, load_digits_split, real_halves  # noqa: E402


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_classifier()


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_split("heldout")


def _noise_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def test_frechet_distance_of_a_set_with_itself_is_zero(classifier, heldout) -> None:
    images, _ = heldout
    assert abs(metrics.frechet_distance(images, images, classifier)) < 1e-3


def test_frechet_distance_real_vs_real_small_and_noise_large(classifier, heldout) -> None:
    train, _ = load_digits_split("train")
    images, _ = heldout
    real = metrics.frechet_distance(train, images, classifier)
    a, b = real_halves()
    halves = metrics.frechet_distance(a, b, classifier)
    noise = metrics.frechet_distance(images, _noise_images(len(images)), classifier)
    assert 0 < real < 20 and 0 < halves < 20
    assert noise > 20 * max(real, halves)


def test_frechet_distance_is_symmetric_and_leaves_classifier_alone(classifier, heldout) -> None:
    images, _ = heldout
    noisy = (images + 0.3 * _noise_images(len(images), 1)).clamp(-1, 1)
    classifier.train()
    try:
        d1 = metrics.frechet_distance(images, noisy, classifier)
        assert classifier.training  # restored
        d2 = metrics.frechet_distance(noisy, images, classifier)
    finally:
        classifier.eval()
    assert d1 == pytest.approx(d2, rel=1e-3)
    assert d1 > 0


def test_frechet_distance_needs_two_images(classifier, heldout) -> None:
    images, _ = heldout
    with pytest.raises(ValueError):
        metrics.frechet_distance(images[:1], images, classifier)


def test_class_accuracy_on_heldout_digits(classifier, heldout) -> None:
    images, labels = heldout
    assert metrics.class_accuracy(images, labels, classifier) >= 0.95
    wrong = (labels + 1) % 10
    assert metrics.class_accuracy(images, wrong, classifier) < 0.05
    assert metrics.class_accuracy(images[:10], labels[:10].tolist(), classifier) >= 0.9
    with pytest.raises(ValueError):
        metrics.class_accuracy(images, labels[:-1], classifier)


def test_psnr_identical_is_inf_and_decreases_with_noise(heldout) -> None:
    images, _ = heldout
    x = images[:64]
    assert metrics.psnr(x, x) == math.inf
    assert metrics.psnr(x, x.clone(), reduction="pooled") == math.inf
    assert torch.isinf(metrics.psnr(x, x, reduction="none")).all()
    noise = _noise_images(len(x))
    values = [metrics.psnr(x, (x + s * noise).clamp(-1, 1)) for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values, reverse=True)
    pooled = [metrics.psnr(x, (x + s * noise).clamp(-1, 1), reduction="pooled") for s in (0.01, 0.2)]
    assert pooled[0] > pooled[1]


def test_psnr_value_and_data_range() -> None:
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.2)
    # data range is 2 for [-1, 1]: PSNR = 10 log10(2^2 / 0.04) = 20 dB
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    # one identical pair makes the mean infinite, the per-image values stay finite elsewhere
    b2 = b.clone()
    b2[0] = 0.0
    per = metrics.psnr(a, b2, reduction="none")
    assert math.isinf(per[0].item()) and per[1].item() == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(a, b2) == math.inf
    with pytest.raises(ValueError):
        metrics.psnr(a, b[:1])


def test_ssim_identical_is_one_and_drops_with_noise(heldout) -> None:
    images, _ = heldout
    x = images[:64]
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    noise = _noise_images(len(x))
    s1 = metrics.ssim(x, (x + 0.05 * noise).clamp(-1, 1))
    s2 = metrics.ssim(x, (x + 0.3 * noise).clamp(-1, 1))
    assert 1.0 > s1 > s2 > 0.0
