"""torch.compile against eager, cached against uncached, at a real model width.

A published shape (speed.py's models; random weights) cut to ``--blocks`` blocks, sampled with CFG batch 2
as in speed.py. Variants:

* ``eager``: the stock model, and each cache through ``tc.apply`` (with its default few-row linear route);
* ``transformer.compile()``: the stock model compiled in place (what one does without a cache);
* ``tc.compile``: each cache through ``tc.apply`` + ``tc.compile`` as a CPU user gets it: the route on, so
  only the cached modules' forward is compiled;
* ``tc.compile, model``: ``tc.apply(..., small_batch_linear=None)`` + ``tc.compile``, which then compiles
  the transformer in place too (what a GPU user gets: the route is CPU only).

Compile time is measured cold, in a fresh process per compiled variant with its own empty inductor cache:
the first run's seconds minus the steady run's. The steady-state seconds per run are measured in this
process, variants interleaved over ``--repeats`` (each variant on its own copy of the model, compiled
before timing), as the median of wall-clock seconds and of this process's CPU seconds.

    python benchmarks/compile_speed.py                      # the committed run (DiT-XL/2 width, 2 blocks)
    python benchmarks/compile_speed.py --blocks 1 --steps 4 --repeats 1 --backend aot_eager   # a quick check

Writes benchmarks/results/compile-speed-<device>-<model>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name
from speed import SETTINGS, make_inputs, sample

import tokencache as tc
from tokencache.core.shapes import MODEL_SHAPES

RESULTS = Path(__file__).parent / "results"
# The caches timed per model: the README's ToCa preset (attention score) and FORA.
METHODS = {"dit-xl-2": ["ToCa dit-ddim50 (attention)", "FORA N=3"],
           "pixart-alpha-256": ["ToCa pixart-dpm20 (entropy)", "FORA N=3"]}
METHODS["pixart-alpha-512"] = METHODS["pixart-alpha-256"]


def variants(model_name: str) -> list[tuple[str, str | None, str]]:
    """(row name, method or None for no cache, how it runs: eager | compiled | model)."""
    rows = [("no cache", None, "eager")]
    rows += [(method, method, "eager") for method in METHODS[model_name]]
    rows += [("no cache, transformer.compile()", None, "compiled")]
    for method in METHODS[model_name]:
        rows += [(f"{method}, tc.compile", method, "compiled"), (f"{method}, tc.compile, model", method, "model")]
    return rows


def build(model_name: str, blocks: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with only ``blocks`` blocks (built at that depth: no full-depth model in memory), seeded so
    that every variant gets the same weights."""
    class_name, kwargs = MODEL_SHAPES[model_name]
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, class_name)(**{**kwargs, "num_layers": blocks}).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def prepare(model_name: str, method: str | None, how: str, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.nn.Module, tc.CacheHandle | None]:
    """A model copy set up as the variant says (compiled lazily: the first run compiles)."""
    transformer = build(model_name, args.blocks, device, dtype)
    route = {"small_batch_linear": None} if how == "model" else {}
    handle = tc.apply(transformer, SETTINGS[model_name]["methods"][method], **route) if method else None
    options = dict(backend=args.backend)
    if handle is not None and how != "eager":
        tc.compile(handle, **options)  # "model": the route is off, so the transformer is compiled too
    elif how == "compiled":
        transformer.compile(**options)
    return transformer, handle


def timed_run(transformer, scheduler, steps: int, inputs: dict, handle) -> tuple[float, float]:
    """One sampling run: (wall seconds, this process's CPU seconds)."""
    cpu = time.process_time()
    wall = sample(transformer, scheduler, steps, inputs, handle)
    return wall, time.process_time() - cpu


