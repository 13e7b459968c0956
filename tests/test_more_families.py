"""Qwen-Image and HunyuanVideo, whose blocks are FLUX's in other classes: tiny transformers in a hand-written loop."""

from __future__ import annotations

import pytest
import torch

import tokencache as tc
from test_model_families import Replay, check_rows_mix, record_token_wise_calls
from tokencache.core.layouts import find_blocks
from tokencache.core.shapes import build_transformer

STEPS = 6


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def qwen_image():
    from diffusers import QwenImageTransformer2DModel

    model = _perturbed(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4)))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 7, 12, generator=g),
                  encoder_hidden_states_mask=torch.ones(2, 7, dtype=torch.long), img_shapes=[[(1, 4, 4)]] * 2)
    return model, inputs, 1 / 1000  # its pipeline passes the timestep divided by 1000


def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    model = _perturbed(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12, pooled_projection_dim=10,
        rope_axes_dim=(2, 2, 4)))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 7, 12, generator=g),
                  encoder_attention_mask=torch.ones(1, 7, dtype=torch.long),
                  pooled_projections=torch.randn(1, 10, generator=g), guidance=torch.tensor([3500.0]))
    return model, inputs, 1.0


@pytest.fixture(scope="module", params=["qwen-image", "hunyuan-video"])
def family(request: pytest.FixtureRequest):
    return {"qwen-image": qwen_image, "hunyuan-video": hunyuan_video}[request.param]()


def loop(model, inputs: dict, scale: float, handle=None) -> torch.Tensor:
    """A bare-transformer sampling loop (the caches need ``handle.sampling`` to know where a run starts)."""
    run = handle.sampling(num_steps=STEPS) if handle is not None else torch.no_grad()
    outputs = []
    with torch.no_grad(), run:
        for i in range(STEPS):
            outputs.append(model(timestep=torch.tensor([(1000.0 - 150 * i) * scale]), **inputs).sample)
    return torch.stack(outputs)


def test_every_step_full_is_exact_reuse_replays_and_remove_is_bitwise(family) -> None:
    model, inputs, scale = family
    reference = loop(model, inputs, scale)
    handle = tc.apply(model, tc.FORAConfig(interval=1))
    torch.testing.assert_close(loop(model, inputs, scale, handle), reference, rtol=0, atol=1e-5)
    handle.remove()
    replay = Replay(type("Pipe", (), {"transformer": model}), full_steps={0, 2, 4}, calls_per_step=1)
    replayed = loop(model, inputs, scale)
    replay.remove()
    handle = tc.apply(model, tc.FORAConfig(interval=2))
    torch.testing.assert_close(loop(model, inputs, scale, handle), replayed, rtol=0, atol=1e-5)
    handle.remove()
    assert torch.equal(loop(model, inputs, scale), reference)


def test_partial_steps_mix_rows_and_equal_their_plan(family) -> None:
    model, inputs, scale = family
    calls, hooks = record_token_wise_calls(model)
    config = tc.ToCaConfig(fresh_ratio=0.5, module_ratio={"mlp": 1.0}, score="random")
    handle = tc.apply(model, config)
    loop(model, inputs, scale, handle)
    stats = handle.stats()
    handle.remove()
    for h in hooks:
        h.remove()
    check_rows_mix(model, calls, 1, 0.5)
    batch, text = inputs["hidden_states"].shape[0], inputs["encoder_hidden_states"].shape[1]
    plan = tc.plan(config, model, STEPS, batch_size=batch, num_tokens=16 if batch == 2 else 48, context_tokens=text)
    assert stats.flops == plan.flops and stats.flops_full == plan.flops_full


@pytest.mark.parametrize("name", ["qwen-image", "hunyuan-video"])
def test_published_shapes(name: str) -> None:
    transformer = build_transformer(name)
    assert len(find_blocks(transformer)) == {"qwen-image": 60, "hunyuan-video": 60}[name]
    plan = tc.plan(tc.FORAConfig(interval=2), transformer, 10, batch_size=1)
    assert plan.count("full") == 5 and 1.8 < plan.speedup < 2.0
