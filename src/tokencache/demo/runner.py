"""``tokencache demo``: every method on the shipped digits model, side by side."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import torch

from ..core.timing import TOLERANCE, Clocks
from ..methods.fora import FORAConfig
from ..methods.toca import ToCaConfig
from ..methods.token_cache import TokenCacheConfig
from . import DEFAULT_GUIDANCE, assets_dir, load_classifier, load_model
from .compare import Method, compare, format_table, real_data_floor, timing_warnings, write_outputs

PREDICTOR_FOLDER = "tokencache-predictor"


def shipped_predictor():
    """The TokenCache predictor calibrated for the shipped model, or None if the package has none."""
    from ..methods.token_cache import TokenCachePredictor

    folder = assets_dir() / PREDICTOR_FOLDER
    return TokenCachePredictor.from_pretrained(folder) if folder.is_dir() else None


def demo_methods(quick: bool, ddpm: bool) -> list[Method]:
    toca = ToCaConfig.preset("dit-ddim50")
    methods = [
        Method("no cache (DDIM-50)", "no cache"),
        Method("FORA N=3", "FORA", config=FORAConfig(interval=3)),
    ]
    intervals = (4,) if quick else (3, 4, 6)
    methods += [Method(f"ToCa N={n}", "ToCa", config=ToCaConfig(**{**toca.__dict__, "full_step_interval": n}))
                for n in intervals]
    predictor = shipped_predictor()
    if predictor is not None:
        methods.append(Method("TokenCache", "TokenCache", config=TokenCacheConfig(predictor)))
    methods.append(Method("forecast N=5 (forecast-n5)", "forecast", config=FORAConfig.preset("forecast-n5")))
    methods.append(Method("output forecast N=5 (forecast-output-n5)", "forecast",
                          config=FORAConfig.preset("forecast-output-n5")))
    if not quick:
        methods.append(Method("DDIM-20 (fewer steps)", "fewer steps", steps=20))
    if ddpm and not quick:
        methods += [
            Method("no cache (DDPM-250)", "no cache", sampler="ddpm", steps=250),
            Method("ToCa dit-ddpm250 (N=4)", "ToCa", sampler="ddpm", steps=250,
                   config=ToCaConfig.preset("dit-ddpm250")),
        ]
    return methods


def run_demo(out: str | Path, quick: bool = False, samples: int | None = None, repeats: int | None = None,
             ddpm: bool = True, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
             clocks: Clocks | None = None) -> list[dict[str, Any]]:
    samples = samples or (20 if quick else 50)
    repeats = repeats or (1 if quick else 2)
    if samples < 10 or samples % 10:
        raise ValueError(f"samples must be a positive multiple of 10 (one per class); got {samples}")
    pipe, classifier = load_model(), load_classifier()
    labels = list(range(10)) * (samples // 10)
    methods = demo_methods(quick, ddpm)
    records = compare(pipe, classifier, methods, labels, seed=seed, guidance=guidance, repeats=repeats,
                      clocks=clocks)
    floor = real_data_floor(classifier, labels, seed)
    warnings = timing_warnings(records)
    meta = dict(title=f"shipped digits DiT, {samples} samples, guidance {guidance}", samples=samples, seed=seed,
                fd_real_same_n=floor,
                guidance=guidance, repeats=repeats, quick=quick, date=datetime.date.today().isoformat(),
                device=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                timing=f"speed-ups are process CPU-time ratios against the uncached run of the same sampler, "
                       f"median and range over {repeats} interleaved round(s); tolerance {TOLERANCE:.0%}",
                timing_unreliable=bool(warnings), timing_warnings=warnings)
    write_outputs(records, Path(out), meta)
    print(format_table(records))
    print(f"\nSpeed-ups: process CPU time (what this process computed, which other programs on the machine barely "
          f"change), median and range over {repeats} interleaved round(s).")
    if warnings:
        print(f"\nWARNING: these measured speed-ups are not reliable (marked '!'; rounds should agree within "
              f"{TOLERANCE:.0%} and the uncached run should time at 1x against itself). The machine was probably "
              "busy; rerun on a quieter machine, with more --repeats, or with one thread (OMP_NUM_THREADS=1). "
              "The FLOPs and quality columns are not affected.\n  " + "\n  ".join(warnings))
        print("(results.json: meta.timing_unreliable = true)")
    elif repeats < 2:
        print("(one round: no spread to check the timing against; --repeats 2 or more checks it)")
    print(f"\nFD of {samples} real training digits to the held-out digits (the floor at this sample size): {floor:.2f}")
    print(f"\nwrote {Path(out) / 'results.json'}, samples.png, tradeoff.png")
    return records
