"""Speed at real sizes: FLOPs speed-up (from the plan) against measured wall-clock speed-up.

Models with the published shapes and random weights (timing needs no checkpoint): DiT-XL/2 256 (DDIM-50)
and PixArt-alpha 256 / 512 (DPM-Solver 20 steps), all with a CFG batch of 2. For each method the uncached
run and the cached run are made in the same process, interleaved, and the speed-up is the median over
repeats of (uncached seconds / cached seconds) of the same repeat.

``tc.apply`` also routes few-row linears (per-step adaLN modulation, timestep embedders) through
``W @ xᵀ`` on the CPU by default (tokencache.small_linear). So that the table separates that from the cache,
one more row times the uncached model with only that route, and the last column gives each method's
measured / FLOPs ratio against that row instead of the stock uncached run. ``--no-small-batch-linear``
times the caches without the route (and drops the row).

    python benchmarks/speed.py                        # the full run behind the committed table
    python benchmarks/speed.py --models dit-xl-2 --steps 10 --blocks 4 --repeats 1   # a short version

Writes benchmarks/results/speed-<device>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from machine import cpu_name
from tqdm import tqdm

import tokencache as tc
from tokencache.shapes import MODEL_SHAPES, build_transformer

RESULTS = Path(__file__).parent / "results"

SETTINGS = {
    "dit-xl-2": dict(scheduler=DDIMScheduler, steps=50, methods={
        "ToCa dit-ddim50 (attention)": tc.ToCaConfig.preset("dit-ddim50"),
        "ToCa dit-ddim50 (random)": tc.ToCaConfig.preset("dit-ddim50", score="random"),
        "FORA N=3": tc.FORAConfig(interval=3),
    }),
    "pixart-alpha-256": dict(scheduler=DPMSolverMultistepScheduler, steps=20, methods={
        "ToCa pixart-dpm20 (entropy)": tc.ToCaConfig.preset("pixart-dpm20"),
        "ToCa pixart-dpm20 (random)": tc.ToCaConfig.preset("pixart-dpm20", score="random"),
        "FORA N=3": tc.FORAConfig(interval=3),
    }),
}
SETTINGS["pixart-alpha-512"] = SETTINGS["pixart-alpha-256"]
TEXT_TOKENS = 120
# TokenCache is timed with the shipped model's calibrated schedule, budget and ranking, on an uncalibrated
# predictor of the timed model's shape: what it costs does not depend on the predictor's weights.
TOKENCACHE_DEFAULTS = dict(budget=0.8, schedule=dict(early_cached_steps=3, late_cached_steps=2, boundary=0.5),
                           token_selection="predictor")


def tokencache_config(transformer: torch.nn.Module, steps: int) -> tuple[str, tc.TokenCacheConfig]:
    from tokencache.demo.runner import shipped_predictor
    from tokencache.layouts import find_blocks

    shipped = shipped_predictor()
    calibration = {k: shipped.calibration[k] for k in TOKENCACHE_DEFAULTS} if shipped else dict(TOKENCACHE_DEFAULTS)
    num_blocks = len(find_blocks(transformer))
    patch = transformer.config.patch_size
    tokens = (transformer.config.sample_size // patch) ** 2
    predictor = tc.TokenCachePredictor(num_blocks, tokens, steps, "features",
                                       model=dict(class_name=type(transformer).__name__),
                                       calibration=dict(calibration, block_sensitivity=[1.0] * num_blocks))
    s = calibration["schedule"]
    name = (f"TokenCache TPRR({s['early_cached_steps']},{s['late_cached_steps']},{s['boundary']}) "
            f"budget {calibration['budget']:.2f} ({calibration['token_selection']})")
    return name, tc.TokenCacheConfig(predictor)


class CudaPeakMemory:
    """Peak CUDA memory allocated above the level at entry (the model's weights are already there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> CudaPeakMemory:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base


SMALL_LINEAR_ROW = "no cache, small-batch linear"


def attach(transformer: torch.nn.Module, config, args: argparse.Namespace):
    """Apply one timed method: None (stock model), the small-batch linear route alone, or a cache."""
    if config is None:
        return None
    if isinstance(config, tc.SmallBatchLinearConfig):
        return tc.apply_small_batch_linear(transformer, config)
    if getattr(args, "no_small_batch_linear", False):
        return tc.apply(transformer, config, small_batch_linear=None)
    return tc.apply(transformer, config)  # tc.apply's default route


def probe_steps(config, transformer: torch.nn.Module, steps: int) -> int:
    """How many steps reach a method's peak memory: through its second full step, when the cache is already
    full and a full step's activations (and score maps) come on top. Partial steps compute fewer tokens."""
    if config is None or isinstance(config, tc.SmallBatchLinearConfig):
        return min(steps, 2)
    kinds = tc.plan(config, transformer, steps, batch_size=2, context_tokens=TEXT_TOKENS).step_kinds
    full = [i for i, kind in enumerate(kinds) if kind == "full"]
    return full[1] + 1 if len(full) > 1 else steps


def cpu_peak_rss_mib(model_name: str, method: str, args: argparse.Namespace) -> float:
    """CPU peak memory of ``method``: the peak resident size, weights included, of a fresh process that builds
    the model and runs the method through :func:`probe_steps` (the peak is reset after the model is built).
    The timing process cannot measure it: its allocator keeps memory freed by earlier runs."""
    command = [sys.executable, __file__, "--rss-probe", method, "--models", model_name, "--dtype", args.dtype]
    for flag in ("steps", "blocks", "threads"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    if getattr(args, "no_small_batch_linear", False):
        command.append("--no-small-batch-linear")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {model_name} / {method} failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def rss_probe(method: str, args: argparse.Namespace) -> None:
    """The probe process: prints the peak resident MiB of running ``method`` (Linux: VmHWM, reset through
    /proc/self/clear_refs once the model is built, so building the full-depth model before cutting it to
    ``--blocks`` does not count)."""
    model_name = args.models
    steps = args.steps or SETTINGS[model_name]["steps"]
    transformer, scheduler, inputs, methods = setup(model_name, args, torch.device("cpu"), getattr(torch, args.dtype))
    config = methods[method]
    handle = attach(transformer, config, args)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    sample(transformer, scheduler, steps, inputs, handle, stop_after=probe_steps(config, transformer, steps))
    peak_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))
    print(peak_kib / 1024)


