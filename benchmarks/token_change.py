"""How unevenly do tokens change between consecutive sampling steps? The "why" behind token choice (not) mattering.

A token-wise cache reuses some tokens' module outputs from an earlier step; what reusing token ``j`` of a module
costs is how much that output changes, ``d_j = ||f_t[j] - f_{t-1}[j]||``. If a few tokens carry most of the
change, picking them (ToCa's scores, TokenCache's predictor) beats picking at random; if change is spread evenly,
every choice of the same number of tokens removes about the same error. This script samples the shipped models
uncached (digits DDIM-50, fashion Euler-30; the shipped guidance, CFG batch), and with forward hooks on every
cacheable module (the blocks' ``attn1`` / ``attn2`` / ``ff`` found by tokencache's layouts) measures, per block
and module, over every consecutive pair of steps and every row of the batch (cond and uncond):

* the per-token relative change ``d_j / ||f_{t-1}[j]||``: quantiles over tokens, steps and rows, and the median
  over (step, row) of its 90th / 10th percentile ratio across tokens (1 = perfectly even);
* the share of the step's total squared change (what reused tokens add to the mean squared error) carried by the
  10 % / 25 % most-changing tokens (even: 0.10 / 0.25);
* for each ToCa score, its Spearman rank correlation with the actual next-step change ``d``, and the share of
  squared change that recomputing its top 25 % would remove, next to the oracle's (the top 25 % by ``d``
  itself) and random's (0.25 on average). The scores' own terms are computed as the engine computes them (without
  ToCa's staleness term and spatial bonus, which only spread the choice): ``attention``
  (attention each token receives in the block's self-attention at step ``t-1``) and ``value_norm`` (its value
  vector's norm there), ``cross_attention_entropy`` (entropy of its cross-attention at ``t-1``; models with
  cross-attention only), ``similarity`` (1 - cosine between the module's input at ``t`` and at ``t-1``) and
  ``random``. Attention statistics come from tokencache's own scoring processor (explicit attention, the
  statistic ToCa reads on full steps).

Also the mean relative change per step (how unevenly the change is spread over *steps*, which a step schedule such
as FORA, forecasting or fewer steps exploits instead).

    python benchmarks/token_change.py                       # both models, 20 samples, 1 thread
    python benchmarks/token_change.py --models fashion --samples 10

Writes ``benchmarks/results/token-change.json`` (everything, per block and module) and ``.md`` (the summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tokencache.core.layouts import find_blocks
from tokencache.core.processors import ScoringAttnProcessor, unsupported_reason
from tokencache.core.scores import score_from_raw
from tokencache.demo.compare import scheduler_for
from tokencache.demo.fashion.model import describe_guidance

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUANTILES = (0.1, 0.5, 0.9, 0.99)
TOP_SHARES = (0.10, 0.25)
CAPTURE = 0.25  # fresh share at which each score's captured change is measured
SCORES = ("attention", "value_norm", "similarity", "cross_attention_entropy", "random")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` and ``b`` (R, n) -> (R,) (no ties in float data)."""
    ra = a.argsort(dim=-1).argsort(dim=-1).double()
    rb = b.argsort(dim=-1).argsort(dim=-1).double()
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def _captured(score: torch.Tensor, energy: torch.Tensor, share: float) -> torch.Tensor:
    """Share of each row's total ``energy`` (R, n) on the top ``share`` of its tokens by ``score`` (R, n) -> (R,)."""
    k = max(1, round(share * score.shape[-1]))
    top = score.topk(k, dim=-1).indices
    return energy.gather(-1, top).sum(-1) / energy.sum(-1).clamp_min(1e-30)


