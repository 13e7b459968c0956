"""The one-table summary README.md shows, built from the committed result files (no number typed by hand).

    python benchmarks/summary.py            # print it
    python benchmarks/summary.py --readme   # and replace the block between the summary markers in README.md

Reads ``results/frontier.json`` (quality against speed on the shipped digits DiT) and every
``results/speed-*.json`` of a full-depth run (wall-clock at the published shapes).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- benchmark-summary -->", "<!-- /benchmark-summary -->"
# Rows of the frontier shown in the summary: each family's setting nearest the ToCa N=4 budget, and the peers.
FRONTIER_ROWS = (
    "ToCa attention N=4", "ToCa similarity N=4", "ToCa value_norm N=4", "FORA N=3", "TokenCache budget=0.7",
    "TokenCache budget=0.9", "forecast N=", "DDIM-20 (fewer steps)", "DDIM-10 (fewer steps)",
    "diffusers TaylorSeer", "diffusers FBCache", "cache-dit DBCache",
    "ToCa dit-ddpm250 N=4", "DDPM-100 (fewer steps)",
)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _psnr(value: object) -> str:
    return "inf" if value == "inf" else f"{value:.1f}"


def frontier_table(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["records"]
    lines = [f"Quality against speed, shipped digits DiT, {meta['samples']} samples, {meta['device']}, "
             f"{meta['date']} (`benchmarks/frontier.py`; speed-up = CPU-time ratio against the uncached run of the "
             f"same sampler, median of {meta['repeats']} interleaved rounds):", "",
             "| method | sampler | FLOPs speed-up | measured speed-up | PSNR vs full (dB) | FD | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if "unavailable" in r or not any(r["method"].startswith(p) for p in FRONTIER_ROWS):
            continue
        lines.append(f"| {r['method']} | {r['sampler'].upper()}-{r['steps']} | {_x(r['flops_speedup'])} | "
                     f"{_x(r.get('cpu_speedup', r['measured_speedup']))} | {_psnr(r['psnr'])} | {r['fd']:.2f} | "
                     f"{r['accuracy']:.1%} |")
    return "\n".join(lines)


def speed_table(runs: list[dict]) -> str:
    """One table for full-depth speed runs (result files' contents) made on the same device, dtype and threads."""
    first = runs[0]
    threads = first["args"].get("threads") or "default"
    dates = sorted({r["date"] for r in runs})
    repeats = sorted({r["args"]["repeats"] for r in runs})
    memory = ("peak mem = the CUDA allocator's peak above the weights" if first["args"]["device"].startswith("cuda")
              else "peak mem = peak resident size of a fresh process running the method, weights included")
    lines = [f"Wall-clock at the published shapes, random weights, CFG batch 2, all blocks ({first['device']}, "
             f"{threads} thread(s), {first['dtype']}, median of {'/'.join(map(str, repeats))} interleaved repeats, "
             f"{', '.join(dates)}; `benchmarks/speed.py`; {memory}):", "",
             "| model | method | few-row linears | FLOPs speed-up | measured speed-up | measured / FLOPs | "
             "measured / FLOPs, same linears uncached | peak mem MiB | cache MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        # runs from before the route existed, or with --no-small-batch-linear, time every method with stock linears
        routed = not run["args"].get("no_small_batch_linear", True)
        for r in run["rows"]:
            stock = r["method"] == "no cache" or not routed
            same = r["overhead_ratio"] if stock else r.get("overhead_ratio_vs_small_linear")
            lines.append(f"| {r['model']} | {r['method']} | {'stock' if stock else 'W @ xᵀ'} | "
                         f"{r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['overhead_ratio']:.2f} | "
                         f"{'-' if same is None else f'{same:.2f}'} | {r['peak_memory_mib']:.0f} | "
                         f"{r['cache_memory_mib']:.0f} |")
    return "\n".join(lines)


def speed_tables() -> list[str]:
    """Full-depth runs grouped by device, dtype and threads; short versions (``--blocks``/``--steps``) are left
    to their own result files."""
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(RESULTS.glob("speed-*.json")):
        data = json.loads(path.read_text())
        if data["args"].get("blocks") or data["args"].get("steps"):
            continue
        groups.setdefault((data["device"], data["dtype"], data["args"].get("threads")), []).append(data)
    return [speed_table(runs) for runs in groups.values()]


def summary() -> str:
    frontier = RESULTS / "frontier.json"
    parts = [frontier_table(frontier) if frontier.exists() else "(frontier.json has not been written yet)"]
    parts += speed_tables()
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="write the summary into README.md")
    args = parser.parse_args()
    text = summary()
    print(text)
    if args.readme:
        readme = README.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"README.md has no {START} ... {END} block")
        block = f"{START}\n{text}\n{END}"
        README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S))


if __name__ == "__main__":
    main()
