"""TokenCache ablation on the shipped digits model (DDIM-50, same seeds and classes for every row).

Every TokenCache row is matched to the FLOPs speed-up of the ``ToCa N=4`` row (the budget is solved per
schedule), then one part is changed at a time:
- step schedule: a sweep of TPRR settings (the best becomes the default) and a fixed interval (K1 = K2);
- token ranking: the learned predictor (features / position-only) against ToCa's scores;
- block selection: sensitivity-allocated ratios against the same ratio in every block.
The winning ranking (by PSNR) is recorded in the shipped predictor's calibration as its ``token_selection``,
so ``TokenCacheConfig(predictor)`` uses it; the table says which one it was.

    python benchmarks/tokencache_ablation.py            # full run (100 samples), writes results/tokencache-ablation.*
    python benchmarks/tokencache_ablation.py --samples 30 --iterations 60 --no-ship   # a shorter version
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch

import tokencache as tc
from tokencache.demo import DEFAULT_GUIDANCE, load_classifier, load_model
from tokencache.demo.compare import Method, compare, format_table, to_json
from tokencache.methods.token_cache_calibration import CalibrationConfig, calibrate, class_calls

RESULTS = Path(__file__).parent / "results"
TPRR_SWEEP = [tc.TPRR(3, 1, 0.5), tc.TPRR(4, 1, 0.5), tc.TPRR(3, 2, 0.5), tc.TPRR(5, 2, 0.5)]


def dummy_predictor(budget: float, schedule: tc.TPRR) -> tc.TokenCachePredictor:
    return tc.TokenCachePredictor(6, 64, 50, "position", model={"class_name": "DiTTransformer2DModel"},
                                  calibration=dict(budget=budget, schedule=dataclasses.asdict(schedule),
                                                   block_sensitivity=[1.0] * 6))


def matched_budget(transformer: torch.nn.Module, schedule: tc.TPRR, target: float) -> float | None:
    """The budget at which ``schedule`` reaches the target FLOPs speed-up (bisection), or None."""
    def speedup(budget: float) -> float:
        return tc.plan(tc.TokenCacheConfig(dummy_predictor(budget, schedule), adaptive_blocks=False), transformer,
                       50, batch_size=2).speedup

    lo, hi = 0.0, 0.95
    if speedup(hi) < target or speedup(lo) > target:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid) < target else (lo, mid)
    return round((lo + hi) / 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=150, help="calibration iterations per predictor")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--no-ship", action="store_true", help="do not overwrite the shipped predictor")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, classifier = load_model(), load_classifier()
    labels = list(range(10)) * (args.samples // 10)
    toca4 = tc.ToCaConfig.preset("dit-ddim50", full_step_interval=4)
    target = tc.plan(toca4, pipe.transformer, 50, batch_size=2).speedup

    cache: dict[tuple, tc.TokenCachePredictor] = {}

    def predictor(schedule: tc.TPRR, budget: float, variant: str = "features",
                  adaptive: bool = True) -> tc.TokenCachePredictor:
        key = (schedule, budget, variant, adaptive)
        if key not in cache:
            cache[key] = calibrate(pipe, CalibrationConfig(
                calls=class_calls(10, 16, 4, seed=1), budget=budget, schedule=schedule, variant=variant,
                adaptive_blocks=adaptive, iterations=args.iterations, budget_weight=0.1))
        return cache[key]

    methods = [Method("ToCa N=4 (attention score)", "ToCa", config=toca4),
               Method("ToCa N=4 (similarity score)", "ToCa", config=tc.ToCaConfig(**{**toca4.__dict__,
                                                                                    "score": "similarity"}))]
    sweep = []
    for schedule in TPRR_SWEEP:
        budget = matched_budget(pipe.transformer, schedule, target)
        name = f"TokenCache TPRR({schedule.early_cached_steps},{schedule.late_cached_steps},{schedule.boundary})"
        if budget is None:
            methods.append(Method(name, "TokenCache", unavailable=f"cannot reach {target:.2f}x with budget <= 0.95"))
            continue
        p = predictor(schedule, budget)
        sweep.append((schedule, budget))
        methods.append(Method(f"{name} budget {budget:.2f}", "TokenCache", config=tc.TokenCacheConfig(p),
                              extra=dict(part="schedule", budget=budget)))
    records = compare(pipe, classifier, methods, labels, guidance=DEFAULT_GUIDANCE, repeats=args.repeats)
    scored = [r for r in records if r.get("part") == "schedule"]
    best = max(scored, key=lambda r: r["psnr"])
    schedule, budget = sweep[scored.index(best)]

    ablations = []
    fixed = tc.TPRR(2, 2, 0.5)
    fixed_budget = matched_budget(pipe.transformer, fixed, target)
    base = predictor(schedule, budget)
    ablations.append(Method("best schedule: features predictor, adaptive blocks", "TokenCache",
                            config=tc.TokenCacheConfig(base, token_selection="predictor"),
                            extra=dict(part="ranking", ship="features", selection="predictor")))
    position = predictor(schedule, budget, "position")
    ablations.append(Method("  ranking: position-only predictor g(l,t)", "TokenCache",
                            config=tc.TokenCacheConfig(position, token_selection="predictor"),
                            extra=dict(part="ranking", ship="position", selection="predictor")))
    for score in ("similarity", "attention", "random"):
        ablations.append(Method(f"  ranking: ToCa {score} score", "TokenCache",
                                config=tc.TokenCacheConfig(base, token_selection=score),
                                extra=dict(part="ranking", ship="features", selection=score)))
    ablations.append(Method("  blocks: uniform ratio (no block selection)", "TokenCache",
                            config=tc.TokenCacheConfig(predictor(schedule, budget, adaptive=False),
                                                       adaptive_blocks=False), extra=dict(part="blocks")))
    if fixed_budget is not None:
        ablations.append(Method(f"  schedule: fixed interval TPRR(2,2) budget {fixed_budget:.2f}", "TokenCache",
                                config=tc.TokenCacheConfig(predictor(fixed, fixed_budget)),
                                extra=dict(part="schedule-fixed")))
    records += compare(pipe, classifier, ablations, labels, guidance=DEFAULT_GUIDANCE, repeats=args.repeats)
    # Keep the ranking that wins (the rule): ship its predictor with that token selection recorded.
    ranking = [r for r in records if r.get("part") == "ranking"]
    winner = max(ranking, key=lambda r: r["psnr"])
    shipped = position if winner["ship"] == "position" else base
    shipped.calibration["token_selection"] = winner["selection"]

    header = (f"TokenCache ablation, shipped digits DiT, DDIM-50, {args.samples} samples, every "
              f"TokenCache row matched to ToCa N=4's {target:.2f}x FLOPs; calibration {args.iterations} iterations; "
              f"guidance {DEFAULT_GUIDANCE}; measured speed-up: median of {args.repeats} interleaved rounds; "
              f"CPU, {torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")
    table = header + "\n\n" + format_table(records) + (
        f"\n\nBest TPRR by PSNR: {best['method']} -> default TPRR({schedule.early_cached_steps}, "
        f"{schedule.late_cached_steps}, {schedule.boundary}), budget {budget}.\n"
        f"Best ranking by PSNR: {winner['method'].strip()} -> shipped as token_selection={winner['selection']!r}"
        f" with the {winner['ship']} predictor.\n")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tokencache-ablation.md").write_text(table)
    (RESULTS / "tokencache-ablation.json").write_text(json.dumps(dict(header=header, records=to_json(records),
                                                                      best_schedule=dataclasses.asdict(schedule),
                                                                      best_budget=budget,
                                                                      best_ranking=winner["selection"]), indent=2))
    if not args.no_ship:
        out = Path(__file__).resolve().parents[1] / "src/tokencache/assets/digits-dit/tokencache-predictor"
        shipped.save_pretrained(out)
        print(f"shipped predictor written to {out}")


if __name__ == "__main__":
    main()