def make_inputs(model_name: str, transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    size = transformer.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=g).to(device, dtype)
    if model_name.startswith("dit"):
        return dict(latents=latents, cond=dict(class_labels=torch.tensor([207, 1000], device=device)))
    caption = transformer.config.caption_channels
    text = torch.randn(2, TEXT_TOKENS, caption, generator=g).to(device, dtype)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long, device=device)
    extra = {"resolution": None, "aspect_ratio": None}
    if transformer.config.use_additional_conditions:
        extra = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device=device, dtype=dtype),
                 "aspect_ratio": torch.tensor([[1.0]] * 2, device=device, dtype=dtype)}
    return dict(latents=latents, cond=dict(encoder_hidden_states=text, encoder_attention_mask=mask,
                                           added_cond_kwargs=extra))


def sample(transformer, scheduler, steps: int, inputs: dict, handle=None,
           step_seconds: list[float] | None = None, stop_after: int | None = None) -> float:
    """One CFG sampling run (guidance 4.0); returns its wall-clock seconds. With ``step_seconds``, also
    appends the seconds of each transformer call (synchronising the device after each); with
    ``stop_after``, only the first steps of the run are made."""
    device = inputs["latents"].device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    scheduler.set_timesteps(steps, device=device)
    x = inputs["latents"].clone()
    run = handle.sampling(num_steps=steps) if isinstance(handle, tc.CacheHandle) else contextlib.nullcontext()
    sync()
    start = time.perf_counter()
    with torch.no_grad(), run:
        for t in scheduler.timesteps[:stop_after]:
            call_start = time.perf_counter()
            out = transformer(torch.cat([x, x]), timestep=t.expand(2), **inputs["cond"]).sample
            if step_seconds is not None:
                sync()
                step_seconds.append(time.perf_counter() - call_start)
            cond, uncond = out[:, :4].chunk(2)
            x = scheduler.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    sync()
    return time.perf_counter() - start