class _Acc:
    """Running per-module statistics over (step, row) pairs."""

    def __init__(self) -> None:
        self.rel: list[torch.Tensor] = []  # sampled relative changes (for quantiles)
        self.spread: list[torch.Tensor] = []
        self.top: dict[float, list[torch.Tensor]] = {s: [] for s in TOP_SHARES}
        self.rho: dict[str, list[torch.Tensor]] = {}
        self.capture: dict[str, list[torch.Tensor]] = {}
        self.step_mean: dict[int, float] = {}

    def add(self, step: int, rel: torch.Tensor, change: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        energy = change.double() ** 2
        self.rel.append(rel.flatten().float())
        q = torch.quantile(rel.double(), torch.tensor([0.1, 0.9], dtype=torch.float64), dim=-1)
        self.spread.append(q[1] / q[0].clamp_min(1e-12))
        for share in TOP_SHARES:
            self.top[share].append(_captured(change, energy, share))
        self.capture.setdefault("oracle", []).append(_captured(change, energy, CAPTURE))
        for name, score in scores.items():
            self.rho.setdefault(name, []).append(_spearman(score.double(), change.double()))
            self.capture.setdefault(name, []).append(_captured(score.double(), energy, CAPTURE))
        self.step_mean[step] = float(rel.mean())

    def summary(self) -> dict[str, Any]:
        rel = torch.cat(self.rel).double()
        if len(rel) > 2_000_000:  # quantile() has a size limit; an even subsample is as good
            rel = rel[:: len(rel) // 2_000_000 + 1]
        mean = lambda xs: float(torch.cat(xs).double().mean())  # noqa: E731
        return dict(
            relative_change_quantiles={str(q): float(torch.quantile(rel, q)) for q in QUANTILES},
            relative_change_mean=float(rel.mean()),
            p90_over_p10_median=float(torch.cat(self.spread).median()),
            top_share={str(s): mean(v) for s, v in self.top.items()},
            spearman={k: mean(v) for k, v in self.rho.items()},
            captured_at_25={k: mean(v) for k, v in self.capture.items()},
            step_mean_relative_change=self.step_mean,
        )


def measure(pipe: Any, labels: list[int], steps: int, sampler: str, guidance: float, seed: int = 0
            ) -> dict[str, Any]:
    """Sample ``labels`` uncached and return the statistics per module (``blocks``) and over all modules."""
    transformer = pipe.transformer
    blocks = find_blocks(transformer)
    state: dict[str, Any] = dict(step=-1)
    prev_out: dict[str, torch.Tensor] = {}
    prev_in: dict[str, torch.Tensor] = {}
    raw_now: dict[tuple[int, str], torch.Tensor] = {}  # statistic of the current step (block, score)
    raw_prev: dict[tuple[int, str], torch.Tensor] = {}  # ... of the previous step: what ToCa would read
    accs: dict[str, _Acc] = {}
    handles = []
    swapped: list[tuple[Any, Any]] = []
    generator = torch.Generator().manual_seed(seed)

    def before_call(module: Any, args: tuple, kwargs: dict) -> None:
        state["step"] += 1
        raw_prev.clear()
        raw_prev.update(raw_now)
        raw_now.clear()

    handles.append(transformer.register_forward_pre_hook(before_call, with_kwargs=True))

    def sink_for(block: int, score: str):
        def sink(value: torch.Tensor) -> None:
            raw_now[(block, score)] = value.detach().float()

        return lambda: sink

    for entry in blocks:
        for slot, module in entry.slots():
            name = f"block {entry.index} {slot.name} ({slot.kind})"
            accs[name] = _Acc()
            if slot.kind in ("self_attn", "cross_attn") and unsupported_reason(module) is None:
                statistic, score = ("received", "attention") if slot.kind == "self_attn" else \
                    ("entropy", "cross_attention_entropy")
                swapped.append((module, module.processor))
                module.set_processor(ScoringAttnProcessor(module.processor, statistic,
                                                          sink_for(entry.index, score), chunk_size=1024))

            def hook(mod: Any, args: tuple, kwargs: dict, output: Any, name: str = name, block: int = entry.index,
                     kind: str = slot.kind) -> None:
                x = (args[0] if args else kwargs["hidden_states"]).detach()
                out = (output[0] if isinstance(output, tuple) else output).detach().float()
                if kind == "self_attn":  # the value norm ToCa's value_norm score reads (head mean of ||v||)
                    value = mod.to_v(x).float()
                    heads = mod.heads
                    raw_now[(block, "value_norm")] = value.view(value.shape[0], value.shape[1], heads, -1) \
                        .norm(dim=-1).mean(dim=-1)
                last = prev_out.get(name)
                if last is not None and last.shape == out.shape:
                    change = (out - last).norm(dim=-1)  # (rows, tokens)
                    rel = change / last.norm(dim=-1).clamp_min(1e-12)
                    scores = {}
                    for score in ("attention", "value_norm", "cross_attention_entropy"):
                        raw = raw_prev.get((block, score))
                        if raw is not None and raw.shape == change.shape:
                            scores[score] = score_from_raw(score, raw)
                    scores["similarity"] = score_from_raw(
                        "similarity", torch.nn.functional.cosine_similarity(x.float(), prev_in[name].float(), dim=-1))
                    scores["random"] = torch.rand(change.shape, generator=generator)
                    accs[name].add(state["step"], rel, change, scores)
                prev_out[name] = out
                prev_in[name] = x

            handles.append(module.register_forward_hook(hook, with_kwargs=True))

    original = pipe.scheduler
    pipe.scheduler = scheduler_for(pipe, sampler)
    try:
        with torch.no_grad():
            pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed))
    finally:
        pipe.scheduler = original
        for handle in handles:
            handle.remove()
        for module, processor in swapped:
            module.set_processor(processor)
    per_module = {name: acc.summary() for name, acc in accs.items() if acc.rel}
    return dict(blocks=per_module, overall=_overall(per_module), steps=steps, sampler=sampler,
                calls=state["step"] + 1)


