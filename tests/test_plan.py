"""Plans: FLOP counting against the published figures, and agreement with real runs."""

import pytest

import tokencache as tc
from tokencache.core.shapes import build_transformer

from models import prompt_embeds, tiny_dit_pipeline, tiny_pixart_pipeline
from test_equivalence import dit_pipe_run, pixart_pipe_run


@pytest.fixture(scope="module")
def dit_xl_2():
    return build_transformer("dit-xl-2")  # meta device: shapes only


def test_dit_xl2_uncached_flops_match_published(dit_xl_2):
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50, batch_size=2, counting="toca")
    assert plan.flops_full == pytest.approx(23.74e12, rel=0.002)
    # the engine's own count: 5 FLOPs per LayerNorm element, 2 per MAC of the adaLN linear, no GELU
    engine = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50, batch_size=2)
    assert engine.counting == "engine" and engine.flops_full == pytest.approx(23.744e12, rel=1e-4)


def test_dit_ddim50_speedup_matches_published(dit_xl_2):
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50, batch_size=2, counting="toca")
    assert plan.speedup == pytest.approx(2.32, rel=0.002)
    assert plan.flops == pytest.approx(10.23e12, rel=0.002)
    assert plan.step_kinds[0] == "full"
    # DDIM-50's step factor is negative for the first quarter: those partial steps recompute nothing, but for
    # the official placement's mixed step 4, where block 0 alone is full
    assert all(k in ("full", "reuse") for i, k in enumerate(plan.step_kinds[:12]) if i != 4)
    assert plan.step_kinds[4] == "partial" and plan.fresh_fraction[4][0] == 1.0 and max(plan.fresh_fraction[4][1:]) == 0
    # per-step FLOPs add up, full steps cost an uncached step, partial steps less
    assert sum(plan.step_flops) == plan.flops and len(plan.step_flops) == 50
    per_step = plan.flops_full // 50
    for kind, flops in zip(plan.step_kinds, plan.step_flops, strict=True):
        assert (flops == per_step) if kind == "full" else (flops < per_step)


def test_dit_ddpm250_speedup_matches_published(dit_xl_2):
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddpm250"), dit_xl_2, 250, batch_size=2, counting="toca")
    assert plan.flops_full == pytest.approx(118.68e12, rel=0.002)
    assert plan.flops == pytest.approx(43.42e12, rel=0.002)
    assert plan.speedup == pytest.approx(2.733, rel=0.002)


def test_toca_counter_is_the_official_per_block_formula(dit_xl_2):
    """The ``toca`` convention, block by block, as the official DiT-ToCa counter writes it (B samples, N tokens,
    C features, h heads): LayerNorms 2BNC, adaLN BC + 6BC², attention with 1 FLOP per query element for the
    scaling, MLP 16BNC² + 6 FLOPs per GELU element."""
    from tokencache.core.flops import TOCA_COUNTER, block_overhead_flops, slot_flops
    from tokencache.core.layouts import find_blocks

    b, n, c, h = 2, 256, 1152, 16
    block = find_blocks(dit_xl_2)[0]
    overhead = 2 * b * n * c + b * c + 6 * b * c * c
    attn = 6 * b * n * c * c + b * n * c + 2 * b * n * n * c + 5 * b * h * n * n + 2 * b * n * n * c + 2 * b * n * c * c

    def mlp(rows):
        return 16 * b * rows * c * c + 6 * b * rows * 4 * c

    assert block_overhead_flops(block, n, b, convention=TOCA_COUNTER) == overhead
    costs = {slot.kind: (slot, module) for slot, module in block.slots()}
    assert slot_flops(*costs["self_attn"], n, n, 0, b, convention=TOCA_COUNTER) == attn
    assert slot_flops(*costs["mlp"], n, n, 0, b, convention=TOCA_COUNTER) == mlp(n)
    assert slot_flops(*costs["mlp"], 37, n, 0, b, convention=TOCA_COUNTER) == mlp(37)
    with pytest.raises(ValueError, match="counting"):
        tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50, counting="paper")


def test_fora_plan_counts_reuse_steps(dit_xl_2):
    plan = tc.plan(tc.FORAConfig(interval=3), dit_xl_2, 50, batch_size=2)
    assert plan.count("full") == 17 and plan.count("reuse") == 33 and plan.count("partial") == 0
    # reuse steps still pay the per-block LayerNorms and adaLN projection
    assert 50 / 17 * 0.95 < plan.speedup < 50 / 17


def test_plan_grid_and_validation(dit_xl_2):
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50, batch_size=2)
    text = str(plan)
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 50 and rows[0].split()[-1] == "F" * 28
    assert "2.32x" in text
    with pytest.raises(ValueError, match="num_steps"):
        tc.plan(tc.FORAConfig(), dit_xl_2, 0)
    with pytest.raises(ValueError, match="interval_ramp"):
        tc.plan(tc.ToCaConfig(interval_ramp=tc.StepRamp(1.0, -2.0)), dit_xl_2, 10)


@pytest.mark.parametrize("preset", ["dit-ddim50", "dit-ddpm250", "fora", "fora-n4", "forecast-output-n5"])
def test_dit_run_flops_equal_plan(preset):
    pipe = tiny_dit_pipeline()
    config = tc.preset(preset)
    handle = tc.apply(pipe, config)
    dit_pipe_run(pipe, steps=30, labels=(1, 2, 3))
    stats = handle.stats()
    handle.remove()
    plan = tc.plan(config, pipe.transformer, 30, batch_size=6)
    assert stats.flops == plan.flops and stats.flops_full == plan.flops_full
    assert stats.step_kinds == plan.step_kinds


def test_pixart_run_flops_equal_plan():
    pipe = tiny_pixart_pipeline()
    config = tc.ToCaConfig.preset("pixart-dpm20")
    handle = tc.apply(pipe, config)
    pixart_pipe_run(pipe, steps=20)
    stats = handle.stats()
    handle.remove()
    tokens = prompt_embeds(2)["prompt_embeds"].shape[1]
    plan = tc.plan(config, pipe.transformer, 20, batch_size=4, context_tokens=tokens)
    assert stats.flops == plan.flops and stats.flops_full == plan.flops_full
    assert stats.partial_steps == plan.count("partial") > 0
    assert set(stats.fresh_fraction) == {"self_attn", "cross_attn", "mlp"}


def test_stats_report_memory():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50"))
    dit_pipe_run(pipe, steps=10)
    stats = handle.stats()
    handle.remove()
    blocks, tokens, dim, batch = 3, 16, 16, 4
    # attn1 and ff outputs in float32 plus an int32 counter each, per block
    assert stats.cache_bytes == blocks * 2 * (batch * tokens * dim * 4 + batch * tokens * 4)
    assert stats.score_bytes == blocks * batch * tokens * 4
    assert "FLOPs" in str(stats) and stats.to_dict()["speedup"] == stats.speedup


def test_stats_before_any_run_is_an_error():
    handle = tc.apply(tiny_dit_pipeline().transformer, tc.FORAConfig())
    with pytest.raises(RuntimeError, match="no sampling run"):
        handle.stats()
    handle.remove()
