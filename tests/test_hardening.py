"""Hardening: hooks that coexist, any scheduler, shared transformers, resolution changes, freed caches,
inputs rejected before any work, and the official DiT full-step placement."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.hooks import (
    HookRegistry,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    apply_layerwise_casting,
    apply_pyramid_attention_broadcast,
)

import tokencache as tc
from tokencache.core.shapes import build_transformer

from models import tiny_dit, tiny_dit_pipeline, tiny_vae
from test_equivalence import ALL_FRESH, cached_run_and_plan, dit_pipe_run

FORA = tc.FORAConfig(interval=2)
EXACT = tc.ToCaConfig(**ALL_FRESH, score="random")


def _close(a, b, atol=1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=atol)


# ---- 1. other diffusers hooks on the same modules -------------------------------------------------------------

class AddOne(ModelHook):
    """A user's own hook: adds 1 to a module's output."""

    def post_forward(self, module, output):
        return output + 1.0


def _add_user_hook(transformer) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0].ff).register_hook(AddOne(), "add")


def _add_layerwise_casting(transformer) -> None:
    apply_layerwise_casting(transformer, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _add_pab(transformer) -> None:
    apply_pyramid_attention_broadcast(transformer, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500))


OTHER_HOOKS = {"user": _add_user_hook, "layerwise_casting": _add_layerwise_casting, "pab": _add_pab}


def _reset_stateful_hooks(transformer) -> None:
    """PyramidAttentionBroadcast counts calls across pipeline calls; start both sides from a clean count."""
    for module in transformer.modules():
        if hasattr(module, "_diffusers_hook"):
            module._diffusers_hook.reset_stateful_hooks(recurse=False)


@pytest.mark.parametrize("name", list(OTHER_HOOKS))
@pytest.mark.parametrize("order", ["cache_first", "cache_last"])
def test_other_hooks_keep_working_after_remove(name, order):
    """The output after tc.apply + remove, in either order, equals the output with the other hook alone."""
    alone = tiny_dit_pipeline()
    plain = dit_pipe_run(alone, steps=6)
    OTHER_HOOKS[name](alone.transformer)
    reference = dit_pipe_run(alone, steps=6)
    assert not _close(reference, plain)  # the other hook changes the output: a switched-off hook is seen

    pipe = tiny_dit_pipeline()
    if order == "cache_first":
        handle = tc.apply(pipe, FORA)
        OTHER_HOOKS[name](pipe.transformer)
    else:
        OTHER_HOOKS[name](pipe.transformer)
        handle = tc.apply(pipe, FORA)
    dit_pipe_run(pipe, steps=6)  # both active
    handle.remove()
    _reset_stateful_hooks(pipe.transformer)
    assert _close(dit_pipe_run(pipe, steps=6), reference)


def test_user_hook_and_cache_both_act():
    """With the cache every step full, a user's hook registered after it still changes the output."""
    pipe = tiny_dit_pipeline()
    plain = dit_pipe_run(pipe, steps=4)
    handle = tc.apply(pipe, tc.FORAConfig(interval=1))
    _add_user_hook(pipe.transformer)
    both = dit_pipe_run(pipe, steps=4)
    handle.remove()
    assert not _close(both, plain)
    alone = tiny_dit_pipeline()
    _add_user_hook(alone.transformer)
    assert _close(both, dit_pipe_run(alone, steps=4))


# ---- 2. any scheduler ----------------------------------------------------------------------------------------

SCHEDULERS = {
    "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler, "kdpm2": KDPM2DiscreteScheduler, "pndm": PNDMScheduler,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_counts_its_own_steps(name):
    pipe = tiny_dit_pipeline()
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    reference = dit_pipe_run(pipe, steps=5)
    evaluations = len(pipe.scheduler.timesteps)
    handle = tc.apply(pipe, EXACT)
    cached = dit_pipe_run(pipe, steps=5)
    stats = handle.stats()
    assert stats.num_steps == 5 and stats.model_evaluations == evaluations
    assert _close(cached, reference)
    dit_pipe_run(pipe, steps=5)  # a second run starts cleanly
    assert handle.stats().num_steps == 5
    handle.remove()


@pytest.mark.parametrize("name", ["heun", "kdpm2", "pndm"])
def test_multistage_schedulers_cache_whole_steps(name):
    """A step's evaluations share the step's kind: FORA N=2 has 3 full steps of 5, whatever the order."""
    pipe = tiny_dit_pipeline()
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    handle = tc.apply(pipe, FORA)
    dit_pipe_run(pipe, steps=5)
    stats = handle.stats()
    handle.remove()
    assert stats.step_kinds == ("full", "reuse", "full", "reuse", "full")


def test_a_call_pattern_that_does_not_fit_raises():
    """Two calls per step where the first step made one: a clear error, not a silent mix of streams."""
    transformer = tiny_dit()
    handle = tc.apply(transformer, FORA)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="2 times with timestep 600"), handle.sampling(num_steps=3):
        for t in (900, 600, 600):
            transformer(x, timestep=torch.tensor([t, t]), class_labels=labels)


