"""With every token fresh, or a full step every step, the cache must not change the output."""

import pytest
import torch

import tokencache as tc

from models import prompt_embeds, tiny_dit, tiny_dit_pipeline, tiny_pixart, tiny_pixart_pipeline

ALL_FRESH = dict(fresh_ratio=1.0, module_ratio={"self_attn": 1.0, "cross_attn": 1.0, "mlp": 1.0})
EXACT_CONFIGS = {
    "toca-fresh-ratio-1": tc.ToCaConfig(**ALL_FRESH, score="random"),
    "toca-fresh-ratio-1-attention": tc.ToCaConfig(**ALL_FRESH, score="attention"),
    "toca-interval-1": tc.ToCaConfig(full_step_interval=1, score="attention"),
    "fora-interval-1": tc.FORAConfig(interval=1),
}


def dit_pipe_run(pipe, steps=12, labels=(1, 7)):
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                output_type="np").images


def cached_run_and_plan(pipe, config, steps: int, batch_size: int = 4):
    """One cached DiT pipeline run: its stats and the plan of the same config (batch 4: 2 labels with CFG)."""
    handle = tc.apply(pipe, config)
    dit_pipe_run(pipe, steps=steps)
    stats = handle.stats()
    handle.remove()
    return stats, tc.plan(config, pipe.transformer, steps, batch_size=batch_size)


def pixart_pipe_run(pipe, steps=8):
    return pipe(prompt=None, negative_prompt=None, num_inference_steps=steps, height=8, width=8,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(3), output_type="np",
                **prompt_embeds(2)).images


@pytest.mark.parametrize("name", list(EXACT_CONFIGS))
def test_dit_pipeline_exact(name):
    pipe = tiny_dit_pipeline()
    reference = dit_pipe_run(pipe)
    handle = tc.apply(pipe, EXACT_CONFIGS[name])
    cached = dit_pipe_run(pipe)
    handle.remove()
    assert torch.allclose(torch.from_numpy(cached), torch.from_numpy(reference), atol=1e-5)


@pytest.mark.parametrize("name", ["toca-fresh-ratio-1", "toca-interval-1", "fora-interval-1"])
def test_pixart_pipeline_exact(name):
    config = EXACT_CONFIGS[name]
    if isinstance(config, tc.ToCaConfig):
        config = tc.ToCaConfig(**{**config.__dict__, "score": "cross_attention_entropy",
                                  "cfg_shared_selection": True})
    pipe = tiny_pixart_pipeline()
    reference = pixart_pipe_run(pipe)
    handle = tc.apply(pipe, config)
    cached = pixart_pipe_run(pipe)
    handle.remove()
    assert torch.allclose(torch.from_numpy(cached), torch.from_numpy(reference), atol=1e-5)


def hand_loop(transformer, handle, steps, batch=2, kwargs_fn=None, seed=0):
    """A minimal sampler: x <- x - 0.1 * model(x, t), transformer called with a CFG-style batch."""
    g = torch.Generator().manual_seed(seed)
    size = transformer.config.sample_size
    x = torch.randn(batch, 4, size, size, generator=g)
    outputs = []
    ctx = handle.sampling(num_steps=steps) if handle is not None else None
    with torch.no_grad(), (ctx if ctx is not None else torch.no_grad()):
        for i in range(steps):
            t = torch.full((batch,), 999 - i * (1000 // steps))
            out = transformer(x, timestep=t, return_dict=False, **kwargs_fn(batch))[0]
            x = x - 0.1 * out[:, :4]
            outputs.append(out)
    return x, outputs


def dit_kwargs(batch):
    return {"class_labels": torch.arange(batch) % 10}


def pixart_kwargs(batch):
    e = prompt_embeds(batch)
    return {"encoder_hidden_states": e["prompt_embeds"], "encoder_attention_mask": e["prompt_attention_mask"],
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


@pytest.mark.parametrize("model", ["dit", "pixart"])
@pytest.mark.parametrize("name", list(EXACT_CONFIGS))
def test_hand_loop_exact(model, name):
    transformer, kwargs_fn = (tiny_dit(), dit_kwargs) if model == "dit" else (tiny_pixart(), pixart_kwargs)
    config = EXACT_CONFIGS[name]
    if model == "pixart" and isinstance(config, tc.ToCaConfig) and config.score == "attention":
        config = tc.ToCaConfig(**{**config.__dict__, "score": "cross_attention_entropy"})
    reference, _ = hand_loop(transformer, None, 10, kwargs_fn=kwargs_fn)
    handle = tc.apply(transformer, config)
    cached, _ = hand_loop(transformer, handle, 10, kwargs_fn=kwargs_fn)
    assert handle.stats().num_steps == 10
    handle.remove()
    assert torch.allclose(cached, reference, atol=1e-5)


def test_caching_changes_output_and_is_close():
    """Guards the tests above: a real cache setting does change the output, but not wildly."""
    pipe = tiny_dit_pipeline()
    reference = torch.from_numpy(dit_pipe_run(pipe, steps=20))
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50"))
    cached = torch.from_numpy(dit_pipe_run(pipe, steps=20))
    stats = handle.stats()
    handle.remove()
    assert stats.partial_steps > 0 and stats.speedup > 1.5
    assert not torch.allclose(cached, reference, atol=1e-5)
