"""Measure the shipped digits DiT against the quality bar; writes ``quality.json`` next to the weights.

    python -m tokencache.demo.quality      # guidance 1.0, 1.1, 1.25, 1.5; 100 per class; ~10 min on 2 threads

Protocol: 100 samples per class (1,000), class ``c`` sampled as one batch with
``torch.Generator().manual_seed(seed + c)``, 50 DDIM steps. Metrics use the shipped classifier:
``accuracy`` (classifier label == requested label), ``fd_heldout`` = FD(samples, held-out split, 450 images),
and the real-vs-real baseline ``fd_real_halves`` = FD(half A, half B) where A/B are the stratified 50/50
split (``random_state=1``) of all 1,797 real digits (898 / 899 images), see :func:`data.real_halves`.
Bar: ``accuracy >= 0.90`` and ``fd_heldout <= 3 * fd_real_halves``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..metrics import class_accuracy, frechet_distance
from .data import NUM_CLASSES, load_digits_split, real_halves
from .pipeline import DEFAULT_GUIDANCE, DigitsPipeline

__all__ = ["measure_quality", "real_baselines", "sample_per_class", "write_quality_report"]

ACCURACY_BAR = 0.90
FD_FACTOR_BAR = 3.0


@torch.no_grad()
def sample_per_class(pipe: DigitsPipeline, n_per_class: int, steps: int, guidance: float,
                     seed: int, **call_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` samples of each class (class ``c`` seeded with ``seed + c``): (images, labels).
    ``call_kwargs`` go to the pipeline call as they are."""
    pipe.set_progress_bar_config(disable=True)
    images, labels = [], []
    for c in range(NUM_CLASSES):
        gen = torch.Generator().manual_seed(seed + c)
        lab = [c] * n_per_class
        out = pipe(class_labels=lab, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                   **call_kwargs)
        images.append(out.images.cpu())
        labels.append(torch.tensor(lab))
    return torch.cat(images), torch.cat(labels)


def real_baselines(classifier: nn.Module) -> dict[str, float]:
    """Real-vs-real Fréchet distances: the halves A/B of all digits, and train split vs held-out split."""
    a, b = real_halves()
    train, _ = load_digits_split("train")
    heldout, _ = load_digits_split("heldout")
    return {
        "fd_real_halves": frechet_distance(a, b, classifier),
        "fd_train_vs_heldout": frechet_distance(train, heldout, classifier),
    }


def measure_quality(pipe: DigitsPipeline, classifier: nn.Module, n_per_class: int = 100, steps: int = 50,
                    guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                    baselines: dict[str, float] | None = None) -> dict[str, Any]:
    """Sample ``10 * n_per_class`` digits and score them; returns accuracy, FDs and whether the bar is met."""
    start = time.perf_counter()
    samples, labels = sample_per_class(pipe, n_per_class, steps, guidance, seed)
    seconds = time.perf_counter() - start
    heldout, _ = load_digits_split("heldout")
    train, _ = load_digits_split("train")
    base = baselines if baselines is not None else real_baselines(classifier)
    acc = class_accuracy(samples, labels, classifier)
    fd_heldout = frechet_distance(samples, heldout, classifier)
    return {
        "guidance": guidance,
        "steps": steps,
        "scheduler": type(pipe.scheduler).__name__,
        "n_samples": len(samples),
        "seed": seed,
        "accuracy": acc,
        "fd_heldout": fd_heldout,
        "fd_train": frechet_distance(samples, train, classifier),
        **base,
        "fd_ratio": fd_heldout / base["fd_real_halves"],
        "meets_bar": bool(acc >= ACCURACY_BAR and fd_heldout <= FD_FACTOR_BAR * base["fd_real_halves"]),
        "sampling_seconds": seconds,
    }


def write_quality_report(folder: str | Path | None = None,
                         guidances: Sequence[float] = (1.0, 1.1, 1.25, 1.5),
                         n_per_class: int = 100, steps: int = 50, seed: int = 0,
                         num_threads: int | None = 2) -> dict[str, Any]:
    """Measure the model in ``folder`` (default: the shipped one) at each guidance; write ``quality.json``."""
    from . import assets_dir, load_pipeline_from
    from .classifier import load_classifier_from

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    folder = Path(folder) if folder is not None else assets_dir()
    pipe = load_pipeline_from(folder)
    classifier = load_classifier_from(folder)
    base = real_baselines(classifier)
    runs = []
    for g in guidances:
        runs.append(measure_quality(pipe, classifier, n_per_class, steps, g, seed, baselines=base))
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "protocol": (__doc__ or "").strip().split("\n\n", 2)[-1],
        "bar": {"accuracy_min": ACCURACY_BAR, "fd_heldout_max_factor_of_fd_real_halves": FD_FACTOR_BAR},
        "baselines": base,
        "bar_met_at_guidance": [r["guidance"] for r in runs if r["meets_bar"]],
        "runs": runs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    (folder / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    write_quality_report()
