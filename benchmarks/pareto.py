"""Check the forecasting issue's frontier claims on a frontier result file.

For every peer row and every fewer-steps row of the reference sampler, is there a tokencache row with an equal or
higher measured (CPU-time) speed-up, an equal or higher PSNR against the uncached run and an FD no worse than
the other row's + ``--fd-slack``? And which tokencache rows keep >= ``--psnr-at-4x`` dB at >= 4x?

    python benchmarks/pareto.py benchmarks/results/frontier.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PEER_PREFIXES = ("diffusers ", "cache-dit ")


def speed(record: dict) -> float:
    return record.get("cpu_speedup", record.get("measured_speedup", 0.0))


def psnr(record: dict) -> float:
    value = record["psnr"]
    return math.inf if value == "inf" else float(value)


def is_ours(record: dict) -> bool:
    return not record["method"].startswith(PEER_PREFIXES) and "fewer steps" not in record["method"] \
        and not record["method"].startswith("no cache")


def check(records: list[dict], sampler: str, fd_slack: float, low: float, high: float) -> tuple[list[str], bool]:
    rows = [r for r in records if r.get("sampler") == sampler and "unavailable" not in r and "psnr" in r]
    ours = [r for r in rows if is_ours(r)]
    others = [r for r in rows if not is_ours(r) and not r["method"].startswith("no cache")
              and low <= speed(r) <= high]
    lines, ok = [], True
    for other in sorted(others, key=speed):
        better = [r for r in ours if speed(r) >= speed(other) and psnr(r) >= psnr(other)
                  and r["fd"] <= other["fd"] + fd_slack]
        best = max(better, key=psnr, default=None)
        ok &= best is not None
        lines.append(f"{other['method']:<42} {speed(other):5.2f}x {psnr(other):5.1f} dB FD {other['fd']:6.2f}  <- "
                     + (f"{best['method']} {speed(best):.2f}x {psnr(best):.1f} dB FD {best['fd']:.2f}" if best
                        else "NOT DOMINATED"))
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--fd-slack", type=float, default=0.5)
    parser.add_argument("--low", type=float, default=1.5)
    parser.add_argument("--high", type=float, default=5.0)
    parser.add_argument("--psnr-at-4x", type=float, default=39.0)
    args = parser.parse_args()
    records = json.loads(args.results.read_text())["records"]
    lines, ok = check(records, args.sampler, args.fd_slack, args.low, args.high)
    print("\n".join(lines))
    print(f"every peer and fewer-steps row in {args.low}-{args.high}x dominated: {ok}")
    fast = [r for r in records if is_ours(r) and "psnr" in r and r.get("sampler") == args.sampler
            and speed(r) >= 4.0 and psnr(r) >= args.psnr_at_4x]
    print(f"tokencache rows at >= 4x with >= {args.psnr_at_4x} dB: "
          + (", ".join(f"{r['method']} ({speed(r):.2f}x, {psnr(r):.1f} dB)" for r in fast) or "none"))


if __name__ == "__main__":
    main()
