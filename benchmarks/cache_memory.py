"""Cache memory per method on the shipped digits DiT (DDIM-50, CFG batch): tokencache against the peers.

What each number is (bytes of the tensors a cache holds between transformer calls, at their peak in a run):

* tokencache: ``handle.stats().cache_bytes``, counted by the engine at the end of the run, right before it frees
  the cache (the module caches never shrink within a run, so the end is the peak). It is checked here against
  :func:`analytic_bytes`, the count from the state's fields (``tokencache.core.state.SlotState``).
* diffusers TaylorSeer (installed by ``peers.py``'s own install function, on each block's ``attn1`` and ``ff``):
  the tensors in the ``taylor_factors`` of every hook's ``TaylorSeerState``, found through the modules'
  ``_diffusers_hook`` registries and the hooks' ``state_manager``, read after every transformer call.
* cache-dit DBCache (installed by ``peers.py``): the tensors in the ``buffers`` of every ``CachedContext`` of
  the pipeline's ``_context_manager`` (cache-dit's ``set_Fn_buffer``/``set_Bn_buffer`` store everything there)
  and in the calibrators' states, read after every transformer call.

Peers are counted by storage (a tensor sharing memory with another counts once), tokencache by elements; the
JSON has both counts for the peers, and they agree on this model.

    python benchmarks/cache_memory.py              # 10 samples (CFG batch 20), writes results/cache-memory.*
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import tokencache as tc
from tokencache.demo import load_model

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TAYLORSEER_INTERVAL = 5  # memory does not depend on it; 5 matches the FORA/forecast rows


def tokencache_methods() -> list[tuple[str, str, Any]]:
    """(method, settings, config) of the tokencache rows; the first is the reference (plain reuse)."""
    def forecast(order: int, dtype: torch.dtype | None) -> Any:
        return tc.FORAConfig.preset("forecast-n5", forecast=tc.ForecastConfig(order=order, expansion="newton",
                                                                              dtype=dtype))

    return [
        ("tokencache FORA", "interval=5, reuse", tc.FORAConfig(interval=5)),
        ("tokencache forecast-n5", "Newton order 3, float32", tc.FORAConfig.preset("forecast-n5")),
        ("tokencache forecast-n5", "Newton order 3, bfloat16", forecast(3, torch.bfloat16)),
        ("tokencache forecast-n5", "order 1, float32", forecast(1, None)),
        ("tokencache forecast-n5", "order 1, bfloat16", forecast(1, torch.bfloat16)),
        ("tokencache ToCa", "dit-ddim50 preset", tc.ToCaConfig.preset("dit-ddim50")),
        ("tokencache forecast-output-n5", "the output, Newton order 3, float32",
         tc.FORAConfig.preset("forecast-output-n5")),
    ]


def cached_modules(transformer: torch.nn.Module) -> int:
    """Cacheable modules of the digits DiT: each block's attn1 and ff."""
    return 2 * len(transformer.transformer_blocks)


def analytic_bytes(config: Any, batch: int, tokens: int, width: int, modules: int,
                   dtype: torch.dtype = torch.float32, output_width: int = 0) -> int:
    """What ``SlotState`` holds per module, times ``modules``: the output (B, n, D) in the cache dtype, the int32
    steps-since-fresh counter (B, n), with a ``similarity`` score the last input (B, n, D), and with forecasting
    ``order`` derivatives (B, n, D) in the forecast dtype, float64 positions (B, n, order) and int8 history (B, n).
    With ``ForecastConfig(target="output")`` no module is cached: the transformer's output (B, n x
    ``output_width``) and its ``order`` derivatives are, as one token per sample.
    """
    cache_dtype = getattr(config, "cache_dtype", None) or dtype
    size = torch.empty(0, dtype=cache_dtype).element_size()
    forecast = getattr(config, "forecast", None)
    if forecast is not None and forecast.target == "output":
        factor = torch.empty(0, dtype=forecast.dtype or cache_dtype).element_size()
        values = batch * tokens * output_width
        return values * size + (batch * (forecast.order * 8 + 1) + values * forecast.order * factor
                                if forecast.order else 0)
    per_module = batch * tokens * (width * size + 4)
    if getattr(config, "score", None) == "similarity":
        per_module += batch * tokens * width * size
    if forecast is not None and forecast.order > 0:
        factor = torch.empty(0, dtype=forecast.dtype or cache_dtype).element_size()
        per_module += batch * tokens * (forecast.order * (width * factor + 8) + 1)
    return modules * per_module


# --------------------------------------------------------------------------------------------------- counting


