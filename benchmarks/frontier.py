"""Quality against speed on the shipped digits DiT: tokencache's methods, fewer sampling steps and peer caches.

Every method runs on the same classes and seed (100 samples, 10 per class, the shipped model's guidance) through
:func:`tokencache.demo.compare.compare`: FLOPs speed-up (tokencache's plan; none for peers), measured speed-up
(interleaved with the uncached run of the same sampler), PSNR/SSIM against that uncached run, FD against
held-out real digits and class accuracy (the shipped classifier).

* DDIM (reference DDIM-50): ToCa with each score at N = 3, 4, 6 (``dit-ddim50`` preset;
  ``cross_attention_entropy`` is recorded as unavailable, DiT has no cross-attention), FORA N = 2, 3, 4, 6,
  TokenCache at budgets 0.3/0.5/0.7/0.9 when the package ships a calibrated predictor (an unavailable row
  otherwise; the rows appear by themselves once ``tokencache/assets/digits-dit/tokencache-predictor`` exists),
  fewer steps (DDIM 10, 15, 20, 25, 35), and the peers of ``benchmarks/peers.py`` (diffusers FirstBlockCache and
  TaylorSeer hooks, cache-dit DBCache with and without its TaylorSeer calibrator; how each is applied is
  written there).
* DDPM (reference DDPM-250): ToCa ``dit-ddpm250`` at N = 3, 4, 6, fewer steps (DDPM 50, 100, 150); peers too
  with ``--ddpm-peers``.

    python benchmarks/frontier.py            # the full sweep (about an hour on 1 CPU thread)
    python benchmarks/frontier.py --quick    # a short version: few methods, 20 samples, DDIM only, repeats 1

Options: ``--samples N`` (a multiple of 10), ``--repeats R`` (interleaved timing rounds, default 2: each round
is the uncached run then every method once, per sampler), ``--no-ddpm``, ``--no-peers``,
``--ddpm-peers``, ``--only REGEX`` (methods whose name matches), ``--threads`` (default 1), ``--seed``,
``--guidance``, ``--out STEM``, ``--x cpu|wall`` (the plot's speed-up axis), ``--update`` (re-run the
``--only`` rows and replace them in the saved results), ``--replot`` (rewrite the table and plot from the saved
JSON). Writes ``benchmarks/results/<stem>.json`` (all records), ``.md`` (the table, with
device and date) and ``.png`` (PSNR and FD against measured speed-up, one curve per family and sampler); the stem
is ``frontier`` (``frontier-quick`` with ``--quick``). The peers need the ``bench`` extra (``cache-dit``); without
it their rows are recorded as unavailable.

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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import tokencache as tc
from tokencache.demo import DEFAULT_GUIDANCE, assets_dir, load_classifier, load_model
from tokencache.demo.compare import Method, compare, scheduler_for, to_json
from tokencache.demo.runner import PREDICTOR_FOLDER, shipped_predictor

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402
from peers import Peer, all_peers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOCA_SCORES = ("attention", "value_norm", "similarity", "random", "cross_attention_entropy")
TOCA_INTERVALS = (3, 4, 6)
UNAVAILABLE_ON_DIT = ("cross_attention_entropy",)  # needs cross-attention; the row records tokencache's refusal
FORA_INTERVALS = (2, 3, 4, 6)
TOKENCACHE_BUDGETS = (0.3, 0.5, 0.7, 0.9)
DDIM_STEPS = (10, 15, 20, 25, 35)
DDPM_STEPS = (50, 100, 150)
REFERENCE_STEPS = {"ddim": 50, "ddpm": 250}


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


def tokencache_methods(quick: bool, ddpm: bool) -> list[Method]:
    """No cache, ToCa, FORA, TokenCache and fewer steps (DDIM, then DDPM)."""
    methods = [Method("no cache (DDIM-50)", "no cache")]
    scores = ("attention",) if quick else TOCA_SCORES
    for score in scores:
        for n in (4,) if quick else TOCA_INTERVALS:
            methods.append(Method(f"ToCa {score} N={n}", f"ToCa {score}", extra=dict(score=score, interval=n),
                                  config=tc.ToCaConfig.preset("dit-ddim50", full_step_interval=n, score=score)))
            if score in UNAVAILABLE_ON_DIT:  # one row says why, for every N
                methods[-1].name = f"ToCa {score} (any N)"
                break
    methods += [Method(f"FORA N={n}", "FORA", config=tc.FORAConfig(interval=n), extra=dict(interval=n))
                for n in ((3,) if quick else FORA_INTERVALS)]
    predictor = shipped_predictor()
    if predictor is None:
        methods.append(Method("TokenCache", "TokenCache", unavailable=f"no shipped predictor yet (tokencache/assets/"
                                                                      f"digits-dit/{PREDICTOR_FOLDER} is missing)"))
    else:
        for budget in (None,) if quick else TOKENCACHE_BUDGETS:
            label = "calibrated" if budget is None else budget
            methods.append(Method(f"TokenCache budget={label}", "TokenCache", extra=dict(budget=budget),
                                  config=tc.TokenCacheConfig(predictor, budget=budget)))
    methods += forecast_methods(quick)
    methods += [Method(f"DDIM-{s} (fewer steps)", "fewer steps", steps=s) for s in ((20,) if quick else DDIM_STEPS)]
    if ddpm:
        methods.append(Method("no cache (DDPM-250)", "no cache", sampler="ddpm", steps=250))
        methods += [Method(f"ToCa dit-ddpm250 N={n}", "ToCa attention", sampler="ddpm", steps=250,
                           config=tc.ToCaConfig.preset("dit-ddpm250", full_step_interval=n),
                           extra=dict(score="attention", interval=n)) for n in TOCA_INTERVALS]
        methods += [Method(f"DDPM-{s} (fewer steps)", "fewer steps", sampler="ddpm", steps=s) for s in DDPM_STEPS]
    return methods


def forecast_methods(quick: bool) -> list[Method]:
    """Forecasting between full steps (the ``forecast-n*`` presets, further intervals), and the variants it won
    against: TaylorSeer's expansion, order 1, and token-wise recomputation on top of the forecast (ToCa)."""
    forecast = tc.ForecastConfig
    rows = [(f"forecast N={n} (preset)", tc.FORAConfig.preset(f"forecast-n{n}"))
            for n in ((5,) if quick else (3, 4, 5, 6, 7))]
    if not quick:
        rows += [(f"forecast N={n} newton o{o}", tc.FORAConfig(interval=n, last_full_steps=1,
                                                               forecast=forecast(o, expansion="newton")))
                 for n, o in ((2, 3), (2, 2), (2, 1), (8, 2), (10, 2))]
        rows += [("forecast N=5 taylor o3", tc.FORAConfig(interval=5, last_full_steps=1, forecast=forecast(3))),
                 ("forecast N=5 newton o1", tc.FORAConfig(interval=5, last_full_steps=1, forecast=forecast(1))),
                 ("ToCa+forecast similarity N=6 r=0.05", tc.ToCaConfig(
                     full_step_interval=6, fresh_ratio=0.05, score="similarity", module_ratio={"mlp": 1.0},
                     full_step_placement="official", forecast=forecast(2, expansion="newton")))]
    return [Method(name, "forecast" if name.startswith("forecast") else "ToCa+forecast", config=config)
            for name, config in rows]


