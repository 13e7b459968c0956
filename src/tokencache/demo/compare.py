"""Side-by-side comparison of caching methods on the shipped digits model (``tokencache demo`` and
``benchmarks/frontier.py``): the same seeds and classes for every method, fidelity against the uncached run
of the same sampler, distribution quality against held-out real digits, and cost (FLOPs, and process CPU time
and wall-clock interleaved with the uncached run: median and range over rounds, see :mod:`tokencache.core.timing`)."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ..core.handle import apply
from ..core.timing import TOLERANCE, Clocks, Timing, speedup_spread, timed, timing_problems
from ..metrics import class_accuracy, frechet_distance, psnr, ssim
from .data import load_digits_split
from .pipeline import DEFAULT_GUIDANCE

# A peer cache is applied by a function returning its remover (diffusers hooks, cache-dit, ...).
Attach = Callable[[Any], Callable[[], None]]


@dataclass
class Method:
    """One row of the comparison."""

    name: str
    family: str
    """Curve of the trade-off plot: ``no cache``, ``ToCa``, ``FORA``, ``TokenCache``, ``fewer steps``, a peer."""
    sampler: str = "ddim"
    """``ddim``, ``ddpm`` or ``flow`` (flow-matching Euler): the reference is the uncached run of this sampler
    at ``reference_steps``."""
    steps: int = 50
    config: Any | None = None
    """A tokencache config, applied with ``tc.apply``."""
    attach: Attach | None = None
    """Or a peer's own way to attach a cache."""
    unavailable: str | None = None
    """Why the method cannot run on this model (recorded instead of dropping the row)."""
    extra: dict[str, Any] = field(default_factory=dict)


def scheduler_for(pipe: Any, sampler: str) -> Any:
    base = pipe.scheduler.config
    if sampler == "ddim":
        return DDIMScheduler.from_config(base)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(base)
    if sampler == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    raise ValueError(f"sampler must be 'ddim', 'ddpm' or 'flow'; got {sampler!r}")


def _sample(pipe: Any, labels: list[int], steps: int, seed: int, guidance: float, clocks: Clocks | None = None,
            samples_per_call: int | None = None, handle: Any = None) -> tuple[torch.Tensor, Timing, list[Any]]:
    """Sample ``labels`` in pipeline calls of ``samples_per_call`` (all at once if None) from one generator; the
    images, the timing of all calls, and the cache's statistics of each call (``handle``: empty without)."""
    generator = torch.Generator().manual_seed(seed)
    per_call = samples_per_call or len(labels)
    stats: list[Any] = []

    def run() -> torch.Tensor:
        images = []
        with torch.no_grad():
            for start in range(0, len(labels), per_call):
                images.append(pipe(class_labels=labels[start:start + per_call], num_inference_steps=steps,
                                   guidance_scale=guidance, generator=generator).images)
                if handle is not None:
                    stats.append(handle.stats())
        return torch.cat(images)

    images, timing = timed(run, clocks)
    return images, timing, stats


def _combined(stats: list[Any]) -> Any:
    """One run's statistics from those of its calls: FLOPs add up, the cache's memory is the largest call's."""
    if not stats:
        return None
    first = stats[0]
    return replace(first, flops=sum(s.flops for s in stats), flops_full=sum(s.flops_full for s in stats),
                   forecast_flops=sum(s.forecast_flops for s in stats),
                   cache_bytes=max(s.cache_bytes for s in stats), score_bytes=max(s.score_bytes for s in stats))


@contextlib.contextmanager
def _attached(pipe: Any, method: Method):
    handle = remover = None
    if method.config is not None:
        handle = apply(pipe, method.config)
    elif method.attach is not None:
        remover = method.attach(pipe)
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
        if remover is not None:
            remover()


