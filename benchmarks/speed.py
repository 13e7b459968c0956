"""Speed at real sizes: FLOPs speed-up (from the plan) against measured wall-clock speed-up.

Models with the published shapes and random weights (timing needs no checkpoint): DiT-XL/2 256 (DDIM-50)
and PixArt-alpha 256 / 512 (DPM-Solver 20 steps), all with a CFG batch of 2; FLUX.1-dev at 1024x1024 (4096
packed image tokens, 512 text tokens, guidance embedding, batch 1, flow-matching Euler, 50 steps) and Wan 2.1
T2V 1.3B at 480x832 (30x52 tokens per latent frame, ``--frames`` latent frames, 5 by default: 7,800 tokens
instead of the published 21 frames; 512 text tokens; CFG as two transformer calls per step, as WanPipeline;
UniPC, 50 steps). ``--blocks N`` keeps the first N blocks (FLUX: the first N dual-stream and the first N
single-stream blocks; FLUX and Wan are built with N blocks directly, a full FLUX.1-dev does not fit in CPU
memory). For each method the uncached run and the cached run are made in the same process, interleaved, and
the speed-up is the median over repeats of (uncached seconds / cached seconds) of the same repeat; the same
ratio of process CPU time (``time.process_time``) is recorded beside it (``cpu_speedup``), which a loaded
machine disturbs less, and each row keeps every repeat's ratios (the spread).

``tc.apply`` also routes few-row linears (per-step adaLN modulation, timestep embedders) through
``W @ xᵀ`` on the CPU by default (tokencache.core.small_linear). So that the table separates that from the cache,
one more row times the uncached model with only that route, and the last column gives each method's
measured / FLOPs ratio against that row instead of the stock uncached run. ``--no-small-batch-linear``
times the caches without the route (and drops the row).

    python benchmarks/speed.py                        # the full run behind the committed table
    python benchmarks/speed.py --models dit-xl-2 --steps 10 --blocks 4 --repeats 1   # a short version
    python benchmarks/speed.py --models flux-dev --blocks 1 --steps 10 --repeats 2 --threads 1 --no-memory

Writes benchmarks/results/speed-<device>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from machine import cpu_name
from tqdm import tqdm

import tokencache as tc
from tokencache.core.shapes import MODEL_SHAPES, build_transformer
from tokencache.models.flux import official_block_factors

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


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (resolution-dependent shift, as FluxPipeline sets it)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan 2.1's scheduler at 480p (flow shift 3.0)."""
    return UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)


SETTINGS.update({
    "flux-dev": dict(scheduler=flux_scheduler, steps=50, methods={
        "ToCa flux-dev-toca5 (random)": tc.ToCaConfig.preset("flux-dev-toca5"),
        "ToCa flux-dev-toca6 (random)": tc.ToCaConfig.preset("flux-dev-toca6"),
        "forecast flux-dev-forecast-n6": tc.FORAConfig.preset("flux-dev-forecast-n6"),
        "FORA N=5": tc.FORAConfig(interval=5, first_full_steps=3),
    }),
    "wan2.1-t2v-1.3b": dict(scheduler=wan_scheduler, steps=50, methods={
        "ToCa N=5 R=0.1 (random)": tc.ToCaConfig(fresh_ratio=0.1, module_ratio={"mlp": 1.0, "cross_attn": 1.0},
                                                 full_step_interval=5, first_full_steps=3, score="random"),
        "forecast N=6 newton o2": tc.FORAConfig(interval=6, first_full_steps=3, last_full_steps=1,
                                                forecast=tc.ForecastConfig(order=2, expansion="newton")),
    }),
})
TEXT_TOKENS = 120
FAMILY_TEXT_TOKENS = {"flux": 512, "wan": 512}  # FLUX.1-dev's T5 length; Wan pads umT5 captions to 512
FLUX_GUIDANCE, WAN_GUIDANCE, CFG_GUIDANCE = 3.5, 5.0, 4.0
WAN_FRAMES = 5  # latent frames timed by default (the published 81-frame video has 21)


