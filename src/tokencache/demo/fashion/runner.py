"""``tokencache demo --model fashion``: the caches on the shipped Fashion-MNIST model, and whether token choice
matters there: every ToCa score (and random) at the same fresh ratio, so the same FLOPs, and TokenCache's learned
ranking against random tokens when a predictor is shipped."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import torch

from ...core.scores import FORECAST_SCORES, SCORES
from ...methods.fora import FORAConfig
from ...methods.toca import ToCaConfig
from ...methods.token_cache import TokenCacheConfig
from ..compare import Method, compare, format_table, write_outputs
from . import assets_dir, load_classifier, load_model
from .data import load_fashion
from .model import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL, DEFAULT_STEPS, describe_guidance
from .reference import fd_to_reference, load_reference

PREDICTOR_FOLDER = "tokencache-predictor"
SAMPLES_PER_CALL = 20
"""Samples per pipeline call: a batch of a few dozen, as people sample (hundreds at once makes cached steps
memory-bound on the CPU); the frontier uses the same."""
#: ToCa settings on this model: the PixArt preset (cross-attention entropy, R0 0.30), the score varied.
TOCA_PRESET = "pixart-dpm20"


def shipped_predictor():
    """The TokenCache predictor calibrated for the shipped Fashion-MNIST model, or None."""
    from ...methods.token_cache import TokenCachePredictor

    folder = assets_dir() / PREDICTOR_FOLDER
    return TokenCachePredictor.from_pretrained(folder) if folder.is_dir() else None


def fashion_methods(quick: bool, steps: int = DEFAULT_STEPS, has_cross_attention: bool = True) -> list[Method]:
    """No cache, FORA, ToCa with each score at the same ratio (same FLOPs), TokenCache learned vs random,
    fewer steps; all with the flow-matching Euler sampler."""
    flow = dict(sampler="flow", steps=steps)
    methods = [Method(f"no cache (Euler-{steps})", "no cache", **flow),
               Method("FORA N=3", "FORA", config=FORAConfig(interval=3), **flow)]
    # the scores that rank tokens by their forecast are compared in benchmarks/forecast_scores.py
    scores = ("attention", "random") if quick else tuple(s for s in SCORES if s not in FORECAST_SCORES)
    for n in (3,) if quick else (3, 4):
        for score in scores:
            if score == "cross_attention_entropy" and not has_cross_attention:
                methods.append(Method(f"ToCa {score} N={n}", f"ToCa {score}", unavailable="no cross-attention",
                                      **flow))
                continue
            methods.append(Method(f"ToCa {score} N={n}", f"ToCa {score}", extra=dict(score=score, interval=n),
                                  config=ToCaConfig.preset(TOCA_PRESET, full_step_interval=n, score=score), **flow))
    predictor = shipped_predictor()
    for selection in ("predictor", "random"):
        name = f"TokenCache ({'learned' if selection == 'predictor' else 'random'} tokens)"
        if predictor is None:
            methods.append(Method(name, "TokenCache", unavailable=f"no shipped predictor (assets/fashion-dit/"
                                                                  f"{PREDICTOR_FOLDER})", **flow))
        else:
            methods.append(Method(name, f"TokenCache {selection}", extra=dict(token_selection=selection),
                                  config=TokenCacheConfig(predictor, token_selection=selection), **flow))
    methods += [Method(f"Euler-{s} (fewer steps)", "fewer steps", sampler="flow", steps=s)
                for s in ((steps // 2,) if quick else (steps // 2, (2 * steps) // 3))]
    return methods


def real_data_floor(classifier: Any, labels: list[int], seed: int = 0) -> float | None:
    """FD of real training images with the classes of ``labels`` to the test statistics (what a perfect model
    scores at this sample size); None without the data set."""
    from .data import FashionMNISTMissing

    try:
        images, classes = load_fashion("train")
    except FashionMNISTMissing:
        return None
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(set(labels)):
        pool = (classes == label).nonzero().flatten()
        chosen += pool[torch.randperm(len(pool), generator=generator)[: labels.count(label)]].tolist()
    return fd_to_reference(images[chosen], classifier, load_reference(assets_dir()))


def run_fashion_demo(out: str | Path, quick: bool = False, samples: int | None = None, repeats: int | None = None,
                     guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                     steps: int = DEFAULT_STEPS) -> list[dict[str, Any]]:
    """Compare the methods on the shipped Fashion-MNIST model; writes results.json, samples.png, tradeoff.png."""
    samples = samples or (20 if quick else 200)
    repeats = repeats or (1 if quick else 2)
    if samples < 10 or samples % 10:
        raise ValueError(f"samples must be a positive multiple of 10 (one per class); got {samples}")
    pipe, classifier = load_model(), load_classifier()
    reference = load_reference(assets_dir())
    labels = list(range(10)) * (samples // 10)
    has_cross = getattr(pipe.transformer.config, "cross_attention_dim", None) is not None
    methods = fashion_methods(quick, steps, has_cross)
    records = compare(pipe, classifier, methods, labels, seed=seed, guidance=guidance, repeats=repeats,
                      reference_steps={"flow": steps}, fd_to_real=lambda x: fd_to_reference(x, classifier, reference),
                      samples_per_call=SAMPLES_PER_CALL)
    floor = real_data_floor(classifier, labels, seed)
    interval = list(DEFAULT_GUIDANCE_INTERVAL)  # the pipeline applies it by default
    title = f"shipped Fashion-MNIST model, {samples} samples, guidance {describe_guidance(guidance, interval)}"
    meta = dict(title=title,
                samples=samples, seed=seed, fd_real_same_n=floor, guidance=guidance, guidance_interval=interval,
                repeats=repeats, quick=quick, steps=steps,
                date=datetime.date.today().isoformat(),
                device=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    write_outputs(records, Path(out), meta)
    print(format_table(records))
    if floor is not None:
        print(f"\nFD of {samples} real training images to the test statistics (the floor at this size): {floor:.2f}")
    print(f"\nwrote {Path(out) / 'results.json'}, samples.png, tradeoff.png")
    return records
