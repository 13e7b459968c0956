"""Where a cached step's time goes, against its FLOPs: the profile behind speed.py's measured / FLOPs column.

For one model (published shape, random weights) and its ToCa preset:

1. Per step kind (full, partial, reuse): wall-clock time as a share of an uncached step against the FLOPs
   share from the plan. The difference is work the FLOPs convention does not see.
2. A reuse step split by submodule, timed with forward hooks: the cached modules (a cache lookup on a
   reuse step), the block's embedders, its other linear layers (adaLN modulation: one row per sample, so
   their weights are read for almost no FLOPs), its LayerNorms, the rest of the block forward (modulation,
   gates, residual adds) and everything outside the blocks.
3. The weight-read floor: seconds to read, once, the weights a step touches whatever its token count (the
   cacheable modules' weights on a partial step, the modulation linears' on every step).

    python benchmarks/step_profile.py --model dit-xl-2 --threads 2          # the committed profile
    python benchmarks/step_profile.py --model dit-xl-2 --blocks 4 --steps 20 # a short version

Writes benchmarks/results/step-profile-<device>-<model>.json and .md and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from machine import cpu_name
from speed import SETTINGS, TEXT_TOKENS, make_inputs, sample
from torch import nn

import tokencache as tc
from tokencache.core.layouts import BlockEntry, find_blocks
from tokencache.core.shapes import build_transformer

RESULTS = Path(__file__).parent / "results"
CATEGORIES = ("cached modules", "embedders", "modulation linears", "LayerNorms", "rest of block forward",
              "outside the blocks")


def block_categories(block: BlockEntry) -> list[tuple[str, nn.Module]]:
    """The block's submodules that ``reuse_step_split`` times, each in one category (none nested in another)."""
    found = [("cached modules", module) for _, module in block.slots()]
    submodules = dict(block.module.named_modules())
    found += [("embedders", submodules[prefix]) for prefix in block.layout.embedder_prefixes if prefix in submodules]
    found += [("modulation linears" if isinstance(module, nn.Linear) else "LayerNorms", module)
              for _, module in block.overhead_modules()]
    return found