def _tensors(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists, tuples and (for cache-dit's calibrators) objects' attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, list | tuple | set):
        for value in obj:
            yield from _tensors(value, seen)
    elif type(obj).__module__.startswith("cache_dit.") and hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), seen)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(bytes of the distinct storages, bytes of the elements) of ``tensors``."""
    storages: dict[int, int] = {}
    elements = 0
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        elements += t.numel() * t.element_size()
    return sum(storages.values()), elements


def taylorseer_tensors(transformer: torch.nn.Module) -> list[torch.Tensor]:
    """The ``taylor_factors`` of every TaylorSeer hook state (all contexts) on ``transformer``'s modules."""
    found = []
    for _, hook in peers._taylorseer_hooks(transformer):
        # _state_cache: one TaylorSeerState per context name; read directly because the context is closed
        # after each call (get_state needs an open one)
        for state in hook.state_manager._state_cache.values():
            found += _tensors(state.taylor_factors)
    return found


CALIBRATORS = ("calibrator", "encoder_calibrator", "cfg_calibrator", "cfg_encoder_calibrator")


def _cache_dit_contexts(pipe: Any) -> list[Any]:
    manager = getattr(pipe, "_context_manager", None)
    return [] if manager is None else list(manager._cached_context_manager.values())


def cache_dit_tensors(pipe: Any) -> list[torch.Tensor]:
    """The buffers and calibrator states of every cache-dit context of ``pipe``."""
    found = []
    for context in _cache_dit_contexts(pipe):
        found += _tensors(context.buffers)
        for name in CALIBRATORS:
            found += _tensors(getattr(context, name))
    return found


def cache_dit_layout(pipe: Any) -> dict[str, list[int]]:
    """Shape of each tensor cache-dit holds, by buffer name or calibrator path (for the JSON)."""
    layout = {}
    for context in _cache_dit_contexts(pipe):
        for name, value in context.buffers.items():
            for i, t in enumerate(_tensors(value)):
                layout[f"{name}[{i}]" if i else name] = list(t.shape)
        for name in CALIBRATORS:
            calibrator = getattr(context, name)
            for key, state in (getattr(calibrator, "states", None) or {}).items():
                for part, ladder in getattr(state, "state", {}).items():
                    for order, t in enumerate(ladder):
                        if t is not None:
                            layout[f"{name}.{key}.{part}[{order}]"] = list(t.shape)
    return layout


# --------------------------------------------------------------------------------------------------- runs


def _sample(pipe: Any, labels: list[int], steps: int, seed: int) -> None:
    with torch.no_grad():
        pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))


def tokencache_row(pipe: Any, config: Any, labels: list[int], steps: int, seed: int) -> dict[str, Any]:
    """Run once with the cache; its ``stats().cache_bytes`` and the analytic count."""
    handle = tc.apply(pipe, config)
    try:
        _sample(pipe, labels, steps, seed)
        stats = handle.stats()
    finally:
        handle.remove()
    transformer = pipe.transformer
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    analytic = analytic_bytes(config, 2 * len(labels), tokens, width, cached_modules(transformer),
                              transformer.dtype, output_width=transformer.proj_out_2.out_features)
    return dict(bytes=stats.cache_bytes, analytic_bytes=analytic, score_bytes=stats.score_bytes,
                speedup=round(stats.speedup, 3))


