"""The benchmark scripts' own logic, and a short run of each profile step (real shapes, one block)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tokencache as tc
from tokencache.core.layouts import find_blocks

from models import tiny_dit, tiny_pixart

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import frontier  # noqa: E402
import pareto  # noqa: E402
import speed  # noqa: E402
import step_profile  # noqa: E402
import token_change  # noqa: E402


def _names(block, categories):
    names = {id(m): n for n, m in block.module.named_modules()}
    found: dict[str, set[str]] = {}
    for category, module in categories:
        found.setdefault(category, set()).add(names[id(module)])
    return found


def test_step_profile_categories_follow_the_layout():
    dit_block = find_blocks(tiny_dit())[0]
    assert _names(dit_block, step_profile.block_categories(dit_block)) == {
        "cached modules": {"attn1", "ff"},
        "embedders": {"norm1.emb"},  # its timestep/class linears are not counted as modulation
        "modulation linears": {"norm1.linear"},
        "LayerNorms": {"norm1.norm", "norm3"},  # DiT has no cross-attention, so no norm2
    }
    pixart_block = find_blocks(tiny_pixart())[0]
    found = _names(pixart_block, step_profile.block_categories(pixart_block))
    assert found["cached modules"] == {"attn1", "attn2", "ff"}
    assert "modulation linears" not in found and "embedders" not in found  # PixArt modulates outside its blocks


def test_memory_probe_runs_through_the_second_full_step():
    dit = tiny_dit()
    assert speed.probe_steps(None, dit, 50) == 2
    assert speed.probe_steps(tc.FORAConfig(interval=3), dit, 50) == 4
    kinds = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit, 50, batch_size=2).step_kinds
    second_full = [i for i, k in enumerate(kinds) if k == "full"][1]
    assert speed.probe_steps(tc.ToCaConfig.preset("dit-ddim50"), dit, 50) == second_full + 1
    assert speed.probe_steps(tc.FORAConfig(interval=50), dit, 50) == 50  # one full step: the whole run
    assert speed.probe_steps(tc.SmallBatchLinearConfig(), dit, 50) == 2  # no cache: like the uncached run


@pytest.mark.parametrize("no_route", [False, True])
def test_speed_rows_separate_the_linear_route_from_the_cache(monkeypatch, no_route):
    """One block, three steps: the route's own row, each cache's ratio against it, and the summary's columns."""
    import summary

    monkeypatch.setattr(speed, "peak_memory", lambda model, methods, *rest: dict.fromkeys(methods, 1.0))
    args = argparse.Namespace(steps=3, blocks=1, repeats=1, threads=1, dtype="float32", device="cpu",
                              no_small_batch_linear=no_route)
    routes = []
    real_apply = tc.apply
    monkeypatch.setattr(tc, "apply", lambda *a, **k: routes.append(k.get("small_batch_linear", "default"))
                        or real_apply(*a, **k))
    rows = speed.bench_model("dit-xl-2", args, speed.torch.device("cpu"), speed.torch.float32)
    methods = [r["method"] for r in rows]
    assert (speed.SMALL_LINEAR_ROW in methods) is not no_route
    assert routes and all((r is None) is no_route for r in routes)
    for r in rows:
        if r["method"] in ("no cache", speed.SMALL_LINEAR_ROW):
            assert r["flops_speedup"] == 1.0 and r["cache_memory_mib"] == 0.0
        else:
            assert r["flops_speedup"] > 1.0 and r["engine_share_of_cached_steps"] >= 0.0
        assert ("overhead_ratio_vs_small_linear" in r) is (not no_route and r["flops_speedup"] > 1.0)
        if not no_route:
            want = r["measured_speedup_vs_small_linear"] / r["flops_speedup"]
            assert r.get("overhead_ratio_vs_small_linear", want) == pytest.approx(want)
    table = speed.markdown(rows, "header")
    assert ("against the small-batch linear row" in table) is not no_route
    run = dict(device="cpu", dtype="float32", date="today", args=vars(args), rows=rows)
    lines = summary.speed_table([run]).splitlines()
    cached = next(line for line in lines if "| ToCa dit-ddim50 (attention) |" in line)
    assert ("| W @ xᵀ |" in cached) is not no_route and ("| stock |" in cached) is no_route


