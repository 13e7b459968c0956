"""Wan 2.2 A14B's two experts: ``transformer`` (high noise) and ``transformer_2`` (low noise), each cached over the
steps the pipeline's ``boundary_ratio`` gives it, through a real diffusers WanPipeline with tiny components."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

import tokencache as tc
from test_model_families import Replay, check_rows_mix, record_token_wise_calls, sample, toca
from tokencache.core.compile import cached_module_hooks

from models import text_embeds, tiny_wan22_i2v_pipeline, tiny_wan22_pipeline, tiny_wan_pipeline

STEPS = 8  # timesteps 999 954 900 | 833 750 643 500 301 at boundary_ratio 0.875: 3 high-noise, 5 low-noise steps
SPLIT = {"transformer": 3, "transformer_2": 5}
EXPERTS = tuple(SPLIT)


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    pipe = tiny_wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan(pipe, **kwargs) -> torch.Tensor:
    return sample("wan", pipe, **{"steps": STEPS, **kwargs})


def untouched(*modules: torch.nn.Module) -> bool:
    """No hook left on any submodule and no forward patched into an instance (the pipeline's ``cache_context``
    leaves an empty registry on the transformer)."""
    return all(not getattr(getattr(m, "_diffusers_hook", None), "hooks", None) and "forward" not in m.__dict__
               for module in modules for m in module.modules())


def test_every_step_full_matches_uncached_for_both_experts_and_remove_is_bitwise(pipe) -> None:
    reference = wan(pipe)
    state = {name: {k: v.clone() for k, v in module.state_dict().items()}
             for name, module in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))}
    handle = tc.apply(pipe, tc.FORAConfig(interval=1))
    assert isinstance(handle, tc.ExpertsHandle)
    assert handle.transformers == {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    cached = wan(pipe)
    stats = handle.stats()
    handle.remove()
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    assert stats.num_steps == STEPS and stats.flops == stats.flops_full
    assert {name: part.num_steps for name, part in stats.experts.items()} == SPLIT
    assert untouched(pipe.transformer, pipe.transformer_2)
    for name in EXPERTS:
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state[name].items())
    assert torch.equal(wan(pipe), reference)
    with pytest.raises(RuntimeError, match="removed"):
        handle.remove()


def test_reuse_steps_hand_back_each_experts_own_last_full_outputs(pipe) -> None:
    """FORA N=2 within each expert's steps: full at its steps 0 and 2 (and 4), from its own cache; CFG as two
    transformer calls per step, two streams in each expert."""
    replays = [Replay(SimpleNamespace(transformer=getattr(pipe, name)), full_steps={0, 2, 4}, calls_per_step=2)
               for name in EXPERTS]
    reference = wan(pipe)
    for replay in replays:
        replay.remove()
    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    cached = wan(pipe)
    stats = handle.stats()
    handle.remove()
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    assert stats.experts["transformer"].step_kinds == ("full", "reuse", "full")
    assert stats.experts["transformer_2"].step_kinds == ("full", "reuse", "full", "reuse", "full")
    assert stats.step_kinds == ("full", "reuse", "full", "full", "reuse", "full", "reuse", "full")


def test_partial_steps_mix_fresh_and_cached_rows_of_each_expert(pipe) -> None:
    recorded = {name: record_token_wise_calls(getattr(pipe, name)) for name in EXPERTS}
    handle = tc.apply(pipe, toca(0.5))
    wan(pipe)
    stats = handle.stats()
    handle.remove()
    for name, (calls, hooks) in recorded.items():
        for h in hooks:
            h.remove()
        # each expert's rows are fresh or its own previous output (two streams: conditional, unconditional)
        check_rows_mix(getattr(pipe, name), calls, 2, 0.5)
    assert stats.experts["transformer"].step_kinds == ("full", "partial", "partial")
    assert stats.experts["transformer_2"].step_kinds == ("full", "partial", "partial", "full", "partial")


def test_each_expert_counts_only_its_own_calls_and_holds_a_cache_only_while_it_runs(pipe) -> None:
    handle = tc.apply(pipe, toca(0.5))
    engines = {name: expert._engine for name, expert in handle._experts.items()}
    held: list[tuple[int, int]] = []

    def after_step(pipeline, i, t, kwargs):
        held.append(tuple(len(engine.streams) for engine in engines.values()))
        return {}

    with torch.no_grad():
        latents = pipe(**text_embeds("wan"), height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                       output_type="latent", guidance_scale=3.5, generator=torch.Generator().manual_seed(1),
                       callback_on_step_end=after_step).frames
    stats = handle.stats()
    handle.remove()
    # two streams (CFG calls) per expert, freed when the expert's last step ends
    assert held == [(2, 0), (2, 0), (0, 0), (0, 2), (0, 2), (0, 2), (0, 2), (0, 0)]
    frames, height, width = latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2
    for name, steps in SPLIT.items():  # each expert's part is the plan of its own steps as a run
        plan = tc.plan(toca(0.5), getattr(pipe, name), steps, batch_size=2, num_tokens=frames * height * width,
                       context_tokens=7, num_frames=frames)
        part = stats.experts[name]
        assert (part.step_kinds, part.flops, part.flops_full) == (plan.step_kinds, plan.flops, plan.flops_full)
    high, low = stats.experts["transformer"], stats.experts["transformer_2"]
    assert (high.model_evaluations, low.model_evaluations, stats.model_evaluations) == (3, 5, STEPS)
    assert high.flops_full * 5 == low.flops_full * 3  # the same architecture: the same cost per step
    assert stats.flops == high.flops + low.flops and stats.flops_full == high.flops_full + low.flops_full
    assert stats.speedup == pytest.approx(stats.flops_full / stats.flops)
    a, b = engines.values()
    assert a is not b and a.tracker is not b.tracker and a.selector is not b.selector
    assert a.tracker.announcer is b.tracker.announcer  # one run for both
    assert "transformer_2: 5 steps (2 full, 3 partial, 0 reuse)" in str(stats)
    assert stats.to_dict()["experts"]["transformer"]["speedup"] == pytest.approx(high.speedup)


def test_step_count_resolution_batch_changes_and_no_leak(pipe) -> None:
    """A second call with another step count (4: steps 999 900 | 750 500), resolution and batch: each expert
    starts afresh; the output is that of a fresh handle; an expert the boundary gives no step reports none."""
    handle = tc.apply(pipe, toca(0.5, seed=3))
    first = wan(pipe, batch=2)
    other = wan(pipe, steps=4, size=48)
    stats = handle.stats()
    handle.remove()
    fresh = tc.apply(pipe, toca(0.5, seed=3))
    alone = wan(pipe, steps=4, size=48)
    fresh.remove()
    assert first.shape[0] == 2 and torch.isfinite(first).all()
    torch.testing.assert_close(other, alone, rtol=0, atol=1e-6)
    assert {name: part.num_steps for name, part in stats.experts.items()} == {"transformer": 2, "transformer_2": 2}
    assert [part.step_kinds[0] for part in stats.experts.values()] == ["full", "full"]

    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    wan(pipe)
    one = wan(pipe, steps=1)  # 999 only: transformer's one step; transformer_2 makes none
    stats = handle.stats()
    handle.remove()
    assert (stats.num_steps, stats.experts["transformer"].step_kinds, stats.experts["transformer_2"].num_steps) == (
        1, ("full",), 0)
    torch.testing.assert_close(one, wan(pipe, steps=1), rtol=0, atol=1e-5)


def test_image_to_video_experts() -> None:
    """WanImageToVideoPipeline (A14B: boundary_ratio 0.9, no image encoder): every step full is the uncached
    output, FORA N=2 runs each expert over its own steps, remove() restores both."""
    pipe = tiny_wan22_i2v_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe(image=image, **text_embeds("wan"), height=32, width=32, num_frames=5, guidance_scale=3.5,
                        num_inference_steps=STEPS, output_type="latent",
                        generator=torch.Generator().manual_seed(1)).frames

    reference = run()
    handle = tc.apply(pipe, tc.FORAConfig(interval=1))
    torch.testing.assert_close(run(), reference, rtol=0, atol=1e-5)
    handle.remove()
    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    run()
    stats = handle.stats()
    handle.remove()
    assert stats.experts["transformer"].step_kinds == ("full", "reuse", "full")
    assert stats.experts["transformer_2"].step_kinds == ("full", "reuse", "full", "reuse", "full")
    assert torch.equal(run(), reference) and untouched(pipe.transformer, pipe.transformer_2)


def test_without_boundary_transformer_runs_everything_as_wan_2_1_does() -> None:
    """boundary_ratio None: diffusers runs transformer at every step. The cache is then the Wan 2.1 cache, to the
    bit; a plain Wan 2.1 pipeline (transformer_2 None) gets a plain CacheHandle, as before."""
    single = tiny_wan_pipeline()
    single.set_progress_bar_config(disable=True)
    handle = tc.apply(single, toca(0.5, seed=5))
    assert type(handle) is tc.CacheHandle and handle._engine.tracker.segment is None
    reference = sample("wan", single)
    reference_stats = handle.stats()
    handle.remove()
    assert reference_stats.experts == {} and "transformer_2" not in str(reference_stats)

    pipe = tiny_wan22_pipeline(boundary_ratio=None)
    pipe.set_progress_bar_config(disable=True)
    handle = tc.apply(pipe, toca(0.5, seed=5))
    out = sample("wan", pipe)
    stats = handle.stats()
    handle.remove()
    assert torch.equal(out, reference)
    assert stats.experts["transformer"].step_kinds == reference_stats.step_kinds
    assert stats.experts["transformer_2"].num_steps == 0 and stats.flops == reference_stats.flops


def test_errors_before_any_work() -> None:
    pipe = tiny_wan22_pipeline(layers_2=4)
    with pytest.raises(ValueError, match=r"pipeline.transformer_2 \(WanTransformer3DModel\): "
                                         "ToCaConfig.depth_ratio has 3 per-block factors but the model has 4 blocks"):
        tc.apply(pipe, toca(0.5, depth_ratio=tc.BlockFactors((1.0, 1.0, 1.0))))
    assert untouched(pipe.transformer, pipe.transformer_2)
    other = tc.apply(pipe.transformer_2, tc.FORAConfig())
    with pytest.raises(RuntimeError, match="pipeline.transformer_2 .*already applied"):
        tc.apply(pipe, tc.FORAConfig())
    other.remove()
    assert untouched(pipe.transformer, pipe.transformer_2)
    same = WanPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer,
                       transformer_2=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.875)
    with pytest.raises(ValueError, match="transformer_2 is pipeline.transformer"):
        tc.apply(same, tc.FORAConfig())
    assert untouched(pipe.transformer)


def test_calls_that_do_not_fit_the_boundary_and_hand_loops_raise() -> None:
    pipe = tiny_wan22_pipeline()
    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    with pytest.raises(RuntimeError, match="no sampling run"):
        handle.stats()
    with pytest.raises(RuntimeError, match="handle.sampling"):
        handle.sampling(num_steps=4)
    pipe.scheduler.set_timesteps(STEPS)
    hidden = torch.randn(1, 4, 2, 4, 4)
    text = text_embeds("wan")["prompt_embeds"]
    with pytest.raises(RuntimeError, match=r"transformer_2 was called at timestep 999, but the pipeline's "
                                           r"boundary_ratio 0.875 .* its first is 833"):
        pipe.transformer_2(hidden, timestep=torch.tensor([999]), encoder_hidden_states=text)
    handle.remove()


def test_attach_timing_and_compile_cover_both_experts(pipe) -> None:
    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    second = WanPipeline(**{**pipe.components, "scheduler": UniPCMultistepScheduler.from_config(pipe.scheduler.config)},
                         boundary_ratio=0.875)
    second.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="attach"):
        wan(second, steps=4)
    handle.attach(second)
    handle.timing(True)
    wan(second, steps=4)
    stats = handle.stats()
    assert stats.num_steps == 4 and all(part.seconds for part in stats.experts.values())
    hooks = [len(cached_module_hooks(module)) for module in handle.transformers.values()]
    assert min(hooks) > 0 and tc.compile(handle) == sum(hooks)
    handle.remove()
    assert untouched(pipe.transformer, pipe.transformer_2)