def family(model_name: str) -> str:
    """dit, pixart, flux or wan."""
    return next((prefix for prefix in ("dit", "flux", "wan") if model_name.startswith(prefix)), "pixart")


def token_counts(model_name: str, transformer: torch.nn.Module, frames: int | None = None) -> dict[str, int]:
    """``tc.plan``'s batch and token arguments for one transformer call of this benchmark's runs."""
    kind = family(model_name)
    if kind == "flux":
        return dict(batch_size=1, num_tokens=4096, context_tokens=FAMILY_TEXT_TOKENS[kind])
    if kind == "wan":  # two calls (streams) of batch 1 per step
        return dict(batch_size=1, num_tokens=(frames or WAN_FRAMES) * 30 * 52, context_tokens=FAMILY_TEXT_TOKENS[kind])
    return dict(batch_size=2, context_tokens=TEXT_TOKENS)


def build(model_name: str, blocks: int | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The published shape cut to its first ``blocks`` blocks. FLUX and Wan are built with that many blocks
    (the same modules as the first ones of the full model; a full FLUX.1-dev, 48 GB in float32, does not fit in
    CPU memory); DiT and PixArt are built whole and cut, as in the committed runs."""
    kind = family(model_name)
    if kind in ("flux", "wan"):
        import diffusers

        class_name, kwargs = MODEL_SHAPES[model_name]
        if blocks:
            kwargs = {**kwargs, "num_layers": blocks, **({"num_single_layers": blocks} if kind == "flux" else {})}
        with torch.device(device):
            model = getattr(diffusers, class_name)(**kwargs).eval()
        return model if dtype == torch.float32 else model.to(dtype)
    transformer = build_transformer(model_name, device=device, dtype=dtype)
    if blocks:
        transformer.transformer_blocks = transformer.transformer_blocks[:blocks]
    return transformer


def fit_to_blocks(config, transformer: torch.nn.Module):
    """FLUX ToCa presets carry one depth factor per block of the full model: give a cut model the factors of
    the blocks it kept (each stream's own depth ramp, as :func:`official_block_factors`)."""
    singles = getattr(transformer, "single_transformer_blocks", None)
    if isinstance(getattr(config, "depth_ratio", None), tc.BlockFactors) and singles is not None:
        factors = official_block_factors(len(transformer.transformer_blocks), len(singles))
        return dataclasses.replace(config, depth_ratio=factors)
    return config


def num_blocks(transformer: torch.nn.Module) -> int:
    """Blocks tokencache caches (FLUX: dual-stream and single-stream blocks together)."""
    from tokencache.core.layouts import find_blocks

    return len(find_blocks(transformer))


# TokenCache is timed with the shipped model's calibrated schedule, budget and ranking, on an uncalibrated
# predictor of the timed model's shape: what it costs does not depend on the predictor's weights.
TOKENCACHE_DEFAULTS = dict(budget=0.8, schedule=dict(early_cached_steps=3, late_cached_steps=2, boundary=0.5),
                           token_selection="predictor")


def tokencache_config(transformer: torch.nn.Module, steps: int) -> tuple[str, tc.TokenCacheConfig]:
    from tokencache.core.layouts import find_blocks
    from tokencache.demo.runner import shipped_predictor

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


def probe_steps(config, transformer: torch.nn.Module, steps: int, counts: dict | None = None) -> int:
    """How many steps reach a method's peak memory: through its second full step, when the cache is already
    full and a full step's activations (and score maps) come on top. Partial steps compute fewer tokens.
    ``counts``: :func:`token_counts` (default: a CFG batch of 2, 120 text tokens)."""
    if config is None or isinstance(config, tc.SmallBatchLinearConfig):
        return min(steps, 2)
    kinds = tc.plan(config, transformer, steps, **(counts or token_counts("dit", transformer))).step_kinds
    full = [i for i, kind in enumerate(kinds) if kind == "full"]
    return full[1] + 1 if len(full) > 1 else steps


def cpu_peak_rss_mib(model_name: str, method: str, args: argparse.Namespace) -> float:
    """CPU peak memory of ``method``: the peak resident size, weights included, of a fresh process that builds
    the model and runs the method through :func:`probe_steps` (the peak is reset after the model is built).
    The timing process cannot measure it: its allocator keeps memory freed by earlier runs."""
    command = [sys.executable, __file__, "--rss-probe", method, "--models", model_name, "--dtype", args.dtype]
    for flag in ("steps", "blocks", "threads", "frames"):
        if getattr(args, flag, None):
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
    counts = token_counts(model_name, transformer, getattr(args, "frames", None))
    sample(transformer, scheduler, steps, inputs, handle, stop_after=probe_steps(config, transformer, steps, counts))
    peak_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))
    print(peak_kib / 1024)