def _overall(per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over modules (and per module kind) of the scalar statistics."""
    def avg(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("relative_change_mean", "p90_over_p10_median"):
            out[key] = statistics.fmean(r[key] for r in rows)
        for key in ("relative_change_quantiles", "top_share", "spearman", "captured_at_25"):
            names = sorted({n for r in rows for n in r[key]})
            out[key] = {n: statistics.fmean(r[key][n] for r in rows if n in r[key]) for n in names}
        steps = sorted({int(s) for r in rows for s in r["step_mean_relative_change"]})
        out["step_mean_relative_change"] = {s: statistics.fmean(r["step_mean_relative_change"][s] for r in rows
                                                                if s in r["step_mean_relative_change"])
                                            for s in steps}
        return out

    rows = list(per_module.values())
    kinds = sorted({name.split("(")[-1].rstrip(")") for name in per_module})
    result = {"all modules": avg(rows)}
    for kind in kinds:
        result[kind] = avg([r for name, r in per_module.items() if name.endswith(f"({kind})")])
    return result


def _gain_db(random_share: float):
    """dB by which removing ``share`` of the squared change beats removing ``random_share`` of it."""
    return lambda share: 10 * math.log10((1 - random_share) / max(1 - share, 1e-12))


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# How unevenly tokens change between consecutive steps ({meta['date']})", "",
             f"Device: {meta['device']}. {meta['samples']} samples (10 per class, seed {meta['seed']}), uncached, "
             "statistics over every consecutive pair of steps and every row of the CFG batch; per-token change "
             "`d = ||f_t - f_(t-1)||` of each cacheable module's output (`benchmarks/token_change.py`). "
             "Relative change: `d / ||f_(t-1)||`. Top share: the share of the step's total squared change "
             "carried by the 10 % / 25 % most-changing tokens (perfectly even: 0.10 / 0.25). Spearman: rank "
             "correlation of each ToCa score (as the engine computes it) with `d`. Captured at 25 %: the share "
             "of squared change removed by recomputing the top 25 % of tokens by that score (oracle: by `d` "
             "itself; random: 0.25 on average). Means over modules and (step, row) pairs.", ""]
    for model, res in results.items():
        guidance = describe_guidance(res["guidance"], res.get("guidance_interval"))
        lines += [f"## {model}: {res['sampler_text']} ({res['blocks_count']} blocks, {res['tokens']} tokens, "
                  f"guidance {guidance})", ""]
        lines += ["| modules | rel. change p10 / p50 / p90 / p99 | p90/p10 within a step | top 10 % share | "
                  "top 25 % share | Spearman: " + " / ".join(res["scores"]) + " | captured at 25 %: oracle / "
                  + " / ".join(res["scores"]) + " |", "|---|---|---|---|---|---|---|"]
        for group, o in res["overall"].items():
            q = o["relative_change_quantiles"]
            rho = " / ".join(f"{o['spearman'].get(s, float('nan')):+.2f}" for s in res["scores"])
            cap = " / ".join(f"{o['captured_at_25'].get(s, float('nan')):.2f}" for s in ("oracle", *res["scores"]))
            lines.append(f"| {group} | {q['0.1']:.3f} / {q['0.5']:.3f} / {q['0.9']:.3f} / {q['0.99']:.3f} | "
                         f"{o['p90_over_p10_median']:.2f} | {o['top_share']['0.1']:.2f} | "
                         f"{o['top_share']['0.25']:.2f} | {rho} | {cap} |")
        cap = res["overall"]["all modules"]["captured_at_25"]
        best = max((s for s in res["scores"] if s != "random"), key=cap.__getitem__)
        gain = _gain_db(cap["random"])
        lines += ["", f"Recomputing 25 % of the tokens of one module, the best score ({best}) removes "
                  f"{cap[best]:.0%} of the squared change against {cap['random']:.0%} at random and "
                  f"{cap['oracle']:.0%} for the oracle: what the reused tokens add to the squared error shrinks by "
                  f"{gain(cap[best]):.1f} dB against random tokens ({gain(cap['oracle']):.1f} dB for a perfect "
                  "choice): a first-order estimate, per partial step, of what token choice can buy here."]
        per_step = res["overall"]["all modules"]["step_mean_relative_change"]
        values = list(per_step.values())
        lines += ["", "Mean relative change per step (all modules; step 1 = first change): "
                  + ", ".join(f"{v:.3f}" for v in values)
                  + f" (max / min over steps {max(values) / min(values):.1f}x).", ""]
        lines += ["<details><summary>per block and module</summary>", "",
                  "| module | rel. change p50 / p90 | p90/p10 | top 10 % | top 25 % | Spearman: "
                  + " / ".join(res["scores"]) + " | captured at 25 %: oracle / " + " / ".join(res["scores"]) + " |",
                  "|---|---|---|---|---|---|---|"]
        for name, o in res["blocks"].items():
            q = o["relative_change_quantiles"]
            rho = " / ".join(f"{o['spearman'].get(s, float('nan')):+.2f}" for s in res["scores"])
            cap = " / ".join(f"{o['captured_at_25'].get(s, float('nan')):.2f}" for s in ("oracle", *res["scores"]))
            lines.append(f"| {name} | {q['0.5']:.3f} / {q['0.9']:.3f} | {o['p90_over_p10_median']:.2f} | "
                         f"{o['top_share']['0.1']:.2f} | {o['top_share']['0.25']:.2f} | {rho} | {cap} |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def run_model(name: str, samples: int, seed: int) -> dict[str, Any]:
    from frontier import MODELS

    spec = MODELS[name]
    pipe, _ = spec.load()
    pipe.set_progress_bar_config(disable=True)
    sampler = spec.main_sampler
    steps = spec.reference_steps[sampler]
    guidance = spec.guidance()
    labels = list(range(10)) * (samples // 10)
    start = time.process_time()
    result = measure(pipe, labels, steps, sampler, guidance, seed)
    blocks = find_blocks(pipe.transformer)
    cross = any(s.kind == "cross_attn" for b in blocks for s, _ in b.slots())
    result.update(sampler_text=spec.sampler_text(sampler, steps), guidance=guidance,
                  guidance_interval=spec.guidance_interval(), blocks_count=len(blocks),
                  tokens=(pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2,
                  scores=[s for s in SCORES if cross or s != "cross_attention_entropy"],
                  cpu_seconds=time.process_time() - start)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "fashion"], choices=["digits", "fashion"])
    parser.add_argument("--samples", type=int, default=20, help="a multiple of 10 (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="token-change", help="result file stem in benchmarks/results")
    args = parser.parse_args(argv)
    if args.samples < 10 or args.samples % 10:
        parser.error(f"--samples must be a positive multiple of 10; got {args.samples}")
    torch.set_num_threads(args.threads)
    results = {name: run_model(name, args.samples, args.seed) for name in args.models}
    meta = dict(date=datetime.date.today().isoformat(), samples=args.samples, seed=args.seed,
                device=f"CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s)", args=vars(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    table = markdown(results, meta)
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
