"""The engine's semantics: partial recomputation, removal, run tracking, state isolation, dtypes."""

import pytest
import torch

import tokencache as tc

from models import prompt_embeds, tiny_dit, tiny_dit_pipeline, tiny_pixart
from test_equivalence import dit_kwargs, dit_pipe_run, hand_loop, pixart_kwargs

HALF = tc.ToCaConfig(fresh_ratio=0.5, module_ratio={"self_attn": 1.0, "cross_attn": 1.0, "mlp": 1.0},
                     full_step_interval=4, score="attention", frequency_weight=0.25)


@pytest.mark.parametrize("slot", ["ff", "attn1"])
def test_partial_step_recomputes_exactly_the_selected_rows(slot):
    """At a partial step a module's output is its true output on k fresh tokens (queries for
    self-attention) and last step's cached output on the rest."""
    transformer = tiny_dit(num_layers=2)
    module = getattr(transformer.transformer_blocks[1], slot)
    seen = []
    module.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out.clone())),
                                 with_kwargs=True)
    handle = tc.apply(transformer, HALF)
    hand_loop(transformer, handle, 4, kwargs_fn=dit_kwargs)
    assert handle.stats().step_kinds == ("full", "partial", "partial", "partial")
    n = seen[0][2].shape[1]
    k = int(0.5 * n)
    for step in (1, 2, 3):
        args, kwargs, out = seen[step]
        previous = seen[step - 1][2]
        true = type(module).forward(module, *args, **kwargs)  # the class forward bypasses the hook
        fresh = torch.isclose(out, true, atol=1e-6).all(-1)
        cached = torch.equal
        assert (fresh.sum(-1) >= k).all()
        stale = ~fresh
        assert cached(out[stale], previous[stale])
        # exactly k rows changed relative to the previous cache, unless a fresh value equals the old one
        changed = (out != previous).any(-1).sum(-1)
        assert (changed <= k).all() and (changed > 0).all()
    handle.remove()


def test_remove_restores_bitwise_and_module_state():
    pipe = tiny_dit_pipeline()
    transformer = pipe.transformer
    before_dict = {m: dict(vars(m)) for m in transformer.modules()}
    processors = {n: m.processor for n, m in transformer.named_modules() if hasattr(m, 'processor')}
    reference = dit_pipe_run(pipe)
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50"))
    dit_pipe_run(pipe)
    handle.remove()
    assert (dit_pipe_run(pipe) == reference).all()
    for m in transformer.modules():
        assert set(vars(m)) == set(before_dict[m]), type(m).__name__
    assert {n: m.processor for n, m in transformer.named_modules() if hasattr(m, 'processor')} == processors
    with pytest.raises(RuntimeError, match="removed"):
        handle.remove()


def test_apply_twice_is_an_error_and_after_remove_is_fine():
    transformer = tiny_dit()
    handle = tc.apply(transformer, tc.FORAConfig())
    with pytest.raises(RuntimeError, match="already applied"):
        tc.apply(transformer, tc.FORAConfig())
    handle.remove()
    tc.apply(transformer, tc.FORAConfig()).remove()


def test_second_pipeline_call_repeats_and_state_resets():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50", score="random"))
    first = dit_pipe_run(pipe, steps=15)
    stats_first = handle.stats()
    # a different batch size and step count in between must not leak into the next run
    dit_pipe_run(pipe, steps=9, labels=(1, 2, 3))
    assert handle.stats().num_steps == 9
    second = dit_pipe_run(pipe, steps=15)
    assert (first == second).all()
    assert handle.stats() == stats_first
    handle.remove()


def test_interrupted_run_does_not_leak():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50"))
    reference = dit_pipe_run(pipe, steps=12)

    original_step = pipe.scheduler.step
    try:  # DiTPipeline has no callbacks: emulate an interruption with an exception in the scheduler
        calls = {"n": 0}

        def failing_step(*a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return original_step(*a, **k)

        pipe.scheduler.step = failing_step
        with pytest.raises(KeyboardInterrupt):
            dit_pipe_run(pipe, steps=12)
    finally:
        pipe.scheduler.step = original_step
    assert (dit_pipe_run(pipe, steps=12) == reference).all()
    handle.remove()


def test_two_transformer_calls_per_step_are_two_streams():
    """A loop that calls the transformer separately for the conditional and unconditional halves gives the
    same result as the batched CFG call when each call's caches are kept apart."""
    transformer = tiny_dit()
    config = tc.ToCaConfig.preset("dit-ddim50")
    steps = 12

    def loop(split: bool):
        handle = tc.apply(transformer, config)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        labels = torch.tensor([3, 1000])
        with torch.no_grad(), handle.sampling(num_steps=steps):
            for i in range(steps):
                t = torch.tensor([999 - 80 * i])
                if split:
                    cond = transformer(x, timestep=t, class_labels=labels[:1]).sample
                    uncond = transformer(x, timestep=t, class_labels=labels[1:]).sample
                else:
                    both = transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample
                    cond, uncond = both[:1], both[1:]
                x = x - 0.05 * (uncond + 1.5 * (cond - uncond))[:, :4]
        stats = handle.stats()
        handle.remove()
        return x, stats

    batched, stats_batched = loop(split=False)
    split, stats_split = loop(split=True)
    assert stats_split.num_steps == steps == stats_batched.num_steps
    assert stats_split.step_kinds == stats_batched.step_kinds
    assert stats_split.flops == stats_batched.flops
    assert torch.allclose(batched, split, atol=1e-4)


def test_bare_transformer_needs_sampling_context():
    transformer = tiny_dit()
    handle = tc.apply(transformer, tc.FORAConfig())
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="sampling"):
        transformer(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="after the last of the 3 model evaluations"), handle.sampling(num_steps=3):
        for t in (900, 800, 700, 600):
            transformer(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_steps"), handle.sampling(num_steps=0):
        pass
    handle.remove()


def test_batch_change_within_a_run_is_an_error():
    transformer = tiny_dit()
    handle = tc.apply(transformer, tc.FORAConfig())
    with pytest.raises(RuntimeError, match="shape changed"), handle.sampling(num_steps=3):
        transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 2]))
        transformer(torch.randn(4, 4, 8, 8), timestep=torch.tensor([800] * 4), class_labels=torch.tensor([1] * 4))
    handle.remove()