def test_flux_and_wan_inputs_match_the_planned_token_counts():
    """FLUX.1-dev and Wan 2.1 1.3B cut to one block (meta weights): the inputs have the real token counts the
    plans assume, and every timed method fits the cut model (FLUX ToCa presets: one depth factor per block)."""
    meta, cpu = speed.torch.device("meta"), speed.torch.device("cpu")
    flux = speed.build("flux-dev", 1, meta, speed.torch.float32)
    assert speed.num_blocks(flux) == 2 and flux.config.num_attention_heads * flux.config.attention_head_dim == 3072
    inputs = speed.make_inputs("flux-dev", flux, cpu, speed.torch.float32)
    cond = inputs["cond"]
    assert inputs["latents"].shape == (1, 4096, 64) and cond["encoder_hidden_states"].shape == (1, 512, 4096)
    assert cond["pooled_projections"].shape == (1, 768) and cond["txt_ids"].shape == (512, 3)
    assert cond["img_ids"].shape == (4096, 3) and cond["img_ids"][-1].tolist() == [0.0, 63.0, 63.0]
    wan = speed.build("wan2.1-t2v-1.3b", 1, meta, speed.torch.float32)
    assert speed.num_blocks(wan) == 1
    video = speed.make_inputs("wan2.1-t2v-1.3b", wan, cpu, speed.torch.float32)
    assert video["latents"].shape == (1, 16, 5, 60, 104) and video["uncond"].shape == (1, 512, 4096)
    for name, model in (("flux-dev", flux), ("wan2.1-t2v-1.3b", wan)):
        counts = speed.token_counts(name, model)
        assert counts["num_tokens"] == (4096 if name == "flux-dev" else 5 * 30 * 52)
        for config in speed.SETTINGS[name]["methods"].values():
            fitted = speed.fit_to_blocks(config, model)
            plan = tc.plan(fitted, model, 10, **counts)
            assert plan.step_kinds[:3] == ("full",) * 3 and plan.step_kinds[3] != "full"
            assert plan.speedup > 1.5
            assert speed.probe_steps(fitted, model, 10, counts) == 2  # the first 3 steps are full
    assert speed._spread([1.234, 1.1]) == "1.10-1.23" and speed._spread([2.0, 2.001]) == "2.00"


def test_cpu_peak_memory_probe_measures_the_run():
    args = argparse.Namespace(dtype="float32", steps=3, blocks=1, threads=1)
    uncached = speed.cpu_peak_rss_mib("pixart-alpha-256", "no cache", args)
    cached = speed.cpu_peak_rss_mib("pixart-alpha-256", "FORA N=3", args)
    # one PixArt-alpha block plus the caption projection and embedders hold well over 100 MiB of float32 weights
    assert 100 < uncached < 4000 and 100 < cached < 4000
    with pytest.raises(RuntimeError, match="memory probe"):
        speed.cpu_peak_rss_mib("pixart-alpha-256", "no such method", args)


def test_step_profile_short_run(tmp_path):
    out = tmp_path / "profile"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_profile.py"), "--model", "dit-xl-2", "--blocks", "1", "--steps", "6",
         "--repeats", "1", "--split-steps", "3", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(out.with_suffix(".json").read_text())["result"]
    one_block = speed.build_transformer("dit-xl-2")
    one_block.transformer_blocks = one_block.transformer_blocks[:1]  # as profiled: a mixed step is full in 1 block
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), one_block, 6, batch_size=2)
    kinds = {k["kind"]: k for k in profile["step_kinds"]}
    assert sum(k["steps"] for k in kinds.values()) == 6
    assert {kind: kinds[kind]["steps"] for kind in kinds} == {k: plan.count(k) for k in kinds}
    assert kinds["full"]["flops_share"] == pytest.approx(1.0)
    split = profile["reuse_step_seconds"]
    assert set(split) == set(step_profile.CATEGORIES)
    assert all(split[c] > 0 for c in ("cached modules", "embedders", "modulation linears", "LayerNorms"))
    assert profile["weight_read"]["partial_step_bytes"] > profile["weight_read"]["modulation_bytes"] > 0
    assert "| reuse |" in out.with_suffix(".md").read_text() or "reuse" not in kinds