def flux_inputs(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, height: int = 1024,
                width: int = 1024) -> dict:
    """What FluxPipeline passes the transformer for one 1024x1024 image: a 128x128x16 latent packed 2x2 into
    (1, 4096, 64), T5 embeddings (1, 512, 4096), the pooled CLIP embedding (1, 768), ``img_ids`` holding each
    packed token's (0, row, column), ``txt_ids`` all zero, and the guidance embedding's scale."""
    g = torch.Generator().manual_seed(0)
    rows, cols = height // 16, width // 16  # VAE factor 8, then 2x2 packing
    channels = transformer.config.in_channels  # 64 = 16 latent channels x 2 x 2
    text = FAMILY_TEXT_TOKENS["flux"]
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(cols)[None, :]
    cond = dict(encoder_hidden_states=torch.randn(1, text, transformer.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
                txt_ids=torch.zeros(text, 3), img_ids=img_ids.reshape(rows * cols, 3))
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    cond["guidance"] = torch.full([1], FLUX_GUIDANCE, device=device, dtype=torch.float32)
    latents = torch.randn(1, rows * cols, channels, generator=g).to(device, dtype)
    return dict(family="flux", latents=latents, cond=cond)


def wan_inputs(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, frames: int = WAN_FRAMES,
               height: int = 480, width: int = 832) -> dict:
    """What WanPipeline passes the transformer at 480x832: latents (1, 16, frames, 60, 104) (VAE factor 8 in
    space, 4 in time: ``frames`` latent frames are 4 * (frames - 1) + 1 video frames), and umT5 embeddings of
    the prompt and of the negative prompt, (1, 512, 4096) each."""
    g = torch.Generator().manual_seed(0)
    shape = (1, transformer.config.in_channels, frames, height // 8, width // 8)
    text = (1, FAMILY_TEXT_TOKENS["wan"], transformer.config.text_dim)
    return dict(family="wan", latents=torch.randn(*shape, generator=g).to(device, dtype),
                cond=torch.randn(*text, generator=g).to(device, dtype),
                uncond=torch.randn(*text, generator=g).to(device, dtype))


def make_inputs(model_name: str, transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                frames: int | None = None) -> dict:
    if family(model_name) == "flux":
        return flux_inputs(transformer, device, dtype)
    if family(model_name) == "wan":
        return wan_inputs(transformer, device, dtype, frames or WAN_FRAMES)
    g = torch.Generator().manual_seed(0)
    size = transformer.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=g).to(device, dtype)
    if model_name.startswith("dit"):
        return dict(family="dit", latents=latents, cond=dict(class_labels=torch.tensor([207, 1000], device=device)))
    caption = transformer.config.caption_channels
    text = torch.randn(2, TEXT_TOKENS, caption, generator=g).to(device, dtype)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long, device=device)
    extra = {"resolution": None, "aspect_ratio": None}
    if transformer.config.use_additional_conditions:
        extra = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device=device, dtype=dtype),
                 "aspect_ratio": torch.tensor([[1.0]] * 2, device=device, dtype=dtype)}
    return dict(family="pixart", latents=latents, cond=dict(encoder_hidden_states=text, encoder_attention_mask=mask,
                                                            added_cond_kwargs=extra))