def peer_methods(pipe: Any, peers: list[Peer], samplers: tuple[str, ...]) -> list[tuple[Method, Peer]]:
    """One method per peer setting and sampler; a peer that cannot run on the model becomes an unavailable row."""
    out = []
    for peer in peers:
        reason = peer.check(pipe)
        for sampler in samplers:
            steps = REFERENCE_STEPS[sampler]
            name = peer.name if sampler == "ddim" else f"{peer.name} (DDPM-{steps})"
            method = Method(name, peer.family, sampler=sampler, steps=steps, extra=dict(peer.knob),
                            attach=None if reason else peer.attach, unavailable=reason)
            out.append((method, peer))
    return out


def model_fingerprint() -> str:
    """Short hash of the shipped model's files (weights, configs): which model a result belongs to."""
    digest = hashlib.sha256()
    folder = assets_dir()
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
        return f"full/partial/reuse steps {record['full_steps']}/{record['partial_steps']}/{record['reuse_steps']}"
    if "skipped_steps" in record:
        return f"computed {record['computed_steps']}, skipped {record['skipped_steps']} of {record['steps']} steps"
    if "predicted_steps" in record:
        return (f"computed {record['computed_steps']}, forecast {record['predicted_steps']} of {record['steps']} "
                f"steps ({record['hooked_modules']} modules)")
    return ""