# ---- 3. a transformer shared by several pipelines ---------------------------------------------------------------

def _second_pipeline(pipe):
    return DiTPipeline(transformer=pipe.transformer, vae=tiny_vae(), scheduler=DDIMScheduler())


def test_shared_transformer_unfollowed_pipeline_raises():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, FORA)
    dit_pipe_run(pipe, steps=6)
    other = _second_pipeline(pipe)
    with pytest.raises(RuntimeError, match="attach"):
        dit_pipe_run(other, steps=6)
    handle.remove()


def test_shared_transformer_attached_pipeline_runs_clean():
    reference_pipe = tiny_dit_pipeline()
    reference_handle = tc.apply(reference_pipe, FORA)
    reference = dit_pipe_run(reference_pipe, steps=6)
    reference_handle.remove()

    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, FORA)
    other = _second_pipeline(pipe)
    handle.attach(other)
    dit_pipe_run(pipe, steps=9)
    first = dit_pipe_run(other, steps=6)
    second = dit_pipe_run(other, steps=6)
    assert _close(first, reference, atol=1e-6) and _close(second, reference, atol=1e-6)
    assert handle.stats().num_steps == 6
    with pytest.raises(ValueError, match="not the transformer"):
        handle.attach(tiny_dit_pipeline())
    handle.remove()


def test_interrupted_run_does_not_leak_into_the_next():
    """A run that fails part-way is never continued by the next pipeline call."""
    pipe = tiny_dit_pipeline()
    reference = dit_pipe_run(pipe, steps=6)
    handle = tc.apply(pipe, EXACT)

    step = pipe.scheduler.step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    pipe.scheduler.step = failing_step
    with pytest.raises(KeyboardInterrupt):
        dit_pipe_run(pipe, steps=6)
    del pipe.scheduler.step
    assert _close(dit_pipe_run(pipe, steps=6), reference)
    handle.remove()


# ---- 4. resolution changes with TokenCache ---------------------------------------------------------------------

def test_tokencache_other_resolution_is_rejected_before_the_first_step():
    predictor = tc.TokenCachePredictor(
        3, 16, 4, "features", model=dict(class_name="DiTTransformer2DModel"),
        calibration=dict(budget=0.5, schedule=dict(early_cached_steps=1, late_cached_steps=1, boundary=0.5),
                         block_sensitivity=[1.0, 1.0, 1.0]))
    transformer = tiny_dit()
    handle = tc.apply(transformer, tc.TokenCacheConfig(predictor))
    calls = []
    transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4, 12, 12)  # 36 tokens, calibrated for 16
    with pytest.raises(ValueError, match=r"36 tokens \(a 6x6 grid\).*num_tokens"), handle.sampling(num_steps=4):
        transformer(x, timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
    assert not calls  # nothing ran
    handle.remove()


# ---- 5. cache memory is freed when a run ends ------------------------------------------------------------------

def test_cache_is_freed_after_a_run_and_stats_kept():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.ToCaConfig(score="similarity"))
    dit_pipe_run(pipe, steps=6)
    engine = handle._engine
    assert engine.streams == [] and engine.context is None
    stats = handle.stats()
    assert stats.cache_bytes > 0 and stats.num_steps == 6
    transformer = tiny_dit()
    hand = tc.apply(transformer, FORA)
    with hand.sampling(num_steps=2):
        for t in (900, 500):
            transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))
        assert hand._engine.streams == []  # freed at the last call, inside the block
    handle.remove()
    hand.remove()


# ---- 6. inputs rejected before any work ------------------------------------------------------------------------

def test_unet_is_rejected():
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(TypeError, match="UNet"):
        tc.apply(unet, FORA)


