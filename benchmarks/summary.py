"""The one-table summary README.md shows, built from the committed result files (no number typed by hand).

    python benchmarks/summary.py            # print it
    python benchmarks/summary.py --readme   # and replace the block between the summary markers in README.md

Reads ``results/frontier.json`` (quality against speed on the shipped digits DiT) and every
``results/speed-*.json`` (wall-clock at the published shapes).
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
    "TokenCache budget=0.9", "DDIM-20 (fewer steps)", "diffusers TaylorSeer", "diffusers FBCache", "cache-dit DBCache",
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


def speed_table(path: Path) -> str:
    data = json.loads(path.read_text())
    args = data["args"]
    short = f", first {args['blocks']} blocks of each model" if args.get("blocks") else ""
    short = short or ", all blocks"
    steps = f", {args['steps']} steps" if args.get("steps") else ""
    lines = [f"Wall-clock at the published shapes, random weights, CFG batch 2 ({data['device']}, "
             f"{args.get('threads') or 'default'} thread(s), {data['dtype']}{short}{steps}, median of "
             f"{args['repeats']} interleaved repeats, {data['date']}; `benchmarks/speed.py`):", "",
             "| model | method | FLOPs speed-up | measured speed-up | measured / FLOPs |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["method"] == "no cache":
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['flops_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                     f"{r['overhead_ratio']:.2f} |")
    return "\n".join(lines)


def summary() -> str:
    frontier = RESULTS / "frontier.json"
    parts = [frontier_table(frontier) if frontier.exists() else "(frontier.json has not been written yet)"]
    parts += [speed_table(path) for path in sorted(RESULTS.glob("speed-*.json"))]
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