# ------------------------------------------------------------------------------------------ frontier.py, --model


def _tiny_fashion(tmp_path, monkeypatch, predictor=None, steps: int | None = None):
    """frontier.py's fashion spec with a tiny PixArt-style model, classifier and FD statistics (results in tmp)."""
    from tokencache.demo.classifier import DigitClassifier
    from tokencache.demo.fashion.model import FashionPipeline, build_transformer, make_scheduler
    from tokencache.demo.fashion.reference import fd_to_reference, feature_stats

    torch.manual_seed(0)
    pipe = FashionPipeline(build_transformer("pixart", num_layers=2, width=32, head_dim=16).eval(), make_scheduler())
    classifier = DigitClassifier(image_size=28).eval()
    reference = feature_stats(torch.rand(30, 1, 28, 28) * 2 - 1, classifier)
    assets = tmp_path / "fashion-dit"
    pipe.transformer.save_pretrained(assets / "transformer")
    pipe.scheduler.save_pretrained(assets / "scheduler")
    changes = dict(load=lambda: (pipe, classifier), assets=lambda: assets, predictor=lambda: predictor,
                   fd=lambda clf: (lambda images: fd_to_reference(images, clf, reference)))
    if steps is not None:  # a shorter reference run (and one fewer-steps row) keeps the sweep tests fast
        changes.update(reference_steps={"flow": steps}, fewer_steps={"flow": (steps // 2,)},
                       quick_fewer_steps=steps // 2)
    spec = replace(frontier.MODELS["fashion"], **changes)
    monkeypatch.setitem(frontier.MODELS, "fashion", spec)
    monkeypatch.setattr(frontier, "RESULTS", tmp_path / "results")
    return spec, pipe


def _tiny_predictor(num_blocks: int, steps: int):
    return tc.TokenCachePredictor(num_blocks, 196, steps, "features",
                                  model=dict(class_name="PixArtTransformer2DModel"),
                                  calibration=dict(budget=0.5, block_sensitivity=[1.0] * num_blocks,
                                                   schedule=dict(early_cached_steps=1, late_cached_steps=1,
                                                                 boundary=0.5)))


def test_frontier_digits_rows_are_unchanged():
    quick = [m.name for m in frontier.tokencache_methods(quick=True, ddpm=False)]
    assert quick[0] == "no cache (DDIM-50)" and quick[1:3] == ["ToCa attention N=4", "FORA N=3"]
    assert quick[-2:] == ["forecast N=5 (preset)", "DDIM-20 (fewer steps)"]
    full = frontier.tokencache_methods(quick=False, ddpm=True)
    assert "ToCa cross_attention_entropy (any N)" in [m.name for m in full]
    assert {m.sampler for m in full} == {"ddim", "ddpm"} and full[-1].name == "DDPM-150 (fewer steps)"
    assert all(m.config.__class__.__name__ != "ToCaConfig" or m.config.module_ratio.get("mlp") for m in full)


def test_frontier_fashion_rows(tmp_path, monkeypatch):
    """Every row of the fashion sweep: Euler, the five scores at the same FLOPs per N (PixArt preset), FORA,
    TokenCache learned vs random at four budgets, forecasting configs that fit the model, fewer steps."""
    spec, pipe = _tiny_fashion(tmp_path, monkeypatch, predictor=_tiny_predictor(2, 30))
    methods = frontier.tokencache_methods(quick=False, ddpm=True, spec=spec)
    names = [m.name for m in methods]
    assert names[0] == "no cache (Euler-30)" and all(m.sampler == "flow" for m in methods)
    assert len(names) == len(set(names)) and not any(m.unavailable for m in methods)
    toca = [m for m in methods if m.family.startswith("ToCa ") and "modules" not in m.extra]
    assert {(m.extra["score"], m.extra["interval"]) for m in toca} == {
        (s, n) for s in frontier.TOCA_SCORES for n in frontier.TOCA_INTERVALS}
    for n in frontier.TOCA_INTERVALS:  # the same FLOPs whatever the score
        same_n = [m.config for m in toca if m.extra["interval"] == n]
        assert len({tc.plan(c, pipe.transformer, 30, batch_size=4).flops for c in same_n}) == 1
        assert all(c.module_ratio["cross_attn"] > 0 and c.cfg_shared_selection for c in same_n)  # PixArt preset
    every = [m.config for m in methods if m.extra.get("modules") == "all"]  # self-attention partial too
    assert len(every) == 3 and len({tc.plan(c, pipe.transformer, 30, batch_size=4).flops for c in every}) == 1
    assert all(c.module_ratio["self_attn"] > 0 for c in every)
    assert [m.extra["interval"] for m in methods if m.family == "FORA"] == list(frontier.FORA_INTERVALS)
    rows = {(m.extra["token_selection"], m.extra["budget"]) for m in methods if m.family.startswith("TokenCache")}
    assert rows == {(s, b) for s in ("predictor", "random") for b in frontier.TOKENCACHE_BUDGETS}
    forecast = [m for m in methods if "forecast" in m.family]
    assert len(forecast) >= 8 and all(m.config.forecast is not None for m in forecast)
    for m in forecast + toca:  # each config plans on the PixArt model and saves FLOPs
        assert tc.plan(m.config, pipe.transformer, 30, batch_size=4).speedup > 1.2, m.name
    assert [m.steps for m in methods if m.family == "fewer steps"] == [10, 15, 20, 25]
    no_predictor = replace(spec, predictor=lambda: None)  # unavailable rows that say what is missing
    empty = [m for m in frontier.tokencache_methods(False, True, no_predictor) if m.family.startswith("TokenCache")]
    assert [m.name for m in empty] == ["TokenCache learned", "TokenCache random"]
    assert all("tokencache-predictor" in m.unavailable for m in empty)


def test_frontier_fashion_sweep_is_incremental_and_resumes(tmp_path, monkeypatch):
    """A quick fashion sweep on a tiny model, cut off after a few rows: the JSON keeps them, --resume runs the
    rest (the peers attach to the PixArt pipeline), --update replaces a row, --replot redraws."""
    _tiny_fashion(tmp_path, monkeypatch, steps=8)
    real_compare = frontier.compare
    seen = []

    def interrupted(*args, on_record=None, **kwargs):
        def cut(i, record):
            on_record(i, record)
            seen.append(record["method"])
            if len(seen) == 4:
                raise KeyboardInterrupt

        return real_compare(*args, on_record=cut, **kwargs)

    argv = ["--model", "fashion", "--quick", "--samples", "10", "--samples-per-call", "5"]
    monkeypatch.setattr(frontier, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        frontier.main(argv)
    path = tmp_path / "results" / "frontier-fashion-quick.json"
    first = json.loads(path.read_text())
    assert first["meta"]["complete"] is False and first["meta"]["model_name"] == "fashion"
    assert first["meta"]["wall_minutes"] > 0  # the cut-off sweep still says how long it ran
    assert [r["method"] for r in first["records"]] == seen
    assert "Incomplete" in path.with_suffix(".md").read_text()

    monkeypatch.setattr(frontier, "compare", real_compare)
    frontier.main(argv + ["--resume"])
    done = json.loads(path.read_text())
    by_name = {r["method"]: r for r in done["records"]}
    assert done["meta"]["complete"] is True
    for record in first["records"]:  # what the cut-off sweep measured is kept as it was
        assert by_name[record["method"]] == record
    expected = {"no cache (Euler-8)", "ToCa attention N=4", "ToCa random N=4", "FORA N=3", "Euler-4 (fewer steps)",
                "forecast N=3 newton o1 first=3", "diffusers FBCache t=0.1", "diffusers TaylorSeer N=3"}
    assert expected <= set(by_name) and by_name["TokenCache learned"]["unavailable"]
    assert by_name["ToCa attention N=4"]["flops_speedup"] == pytest.approx(by_name["ToCa random N=4"]["flops_speedup"])
    assert by_name["diffusers TaylorSeer N=3"]["hooked_modules"] == 6  # attn1, attn2 (cross) and ff of 2 blocks
    # two pipeline calls per run: tokencache's FLOPs add up over them (compare checks them against the plan of the
    # whole batch), and a peer's step counts too (the notes show them per call)
    assert {r["calls"] for r in done["records"] if "unavailable" not in r} == {2}
    for name in by_name:
        peer = by_name[name]
        done_steps = peer.get("skipped_steps", peer.get("predicted_steps"))
        if "computed_steps" in peer and done_steps is not None:
            assert peer["computed_steps"] + done_steps == 2 * 8, name
            assert " of 8 steps" in frontier.notes(peer)
    assert set(done["meta"]["resumed"][0]["methods"]) == {n for n, r in by_name.items()
                                                         if n not in seen and "unavailable" not in r}
    assert done["meta"]["resumed"][0]["wall_minutes"] > 0

    frontier.main(argv + ["--update", "--only", "^FORA"])
    updated = json.loads(path.read_text())
    assert updated["meta"]["updates"][-1]["methods"] == ["FORA N=3"]
    assert [r["method"] for r in updated["records"]] == [r["method"] for r in done["records"]]
    frontier.main(argv + ["--replot"])
    assert path.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):  # a resume with other settings is refused
        frontier.main(["--model", "fashion", "--quick", "--samples", "20", "--resume"])
    with pytest.raises(SystemExit):  # and so is one with other calls
        frontier.main(["--model", "fashion", "--quick", "--samples", "10", "--resume"])
    # the pipeline's guidance interval is recorded; a resume after it changed is refused
    from tokencache.demo.fashion import DEFAULT_GUIDANCE_INTERVAL

    assert done["meta"]["guidance_interval"] == [float(v) for v in DEFAULT_GUIDANCE_INTERVAL]
    monkeypatch.setitem(frontier.MODELS, "fashion", replace(frontier.MODELS["fashion"],
                                                            guidance_interval=lambda: [0.05, 0.95]))
    with pytest.raises(SystemExit):
        frontier.main(argv + ["--resume"])


def test_frontier_sweeps_run_side_by_side_merge_in_order(tmp_path, monkeypatch):
    """Two processes on disjoint rows (--only, --out), then --merge: every row once, in the sweep's order; parts
    with other settings or the same row twice are refused."""
    _tiny_fashion(tmp_path, monkeypatch, steps=4)
    base = ["--model", "fashion", "--quick", "--samples", "10", "--no-peers"]
    frontier.main(base + ["--only", "^(no cache|ToCa )", "--out", "frontier-a"])
    frontier.main(base + ["--only", "^(?!no cache|ToCa )", "--out", "frontier-b"])
    frontier.main(base + ["--merge", "frontier-a", "frontier-b", "--out", "frontier-ab"])
    merged = json.loads((tmp_path / "results" / "frontier-ab.json").read_text())
    names = [r["method"] for r in merged["records"]]
    b_rows = [r["method"] for r in json.loads((tmp_path / "results" / "frontier-b.json").read_text())["records"]
              if "unavailable" not in r]
    assert names[:3] == ["no cache (Euler-4)", "ToCa attention N=4", "ToCa random N=4"]
    assert len(set(names)) == len(names)
    assert set(b_rows) <= set(names) and merged["meta"]["parallel"][0]["methods"] == b_rows
    header = (tmp_path / "results" / "frontier-ab.md").read_text()
    assert "second process" in header and "Merged from the sweeps of frontier-a, frontier-b" in header
    assert merged["meta"]["merged_from"] == ["frontier-a", "frontier-b"]
    with pytest.raises(SystemExit):  # the same row in both parts
        frontier.main(base + ["--merge", "frontier-a", "frontier-a", "--out", "frontier-aa"])
    with pytest.raises(SystemExit):  # other settings (samples)
        frontier.main(["--model", "fashion", "--quick", "--samples", "20", "--no-peers", "--merge", "frontier-a",
                       "frontier-b", "--out", "frontier-x"])


def test_frontier_header_tells_each_sweep_of_a_merged_part_apart():
    """A merged part that was itself interrupted and resumed: the header lists the rows of its first sweep and of
    its resumed and updated sweeps separately, each with its own wall time (0 = not recorded)."""
    part = dict(date="2026-01-01", wall_minutes=0.0, methods=["A", "B", "C", "D"],
                resumed=[dict(date="2026-01-02", wall_minutes=12.4, methods=["C", "D"])],
                updates=[dict(date="2026-01-03", wall_minutes=3.0, repeats=2, methods=["D"])])
    assert frontier._first_sweep_methods(part) == ["A", "B"]
    text = frontier._later_sweeps(part, repeats=1)
    assert "resumed run on 2026-01-02 (12 min" in text and ": C, D." in text
    assert "`--update` on 2026-01-03 (3 min, 2 repeat(s)" in text and text.endswith(": D.")
    assert frontier._minutes(0.0) == "wall time not recorded" and frontier._minutes(61.6) == "62 min"


def test_pareto_compares_rows_of_different_sweeps_by_their_cpu_time():
    """Rows timed against two uncached references (300 and 270 CPU-s): ours took 100 s, the peer 105 s, yet the
    peer's recorded ratio is the higher one; on the common (median) reference ours is the faster. Equal images
    (PSNR equal to float rounding) count as equal."""
    rows = [dict(method="forecast N=3", sampler="flow", cpu_seconds=100.0, cpu_speedup=3.0, psnr=41.514086, fd=16.9),
            dict(method="diffusers TaylorSeer N=3", sampler="flow", cpu_seconds=105.0, cpu_speedup=270 / 105,
                 psnr=41.514088, fd=16.9)]
    speeds, refs = pareto.common_speeds(rows)
    assert refs == [270.0, 300.0]
    assert speeds["forecast N=3"] == pytest.approx(285 / 100) and speeds["diffusers TaylorSeer N=3"] == \
        pytest.approx(285 / 105)
    lines, ok = pareto.check(rows, "flow", fd_slack=0.5, low=1.5, high=5.0)
    assert ok and "<- forecast N=3" in lines[0]
    slower = [dict(rows[0], cpu_seconds=110.0, cpu_speedup=300 / 110), rows[1]]
    assert pareto.check(slower, "flow", 0.5, 1.5, 5.0)[1] is False  # 110 s against 105 s: not dominated


def test_token_change_measures_every_cacheable_module(tmp_path, monkeypatch):
    _, pipe = _tiny_fashion(tmp_path, monkeypatch, steps=5)
    processors = [type(m.processor) for m in pipe.transformer.modules() if hasattr(m, "processor")]
    with torch.no_grad():
        before = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    monkeypatch.setattr(token_change, "RESULTS", tmp_path / "results")
    token_change.main(["--models", "fashion", "--samples", "10"])
    result = json.loads((tmp_path / "results" / "token-change.json").read_text())["results"]["fashion"]
    assert result["calls"] == 5 and len(result["blocks"]) == 6  # attn1, attn2, ff of 2 blocks
    for stats in result["blocks"].values():
        capture = stats["captured_at_25"]
        assert set(capture) == {"oracle", *token_change.SCORES}
        assert all(capture["oracle"] >= v - 1e-9 for v in capture.values())  # nothing beats the oracle
        assert stats["top_share"]["0.1"] >= 0.1 - 1e-9 and stats["top_share"]["0.25"] >= 0.25 - 1e-9
        assert all(-1 <= rho <= 1 for rho in stats["spearman"].values())
        assert len(stats["step_mean_relative_change"]) == 4
    assert "cross_attention_entropy" in (tmp_path / "results" / "token-change.md").read_text()
    # the hooks and scoring processors are gone: the model samples as before
    assert [type(m.processor) for m in pipe.transformer.modules() if hasattr(m, "processor")] == processors
    with torch.no_grad():
        after = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(before, after)