def setup(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The model (cut to ``--blocks``), its scheduler, inputs and the methods timed on it."""
    setting = SETTINGS[model_name]
    steps = args.steps or setting["steps"]
    transformer = build_transformer(model_name, device=device, dtype=dtype)
    if args.blocks:
        transformer.transformer_blocks = transformer.transformer_blocks[: args.blocks]
    inputs = make_inputs(model_name, transformer, device, dtype)
    tokencache_name, tokencache = tokencache_config(transformer, steps)
    methods = {"no cache": None}
    if not getattr(args, "no_small_batch_linear", False):
        methods[SMALL_LINEAR_ROW] = tc.SmallBatchLinearConfig()
    methods.update({**setting["methods"], tokencache_name: tokencache})
    return transformer, setting["scheduler"](), inputs, methods


def peak_memory(model_name: str, methods: dict, args: argparse.Namespace, device: torch.device,
                cuda_peaks: dict[str, list[int]]) -> dict[str, float]:
    """Peak memory per method, MiB: on CUDA the median allocator peak of the timed runs (above the weights);
    on the CPU the peak RSS of a fresh probe process (weights included)."""
    if device.type == "cuda":
        return {name: statistics.median(cuda_peaks[name]) / 2**20 for name in methods}
    return {name: cpu_peak_rss_mib(model_name, name, args) for name in tqdm(methods, desc="memory", leave=False)}


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    transformer, scheduler, inputs, methods = setup(model_name, args, device, dtype)
    steps = args.steps or SETTINGS[model_name]["steps"]
    sample(transformer, scheduler, min(steps, 3), inputs)  # warm-up (allocator, kernels)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    cuda_peaks: dict[str, list[int]] = {m: [] for m in methods}
    extra: dict[str, dict] = {}
    progress = tqdm(total=args.repeats * len(methods), desc=model_name, leave=False)
    for _ in range(args.repeats):
        for name, config in methods.items():
            handle = attach(transformer, config, args)
            cache = handle if isinstance(handle, tc.CacheHandle) else None
            if cache is not None and device.type == "cpu":
                handle.timing(True)  # perf_counter around the engine's sections; no device sync on the CPU
            with CudaPeakMemory(device) if device.type == "cuda" else contextlib.nullcontext() as peak:
                seconds[name].append(sample(transformer, scheduler, steps, inputs, handle))
            if peak is not None:
                cuda_peaks[name].append(peak.peak_bytes)
            if cache is not None:
                extra[name] = dict(stats=cache.stats())
            if handle is not None:
                handle.remove()
            progress.update()
    progress.close()

    if device.type == "cuda":  # the overhead split needs device syncs: one extra run per method
        for name, config in methods.items():
            if config is None or isinstance(config, tc.SmallBatchLinearConfig):
                continue
            handle = attach(transformer, config, args)
            handle.timing(True)
            sample(transformer, scheduler, steps, inputs, handle)
            extra[name]["timed"] = handle.stats()
            handle.remove()

    peaks = peak_memory(model_name, methods, args, device, cuda_peaks)
    rows = []
    for name, config in methods.items():
        ratios = [a / b for a, b in zip(seconds["no cache"], seconds[name], strict=True)]
        row = dict(model=model_name, method=name, steps=steps, blocks=len(transformer.transformer_blocks),
                   seconds_median=statistics.median(seconds[name]), seconds=seconds[name],
                   measured_speedup=statistics.median(ratios), peak_memory_mib=peaks[name])
        if SMALL_LINEAR_ROW in seconds:
            ratios = [a / b for a, b in zip(seconds[SMALL_LINEAR_ROW], seconds[name], strict=True)]
            row["measured_speedup_vs_small_linear"] = statistics.median(ratios)
        if config is None or isinstance(config, tc.SmallBatchLinearConfig):
            row.update(flops_speedup=1.0, overhead_ratio=row["measured_speedup"], cache_memory_mib=0.0)
        else:
            stats = extra[name]["stats"]
            plan = tc.plan(config, transformer, steps, batch_size=2, context_tokens=TEXT_TOKENS)
            assert plan.flops == stats.flops, "the run's FLOPs must equal the plan's"
            timed = extra[name].get("timed", stats).seconds
            engine = timed.get("select", 0.0) + timed.get("gather", 0.0) + timed.get("scatter", 0.0)
            if "measured_speedup_vs_small_linear" in row:
                row["overhead_ratio_vs_small_linear"] = row["measured_speedup_vs_small_linear"] / plan.speedup
            row.update(flops_speedup=plan.speedup, overhead_ratio=row["measured_speedup"] / plan.speedup,
                       cache_memory_mib=stats.cache_bytes / 2**20,
                       engine_share_of_cached_steps=engine / timed["cached_steps"] if timed.get("cached_steps")
                       else 0.0,
                       engine_seconds={k: timed.get(k, 0.0) for k in ("select", "gather", "scatter")})
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    both = any("overhead_ratio_vs_small_linear" in r for r in rows)
    lines = [header, "",
             "| model | method | FLOPs speed-up | measured speed-up | measured / FLOPs | median s | "
             "select+gather+scatter share of cached steps | peak mem MiB | cache MiB |"
             + (" measured / FLOPs against the small-batch linear row |" if both else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if both else "")]
    for r in rows:
        share = r.get("engine_share_of_cached_steps")
        fair = r.get("overhead_ratio_vs_small_linear")
        last = (" - |" if fair is None else f" {fair:.2f} |") if both else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                     f"{r['overhead_ratio']:.2f} | {r['seconds_median']:.1f} | "
                     f"{'-' if share is None else f'{share:.1%}'} | {r['peak_memory_mib']:.0f} | "
                     f"{r['cache_memory_mib']:.1f} |{last}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dit-xl-2,pixart-alpha-256,pixart-alpha-512",
                        help=f"comma-separated, from {sorted(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=None, help="override the sampling steps (short version)")
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (short version)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="result file stem (default results/speed-<device>-<dtype>)")
    parser.add_argument("--no-small-batch-linear", action="store_true",
                        help="time the caches with tc.apply(..., small_batch_linear=None) and drop the route's row")
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure only the peak-memory column of the existing result file --out")
    parser.add_argument("--rss-probe", default=None, metavar="METHOD", help=argparse.SUPPRESS)  # cpu_peak_rss_mib
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = args.models.split(",")
    for m in models:
        if m not in SETTINGS or m not in MODEL_SHAPES:
            parser.error(f"--models: {m!r} is not one of {sorted(SETTINGS)}")
    if args.rss_probe:
        rss_probe(args.rss_probe, args)
        return
    stem = RESULTS / (args.out or f"speed-{device.type}-{args.dtype}")
    if args.memory_only:
        remeasure_memory(stem, parser)
        return

    rows = []
    for model_name in models:
        rows.extend(bench_model(model_name, args, device, dtype))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    when = datetime.date.today().isoformat()
    header = (f"Device: {name} ({args.device}, {torch.get_num_threads()} threads), {args.dtype}, "
              f"{args.repeats} repeats, {when}" + (" — SHORT VERSION" if args.steps or args.blocks else ""))
    write(stem, dict(device=name, dtype=args.dtype, date=when, args=vars(args), rows=rows), header, device)


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "Peak mem: the CUDA allocator's peak during a run, above the model's weights."
    return ("Peak mem: peak resident size of a fresh process that builds the model and runs the method through its "
            "second full step, weights included (the timing process cannot show it: its allocator keeps freed memory).")


def write(stem: Path, result: dict, header: str, device: torch.device) -> None:
    result["header"] = header
    table = markdown(result["rows"], f"{header}\n\n{memory_note(device)}")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))


def remeasure_memory(stem: Path, parser: argparse.ArgumentParser) -> None:
    """Fill the peak-memory column of a finished CPU result file with :func:`cpu_peak_rss_mib`, run with the
    file's own options (model, steps, blocks, threads, dtype)."""
    path = stem.with_suffix(".json")
    if not path.exists():
        parser.error(f"--memory-only: no result file {path}")
    result = json.loads(path.read_text())
    # files from before the small-batch linear route existed were timed without it
    saved = argparse.Namespace(**{"no_small_batch_linear": True, **result["args"]})
    if saved.device != "cpu":
        parser.error(f"--memory-only re-measures CPU results; {path} is from {saved.device}")
    for row in tqdm(result["rows"], desc="memory"):
        saved.models = row["model"]
        row["peak_memory_mib"] = cpu_peak_rss_mib(row["model"], row["method"], saved)
    header = result.get("header") or (  # files written before the header was stored
        f"Device: {result['device']} (cpu, {saved.threads} threads), {result['dtype']}, {saved.repeats} repeats, "
        f"{result['date']}" + (" — SHORT VERSION" if saved.steps or saved.blocks else ""))
    write(stem, result, header, torch.device("cpu"))


if __name__ == "__main__":
    main()
