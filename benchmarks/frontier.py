"""Quality against speed on a shipped model: tokencache's methods, fewer sampling steps and peer caches.

``--model digits`` (default): the digits DiT (64 tokens, DDIM/DDPM). ``--model fashion``: the Fashion-MNIST
PixArt-style transformer (196 tokens, class tokens through cross-attention, flow matching, Euler). Every method
runs on the same classes and seed (10 per class, the model's guidance) through
:func:`tokencache.demo.compare.compare`: FLOPs speed-up (tokencache's plan; none for peers), measured speed-up
(interleaved with the uncached run of the same sampler), PSNR/SSIM against that uncached run, FD against the
model's real data (digits: held-out digits; fashion: the stored statistics of the 10,000 test images) and class
accuracy (the model's shipped classifier). What differs between the models is one :class:`ModelSpec` (``MODELS``).

* digits, DDIM (reference DDIM-50): ToCa with each score at N = 3, 4, 6 (``dit-ddim50`` preset;
  ``cross_attention_entropy`` is recorded as unavailable, DiT has no cross-attention), FORA N = 2, 3, 4, 6,
  TokenCache at budgets 0.3/0.5/0.7/0.9 when the package ships a calibrated predictor (an unavailable row
  otherwise; the rows appear by themselves once ``tokencache/assets/digits-dit/tokencache-predictor`` exists),
  forecasting (the ``forecast-n*`` presets and variants), fewer steps (DDIM 10, 15, 20, 25, 35), and the peers of
  ``benchmarks/peers.py`` (diffusers FirstBlockCache and TaylorSeer hooks, cache-dit DBCache with and without its
  TaylorSeer calibrator; how each is applied is written there).
* digits, DDPM (reference DDPM-250): ToCa ``dit-ddpm250`` at N = 3, 4, 6, fewer steps (DDPM 50, 100, 150); peers
  too with ``--ddpm-peers``.
* fashion, Euler (reference Euler-30, ``FlowMatchEulerDiscreteScheduler``): ToCa with each of the five scores at
  N = 3, 4, 6 with the PixArt preset the fashion demo uses (``pixart-dpm20``: R0 0.30, cross-attention and MLP
  partial, self-attention reused; the score is the only difference, so the same FLOPs per N), ToCa with every
  module partial at N = 4, R0 = 0.3 (attention, similarity, random: self-attention recomputed too), FORA N = 2, 3, 4,
  6, TokenCache with the learned ranking and with random tokens at budgets 0.3/0.5/0.7/0.9 (when
  ``tokencache/assets/fashion-dit/tokencache-predictor`` exists), forecasting between full steps (configs built
  for this model, see ``_fashion_forecast_rows``: order 1 after three full steps at N = 2 ... 8, variants, the
  digits preset's setting as a named row, ToCa+forecast with the cross-attention recomputed too), fewer steps
  (Euler 10, 15, 20, 25) and the same peers.

    python benchmarks/frontier.py                   # digits, the full sweep (about an hour on 1 CPU thread)
    python benchmarks/frontier.py --model fashion   # fashion (about 2 CPU-hours at 200 samples)
    python benchmarks/frontier.py --quick           # a short version: few methods, 20 samples, repeats 1

Options: ``--samples N`` (a multiple of 10; default 100 digits, 200 fashion), ``--repeats R`` (interleaved timing
rounds, default 2: each round is the uncached run then every method once, per sampler), ``--no-ddpm``,
``--no-peers``, ``--ddpm-peers``, ``--only REGEX`` (methods whose name matches), ``--threads`` (default 1),
``--seed``, ``--guidance`` (default: the model's), ``--out STEM``, ``--x cpu|wall`` (the plot's speed-up axis),
``--update`` (re-run the ``--only`` rows and replace them in the saved results), ``--resume`` (run only the rows
the stem's JSON lacks, e.g. after an interruption; its settings must match), ``--replot`` (rewrite the table and
plot from the saved JSON). Writes ``benchmarks/results/<stem>.json`` (all records), ``.md`` (the table, with
device and date) and ``.png`` (PSNR and FD against measured speed-up, one curve per family and sampler); the stem
is ``frontier`` / ``frontier-fashion`` (``-quick`` appended with ``--quick``). The JSON and the table are
rewritten after every row (``meta.complete`` is false until the sweep ends), so an interrupted sweep keeps what it
measured and ``--resume`` finishes it. The peers need the ``bench`` extra (``cache-dit``); without it their rows
are recorded as unavailable.

Besides the wall-clock speed-up, compare records a CPU-time speed-up: the same ratio for the process CPU time of
the same runs. With one torch thread it barely depends on what else runs on the machine, so on a shared machine
it is the steadier number; the plot uses it (``--x wall`` for the wall clock).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import tokencache as tc
from tokencache.demo.compare import Method, compare, scheduler_for, to_json
from tokencache.demo.fashion.model import describe_guidance

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402
from peers import Peer, all_peers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOCA_SCORES = ("attention", "value_norm", "similarity", "random", "cross_attention_entropy")
TOCA_INTERVALS = (3, 4, 6)
FORA_INTERVALS = (2, 3, 4, 6)
TOKENCACHE_BUDGETS = (0.3, 0.5, 0.7, 0.9)
SAMPLER_LABELS = {"ddim": "DDIM", "ddpm": "DDPM", "flow": "Euler"}


# --------------------------------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelSpec:
    """What the sweep needs to know about one shipped model; everything else is shared."""

    name: str
    title: str
    """How tables and plots name the model."""
    stem: str
    """Result file stem in benchmarks/results."""
    reference_steps: dict[str, int]
    """Sampler -> steps of its uncached reference run; the first sampler is the main one (peers, forecasting,
    TokenCache), the others are extra (``--no-ddpm`` drops them)."""
    fewer_steps: dict[str, tuple[int, ...]]
    """Sampler -> step counts of the "fewer steps" rows."""
    toca_preset: str
    """The ToCa preset whose score and interval the ToCa rows vary."""
    quick_scores: tuple[str, ...]
    """The ToCa scores of ``--quick`` (at N = 4)."""
    quick_fewer_steps: int
    """The fewer-steps row of ``--quick`` (main sampler)."""
    unavailable_scores: tuple[str, ...]
    """ToCa scores the model cannot use (one row records tokencache's refusal)."""
    tokencache_selections: tuple[str, ...]
    """TokenCache rows per budget: ``()`` = the calibrated token selection; else one row per selection."""
    forecast_rows: Callable[[bool], list[tuple[str, Any]]]
    """(name, config) of the forecasting rows (quick or full)."""
    load: Callable[[], tuple[Any, Any]]
    """The pipeline and the classifier."""
    fd: Callable[[Any], Callable[[torch.Tensor], float] | None]
    """``fd(classifier)`` -> ``fd_to_real(images)`` for compare (None: compare's default, the held-out digits)."""
    assets: Callable[[], Path]
    predictor: Callable[[], Any]
    """The shipped TokenCache predictor, or None."""
    guidance: Callable[[], float]
    """The shipped guidance (read when asked: the fashion model's can change with its weights)."""
    real_data: str
    """What FD is measured against (for the table's header)."""
    guidance_interval: Callable[[], list[float] | None] = field(default=lambda: None)
    """The flow times ``[low, high]`` at which the pipeline applies guidance by default (None: it has no such
    setting); recorded with the results, since the samples depend on it."""
    extra_rows: Callable[[bool, bool], list[Method]] = field(default=lambda quick, extra: [])
    """Rows of the extra samplers (digits: DDPM), given ``quick`` and whether extra samplers run."""
    toca_variants: Callable[[bool], list[Method]] = field(default=lambda quick: [])
    """More ToCa rows after the preset's (main sampler), given ``quick``."""
    samples_per_call: int | None = None
    """Samples per pipeline call (None: all in one call). The digits model is tiny and its batch of 200 stays in
    cache; the Fashion model's batch of 400 (CFG) made cached steps memory-bound (FORA N=4: 2.31x CPU time
    for 3.73x FLOPs at 200 samples per call, 3.95x at 20)."""

    @property
    def main_sampler(self) -> str:
        return next(iter(self.reference_steps))

    def sampler_text(self, sampler: str, steps: int) -> str:
        return f"{SAMPLER_LABELS.get(sampler, sampler.upper())}-{steps}"


def _digits_guidance() -> float:
    from tokencache.demo import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


def _digits_load() -> tuple[Any, Any]:
    from tokencache.demo import load_classifier, load_model

    return load_model(), load_classifier()


def _digits_predictor() -> Any:
    from tokencache.demo.runner import shipped_predictor

    return shipped_predictor()


def _digits_assets() -> Path:
    from tokencache.demo import assets_dir

    return assets_dir()


def _digits_forecast_rows(quick: bool) -> list[tuple[str, Any]]:
    """The ``forecast-n*`` presets (the settings that won on this model) and the variants they won against:
    TaylorSeer's expansion, order 1, and token-wise recomputation on top of the forecast (ToCa); the
    ``forecast-output-n*`` presets (the transformer skipped between full steps, its output forecast)."""
    forecast = tc.ForecastConfig
    rows = [(f"forecast N={n} (preset)", tc.FORAConfig.preset(f"forecast-n{n}"))
            for n in ((5,) if quick else (3, 4, 5, 6, 7))]
    if not quick:
        rows += [(f"forecast N={n} newton o{o}", tc.FORAConfig(interval=n, last_full_steps=1,
                                                               forecast=forecast(o, expansion="newton")))
                 for n, o in ((2, 3), (2, 2), (2, 1), (8, 2), (10, 2))]
        rows += [(f"forecast output N={n} (preset)", tc.FORAConfig.preset(f"forecast-output-n{n}"))
                 for n in (3, 4, 5, 6, 7, 8)]
        rows += [("forecast output N=10 newton o2", tc.FORAConfig(
            interval=10, last_full_steps=1, forecast=forecast(2, expansion="newton", target="output")))]
        rows += [("forecast N=5 taylor o3", tc.FORAConfig(interval=5, last_full_steps=1, forecast=forecast(3))),
                 ("forecast N=5 newton o1", tc.FORAConfig(interval=5, last_full_steps=1, forecast=forecast(1))),
                 ("ToCa+forecast similarity N=6 r=0.05", tc.ToCaConfig(
                     full_step_interval=6, fresh_ratio=0.05, score="similarity", module_ratio={"mlp": 1.0},
                     full_step_placement="official", forecast=forecast(2, expansion="newton")))]
    return rows


def _digits_ddpm_rows(quick: bool, extra: bool) -> list[Method]:
    if not extra:
        return []
    rows = [Method("no cache (DDPM-250)", "no cache", sampler="ddpm", steps=250)]
    rows += [Method(f"ToCa dit-ddpm250 N={n}", "ToCa attention", sampler="ddpm", steps=250,
                    config=tc.ToCaConfig.preset("dit-ddpm250", full_step_interval=n),
                    extra=dict(score="attention", interval=n)) for n in TOCA_INTERVALS]
    return rows + [Method(f"DDPM-{s} (fewer steps)", "fewer steps", sampler="ddpm", steps=s) for s in (50, 100, 150)]


def _fashion_load() -> tuple[Any, Any]:
    from tokencache.demo.fashion import load_classifier, load_model

    return load_model(), load_classifier()


def _fashion_fd(classifier: Any) -> Callable[[torch.Tensor], float]:
    from tokencache.demo.fashion import assets_dir
    from tokencache.demo.fashion.reference import fd_to_reference, load_reference

    reference = load_reference(assets_dir())
    return lambda images: fd_to_reference(images, classifier, reference)


def _fashion_predictor() -> Any:
    from tokencache.demo.fashion.runner import shipped_predictor

    return shipped_predictor()


def _fashion_assets() -> Path:
    from tokencache.demo.fashion import assets_dir

    return assets_dir()


def _fashion_guidance() -> float:
    from tokencache.demo.fashion.model import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


def _fashion_guidance_interval() -> list[float]:
    from tokencache.demo.fashion.model import DEFAULT_GUIDANCE_INTERVAL

    return [float(v) for v in DEFAULT_GUIDANCE_INTERVAL]


def _fashion_forecast_rows(quick: bool) -> list[tuple[str, Any]]:
    """Forecasting on the 30-step flow sampler, configs built for this model rather than the digits presets. On
    10 samples of another seed (seed 1; the sweep reports seed 0) order 1 beat orders 2 and 3 at every N (order 2
    lost up to 15 dB once the first steps were full), three full steps first beat one at the same FLOPs (the
    first steps change the most; diffusers' TaylorSeer also computes its first 3), and a full last step changed
    nothing (it moves the sample by sigma_29 = 1/30 of the velocity). The rows: order 1 after 3 full steps at
    N = 2 ... 8; order 1 with one full step first (N = 3, 5, 6); the full steps of diffusers' TaylorSeer hook
    (N = 3, 4, 6: a full step 2 steps after the warm-up, where ours waits N); more warm-up at N = 2 / 3 (for the
    slow end, where cache-dit's gated DBCache+TaylorSeer leads); order 2 at N = 3; the digits preset's setting
    (``forecast-n5``: Newton order 3, last step full) as it is; ToCa+forecast with PixArt's partial modules
    (cross-attention and MLP; self-attention forecast whole) recomputing 5 % of the tokens by similarity and at
    random."""
    forecast = tc.ForecastConfig

    def newton(n: int, order: int, first: int = 3, last: int = 0, first_interval: int | None = None,
               target: str = "modules") -> Any:
        return tc.FORAConfig(interval=n, first_full_steps=first, last_full_steps=last, first_interval=first_interval,
                             forecast=forecast(order, expansion="newton", target=target))

    if quick:
        return [("forecast N=3 newton o1 first=3", newton(3, 1))]
    rows = [(f"forecast N={n} newton o1 first=3", newton(n, 1)) for n in (2, 3, 4, 5, 6, 8)]
    rows += [(f"forecast N={n} newton o1", newton(n, 1, first=1)) for n in (3, 5, 6)]
    rows += [(f"forecast N={n} newton o1 first=3 first_interval=2 (diffusers TaylorSeer's steps)",
              newton(n, 1, first_interval=2)) for n in (3, 4, 6)]
    rows += [("forecast N=2 newton o1 first=9", newton(2, 1, first=9)),
             ("forecast N=3 newton o1 first=6 first_interval=2", newton(3, 1, first=6, first_interval=2)),
             ("forecast N=3 newton o1 first=9 first_interval=2", newton(3, 1, first=9, first_interval=2))]
    # the transformer's output forecast whole, the blocks skipped (target="output"): N=2 first=3 gives diffusers'
    # TaylorSeer lite's images; the others place the same 16 full steps after more warm-up (N=3 first=9) or fill
    # the fast end (results/frontier-fashion.md, step-10,060 weights: 48.0 against lite's 46.5 dB; N=5 first=3
    # 29.2 dB at 8 full steps, where the module forecast on TaylorSeer's N=6 steps gives 30.9)
    rows += [(f"forecast output N={n} newton o1 first={first}" + (f" first_interval={fi}" if fi else "")
              + (" (diffusers TaylorSeer lite's steps)" if (n, first) == (2, 3) else ""),
              newton(n, 1, first=first, first_interval=fi, target="output"))
             for n, first, fi in ((2, 3, None), (3, 9, 2), (4, 5, 2), (5, 3, None), (6, 3, None),
                                  (8, 3, None))]
    rows += [("forecast N=3 newton o2 first=3", newton(3, 2)),
             ("forecast N=5 newton o3 last=1 (digits forecast-n5 setting)", newton(5, 3, first=1, last=1))]
    rows += [(f"ToCa+forecast {score} N=4 r=0.05", tc.ToCaConfig(
        full_step_interval=4, fresh_ratio=0.05, score=score, module_ratio={"cross_attn": 1.0, "mlp": 1.0},
        first_full_steps=3, forecast=forecast(1, expansion="newton"))) for score in ("similarity", "random")]
    return rows


def _fashion_toca_variants(quick: bool) -> list[Method]:
    """ToCa with every module partial, self-attention included (as fresh queries against all keys), N = 4,
    R0 = 0.3, no ramps: the PixArt preset never recomputes self-attention on partial steps, and on 10 samples of
    seed 1 recomputing MLP and cross-attention tokens on top of a stale self-attention was worse than reusing
    everything (FORA); with self-attention recomputed too, the score made a difference there. Three scores."""
    if quick:
        return []
    every = {"self_attn": 1.0, "cross_attn": 1.0, "mlp": 1.0}
    return [Method(f"ToCa {score} N=4 all modules r=0.3", f"ToCa {score} (all modules)", sampler="flow", steps=30,
                   extra=dict(score=score, interval=4, fresh_ratio=0.3, modules="all"),
                   config=tc.ToCaConfig(full_step_interval=4, fresh_ratio=0.3, score=score, module_ratio=every))
            for score in ("attention", "similarity", "random")]


MODELS: dict[str, ModelSpec] = {
    "digits": ModelSpec(
        name="digits", title="shipped digits DiT", stem="frontier",
        reference_steps={"ddim": 50, "ddpm": 250}, fewer_steps={"ddim": (10, 15, 20, 25, 35)},
        toca_preset="dit-ddim50", quick_scores=("attention",), quick_fewer_steps=20,
        unavailable_scores=("cross_attention_entropy",), tokencache_selections=(),
        forecast_rows=_digits_forecast_rows, load=_digits_load, fd=lambda classifier: None, assets=_digits_assets,
        predictor=_digits_predictor, guidance=_digits_guidance, real_data="held-out real digits",
        extra_rows=_digits_ddpm_rows),
    "fashion": ModelSpec(
        name="fashion", title="shipped Fashion-MNIST PixArt-style model", stem="frontier-fashion",
        reference_steps={"flow": 30}, fewer_steps={"flow": (10, 15, 20, 25)},
        toca_preset="pixart-dpm20", quick_scores=("attention", "random"), quick_fewer_steps=15,
        unavailable_scores=(), tokencache_selections=("predictor", "random"),
        forecast_rows=_fashion_forecast_rows, load=_fashion_load, fd=_fashion_fd, assets=_fashion_assets,
        predictor=_fashion_predictor, guidance=_fashion_guidance, guidance_interval=_fashion_guidance_interval,
        real_data="the 10,000 Fashion-MNIST test images (the shipped feature statistics)",
        toca_variants=_fashion_toca_variants, samples_per_call=20),  # as the fashion demo
}


# --------------------------------------------------------------------------------------------------- the rows


def config_reason(pipe: Any, config: Any, sampler: str, steps: int) -> str | None:
    """Try a tokencache config on a one-sample call with the row's step count; the error as the reason it cannot
    run, or None."""
    original = pipe.scheduler
    pipe.scheduler = scheduler_for(pipe, sampler)
    handle = None
    try:
        handle = tc.apply(pipe, config)
        with torch.no_grad():
            pipe(class_labels=[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    except Exception as error:  # the library's own refusal is what the row records
        return f"{type(error).__name__}: {error}"
    finally:
        if handle is not None:
            handle.remove()
        pipe.scheduler = original
    return None


def tokencache_methods(quick: bool, ddpm: bool, spec: ModelSpec | None = None) -> list[Method]:
    """No cache, ToCa, FORA, TokenCache, forecasting and fewer steps (main sampler, then the extra ones)."""
    spec = spec or MODELS["digits"]
    sampler = spec.main_sampler
    ref = spec.reference_steps[sampler]
    on = dict(sampler=sampler, steps=ref)
    methods = [Method(f"no cache ({spec.sampler_text(sampler, ref)})", "no cache", **on)]
    for score in spec.quick_scores if quick else TOCA_SCORES:
        for n in (4,) if quick else TOCA_INTERVALS:
            methods.append(Method(f"ToCa {score} N={n}", f"ToCa {score}", extra=dict(score=score, interval=n),
                                  config=tc.ToCaConfig.preset(spec.toca_preset, full_step_interval=n, score=score),
                                  **on))
            if score in spec.unavailable_scores:  # one row says why, for every N
                methods[-1].name = f"ToCa {score} (any N)"
                break
    methods += spec.toca_variants(quick)
    methods += [Method(f"FORA N={n}", "FORA", config=tc.FORAConfig(interval=n), extra=dict(interval=n), **on)
                for n in ((3,) if quick else FORA_INTERVALS)]
    methods += tokencache_rows(spec, quick)
    methods += [Method(name, "forecast" if name.startswith("forecast") else "ToCa+forecast", config=config, **on)
                for name, config in spec.forecast_rows(quick)]
    for fewer_sampler, counts in spec.fewer_steps.items():
        counts = (spec.quick_fewer_steps,) if quick else counts
        label = SAMPLER_LABELS.get(fewer_sampler, fewer_sampler.upper())
        methods += [Method(f"{label}-{s} (fewer steps)", "fewer steps", sampler=fewer_sampler, steps=s)
                    for s in counts]
    return methods + spec.extra_rows(quick, ddpm)


def tokencache_rows(spec: ModelSpec, quick: bool) -> list[Method]:
    """TokenCache at each budget (quick: the calibrated one), per token selection where the spec compares them
    (learned ranking against random tokens); unavailable rows without a shipped predictor."""
    on = dict(sampler=spec.main_sampler, steps=spec.reference_steps[spec.main_sampler])
    selections = spec.tokencache_selections or (None,)
    names = {None: "TokenCache", "predictor": "TokenCache learned", "random": "TokenCache random"}
    predictor = spec.predictor()
    if predictor is None:
        folder = spec.assets().name if _has_assets(spec) else f"{spec.name} assets"
        return [Method(names[s], names[s], unavailable=f"no shipped predictor yet (tokencache/assets/{folder}/"
                                                       "tokencache-predictor is missing)", **on) for s in selections]
    methods = []
    for selection in selections:
        for budget in (None,) if quick else TOKENCACHE_BUDGETS:
            label = "calibrated" if budget is None else budget
            extra: dict[str, Any] = dict(budget=budget)
            if selection is not None:
                extra["token_selection"] = selection
            methods.append(Method(f"{names[selection]} budget={label}", names[selection], extra=extra,
                                  config=tc.TokenCacheConfig(predictor, budget=budget, token_selection=selection),
                                  **on))
    return methods


def _has_assets(spec: ModelSpec) -> bool:
    try:
        spec.assets()
    except FileNotFoundError:
        return False
    return True


def peer_methods(pipe: Any, peers: list[Peer], samplers: tuple[str, ...],
                 spec: ModelSpec | None = None) -> list[tuple[Method, Peer]]:
    """One method per peer setting and sampler; a peer that cannot run on the model becomes an unavailable row."""
    spec = spec or MODELS["digits"]
    out = []
    for peer in peers:
        reason = peer.check(pipe)
        for sampler in samplers:
            steps = spec.reference_steps[sampler]
            name = peer.name if sampler == spec.main_sampler else f"{peer.name} ({spec.sampler_text(sampler, steps)})"
            method = Method(name, peer.family, sampler=sampler, steps=steps, extra=dict(peer.knob),
                            attach=None if reason else peer.attach, unavailable=reason)
            out.append((method, peer))
    return out


def model_fingerprint(spec: ModelSpec | None = None) -> str:
    """Short hash of the shipped model's files (weights, configs): which model a result belongs to."""
    digest = hashlib.sha256()
    folder = (spec or MODELS["digits"]).assets()
    for path in sorted(folder.glob("transformer/*")) + sorted(folder.glob("scheduler/*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def notes(record: dict[str, Any]) -> str:
    """The last column: why a row is unavailable, the step split of tokencache runs, or what a peer skipped."""
    if "unavailable" in record:
        return f"unavailable: {record['unavailable']}"
    if "full_steps" in record:
        steps = f"{record['full_steps']}/{record['partial_steps']}/{record['reuse_steps']}"
        if record.get("forecast_steps"):  # rows from before the forecast count was kept list them as reuse
            return f"full/partial/reuse/forecast steps {steps}/{record['forecast_steps']}"
        return f"full/partial/reuse steps {steps}"
    calls = record.get("calls", 1)  # a peer's counts add up over a run's pipeline calls: show them per call

    def count(key: str) -> str:
        return f"{record[key] / calls:.3g}"
    if "skipped_steps" in record:
        return f"computed {count('computed_steps')}, skipped {count('skipped_steps')} of {record['steps']} steps"
    if "predicted_steps" in record:
        return (f"computed {count('computed_steps')}, forecast {count('predicted_steps')} of {record['steps']} "
                f"steps ({record['hooked_modules']} modules)")
    return ""


def _psnr_text(value: Any) -> str:
    return "inf (identical)" if value == "inf" or (isinstance(value, float) and math.isinf(value)) else f"{value:.1f}"


def x_key(records: list[dict[str, Any]], x: str) -> str:
    """The speed-up plotted: ``cpu_speedup`` when asked for and every run has it, else ``measured_speedup``."""
    runnable = [r for r in records if "unavailable" not in r]
    return "cpu_speedup" if x == "cpu" and runnable and all("cpu_speedup" in r for r in runnable) else \
        "measured_speedup"


def _spec_of(meta: dict[str, Any]) -> ModelSpec:
    return MODELS[meta.get("model_name", "digits")]


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (JSON records) with its header (device, date, settings)."""
    spec = _spec_of(meta)
    cpu = any("cpu_speedup" in r for r in records)
    references = " / ".join(spec.sampler_text(s, n) for s, n in meta.get("reference_steps", {}).items()) or "?"
    floor = meta.get("fd_real_same_n")
    lines = [
        f"# Quality against speed on the {spec.title} ({meta['date']})",
        "",
        f"Device: {meta['device']}. {meta['samples']} samples (10 per class"
        + (f", {meta['samples_per_call']} per pipeline call" if meta.get("samples_per_call") else ", one call")
        + f"), seed {meta['seed']}, guidance {describe_guidance(meta['guidance'], meta.get('guidance_interval'))}"
        + f", **{meta['repeats']} repeat(s)**{meta['repeats_note']}. First sweep: "
        f"{_minutes(meta['wall_minutes'])}. Versions: {meta['versions']}. Model files: {meta.get('model', '?')}"
        + (f" ({meta['model_note']})" if meta.get("model_note") else "") + "."
        + ("" if meta.get("complete", True) else " **Incomplete: the sweep has not finished (or was interrupted; "
           "`--resume` runs the missing rows).**")
        + (f" Merged from the sweeps of {', '.join(str(m) for m in meta['merged_from'])}, each part's rows timed "
           "in its own process (the first part's sweeps, then the others')." if meta.get("merged_from") else "")
        + _later_sweeps(meta, repeats=meta.get("repeats", 1))
        + "".join(f" Rows measured in a second process running side by side, first on {u['date']} "
                  f"({_minutes(u['wall_minutes'])}, their own uncached reference in that process): "
                  f"{', '.join(_first_sweep_methods(u)) or 'none'}.{_later_sweeps(u, meta.get('repeats', 1))}"
                  for u in meta.get("parallel", [])),
        "",
        f"FLOPs speed-up: tokencache's plan against the uncached run of the same sampler ({references}); "
        "peers report none (what they skipped is in the notes). Measured speed-up (wall): uncached seconds / "
        "method seconds, the two runs made back to back (`tokencache.demo.compare`)."
        + (" CPU-time speed-up: the same ratio for the process CPU time of the same two runs "
           "(1 thread), which other processes on the machine disturb less than the wall clock but still move (on 2 "
           "cores, a third busy process slowed a reference run's CPU time by up to ~20 %: a row that computes every "
           "step, such as a peer that skipped none, then reads above 1x); the plot uses it; with more than one "
           "round, the median and (in brackets) the range over rounds." if cpu else "")
        + f" PSNR/SSIM: against the uncached run of the same sampler and seed. FD: Frechet distance to "
        f"{spec.real_data} in the shipped classifier's feature space (lower is better"
        + (f"; {meta['samples']} real training images score {floor:.2f}, the floor at this sample size"
           if isinstance(floor, (int, float)) else "") + "). How each peer is applied: `benchmarks/peers.py`.",
        "",
        "| method | family | sampler | FLOPs speed-up | measured speed-up (wall) |"
        + (" CPU-time speed-up |" if cpu else "") + " PSNR vs full (dB) | SSIM | FD | accuracy | notes |",
        "|---|---|---|---|---|" + ("---|" if cpu else "") + "---|---|---|---|---|",
    ]
    for r in records:
        sampler = spec.sampler_text(r["sampler"], r["steps"])
        if "unavailable" in r:
            lines.append(f"| {r['method']} | {r['family']} | {sampler} |" + " |" * (7 if cpu else 6)
                         + f" {notes(r)} |")
            continue
        cells = [r["method"], r["family"], sampler, _fmt(r["flops_speedup"], ".2f", "x"),
                 f"{r['measured_speedup']:.2f}x"]
        if cpu:
            spread = r.get("cpu_speedup_range") if r.get("repeats", 1) > 1 else None
            cells.append(_fmt(r.get("cpu_speedup"), ".2f", "x")
                         + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""))
        cells += [_psnr_text(r["psnr"]), f"{r['ssim']:.3f}", f"{r['fd']:.2f}", f"{r['accuracy']:.1%}", notes(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _family_front(rows: list[dict[str, Any]], key: str, value: str, sign: int) -> list[dict[str, Any]]:
    """The rows no faster row of the same family beats on ``value`` (``sign`` 1: higher is better), by speed."""
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: r[key], reverse=True):
        if sign * r[value] > best:
            front.append(r)
            best = sign * r[value]
    return front[::-1]


def plot(records: list[dict[str, Any]], meta: dict[str, Any], path: Path, x: str = "cpu") -> None:
    """PSNR (left) and FD (right) against speed-up (JSON records), one curve per family and sampler: a colour and
    marker per family, solid for the main sampler and dashed with open markers for the others (DDPM); each curve
    joins its family's best rows, the others are drawn as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = _spec_of(meta)
    key = x_key(records, x)
    shown = [r for r in records if "unavailable" not in r]
    families = list(dict.fromkeys(r["family"] for r in shown))
    colors = [*plt.get_cmap("tab10").colors, (0.0, 0.0, 0.0), (0.55, 0.55, 0.95), (0.6, 0.3, 0.0),
              (0.2, 0.6, 0.5), (0.9, 0.6, 0.0), (0.5, 0.0, 0.5)]
    markers = "o*sD^v<>pPXhH"
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in shown:
        curves.setdefault((r["family"], r["sampler"]), []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2))
    for (family, sampler), rows in curves.items():
        rows = sorted(rows, key=lambda r: r[key])
        i = families.index(family)
        extra = sampler != spec.main_sampler and sampler != "ddim"
        style = dict(color=colors[i % len(colors)], marker=markers[i % len(markers)], linestyle="--" if extra else "-",
                     markerfacecolor="white" if extra else colors[i % len(colors)], linewidth=1.4,
                     markersize=11 if family == "no cache" else 6,
                     label=f"{family} ({SAMPLER_LABELS.get(sampler, sampler.upper())})")
        finite = [r for r in rows if _psnr_text(r["psnr"]) != "inf (identical)"]
        for ax, points, value, sign in ((left, finite, "psnr", 1), (right, rows, "fd", -1)):
            # the line joins the family's best rows (none of its rows is faster and better); the rest are markers
            front = _family_front(points, key, value, sign)
            ax.plot([r[key] for r in front], [r[value] for r in front], **style)
            rest = [r for r in points if r not in front]
            ax.plot([r[key] for r in rest], [r[value] for r in rest], linestyle="none",
                    **{k: v for k, v in style.items() if k not in ("linestyle", "label", "linewidth")})
    label = ("measured speed-up vs uncached (CPU time, same sampler)" if key == "cpu_speedup"
             else "measured speed-up vs uncached (wall clock, same sampler)")
    left.set_xlabel(label)
    left.set_ylabel("PSNR vs uncached run (dB, higher is better)")
    left.set_title("fidelity to the uncached run (no cache: identical, not drawn)", fontsize=9)
    right.set_xlabel(label)
    right.set_ylabel(("FD to held-out digits" if spec.name == "digits" else "FD to the real test set")
                     + " (lower is better)")
    right.set_title("distribution quality (no cache: large marker)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Quality against speed, {spec.title}, {meta['samples']} samples, {meta['repeats']} "
                 f"repeat(s), {meta['device']}, {meta['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.80, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _minutes(value: float) -> str:
    # sweeps interrupted before the store kept their wall time recorded 0
    return f"{value:.0f} min" if value else "wall time not recorded"


def _later_sweeps(meta: dict[str, Any], repeats: int) -> str:
    """The header's sentences for a stem's (or a merged part's) resumed and ``--update`` sweeps."""
    return ("".join(f" Rows measured by a resumed run on {u['date']} ({_minutes(u['wall_minutes'])}, their own "
                    f"uncached reference in that process): {', '.join(u['methods'])}."
                    for u in meta.get("resumed", []))
            + "".join(f" Rows re-run with `--update` on {u['date']} ({_minutes(u['wall_minutes'])}, "
                      f"{u.get('repeats', repeats)} repeat(s), their own uncached reference in that process): "
                      f"{', '.join(u['methods'])}." for u in meta.get("updates", [])))


def _first_sweep_methods(part: dict[str, Any]) -> list[str]:
    """A merged part's rows that its first sweep measured (not a later resumed or updated one)."""
    later = {m for key in ("resumed", "updates") for u in part.get(key, []) for m in u["methods"]}
    return [m for m in part["methods"] if m not in later]


def write(records: list[dict[str, Any]], meta: dict[str, Any], stem: str, x: str, figure: bool = True) -> str:
    """``<stem>.json``, ``.md`` and (with ``figure``) ``.png`` in benchmarks/results; returns the table."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(dict(meta=meta, records=records), indent=2, default=str))
    partial.replace(path)  # never a half-written JSON, even when the sweep is killed while writing
    table = markdown(records, meta)
    (RESULTS / f"{stem}.md").write_text(table)
    if figure:
        plot(records, meta, RESULTS / f"{stem}.png", x)
    return table


# --------------------------------------------------------------------------------------------------- the sweep


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return record["method"], record["sampler"]


class Store:
    """The records of a stem, rewritten to disk (JSON and table) after every row a sweep completes: an
    interrupted sweep keeps what it measured. New records replace saved ones with the same method and sampler.

    ``run`` is the meta entry of the sweep in progress (the meta itself for a first sweep, an entry of its
    ``resumed`` or ``updates`` list otherwise): every row updates its ``wall_minutes`` and, where it lists
    ``methods``, adds the row, so an interrupted sweep still says how long it ran and what it measured."""

    def __init__(self, stem: str, records: list[dict[str, Any]], meta: dict[str, Any], x: str,
                 run: dict[str, Any] | None = None) -> None:
        self.stem, self.records, self.meta, self.x = stem, records, meta, x
        self.run = meta if run is None else run
        self.started = time.perf_counter()

    def put(self, record: dict[str, Any]) -> None:
        (clean,) = to_json([record])
        for i, old in enumerate(self.records):
            if _key(old) == _key(clean):
                self.records[i] = clean
                break
        else:
            self.records.append(clean)
        self.run["wall_minutes"] = (time.perf_counter() - self.started) / 60
        if "methods" in self.run and "unavailable" not in clean and clean["method"] not in self.run["methods"]:
            self.run["methods"].append(clean["method"])
        write(self.records, self.meta, self.stem, self.x, figure=False)


def _settings(args: argparse.Namespace, samples: int, fingerprint: str) -> dict[str, Any]:
    """What a saved result must share with a run that resumes it."""
    return dict(model_name=args.model, samples=samples, seed=args.seed, guidance=args.guidance,
                guidance_interval=args.guidance_interval, repeats=args.repeats, threads=args.threads, model=fingerprint,
                samples_per_call=args.samples_per_call)


def build_methods(args: argparse.Namespace, spec: ModelSpec, pipe: Any) -> tuple[list[Method], dict[int, Peer]]:
    """Every row of the sweep (the --only selection), with the peers they came from."""
    extra = not (args.quick or args.no_ddpm)
    methods = tokencache_methods(args.quick, extra, spec)
    for i, m in enumerate(methods):
        if m.config is not None and (reason := config_reason(pipe, m.config, m.sampler, m.steps)):
            methods[i] = Method(m.name, m.family, m.sampler, m.steps, unavailable=reason, extra=m.extra)
    pairs: list[tuple[Method, Peer]] = []
    if not args.no_peers:
        samplers = tuple(spec.reference_steps) if args.ddpm_peers and extra else (spec.main_sampler,)
        pairs = peer_methods(pipe, all_peers(args.quick), samplers, spec)
    # main-sampler rows first, then the others (compare makes each sampler's reference once).
    order = {s: i for i, s in enumerate(spec.reference_steps)}
    methods = sorted(methods + [m for m, _ in pairs], key=lambda m: order[m.sampler])
    if args.only:
        methods = [m for m in methods if re.search(args.only, m.name)]
    peer_of = {id(m): p for m, p in pairs}
    return methods, {i: peer_of[id(m)] for i, m in enumerate(methods) if id(m) in peer_of}


def sweep(args: argparse.Namespace, samples: int, store: Store | None = None
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build the methods, run them through :func:`compare`; returns the JSON records and the meta data. With a
    ``store``, each record goes to it as soon as it is measured, and rows the store already holds are skipped
    when ``args.resume`` is set."""
    spec = MODELS[args.model]
    fingerprint = model_fingerprint(spec)
    pipe, classifier = spec.load()
    pipe.set_progress_bar_config(disable=True)
    methods, peer_of = build_methods(args, spec, pipe)
    if store is not None and getattr(args, "resume", False):
        done = {_key(r) for r in store.records if "unavailable" not in r}
        keep = [i for i, m in enumerate(methods) if (m.name, m.sampler) not in done]
        peer_of = {keep.index(i): p for i, p in peer_of.items() if i in keep}
        methods = [methods[i] for i in keep]
    run_meta = _meta(args, samples, spec, fingerprint, wall=0.0)

    def on_record(i: int, record: dict[str, Any]) -> None:
        peer = peer_of.get(i)
        if peer is not None and "unavailable" not in record:
            record.update(peer.stats)
            if peer.leftovers:
                record["left_behind_by_peer_removal"] = sorted(set(peer.leftovers))
        if store is not None:
            store.put(record)

    labels = list(range(10)) * (samples // 10)
    start = time.perf_counter()
    records = compare(pipe, classifier, methods, labels, seed=args.seed, guidance=args.guidance,
                      repeats=args.repeats, reference_steps=spec.reference_steps, fd_to_real=spec.fd(classifier),
                      on_record=on_record, samples_per_call=args.samples_per_call)
    run_meta["wall_minutes"] = (time.perf_counter() - start) / 60
    if model_fingerprint(spec) != fingerprint:
        run_meta["model_note"] = ("the shipped model's files changed during the sweep; every row used the model "
                                  f"loaded at the start ({fingerprint})")
    return to_json(records), run_meta


def _meta(args: argparse.Namespace, samples: int, spec: ModelSpec, fingerprint: str, wall: float) -> dict[str, Any]:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "diffusers", "cache-dit"))
    repeats_note = (" (one round: the uncached run, then each method once)" if args.repeats == 1 else
                    " (median over interleaved rounds: the uncached run, then each method once)")
    meta = dict(date=datetime.date.today().isoformat(), samples=samples, seed=args.seed, guidance=args.guidance,
                guidance_interval=args.guidance_interval, repeats=args.repeats, repeats_note=repeats_note,
                quick=args.quick, versions=versions,
                device=f"CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s)", wall_minutes=wall,
                reference_steps=spec.reference_steps, args=vars(args), model=fingerprint, model_name=spec.name,
                threads=args.threads, samples_per_call=args.samples_per_call)
    floor = _fd_floor(spec, samples)
    if floor is not None:
        meta["fd_real_same_n"] = floor
    return meta


def _fd_floor(spec: ModelSpec, samples: int) -> float | None:
    """FD of ``samples`` real images to the real reference where the model's files record it (fashion)."""
    try:
        info = json.loads((spec.assets() / "classifier.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    value = (info.get("fd_real_same_n") or {}).get(str(samples))
    return float(value) if isinstance(value, (int, float)) else None


def merge(args: argparse.Namespace, spec: ModelSpec, samples: int, parts: list[dict[str, Any]],
          parser: argparse.ArgumentParser) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One result from sweeps of the same settings that ran side by side on disjoint rows (each timed its rows
    against its own uncached run, as a resumed sweep does): rows in the sweep's order, the first part's meta with
    the others' rows listed as measured in another process."""
    want = _settings(args, samples, parts[0]["meta"]["model"])
    seen: set[tuple[str, str]] = set()
    for part in parts:
        have = {k: part["meta"].get(k) for k in want}
        if have != want:
            parser.error(f"--merge: the parts were made with other settings: {have} vs {want}")
        keys = {_key(r) for r in part["records"] if "unavailable" not in r}
        if keys & seen:
            parser.error(f"--merge: rows measured twice: {sorted(k[0] for k in keys & seen)}")
        seen |= keys
    pipe, _ = spec.load()
    pipe.set_progress_bar_config(disable=True)
    order = [dict(method=m.name, sampler=m.sampler) for m in build_methods(args, spec, pipe)[0]]
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:  # a row one part measured wins over another part's "unavailable" record of it
        for r in part["records"]:
            if _key(r) not in records or "unavailable" in records[_key(r)]:
                records[_key(r)] = r
    meta = dict(parts[0]["meta"])
    meta["complete"] = all(p["meta"].get("complete", False) for p in parts)
    meta["merged_from"] = list(args.merge)
    meta["parallel"] = [  # each other part's own sweeps: its first, then its resumed and updated ones
        dict(date=p["meta"]["date"], wall_minutes=p["meta"]["wall_minutes"],
             methods=[r["method"] for r in p["records"] if "unavailable" not in r],
             **{k: p["meta"][k] for k in ("resumed", "updates") if p["meta"].get(k)}) for p in parts[1:]]
    return _order(list(records.values()), order), meta


def _order(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` in the order of ``reference`` (rows it lacks keep their place at the end)."""
    rank = {_key(r): i for i, r in enumerate(reference)}
    return sorted(records, key=lambda r: rank.get(_key(r), len(rank)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="digits",
                        help="the shipped model: digits (DiT, DDIM/DDPM) or fashion (PixArt-style, flow Euler)")
    parser.add_argument("--quick", action="store_true", help="few methods, 20 samples, main sampler only, repeats 1")
    parser.add_argument("--samples", type=int, default=None,
                        help="multiple of 10 (default 100 digits, 200 fashion; quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 2; 1 with --quick)")
    parser.add_argument("--no-ddpm", action="store_true", help="digits: DDIM rows only")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--ddpm-peers", action="store_true", help="digits: also run the peers with DDPM-250")
    parser.add_argument("--only", default=None, help="keep only methods whose name matches this regex")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples-per-call", type=int, default=None,
                        help="samples per pipeline call (default: the model's; digits all at once, fashion 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's shipped guidance")
    parser.add_argument("--x", choices=("cpu", "wall"), default="cpu",
                        help="speed-up on the plot's x axis: CPU time (default) or wall clock")
    parser.add_argument("--replot", action="store_true", help="rewrite .md and .png from the stem's .json")
    parser.add_argument("--update", action="store_true",
                        help="re-run the rows selected by --only and replace them in the stem's .json")
    parser.add_argument("--resume", action="store_true",
                        help="run only the rows the stem's .json does not hold yet (same settings)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="STEM",
                        help="join the rows of sweeps run in parallel (each with --out STEM and its own --only) "
                             "into the model's stem (or --out); they must share their settings")
    parser.add_argument("--out", default=None, help="result file stem in benchmarks/results (must start with "
                                                    "'frontier')")
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    if args.ddpm_peers and len(spec.reference_steps) < 2:
        parser.error(f"--ddpm-peers: the {args.model} model has one sampler")
    if args.update and args.resume:
        parser.error("--update and --resume do not go together")
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.guidance = spec.guidance() if args.guidance is None else args.guidance
    args.guidance_interval = spec.guidance_interval()
    if args.samples_per_call is None:
        args.samples_per_call = spec.samples_per_call
    if args.samples_per_call is not None and args.samples_per_call < 1:
        parser.error(f"--samples-per-call must be >= 1; got {args.samples_per_call}")
    torch.set_num_threads(args.threads)
    samples = args.samples or (20 if args.quick else 200 if args.model == "fashion" else 100)
    if samples < 10 or samples % 10:
        parser.error(f"--samples must be a positive multiple of 10; got {samples}")
    stem = args.out or (spec.stem + ("-quick" if args.quick else ""))
    if not stem.startswith("frontier"):
        parser.error("--out must start with 'frontier'")
    saved_path = RESULTS / f"{stem}.json"
    if args.replot:
        saved = json.loads(saved_path.read_text())
        records, meta = saved["records"], saved["meta"]
        table = write(records, meta, stem, args.x)
        print(table)
        print(f"wrote {RESULTS / stem}.json, .md, .png")
        return
    if args.merge:
        records, meta = merge(args, spec, samples,
                              [json.loads((RESULTS / f"{m}.json").read_text()) for m in args.merge], parser)
        table = write(records, meta, stem, args.x)
        print(table)
        print(f"wrote {RESULTS / stem}.json, .md, .png from {', '.join(args.merge)}")
        return
    if args.update:
        if not args.only:
            parser.error("--update needs --only REGEX (the rows to re-run)")
        saved = json.loads(saved_path.read_text())
        if saved["meta"].get("model_name", "digits") != args.model:
            parser.error(f"{saved_path} holds the {saved['meta'].get('model_name', 'digits')} model's results")
        run = dict(date=datetime.date.today().isoformat(), wall_minutes=0.0, repeats=args.repeats, methods=[])
        saved["meta"].setdefault("updates", []).append(run)
        store = Store(stem, saved["records"], saved["meta"], args.x, run)
        fresh, fresh_meta = sweep(args, samples, store)
        run.update(wall_minutes=fresh_meta["wall_minutes"],
                   methods=[r["method"] for r in fresh if re.search(args.only, r["method"])])
        records, meta = store.records, store.meta
    elif args.resume and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        fingerprint = model_fingerprint(spec)
        want = _settings(args, samples, fingerprint)
        old = saved["meta"]
        have = {k: old.get(k, old.get("args", {}).get(k, "digits" if k == "model_name" else None)) for k in want}
        if have != want:
            differ = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            parser.error(f"--resume: {saved_path} was made with other settings (saved, now): {differ}")
        run = dict(date=datetime.date.today().isoformat(), wall_minutes=0.0, methods=[])
        saved["meta"].setdefault("resumed", []).append(run)
        store = Store(stem, saved["records"], saved["meta"], args.x, run)
        fresh, fresh_meta = sweep(args, samples, store)
        if fresh:
            run.update(wall_minutes=fresh_meta["wall_minutes"],
                       methods=[r["method"] for r in fresh if "unavailable" not in r])
        else:
            store.meta["resumed"].remove(run)
        store.meta["complete"] = True
        records, meta = store.records, store.meta
    else:
        fingerprint = model_fingerprint(spec)
        meta = _meta(args, samples, spec, fingerprint, wall=0.0)
        meta["complete"] = False
        store = Store(stem, [], meta, args.x)
        fresh, fresh_meta = sweep(args, samples, store)
        meta.update({k: v for k, v in fresh_meta.items() if k in ("wall_minutes", "model_note")})
        meta["complete"] = True
        records = _order(store.records, fresh)
    table = write(records, meta, stem, args.x)
    print(table)
    print(f"wrote {RESULTS / stem}.json, .md, .png in {meta['wall_minutes']:.1f} min")


if __name__ == "__main__":
    main()