def compile_probe(args: argparse.Namespace) -> None:
    """In a fresh process: the first run (compiles) and a second run of one variant; prints a JSON line."""
    from torch._dynamo.utils import counters

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _, method, how = next(v for v in variants(args.model) if v[0] == args.probe)
    transformer, handle = prepare(args.model, method, how, args, device, dtype)
    scheduler, inputs = SETTINGS[args.model]["scheduler"](), make_inputs(args.model, transformer, device, dtype)
    first = timed_run(transformer, scheduler, args.steps, inputs, handle)
    graphs = counters["stats"]["unique_graphs"]
    second = timed_run(transformer, scheduler, args.steps, inputs, handle)
    print(json.dumps(dict(first_run_s=first[0], steady_run_s=second[0], compile_s=first[0] - second[0],
                          graphs=graphs, graphs_after_second_run=counters["stats"]["unique_graphs"],
                          graph_breaks=sum(counters["graph_break"].values()))))


def probe(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--probe", name, "--model", args.model, "--blocks", str(args.blocks),
               "--steps", str(args.steps), "--backend", args.backend, "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as cache:  # a cold compile: no inductor artefacts from earlier runs
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"compile probe {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = variants(args.model)
    compiled = {name: probe(name, args) for name, _, how in rows if how != "eager"}
    setups = {name: prepare(args.model, method, how, args, device, dtype) for name, method, how in rows}
    scheduler = SETTINGS[args.model]["scheduler"]()
    inputs = make_inputs(args.model, next(iter(setups.values()))[0], device, dtype)
    for transformer, handle in setups.values():  # warm-up: allocator, kernels, and the compiles
        sample(transformer, scheduler, args.steps, inputs, handle)
    wall: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (transformer, handle) in setups.items():
            w, c = timed_run(transformer, scheduler, args.steps, inputs, handle)
            wall[name].append(w)
            cpu[name].append(c)
    base_wall, base_cpu = statistics.median(wall["no cache"]), statistics.median(cpu["no cache"])
    out = []
    for name, method, how in rows:
        handle = setups[name][1]
        stats = handle.stats() if handle is not None else None
        row = dict(variant=name, method=method or "no cache", how=how, steps=args.steps, blocks=args.blocks,
                   wall_s=statistics.median(wall[name]), cpu_s=statistics.median(cpu[name]), wall_all=wall[name],
                   cpu_all=cpu[name], flops_speedup=stats.speedup if stats else 1.0,
                   step_kinds=list(stats.step_kinds) if stats else None)
        row["speedup_wall"] = base_wall / row["wall_s"]
        row["speedup_cpu"] = base_cpu / row["cpu_s"]
        row.update(compiled.get(name, {}))
        out.append(row)
    return out


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| variant | FLOPs speed-up | s per run (wall) | CPU s per run | speed-up vs eager uncached (wall) | "
             "(CPU) | compile s (cold) | graphs | graph breaks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        comp = "-" if "compile_s" not in r else f"{r['compile_s']:.1f}"
        graphs = "-" if "graphs" not in r else str(r["graphs"])
        breaks = "-" if "graph_breaks" not in r else str(r["graph_breaks"])
        lines.append(f"| {r['variant']} | {r['flops_speedup']:.2f}x | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x | {comp} | {graphs} | {breaks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-xl-2", choices=sorted(METHODS))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="result file stem (default results/compile-speed-<device>-<model>)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # compile_probe, in a fresh process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        compile_probe(args)
        return
    rows = bench(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    when = datetime.date.today().isoformat()
    header = (f"Device: {name} ({args.device}, {torch.get_num_threads()} threads), {args.dtype}, torch "
              f"{torch.__version__}, backend {args.backend}; {args.model} width, {args.blocks} blocks, {args.steps} "
              f"steps, CFG batch 2, {args.repeats} repeats, {when}. Steady state: medians over interleaved repeats; "
              "compile s: first run minus steady run, in a fresh process with an empty inductor cache.")
    table = markdown(rows, header)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (args.out or f"compile-speed-{device.type}-{args.model}")
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(dict(header=header, args=vars(args), rows=rows), indent=2))


if __name__ == "__main__":
    main()