def test_config_class_compiled_model_nested_runs_and_removed_handle():
    transformer = tiny_dit()
    with pytest.raises(TypeError, match="the class ToCaConfig"):
        tc.apply(transformer, tc.ToCaConfig)
    with pytest.raises(TypeError, match="torch.compile"):
        tc.apply(torch.compile(transformer), FORA)
    handle = tc.apply(transformer, FORA)
    with pytest.raises(RuntimeError, match="nested"), handle.sampling(num_steps=2), handle.sampling(num_steps=2):
        pass
    with handle.sampling(num_steps=1):  # the failed inner block left the tracker usable
        transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([9, 9]), class_labels=torch.tensor([1, 2]))
    handle.remove()
    for call in (lambda: handle.remove(), lambda: handle.timing(True), lambda: handle.attach(None),
                 lambda: handle.sampling(num_steps=2).__enter__()):
        with pytest.raises(RuntimeError, match="removed"):
            call()


def test_latte_is_rejected_before_any_work():
    from diffusers import LatteTransformer3DModel

    latte = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=12, video_length=2)
    # Latte's spatial and temporal blocks share one token selection per step: no per-block attention-map score
    with pytest.raises(ValueError, match=r"score 'attention' is not supported on this model.*'random', 'similarity'"):
        tc.apply(latte, tc.ToCaConfig.preset("dit-ddim50"))
    assert not getattr(latte, "_diffusers_hook", None) or not latte._diffusers_hook.hooks


# ---- the official DiT-ToCa full-step placement -----------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_xl_2():
    return build_transformer("dit-xl-2")


@pytest.mark.parametrize(("preset", "steps", "uncached", "cached", "speedup"), [
    ("dit-ddim50", 50, 23.74, 10.23, 2.320), ("dit-ddpm250", 250, 118.68, 43.42, 2.733)])
def test_official_placement_reproduces_published_flops(dit_xl_2, preset, steps, uncached, cached, speedup):
    # counted as the official DiT-ToCa counter counts (1 FLOP per LayerNorm element, 1 per MAC of the adaLN
    # linear, GELU and query scaling counted): the published figures to their last digit
    plan = tc.plan(tc.ToCaConfig.preset(preset), dit_xl_2, steps, batch_size=2, counting="toca")
    assert plan.flops_full / 1e12 == pytest.approx(uncached, rel=0.002)
    assert plan.flops / 1e12 == pytest.approx(cached, rel=0.002)
    assert plan.speedup == pytest.approx(speedup, rel=0.002)
    assert (round(plan.flops_full / 1e12, 2), round(plan.flops / 1e12, 2), round(plan.speedup, 3)) == (
        uncached, cached, speedup)
    assert plan.step_kinds[-1] == "full"  # the count-down index reaches 0 on the last step
    # the engine's count, of the same schedule, is 0.03 % above on uncached steps and 0.2 % above cached
    engine = tc.plan(tc.ToCaConfig.preset(preset), dit_xl_2, steps, batch_size=2)
    assert engine.step_kinds == plan.step_kinds and engine.fresh_fraction == plan.fresh_fraction
    assert plan.flops_full < engine.flops_full < plan.flops_full * 1.0004
    assert plan.flops < engine.flops < plan.flops * 1.0025


def test_official_placement_has_mixed_steps_and_relative_is_kept():
    from tokencache.methods.toca import ToCaPolicy

    official = ToCaPolicy(tc.ToCaConfig.preset("dit-ddim50"), 50, 28)
    mixed = [i for i, f in enumerate(official.full_blocks) if 0 < f < 28]
    assert mixed and all(official.full_blocks[i] == 1 for i in mixed)
    # count-down index 45 is a multiple of the interval 5 set at step 0; the interval then becomes 4
    assert official.full_blocks[4] == 1 and official.full_blocks[5] == 28
    relative = ToCaPolicy(tc.ToCaConfig.preset("dit-ddim50", full_step_placement="relative"), 50, 28)
    assert set(relative.full_blocks) == {0, 28}
    with pytest.raises(ValueError, match="full_step_placement"):
        tc.ToCaConfig(full_step_placement="absolute")


def test_mixed_step_run_equals_plan_and_block0_is_recomputed():
    """A real run with mixed steps: block 0 runs on every token there, the FLOPs equal the plan's."""
    config = tc.ToCaConfig(full_step_interval=3, interval_ramp=tc.StepRamp(0.6, 0.8, offset=1),
                           full_step_placement="official", score="random")
    from tokencache.methods.toca import ToCaPolicy

    steps = 12
    policy = ToCaPolicy(config, steps, 3)
    assert any(0 < f < 3 for f in policy.full_blocks)
    stats, plan = cached_run_and_plan(tiny_dit_pipeline(), config, steps)
    assert stats.flops == plan.flops and stats.step_kinds == plan.step_kinds
