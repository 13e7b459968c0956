"""The benchmark scripts' own logic, and a short run of each profile step (real shapes, one block)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tokencache as tc
from tokencache.core.layouts import find_blocks

from models import tiny_dit, tiny_pixart

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import speed  # noqa: E402
import step_profile  # noqa: E402


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