def set_timesteps(scheduler, steps: int, inputs: dict, device: torch.device) -> None:
    if inputs.get("family") == "flux":  # as FluxPipeline: linear sigmas, shifted by the image sequence length
        tokens = inputs["latents"].shape[1]
        config = scheduler.config
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        scheduler.set_timesteps(steps, device=device, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    else:
        scheduler.set_timesteps(steps, device=device)


def sample(transformer, scheduler, steps: int, inputs: dict, handle=None,
           step_seconds: list[float] | None = None, stop_after: int | None = None,
           cpu_seconds: list[float] | None = None) -> float:
    """One guided sampling run; returns its wall-clock seconds. DiT and PixArt: one CFG batch of 2 per step
    (guidance 4.0); FLUX.1-dev: one call of batch 1 (guidance 3.5 as an embedding); Wan: two calls of batch 1
    per step, the prompt's then the negative prompt's (guidance 5.0). With ``step_seconds``, also appends the
    seconds of each transformer call (synchronising the device after each); with ``stop_after``, only the
    first steps of the run are made; with ``cpu_seconds``, appends the run's process CPU seconds."""
    device = inputs["latents"].device
    kind = inputs.get("family", "dit")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        call_start = time.perf_counter()
        out = transformer(x, timestep=t, return_dict=False, **kwargs)[0]
        if step_seconds is not None:
            sync()
            step_seconds.append(time.perf_counter() - call_start)
        return out

    set_timesteps(scheduler, steps, inputs, device)
    x = inputs["latents"].clone()
    run = handle.sampling(num_steps=steps) if isinstance(handle, tc.CacheHandle) else contextlib.nullcontext()
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad(), run:
        for t in scheduler.timesteps[:stop_after]:
            if kind == "flux":
                guided = call(x, (t.expand(1) / 1000).to(x.dtype), **inputs["cond"])
            elif kind == "wan":
                cond = call(x, t.expand(1), encoder_hidden_states=inputs["cond"])
                uncond = call(x, t.expand(1), encoder_hidden_states=inputs["uncond"])
                guided = uncond + WAN_GUIDANCE * (cond - uncond)
            else:
                cond, uncond = call(torch.cat([x, x]), t.expand(2), **inputs["cond"])[:, :4].chunk(2)
                guided = uncond + CFG_GUIDANCE * (cond - uncond)
            x = scheduler.step(guided, t, x, return_dict=False)[0]
    sync()
    if cpu_seconds is not None:
        cpu_seconds.append(time.process_time() - cpu_start)
    return time.perf_counter() - start


def setup(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The model (cut to ``--blocks``), its scheduler, inputs and the methods timed on it."""
    setting = SETTINGS[model_name]
    steps = args.steps or setting["steps"]
    transformer = build(model_name, args.blocks, device, dtype)
    inputs = make_inputs(model_name, transformer, device, dtype, getattr(args, "frames", None))
    methods = {"no cache": None}
    if not getattr(args, "no_small_batch_linear", False) and not getattr(args, "no_route_row", False):
        methods[SMALL_LINEAR_ROW] = tc.SmallBatchLinearConfig()
    methods.update({name: fit_to_blocks(config, transformer) for name, config in setting["methods"].items()})
    if family(model_name) in ("dit", "pixart"):  # TokenCache's predictor is timed on DiT and PixArt only
        tokencache_name, tokencache = tokencache_config(transformer, steps)
        methods[tokencache_name] = tokencache
    wanted = getattr(args, "method", None)
    if wanted and not getattr(args, "rss_probe", None):
        methods = {name: config for name, config in methods.items()
                   if name == "no cache" or any(w.lower() in name.lower() for w in wanted)}
    return transformer, setting["scheduler"](), inputs, methods


def peak_memory(model_name: str, methods: dict, args: argparse.Namespace, device: torch.device,
                cuda_peaks: dict[str, list[int]]) -> dict[str, float]:
    """Peak memory per method, MiB: on CUDA the median allocator peak of the timed runs (above the weights);
    on the CPU the peak RSS of a fresh probe process (weights included)."""
    if device.type == "cuda":
        return {name: statistics.median(cuda_peaks[name]) / 2**20 for name in methods}
    if getattr(args, "no_memory", False):
        return dict.fromkeys(methods)
    return {name: cpu_peak_rss_mib(model_name, name, args) for name in tqdm(methods, desc="memory", leave=False)}


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    transformer, scheduler, inputs, methods = setup(model_name, args, device, dtype)
    steps = args.steps or SETTINGS[model_name]["steps"]
    counts = token_counts(model_name, transformer, getattr(args, "frames", None))
    warmup = getattr(args, "warmup", None)
    sample(transformer, scheduler, min(steps, 3) if warmup is None else warmup, inputs)  # allocator, kernels
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
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
                seconds[name].append(sample(transformer, scheduler, steps, inputs, handle, cpu_seconds=cpu[name]))
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
        cpu_ratios = [a / b for a, b in zip(cpu["no cache"], cpu[name], strict=True)]
        row = dict(model=model_name, method=name, steps=steps, blocks=num_blocks(transformer), **counts,
                   seconds_median=statistics.median(seconds[name]), seconds=seconds[name],
                   cpu_seconds_median=statistics.median(cpu[name]), cpu_seconds=cpu[name],
                   measured_speedup=statistics.median(ratios), measured_speedups=ratios,
                   cpu_speedup=statistics.median(cpu_ratios), cpu_speedups=cpu_ratios, peak_memory_mib=peaks[name])
        if SMALL_LINEAR_ROW in seconds:
            ratios = [a / b for a, b in zip(seconds[SMALL_LINEAR_ROW], seconds[name], strict=True)]
            row["measured_speedup_vs_small_linear"] = statistics.median(ratios)
        if config is None or isinstance(config, tc.SmallBatchLinearConfig):
            row.update(flops_speedup=1.0, overhead_ratio=row["measured_speedup"], cpu_overhead_ratio=row["cpu_speedup"],
                       cache_memory_mib=0.0)
        else:
            stats = extra[name]["stats"]
            plan = tc.plan(config, transformer, steps, **counts)
            streams = 2 if family(model_name) == "wan" else 1  # Wan: the prompt's and the negative prompt's calls
            assert streams * plan.flops == stats.flops, "the run's FLOPs must equal the plan's"
            timed = extra[name].get("timed", stats).seconds
            engine = timed.get("select", 0.0) + timed.get("gather", 0.0) + timed.get("scatter", 0.0)
            if "measured_speedup_vs_small_linear" in row:
                row["overhead_ratio_vs_small_linear"] = row["measured_speedup_vs_small_linear"] / plan.speedup
            row.update(flops_speedup=plan.speedup, overhead_ratio=row["measured_speedup"] / plan.speedup,
                       cpu_overhead_ratio=row["cpu_speedup"] / plan.speedup, step_kinds="".join(
                           k[0] for k in plan.step_kinds),
                       cache_memory_mib=stats.cache_bytes / 2**20,
                       engine_share_of_cached_steps=engine / timed["cached_steps"] if timed.get("cached_steps")
                       else 0.0,
                       engine_seconds={k: timed.get(k, 0.0) for k in ("select", "gather", "scatter")},
                       step_seconds={k: timed.get(k, 0.0) for k in ("full_steps", "cached_steps")})
        rows.append(row)
    return rows


def _spread(values: list[float] | None) -> str:
    """The per-repeat ratios' range, ``min-max`` (one value for one repeat)."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.2f}" if high - low < 0.005 else f"{low:.2f}-{high:.2f}"


def markdown(rows: list[dict], header: str) -> str:
    both = any("overhead_ratio_vs_small_linear" in r for r in rows)
    cpu = any("cpu_speedup" in r for r in rows)  # files from before CPU time was recorded have none
    lines = [header, "",
             "| model | method | FLOPs speed-up | measured speed-up | measured / FLOPs | median s | "
             + ("CPU-time speed-up | CPU / FLOPs | per-repeat speed-ups, wall; CPU | " if cpu else "")
             + "select+gather+scatter share of cached steps | peak mem MiB | cache MiB |"
             + (" measured / FLOPs against the small-batch linear row |" if both else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cpu else "") + ("---|" if both else "")]
    for r in rows:
        share = r.get("engine_share_of_cached_steps")
        fair = r.get("overhead_ratio_vs_small_linear")
        memory = r.get("peak_memory_mib")
        last = (" - |" if fair is None else f" {fair:.2f} |") if both else ""
        times = (f"{r['cpu_speedup']:.2f}x | {r['cpu_overhead_ratio']:.2f} | "
                 f"{_spread(r.get('measured_speedups'))}; {_spread(r.get('cpu_speedups'))} | ") if cpu else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                     f"{r['overhead_ratio']:.2f} | {r['seconds_median']:.1f} | {times}"
                     f"{'-' if share is None else f'{share:.1%}'} | {'-' if memory is None else f'{memory:.0f}'} | "
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
    parser.add_argument("--frames", type=int, default=None,
                        help=f"Wan: latent frames (default {WAN_FRAMES}; the published 81-frame video has 21)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps before timing (default 3)")
    parser.add_argument("--method", action="append", default=None, metavar="TEXT",
                        help="time only the methods whose name contains TEXT (repeatable; 'no cache' is always "
                             "timed: the other rows' reference)")
    parser.add_argument("--no-route-row", action="store_true",
                        help="drop the uncached small-batch-linear row (the caches keep tc.apply's default route)")
    parser.add_argument("--no-memory", action="store_true",
                        help="CPU: skip the peak-RSS probe processes (the peak-memory column shows '-')")
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
    notes = [shape_note(m, args) for m in models if family(m) in ("flux", "wan")]
    if notes:
        header += "\n\n" + "\n".join(notes)
    write(stem, dict(device=name, dtype=args.dtype, date=when, args=vars(args), rows=rows), header, device)


def shape_note(model_name: str, args: argparse.Namespace) -> str:
    """What a FLUX or Wan run timed, against the published model and sampler."""
    steps = args.steps or SETTINGS[model_name]["steps"]
    if family(model_name) == "flux":
        blocks = f"{args.blocks} dual-stream + {args.blocks} single-stream blocks of 19 + 38" if args.blocks else (
            "all 19 + 38 blocks")
        return (f"- {model_name}: {steps} of 50 steps, {blocks}; width 3072 (24 heads), 1024x1024: 4096 packed image "
                "tokens + 512 text tokens, batch 1 (guidance 3.5 as an embedding), flow-matching Euler.")
    frames = args.frames or WAN_FRAMES
    blocks = f"{args.blocks} of 30 blocks" if args.blocks else "all 30 blocks"
    return (f"- {model_name}: {steps} of 50 steps, {blocks}; width 1536, 480x832 with {frames} latent frames "
            f"({frames} x 30 x 52 = {frames * 1560:,} tokens; the published 81 frames are 21 latent frames, 32,760 "
            "tokens) + 512 text tokens; CFG as two calls of batch 1 per step (guidance 5.0), UniPC.")


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "Peak mem: the CUDA allocator's peak during a run, above the model's weights."
    return ("Peak mem: peak resident size of a fresh process that builds the model and runs the method through its "
            "second full step, weights included (the timing process cannot show it: its allocator keeps freed memory).")


def write(stem: Path, result: dict, header: str, device: torch.device) -> None:
    result["header"] = header
    memory = memory_note(device)
    if all(r.get("peak_memory_mib") is None for r in result["rows"]):
        memory = "Peak mem: not measured (--no-memory)."
    table = markdown(result["rows"], f"{header}\n\n{memory}")
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