def test_unsupported_model_is_a_type_error():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="Supported: BasicTransformerBlock"):
        tc.apply(unet, tc.FORAConfig())
    with pytest.raises(TypeError, match="pipeline"):
        tc.apply(object(), tc.FORAConfig())
    with pytest.raises(TypeError, match="config"):
        tc.apply(tiny_dit(), {"interval": 3})


def test_score_needing_missing_module_is_rejected():
    with pytest.raises(ValueError, match="cross_attn"):
        tc.apply(tiny_dit(), tc.ToCaConfig(score="cross_attention_entropy"))


def test_chunked_feed_forward_is_rejected():
    transformer = tiny_dit()
    transformer.transformer_blocks[0].set_chunk_feed_forward(2)
    with pytest.raises(TypeError, match="chunked"):
        tc.apply(transformer, tc.FORAConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16])
def test_dtypes(dtype, cache_dtype):
    transformer = tiny_dit(dtype=dtype)
    config = tc.ToCaConfig.preset("dit-ddim50", cache_dtype=cache_dtype)
    handle = tc.apply(transformer, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    with torch.no_grad(), handle.sampling(num_steps=10):
        for i in range(10):
            out = transformer(x, timestep=torch.tensor([900 - 90 * i] * 2), class_labels=torch.tensor([1, 2])).sample
            assert out.dtype == dtype and torch.isfinite(out).all()
            x = x - 0.05 * out[:, :4]
    stats = handle.stats()
    handle.remove()
    assert stats.partial_steps > 0
    cache = cache_dtype or dtype
    elements = stats.cache_bytes // torch.tensor([], dtype=cache).element_size()
    assert elements > 0


def test_cache_dtype_halves_cache_memory():
    def cache_bytes(cache_dtype):
        transformer = tiny_dit()
        handle = tc.apply(transformer, tc.FORAConfig(cache_dtype=cache_dtype))
        hand_loop(transformer, handle, 4, kwargs_fn=dit_kwargs)
        stats = handle.stats()
        handle.remove()
        return stats.cache_bytes

    full, half = cache_bytes(None), cache_bytes(torch.float16)
    counters = full - 2 * (full - half)  # the int32 frequency counters do not shrink
    assert half < full and counters >= 0


def test_pixart_cfg_halves_share_selection():
    transformer = tiny_pixart()
    config = tc.ToCaConfig.preset("pixart-dpm20")
    handle = tc.apply(transformer, config)
    ff = transformer.transformer_blocks[0].ff
    outputs = []
    ff.register_forward_hook(lambda m, a, o: outputs.append((a[0].clone(), o.clone())))
    e = prompt_embeds(1)
    cond = {"encoder_hidden_states": torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
            "encoder_attention_mask": torch.cat([e["negative_prompt_attention_mask"], e["prompt_attention_mask"]]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), handle.sampling(num_steps=4):
        for t in (900, 700, 500, 300):
            transformer(torch.cat([x, x]), timestep=torch.tensor([t, t]), **cond)
    assert handle.stats().cfg_shared_selection
    # on a partial step the changed rows are the same token positions in both halves
    changed = (outputs[1][1] != outputs[0][1]).any(-1)
    assert changed.any() and torch.equal(changed[0], changed[1])
    handle.remove()
    # without CFG (different halves) the selection is per sample
    handle = tc.apply(transformer, config)
    hand_loop(transformer, handle, 3, kwargs_fn=pixart_kwargs)
    assert not handle.stats().cfg_shared_selection
    handle.remove()


def test_timing_reports_engine_sections():
    transformer = tiny_dit()
    handle = tc.apply(transformer, HALF)
    handle.timing(True)
    hand_loop(transformer, handle, 4, kwargs_fn=dit_kwargs)
    seconds = handle.stats().seconds
    handle.remove()
    assert {"full_steps", "cached_steps", "select", "gather", "scatter"} <= set(seconds)
    assert seconds["select"] + seconds["gather"] + seconds["scatter"] < seconds["cached_steps"]