def peer_row(pipe: Any, peer: peers.Peer, collect: Callable[[Any], list[torch.Tensor]], labels: list[int],
             steps: int, seed: int, describe: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run once with the peer; the largest count of its tensors after any transformer call, and at the end."""
    peak = [0, 0]

    def measure(*_: Any) -> None:
        storage, elements = tensor_bytes(collect(pipe))
        peak[0], peak[1] = max(peak[0], storage), max(peak[1], elements)

    remover = peer.attach(pipe)
    # registered after the peer's own hooks, so it runs after each call's cache update
    handle = pipe.transformer.register_forward_hook(measure)
    try:
        _sample(pipe, labels, steps, seed)
        end = tensor_bytes(collect(pipe))
        layout = describe(pipe) if describe is not None else None
    finally:
        handle.remove()
        remover()
    row = dict(bytes=peak[0], element_bytes=peak[1], end_bytes=end[0], **peer.stats)
    return row if layout is None else dict(row, tensors=layout)


def taylorseer_peer(max_order: int, dtype: torch.dtype) -> peers.Peer:
    """diffusers TaylorSeer through peers.py's install, with ``max_order`` and ``taylor_factors_dtype`` changed."""
    base = peers._taylorseer_config
    install = peers._install_taylorseer(TAYLORSEER_INTERVAL, "blocks")

    def config(cache_interval: int, variant: str) -> Any:
        return dataclasses.replace(base(cache_interval, variant), max_order=max_order, taylor_factors_dtype=dtype)

    def install_with(pipe: Any, stats: dict[str, Any]) -> peers.Remover:
        with mock.patch.object(peers, "_taylorseer_config", config):
            return install(pipe, stats)

    return peers.Peer(f"diffusers TaylorSeer N={TAYLORSEER_INTERVAL}", "diffusers TaylorSeer",
                      dict(cache_interval=TAYLORSEER_INTERVAL, max_order=max_order), install=install_with)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_all(pipe: Any, labels: list[int], steps: int, seed: int) -> list[dict[str, Any]]:
    """Every row: tokencache methods, diffusers TaylorSeer, cache-dit DBCache (if installed)."""
    rows = []
    for method, settings, config in tokencache_methods():
        rows.append(dict(method=method, settings=settings, how="stats().cache_bytes",
                         **tokencache_row(pipe, config, labels, steps, seed)))
        print(f"{method} ({settings}): {rows[-1]['bytes']} B", flush=True)
    taylorseer = "peak over calls of the taylor_factors tensors in each hook's TaylorSeerState"
    for max_order in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            peer = taylorseer_peer(max_order, dtype)
            settings = f"attn1+ff, max_order={max_order}, {_dtype_name(dtype)}"
            rows.append(dict(method=peer.family, settings=settings, how=taylorseer,
                             **peer_row(pipe, peer, lambda p: taylorseer_tensors(p.transformer), labels, steps,
                                        seed)))
            print(f"{peer.name} ({settings}): {rows[-1]['bytes']} B", flush=True)
    for peer in peers.cache_dit_peers(quick=True):
        if peer.install is None:
            print(f"{peer.name}: skipped ({peer.reason})")
            continue
        settings = "F1B0, r=0.08" + (", TaylorSeer order 1" if "TaylorSeer" in peer.family else "")
        rows.append(dict(method=peer.family, settings=settings,
                         how="peak over calls of the context buffers and calibrator states",
                         **peer_row(pipe, peer, cache_dit_tensors, labels, steps, seed, cache_dit_layout)))
        print(f"{peer.name}: {rows[-1]['bytes']} B", flush=True)
    reference = rows[0]["bytes"]
    for row in rows:
        row["mib"] = row["bytes"] / 2**20
        row["ratio"] = row["bytes"] / reference
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: method, settings, cache MiB, ratio to tokencache's reuse cache."""
    lines = ["| method | settings | cache MiB | × reuse cache |", "|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['settings']} | {row['mib']:.2f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10, help="images per run (CFG batch = 2 x samples)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model()
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(args.samples)]
    rows = measure_all(pipe, labels, args.steps, args.seed)
    for row in rows:
        if "analytic_bytes" in row and row["bytes"] != row["analytic_bytes"]:
            raise SystemExit(f"{row['method']} ({row['settings']}): stats().cache_bytes {row['bytes']} != "
                             f"analytic {row['analytic_bytes']}")
    table = format_table(rows)
    print(table)
    config = pipe.transformer.config
    header = dict(
        device=f"cpu ({cpu_name()})", date=datetime.date.today().isoformat(), python=platform.python_version(),
        versions={name: version(name) for name in ("torch", "diffusers", "tokencache")}
        | {"cache-dit": peers.cache_dit_version()},
        model="shipped digits DiT (DiTTransformer2DModel, 6 blocks, 64 tokens, width "
              f"{config.num_attention_heads * config.attention_head_dim}, float32)",
        scheduler="DDIM", steps=args.steps, samples=args.samples, batch=2 * args.samples,
        class_labels=labels, seed=args.seed, cached_modules="attn1 and ff of every block (12)",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache-memory.json").write_text(json.dumps(dict(**header, rows=rows), indent=2) + "\n")
    markdown = [
        "# Cache memory per method", "",
        f"{header['model']}, DDIM-{args.steps}, {args.samples} samples (CFG batch {2 * args.samples}), "
        f"{header['device']}, {header['date']}; torch {header['versions']['torch']}, diffusers "
        f"{header['versions']['diffusers']}, cache-dit {header['versions']['cache-dit']}. "
        "`python benchmarks/cache_memory.py`.", "",
        "Bytes of the tensors each cache holds between transformer calls, at their peak in a run. tokencache: "
        "`handle.stats().cache_bytes` (equal to the analytic count of its state's fields); diffusers TaylorSeer: "
        "the `taylor_factors` of every hook's state; cache-dit: its contexts' buffers and calibrator states "
        "(both read after every transformer call). Memory scales linearly with the batch.", "",
        table, "",
        "Why the rows differ: tokencache and diffusers' TaylorSeer cache every block's attn1 and ff output (12 "
        "tensors of (B, n, D)) and, when forecasting, `order` more per module; tokencache keeps the value in the "
        "cache dtype and only the derivatives in `ForecastConfig.dtype` (plus per-token float64 positions and "
        "int8 history), while TaylorSeer's bfloat16 stores the value in bfloat16 too. cache-dit's DBCache caches "
        "at the level of the block stack: the residual of the first block (to decide) and of the remaining "
        "blocks (to reuse), 2 tensors of (B, n, D) in all; its TaylorSeer calibrator replaces the second with "
        "its value and first difference at the last two computations (4 tensors). ToCa's attention scores "
        "(`stats().score_bytes`, 30 KiB here) are not counted in its row. `forecast-output-n5` caches no module: "
        "it keeps the transformer's output (B, 1, 16, 16) and its 3 differences, 4 images' worth per sample.", "",
    ]
    (args.out / "cache-memory.md").write_text("\n".join(markdown))


if __name__ == "__main__":
    main()
