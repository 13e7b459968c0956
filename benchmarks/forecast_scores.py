"""Which tokens to recompute on top of forecasting, and the ClusCa-style cluster correction (issue: forecast,
don't just reuse).

Shipped digits DiT, DDIM-50, ToCa's official full-step placement with N=6, Newton forecast of order 2; the MLP
recomputes ``ratio`` of its tokens on cached steps, chosen by each score (plus ToCa's 0.25 x staleness), with
and without the cluster correction. Quality is PSNR against the uncached run (same seeds and classes); the
FLOPs speed-up comes from the engine's statistics (it is the same for every score at one ratio).

    python benchmarks/forecast_scores.py                 # 100 samples: the committed table
    python benchmarks/forecast_scores.py --samples 20    # a quick look

Writes benchmarks/results/forecast-scores.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from machine import cpu_name

import tokencache as tc
from tokencache.demo import load_model
from tokencache.demo.pipeline import DEFAULT_GUIDANCE
from tokencache.metrics import psnr

RESULTS = Path(__file__).parent / "results"
SCORES = ("random", "similarity", "forecast_error", "forecast_term")
CLUSTERS = ((8, 1.0), (16, 1.0), (16, 0.5))


def config(ratio: float, score: str, clusters: int = 0, weight: float = 1.0) -> tc.ToCaConfig:
    forecast = tc.ForecastConfig(2, expansion="newton", clusters=clusters, cluster_weight=weight)
    return tc.ToCaConfig(full_step_interval=6, fresh_ratio=ratio, score=score, module_ratio={"mlp": 1.0},
                         full_step_placement="official", frequency_weight=0.25, forecast=forecast)


def rows_to_run() -> list[tuple[str, float, str, int, float]]:
    rows = [("no recomputation (ratio 0)", 0.0, "random", 0, 1.0)]
    for ratio in (0.05, 0.1):
        rows += [(f"{score}, ratio {ratio}", ratio, score, 0, 1.0) for score in SCORES]
        rows += [(f"{score}, ratio {ratio}, {k} clusters, weight {w}", ratio, score, k, w)
                 for score in ("random", "forecast_error", "forecast_term") for k, w in CLUSTERS]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="forecast-scores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stem = RESULTS / args.out
    meta = dict(samples=args.samples, device=cpu_name(), date=datetime.date.today().isoformat(),
                guidance=DEFAULT_GUIDANCE, schedule="DDIM-50, official placement N=6, Newton order 2")
    # Resumable: rows already in the result file (same sample count) are kept, the others run and are saved
    # one by one, so an interrupted run loses at most the row it was making.
    records: list[dict] = []
    if stem.with_suffix(".json").exists():
        previous = json.loads(stem.with_suffix(".json").read_text())
        if previous["meta"]["samples"] == args.samples:
            records = previous["rows"]
    done = {r["method"] for r in records}
    todo = [row for row in rows_to_run() if row[0] not in done]
    pipe = load_model()
    labels = [i % 10 for i in range(args.samples)]

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe(class_labels=labels, num_inference_steps=50, guidance_scale=DEFAULT_GUIDANCE,
                        generator=torch.Generator().manual_seed(0)).images

    full = run() if todo else None
    for name, ratio, score, clusters, weight in todo:
        handle = tc.apply(pipe, config(ratio, score, clusters, weight))
        start = time.process_time()
        images = run()
        seconds = time.process_time() - start
        stats = handle.stats()
        handle.remove()
        record = dict(method=name, ratio=ratio, score=score, clusters=clusters, cluster_weight=weight,
                      psnr=psnr(images, full), flops_speedup=stats.flops_full / stats.flops, cpu_seconds=seconds)
        records.append(record)
        print(f"{name:<50} {record['psnr']:6.2f} dB  {record['flops_speedup']:.2f}x FLOPs", flush=True)
        write(stem, meta, records)
    write(stem, meta, records)


def write(stem: Path, meta: dict, records: list[dict]) -> None:
    order = [row[0] for row in rows_to_run()]
    records = sorted(records, key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=records), indent=1))
    lines = [f"Digits DiT, {meta['schedule']}, {meta['samples']} samples, {meta['device']}, {meta['date']}", "",
             "| method | PSNR vs full (dB) | FLOPs speed-up |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['psnr']:.2f} | {r['flops_speedup']:.2f}x |" for r in records]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