def _psnr_text(value: Any) -> str:
    return "inf (identical)" if value == "inf" or (isinstance(value, float) and math.isinf(value)) else f"{value:.1f}"


def x_key(records: list[dict[str, Any]], x: str) -> str:
    """The speed-up plotted: ``cpu_speedup`` when asked for and every run has it, else ``measured_speedup``."""
    runnable = [r for r in records if "unavailable" not in r]
    return "cpu_speedup" if x == "cpu" and runnable and all("cpu_speedup" in r for r in runnable) else \
        "measured_speedup"


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (JSON records) with its header (device, date, settings)."""
    cpu = any("cpu_speedup" in r for r in records)
    lines = [
        f"# Quality against speed on the shipped digits DiT ({meta['date']})",
        "",
        f"Device: {meta['device']}. {meta['samples']} samples (10 per class), seed {meta['seed']}, guidance "
        f"{meta['guidance']}, **{meta['repeats']} repeat(s)**{meta['repeats_note']}. Sweep wall time "
        f"{meta['wall_minutes']:.0f} min. Versions: {meta['versions']}. Model files: {meta.get('model', '?')}"
        + (f" ({meta['model_note']})" if meta.get("model_note") else "") + "."
        + "".join(f" Rows re-run with `--update` on {u['date']} ({u['wall_minutes']:.0f} min, their own uncached "
                  f"reference in that process): {', '.join(u['methods'])}." for u in meta.get("updates", [])),
        "",
        "FLOPs speed-up: tokencache's plan against the uncached run of the same sampler (DDIM-50 / DDPM-250); "
        "peers report none (what they skipped is in the notes). Measured speed-up (wall): uncached seconds / "
        "method seconds, the two runs made back to back (`tokencache.demo.compare`)."
        + (" CPU-time speed-up: the same ratio for the process CPU time of the same two runs "
           "(1 thread), which other processes on the machine barely disturb; the plot uses it." if cpu else "")
        + " PSNR/SSIM: against the uncached run of the same sampler and seed. FD: Frechet distance to held-out "
        "real digits in the shipped classifier's feature space (lower is better). How each peer is applied: "
        "`benchmarks/peers.py`.",
        "",
        "| method | family | sampler | FLOPs speed-up | measured speed-up (wall) |"
        + (" CPU-time speed-up |" if cpu else "") + " PSNR vs full (dB) | SSIM | FD | accuracy | notes |",
        "|---|---|---|---|---|" + ("---|" if cpu else "") + "---|---|---|---|---|",
    ]
    for r in records:
        sampler = f"{r['sampler'].upper()}-{r['steps']}"
        if "unavailable" in r:
            lines.append(f"| {r['method']} | {r['family']} | {sampler} |" + " |" * (7 if cpu else 6)
                         + f" {notes(r)} |")
            continue
        cells = [r["method"], r["family"], sampler, _fmt(r["flops_speedup"], ".2f", "x"),
                 f"{r['measured_speedup']:.2f}x"]
        if cpu:
            cells.append(_fmt(r.get("cpu_speedup"), ".2f", "x"))
        cells += [_psnr_text(r["psnr"]), f"{r['ssim']:.3f}", f"{r['fd']:.2f}", f"{r['accuracy']:.1%}", notes(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], meta: dict[str, Any], path: Path, x: str = "cpu") -> None:
    """PSNR (left) and FD (right) against speed-up (JSON records), one curve per family and sampler: a colour and
    marker per family, solid for DDIM and dashed with open markers for DDPM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = x_key(records, x)
    shown = [r for r in records if "unavailable" not in r]
    families = list(dict.fromkeys(r["family"] for r in shown))
    colors = [*plt.get_cmap("tab10").colors, (0.0, 0.0, 0.0), (0.55, 0.55, 0.95), (0.6, 0.3, 0.0)]
    markers = "o*sD^v<>pPXh"
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in shown:
        curves.setdefault((r["family"], r["sampler"]), []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2))
    for (family, sampler), rows in curves.items():
        rows = sorted(rows, key=lambda r: r[key])
        i = families.index(family)
        ddpm = sampler == "ddpm"
        style = dict(color=colors[i % len(colors)], marker=markers[i % len(markers)], linestyle="--" if ddpm else "-",
                     markerfacecolor="white" if ddpm else colors[i % len(colors)], linewidth=1.4,
                     markersize=11 if family == "no cache" else 6, label=f"{family} ({sampler.upper()})")
        finite = [r for r in rows if _psnr_text(r["psnr"]) != "inf (identical)"]
        left.plot([r[key] for r in finite], [r["psnr"] for r in finite], **style)
        right.plot([r[key] for r in rows], [r["fd"] for r in rows], **style)
    label = ("measured speed-up vs uncached (CPU time, same sampler)" if key == "cpu_speedup"
             else "measured speed-up vs uncached (wall clock, same sampler)")
    left.set_xlabel(label)
    left.set_ylabel("PSNR vs uncached run (dB, higher is better)")
    left.set_title("fidelity to the uncached run (no cache: identical, not drawn)", fontsize=9)
    right.set_xlabel(label)
    right.set_ylabel("FD to held-out digits (lower is better)")
    right.set_title("distribution quality (no cache: large marker)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Quality against speed, shipped digits DiT, {meta['samples']} samples, {meta['repeats']} "
                 f"repeat(s), {meta['device']}, {meta['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.80, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(records: list[dict[str, Any]], meta: dict[str, Any], stem: str, x: str) -> str:
    """``<stem>.json``, ``.md`` and ``.png`` in benchmarks/results; returns the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=2, default=str))
    table = markdown(records, meta)
    (RESULTS / f"{stem}.md").write_text(table)
    plot(records, meta, RESULTS / f"{stem}.png", x)
    return table


def sweep(args: argparse.Namespace, samples: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build the methods, run them through :func:`compare`; returns the JSON records and the meta data."""
    ddpm = not (args.quick or args.no_ddpm)
    fingerprint = model_fingerprint()
    pipe, classifier = load_model(), load_classifier()
    pipe.set_progress_bar_config(disable=True)
    methods = tokencache_methods(args.quick, ddpm)
    for i, m in enumerate(methods):
        if m.config is not None and (reason := config_reason(pipe, m.config, m.sampler, m.steps)):
            methods[i] = Method(m.name, m.family, m.sampler, m.steps, unavailable=reason, extra=m.extra)
    pairs: list[tuple[Method, Peer]] = []
    if not args.no_peers:
        samplers = ("ddim", "ddpm") if args.ddpm_peers and ddpm else ("ddim",)
        pairs = peer_methods(pipe, all_peers(args.quick), samplers)
    # DDIM rows first, then DDPM (compare makes each sampler's reference once).
    order = {"ddim": 0, "ddpm": 1}
    methods = sorted(methods + [m for m, _ in pairs], key=lambda m: order[m.sampler])
    if args.only:
        methods = [m for m in methods if re.search(args.only, m.name)]
    peer_of = {id(m): p for m, p in pairs}

    labels = list(range(10)) * (samples // 10)
    start = time.perf_counter()
    records = compare(pipe, classifier, methods, labels, seed=args.seed, guidance=args.guidance,
                      repeats=args.repeats, reference_steps=REFERENCE_STEPS)
    wall = time.perf_counter() - start
    for method, record in zip(methods, records, strict=True):
        peer = peer_of.get(id(method))
        if peer is not None and "unavailable" not in record:
            record.update(peer.stats)
            if peer.leftovers:
                record["left_behind_by_peer_removal"] = sorted(set(peer.leftovers))

    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "diffusers", "cache-dit"))
    repeats_note = (" (one round: the uncached run, then each method once)" if args.repeats == 1 else
                    " (median over interleaved rounds: the uncached run, then each method once)")
    meta = dict(date=datetime.date.today().isoformat(), samples=samples, seed=args.seed, guidance=args.guidance,
                repeats=args.repeats, repeats_note=repeats_note, quick=args.quick, versions=versions,
                device=f"CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s)", wall_minutes=wall / 60,
                reference_steps=REFERENCE_STEPS, args=vars(args), model=fingerprint)
    if model_fingerprint() != fingerprint:
        meta["model_note"] = ("the shipped model's files changed during the sweep; every row used the model "
                              f"loaded at the start ({fingerprint})")
    return to_json(records), meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few methods, 20 samples, DDIM only, repeats 1")
    parser.add_argument("--samples", type=int, default=None, help="multiple of 10 (default 100, quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 2; 1 with --quick)")
    parser.add_argument("--no-ddpm", action="store_true", help="DDIM rows only")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--ddpm-peers", action="store_true", help="also run the peers with DDPM-250")
    parser.add_argument("--only", default=None, help="keep only methods whose name matches this regex")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--x", choices=("cpu", "wall"), default="cpu",
                        help="speed-up on the plot's x axis: CPU time (default) or wall clock")
    parser.add_argument("--replot", action="store_true", help="rewrite .md and .png from the stem's .json")
    parser.add_argument("--update", action="store_true",
                        help="re-run the rows selected by --only and replace them in the stem's .json")
    parser.add_argument("--out", default=None, help="result file stem in benchmarks/results (must start with "
                                                    "'frontier')")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    samples = args.samples or (20 if args.quick else 100)
    if samples < 10 or samples % 10:
        parser.error(f"--samples must be a positive multiple of 10; got {samples}")
    stem = args.out or ("frontier-quick" if args.quick else "frontier")
    if not stem.startswith("frontier"):
        parser.error("--out must start with 'frontier'")
    if args.replot:
        saved = json.loads((RESULTS / f"{stem}.json").read_text())
        records, meta = saved["records"], saved["meta"]
    elif args.update:
        if not args.only:
            parser.error("--update needs --only REGEX (the rows to re-run)")
        saved = json.loads((RESULTS / f"{stem}.json").read_text())
        records, meta = saved["records"], saved["meta"]
        fresh, fresh_meta = sweep(args, samples)
        fresh = [r for r in fresh if re.search(args.only, r["method"])]
        by_key = {(r["method"], r["sampler"]): r for r in fresh}
        records = [by_key.pop((r["method"], r["sampler"]), r) for r in records] + list(by_key.values())
        meta.setdefault("updates", []).append(dict(date=fresh_meta["date"], wall_minutes=fresh_meta["wall_minutes"],
                                                   methods=[r["method"] for r in fresh]))
    else:
        records, meta = sweep(args, samples)
    table = write(records, meta, stem, args.x)
    print(table)
    print(f"wrote {RESULTS / stem}.json, .md, .png" + ("" if args.replot else f" in {meta['wall_minutes']:.1f} min"))


if __name__ == "__main__":
    main()