def compare(pipe: Any, classifier: Any, methods: Sequence[Method], labels: list[int], seed: int = 0,
            guidance: float = DEFAULT_GUIDANCE, repeats: int = 3, reference_steps: dict[str, int] | None = None,
            progress: bool = True, clocks: Clocks | None = None,
            tolerance: float = TOLERANCE,
            fd_to_real: Callable[[torch.Tensor], float] | None = None,
            on_record: Callable[[int, dict[str, Any]], None] | None = None,
            samples_per_call: int | None = None) -> list[dict[str, Any]]:
    """Run every method on the same classes and seed; returns one record per method, in ``methods`` order.

    Timing is interleaved in rounds, per sampler: the uncached reference run, then one run of each method; a
    method's speed-up is the median over rounds of (reference seconds / its seconds) within the round, for the
    process CPU time (``cpu_speedup``, with its range over rounds: load barely moves it, see
    :mod:`tokencache.core.timing`) and the wall clock (``measured_speedup``). Quality compares each method's images
    (the same in every round) with the reference's. A no-cache row is timed like any other, so its speed-up
    (about 1) shows the timing noise of the machine. ``timing_warnings`` lists why a row's CPU-time speed-up
    should not be believed (rounds disagreeing by more than ``tolerance``, an uncached row off 1x).
    ``fd_to_real(images)`` gives a record's FD (default: against the held-out digits). ``on_record(i, record)``
    is called as soon as the record of ``methods[i]`` is complete (unavailable rows first, then each method right
    after its run of the last round), so that a caller can save what was measured before a long sweep ends.
    ``samples_per_call`` splits every run into pipeline calls of that many samples (one generator across them,
    so the reference and each method see the same noise): a batch of hundreds is far from how people sample and
    makes a cached step's copies memory-bound; None samples all ``labels`` in one call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if samples_per_call is not None and (isinstance(samples_per_call, bool) or not isinstance(samples_per_call, int)
                                         or samples_per_call < 1):
        raise ValueError(f"samples_per_call must be an integer >= 1 or None; got {samples_per_call!r}")
    reference_steps = reference_steps or {"ddim": 50, "ddpm": 250}
    if fd_to_real is None:
        real, _ = load_digits_split("heldout")

        def fd_to_real(images: torch.Tensor) -> float:
            return frechet_distance(images, real, classifier)
    pipe.set_progress_bar_config(disable=True)
    original_scheduler = pipe.scheduler
    records: list[dict[str, Any] | None] = [None] * len(methods)
    groups: dict[str, list[int]] = {}
    for i, method in enumerate(methods):
        if method.unavailable:
            records[i] = dict(method=method.name, family=method.family, sampler=method.sampler, steps=method.steps,
                              **method.extra, unavailable=method.unavailable)
            if on_record is not None:
                on_record(i, records[i])
        else:
            groups.setdefault(method.sampler, []).append(i)
    n_calls = math.ceil(len(labels) / (samples_per_call or len(labels)))  # pipeline calls per run
    bar = tqdm(total=repeats * sum(1 + len(g) for g in groups.values()), desc="sampling runs", disable=not progress)
    # warm-up, so that no timed run pays for first-call costs
    _sample(pipe, labels[:samples_per_call], 2, seed, guidance, clocks)
    try:
        for sampler, group in groups.items():
            pipe.scheduler = scheduler_for(pipe, sampler)
            ref_steps = reference_steps[sampler]
            ref_timings: list[Timing] = []
            timings: dict[int, list[Timing]] = {i: [] for i in group}
            ref_flops = uncached_flops(pipe, ref_steps, labels, guidance)
            for round_ in range(repeats):
                bar.set_postfix_str(f"no cache ({sampler.upper()}-{ref_steps})")
                ref_images, timing, _ = _sample(pipe, labels, ref_steps, seed, guidance, clocks, samples_per_call)
                ref_timings.append(timing)
                bar.update()
                for i in group:
                    method = methods[i]
                    bar.set_postfix_str(method.name)
                    with _attached(pipe, method) as handle:
                        images, timing, calls = _sample(pipe, labels, method.steps, seed, guidance, clocks,
                                                        samples_per_call, handle)
                        stats = _combined(calls)
                    timings[i].append(timing)
                    bar.update()
                    if round_ == repeats - 1:  # its last run: the record is complete
                        records[i] = _record(pipe, classifier, method, images, stats, ref_images, ref_steps,
                                             ref_flops, list(zip(ref_timings, timings[i], strict=True)), labels,
                                             guidance, repeats, tolerance, fd_to_real, n_calls)
                        if on_record is not None:
                            on_record(i, records[i])
    finally:
        pipe.scheduler = original_scheduler
        bar.close()
    return [r for r in records if r is not None]


def _record(pipe: Any, classifier: Any, method: Method, images: torch.Tensor, stats: Any, ref_images: torch.Tensor,
            ref_steps: int, ref_flops: int, pairs: list[tuple[Timing, Timing]], labels: list[int], guidance: float,
            repeats: int, tolerance: float, fd_to_real: Callable[[torch.Tensor], float],
            calls: int = 1) -> dict[str, Any]:
    """One method's record: FLOPs, speed-ups over the (reference, method) timing pairs of every round, quality;
    ``calls``: pipeline calls per run (a peer's step counts add up over them)."""
    record: dict[str, Any] = dict(method=method.name, family=method.family, sampler=method.sampler,
                                  steps=method.steps, **method.extra)
    if stats is not None:
        flops = stats.flops
        if method.steps == ref_steps and stats.flops_full != ref_flops:
            # the speed-up divides the planned uncached run by this run's count: both must price the same model
            raise RuntimeError(f"{method.name}: the run's uncached FLOPs ({stats.flops_full}) differ from the planned "
                               f"uncached run's ({ref_flops}); the plan does not see the shapes this pipeline runs")
        record.update(full_steps=stats.full_steps, partial_steps=stats.partial_steps,
                      reuse_steps=stats.reuse_steps, forecast_steps=stats.forecast_steps,
                      cache_mib=stats.cache_bytes / 2**20)
    else:
        flops = uncached_flops(pipe, method.steps, labels, guidance)
    cpu = speedup_spread(pairs, "cpu", tolerance)
    wall = speedup_spread(pairs, "wall", tolerance)
    uncached = method.config is None and method.attach is None and method.steps == ref_steps
    record.update(
        flops_speedup=ref_flops / flops if method.attach is None else None,
        measured_speedup=wall.median,
        measured_speedup_range=[wall.low, wall.high],
        seconds=statistics.median(own.wall for _, own in pairs),
        cpu_speedup=cpu.median,
        cpu_speedup_range=[cpu.low, cpu.high],
        cpu_speedup_spread=cpu.relative,
        cpu_seconds=statistics.median(own.cpu for _, own in pairs),
        timing_warnings=timing_problems(method.name, cpu, uncached),
        repeats=repeats,
        calls=calls,
        psnr=psnr(images, ref_images),
        ssim=ssim(images, ref_images),
        fd=fd_to_real(images),
        accuracy=class_accuracy(images, labels, classifier),
        images=images,
    )
    return record


def uncached_flops(pipe: Any, steps: int, labels: list[int], guidance: float) -> int:
    """FLOPs of an uncached run (the plan of a schedule with a full step every step). A pipeline whose
    transformer reads a context of its own length says so in ``context_tokens`` (the plan's default is the model
    family's usual caption length)."""
    from ..core.plan import plan
    from ..methods.fora import FORAConfig

    batch = len(labels) * (2 if guidance > 1 else 1)
    return plan(FORAConfig(interval=1), pipe.transformer, steps, batch_size=batch,
                context_tokens=getattr(pipe, "context_tokens", None)).flops


def to_json(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without images; infinite PSNR (identical to the reference) is written as the string "inf"."""
    out = []
    for r in records:
        clean = {k: v for k, v in r.items() if k != "images"}
        if isinstance(clean.get("psnr"), float) and math.isinf(clean["psnr"]):
            clean["psnr"] = "inf"
        out.append(clean)
    return out


def speedup_text(record: dict[str, Any]) -> str:
    """The CPU-time speed-up with its range over rounds (``2.38x (2.30-2.45)``), ``!`` when not to be believed;
    the wall-clock one for records made before CPU time was recorded."""
    if "cpu_speedup" not in record:
        return f"{record['measured_speedup']:.2f}x"
    low, high = record.get("cpu_speedup_range") or [record["cpu_speedup"]] * 2
    text = f"{record['cpu_speedup']:.2f}x" + (f" ({low:.2f}-{high:.2f})" if record.get("repeats", 1) > 1 else "")
    return text + (" !" if record.get("timing_warnings") else "")


def timing_warnings(records: list[dict[str, Any]]) -> list[str]:
    return [w for r in records for w in r.get("timing_warnings", [])]


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("| method | sampler | FLOPs speed-up | measured speed-up (CPU time, range over rounds) | "
              "PSNR vs full (dB) | SSIM | FD | accuracy |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in records:
        if "unavailable" in r:
            lines.append(f"| {r['method']} | {r['sampler']} | n/a: {r['unavailable']} | | | | | |")
            continue
        flops = "-" if r["flops_speedup"] is None else f"{r['flops_speedup']:.2f}x"
        value = r["psnr"]
        psnr_text = "inf (identical)" if math.isinf(value) else f"{value:.1f}"
        lines.append(f"| {r['method']} | {r['sampler']}-{r['steps']} | {flops} | {speedup_text(r)} | "
                     f"{psnr_text} | {r['ssim']:.3f} | {r['fd']:.2f} | {r['accuracy']:.1%} |")
    return "\n".join(lines)


def write_outputs(records: list[dict[str, Any]], out: Path, meta: dict[str, Any], columns: int = 10) -> None:
    """``results.json``, ``samples.png`` (one row per method, same seeds) and ``tradeoff.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, records=to_json(records)), indent=2))

    shown = [r for r in records if "images" in r]
    fig, axes = plt.subplots(len(shown), 1, figsize=(columns * 0.8, len(shown) * 0.95), squeeze=False)
    for ax, r in zip(axes[:, 0], shown, strict=True):
        images = ((r["images"][:columns].clamp(-1, 1) + 1) / 2)[:, 0]
        strip = torch.cat(list(images), dim=1).numpy()
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(r["method"], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in shown:
        families.setdefault(f"{r['family']} ({r['sampler']})", []).append(r)
    for name, rows in families.items():
        rows = sorted(rows, key=lambda r: r[_speedup_key(r)])
        xs = [r[_speedup_key(r)] for r in rows]
        finite = [r["psnr"] if not math.isinf(r["psnr"]) else None for r in rows]
        left.plot(xs, [60.0 if v is None else v for v in finite], "o-", label=name)
        right.plot(xs, [r["fd"] for r in rows], "o-", label=name)
        for r in rows:
            right.annotate(r["method"], (r[_speedup_key(r)], r["fd"]), fontsize=6, alpha=0.7)
    left.set_xlabel("measured speed-up vs uncached (CPU time, same sampler)")
    left.set_ylabel("PSNR vs uncached (dB; identical plotted at 60)")
    right.set_xlabel("measured speed-up vs uncached (CPU time, same sampler)")
    right.set_ylabel("FD to held-out digits (lower is better)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.suptitle(meta.get("title", "quality against speed"), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=110)
    plt.close(fig)


def _speedup_key(record: dict[str, Any]) -> str:
    return "cpu_speedup" if "cpu_speedup" in record else "measured_speedup"


def real_data_floor(classifier: Any, labels: list[int], seed: int = 0) -> float:
    """FD between real training digits with the same classes as ``labels`` and the held-out digits: what
    a perfect model scores at this sample size (FD is biased upwards for small sets)."""
    images, classes = load_digits_split("train")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(set(labels)):
        pool = (classes == label).nonzero().flatten()
        chosen += pool[torch.randperm(len(pool), generator=generator)[: labels.count(label)]].tolist()
    real, _ = load_digits_split("heldout")
    return frechet_distance(images[chosen], real, classifier)