class SectionClock:
    """Forward pre/post hooks that add each module's wall-clock seconds to its category."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}
        self._handles: list = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def watch(self, module: nn.Module, category: str) -> None:
        def pre(mod, args):
            self._started[id(mod)] = self._now()

        def post(mod, args, output):
            self.seconds[category] += self._now() - self._started.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def reuse_step_split(transformer: nn.Module, blocks: list[BlockEntry], scheduler, inputs: dict, steps: int,
                     device: torch.device, route: tc.SmallBatchLinearConfig | None) -> dict[str, float]:
    """Seconds per category of one reuse step (median over the reuse steps of a FORA run that computes
    only its first step)."""
    handle = tc.apply(transformer, tc.FORAConfig(interval=steps), small_batch_linear=route)
    clock = SectionClock(device)
    for block in blocks:
        clock.watch(block.module, "blocks")
        for category, module in block_categories(block):
            clock.watch(module, category)
    per_step: list[dict[str, float]] = []
    step_seconds: list[float] = []

    def snapshot(*args) -> None:  # the category totals of one transformer call
        per_step.append(dict(clock.seconds))
        clock.seconds.clear()

    hook = transformer.register_forward_hook(snapshot)
    try:
        sample(transformer, scheduler, steps, inputs, handle, step_seconds)
    finally:
        hook.remove()
        clock.remove()
        handle.remove()
    splits = []
    for seconds, total in zip(per_step[1:], step_seconds[1:], strict=True):  # step 0 is the full step
        inner = sum(seconds.get(c, 0.0) for c in CATEGORIES[:4])
        split = {c: seconds.get(c, 0.0) for c in CATEGORIES[:4]}
        split["rest of block forward"] = seconds["blocks"] - inner
        split["outside the blocks"] = total - seconds["blocks"]
        splits.append(split)
    return {c: statistics.median(s[c] for s in splits) for c in CATEGORIES}


def weight_read_seconds(modules: list[nn.Module], device: torch.device, repeats: int = 5) -> tuple[float, int]:
    """Median seconds to read every parameter of ``modules`` once (a reduction over each), and the bytes."""
    params = [p for m in modules for p in m.parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for p in params:
            p.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), nbytes


def profile(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    setting = SETTINGS[args.model]
    steps = args.steps or setting["steps"]
    transformer = build_transformer(args.model, device=device, dtype=dtype)
    if args.blocks:
        transformer.transformer_blocks = transformer.transformer_blocks[: args.blocks]
    blocks = find_blocks(transformer)
    scheduler = setting["scheduler"]()
    inputs = make_inputs(args.model, transformer, device, dtype)
    method, config = next(iter(setting["methods"].items()))
    route = None if args.no_small_batch_linear else tc.SmallBatchLinearConfig()  # tc.apply's default
    plan = tc.plan(config, transformer, steps, batch_size=2, context_tokens=TEXT_TOKENS)
    sample(transformer, scheduler, min(steps, 3), inputs)  # warm-up

    uncached: list[list[float]] = []
    cached: list[list[float]] = []
    for _ in range(args.repeats):  # interleaved
        uncached.append([])
        sample(transformer, scheduler, steps, inputs, None, uncached[-1])
        handle = tc.apply(transformer, config, small_batch_linear=route)
        cached.append([])
        sample(transformer, scheduler, steps, inputs, handle, cached[-1])
        handle.remove()
    uncached_step = statistics.median(s for run in uncached for s in run)
    cached_steps = [statistics.median(run[i] for run in cached) for i in range(steps)]
    step_flops_full = plan.flops_full / steps

    kinds = []
    for kind in ("full", "partial", "reuse"):
        idx = [i for i, k in enumerate(plan.step_kinds) if k == kind]
        if not idx:
            continue
        time_share = statistics.mean(cached_steps[i] / uncached_step for i in idx)
        flops_share = statistics.mean(plan.step_flops[i] / step_flops_full for i in idx)
        kinds.append(dict(kind=kind, steps=len(idx), time_share=time_share, flops_share=flops_share,
                          excess=time_share - flops_share))
    uncached_run = statistics.median(sum(run) for run in uncached)
    cached_run = statistics.median(sum(run) for run in cached)

    split = reuse_step_split(transformer, blocks, scheduler, inputs, min(steps, args.split_steps), device, route)
    cacheable = [m for b in blocks for _, m in b.slots()]
    modulation = [m for b in blocks for c, m in block_categories(b) if c == "modulation linears"]
    floor_partial, bytes_partial = weight_read_seconds(cacheable + modulation, device)
    floor_modulation, bytes_modulation = weight_read_seconds(modulation, device) if modulation else (0.0, 0)
    # A reuse step's time outside the cached modules is work every step does, cached or not; without it:
    step_work = sum(v for c, v in split.items() if c != "cached modules") * steps
    return dict(
        model=args.model, method=method, steps=steps, blocks=len(blocks), small_batch_linear=route is not None,
        uncached_step_seconds=uncached_step, uncached_run_seconds=uncached_run, cached_run_seconds=cached_run,
        flops_speedup=plan.speedup, measured_speedup=uncached_run / cached_run,
        speedup_without_per_step_work=(uncached_run - step_work) / (cached_run - step_work), step_kinds=kinds,
        reuse_step_seconds=split,
        weight_read=dict(partial_step_bytes=bytes_partial, partial_step_seconds=floor_partial,
                         modulation_bytes=bytes_modulation, modulation_seconds=floor_modulation),
    )


def markdown(result: dict, header: str) -> str:
    full = result["uncached_step_seconds"]
    lines = [header, "",
             f"{result['model']}, {result['blocks']} blocks, {result['steps']} steps, {result['method']}: "
             f"FLOPs speed-up {result['flops_speedup']:.2f}x, measured {result['measured_speedup']:.2f}x "
             f"({result['measured_speedup'] / result['flops_speedup']:.2f} of FLOPs). "
             f"Uncached step: {full:.3f} s. Cached runs "
             + ("route few-row linears through W @ xᵀ (tc.apply's default); uncached runs are stock."
                if result.get("small_batch_linear") else "use stock linears (--no-small-batch-linear)."), "",
             "| step kind | steps | time / uncached step | FLOPs / uncached step | excess |",
             "|---|---|---|---|---|"]
    for k in result["step_kinds"]:
        lines.append(f"| {k['kind']} | {k['steps']} | {k['time_share']:.3f} | {k['flops_share']:.3f} | "
                     f"{k['excess']:+.3f} |")
    split = result["reuse_step_seconds"]
    total = sum(split.values())
    without = result["speedup_without_per_step_work"]
    lines += ["", f"A reuse step: {total:.3f} s = {total / full:.3f} of an uncached step. With its work outside the "
              f"cached modules taken out of every step of both runs, the measured speed-up would be {without:.2f}x "
              f"({without / result['flops_speedup']:.2f} of FLOPs).", "",
              "| part of a reuse step | seconds | share of the reuse step |", "|---|---|---|"]
    for c in CATEGORIES:
        lines.append(f"| {c} | {split[c]:.4f} | {split[c] / total:.1%} |")
    w = result["weight_read"]
    lines += ["", "| weights read once | MiB | seconds | share of an uncached step |", "|---|---|---|---|",
              f"| cacheable modules + modulation linears (a partial step) | {w['partial_step_bytes'] / 2**20:.0f} | "
              f"{w['partial_step_seconds']:.4f} | {w['partial_step_seconds'] / full:.3f} |",
              f"| modulation linears (every step) | {w['modulation_bytes'] / 2**20:.0f} | "
              f"{w['modulation_seconds']:.4f} | {w['modulation_seconds'] / full:.3f} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-xl-2", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="override the sampling steps (short version)")
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (short version)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved uncached/cached runs")
    parser.add_argument("--split-steps", type=int, default=8, help="steps of the run that splits a reuse step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-small-batch-linear", action="store_true",
                        help="cached runs with tc.apply(..., small_batch_linear=None): stock linears")
    parser.add_argument("--out", default=None,
                        help="result file stem (default results/step-profile-<device>-<dtype>-<model>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = profile(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    when = datetime.date.today().isoformat()
    header = (f"Device: {name} ({args.device}, {torch.get_num_threads()} threads), {args.dtype}, "
              f"{args.repeats} repeats, {when}" + (" — SHORT VERSION" if args.steps or args.blocks else ""))
    table = markdown(result, header)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (args.out or f"step-profile-{device.type}-{args.dtype}-{args.model}")
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(dict(device=name, dtype=args.dtype, date=when, args=vars(args),
                                                         result=result), indent=2))


if __name__ == "__main__":
    main()
