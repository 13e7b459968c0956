"""Spatial-temporal video DiTs: diffusers' Latte and an OpenSora-1.2-like STDiT3 written here from the published
architecture (spatial and temporal blocks, interleaved; fresh tokens chosen once per step over each video's
frames x positions and shared by both kinds of block)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokencache as tc
from tokencache.core.layouts import canonical_tokens, find_blocks

from models import _perturbed, tiny_vae

# ---- Latte -----------------------------------------------------------------------------------------------------


def tiny_latte_pipeline(video_length: int = 3, num_layers: int = 2):
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = _perturbed(LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, video_length=video_length,
        norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000))
    return LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                         scheduler=DDIMScheduler())


@pytest.fixture(scope="module")
def latte():
    return tiny_latte_pipeline()


LATTE_STEPS = 6


def latte_sample(pipe, frames: int = 3, batch: int = 1, steps: int = LATTE_STEPS, size: int = 16,
                 guidance: float = 7.5) -> torch.Tensor:
    """Latents of ``batch`` captions (a CFG batch of 2 * batch with guidance; 16 px: an 8 x 8 token grid)."""
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(batch, 5, 12, generator=g),
                  negative_prompt_embeds=torch.randn(batch, 5, 12, generator=g))
    with torch.no_grad():
        return pipe(negative_prompt=None, **embeds, video_length=frames, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).frames


def toca(ratio: float = 0.3, **extra) -> tc.ToCaConfig:
    values = dict(fresh_ratio=ratio, module_ratio={"mlp": 1.0, "cross_attn": 1.0}, full_step_interval=3,
                  score="random")
    return tc.ToCaConfig(**{**values, **extra})


def test_latte_blocks_run_interleaved(latte) -> None:
    names = [b.name for b in find_blocks(latte.transformer)]
    assert names == ["transformer_blocks.0", "temporal_transformer_blocks.0",
                     "transformer_blocks.1", "temporal_transformer_blocks.1"]
    slots = [[(s.name, s.partial, s.groups) for s, _ in b.slots()] for b in find_blocks(latte.transformer)]
    assert slots[0] == [("attn1", "whole", "frame"), ("attn2", "rows", "frame"), ("ff", "rows", "frame")]
    assert slots[1] == [("attn1", "whole", "position"), ("ff", "rows", "position")]  # no cross-attention


def test_latte_every_step_full_is_exact_and_remove_is_bitwise(latte) -> None:
    reference = latte_sample(latte)
    handle = tc.apply(latte, tc.FORAConfig(interval=1), small_batch_linear=None)
    cached = latte_sample(latte)
    stats = handle.stats()
    handle.remove()
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    assert stats.flops == stats.flops_full and stats.step_kinds == ("full",) * LATTE_STEPS
    # the default few-row linears (adaLN on the CPU) only reorder sums; DDIM's x0 prediction amplifies them
    handle = tc.apply(latte, tc.ToCaConfig(full_step_interval=1, score="random"))
    cached = latte_sample(latte)
    handle.remove()
    torch.testing.assert_close(cached, reference, rtol=0, atol=2e-4)
    assert torch.equal(latte_sample(latte), reference)


class Replay:
    """Reuse reference: forward hooks hand back each cached module's output of the last full step."""

    def __init__(self, transformer: nn.Module, full_steps: set[int]) -> None:
        self.full_steps = full_steps
        self.call = -1
        self.store: dict[str, object] = {}
        self.handles = [transformer.register_forward_pre_hook(self._count)]
        for block in find_blocks(transformer):
            for slot, module in block.slots():
                self.handles.append(module.register_forward_hook(self._hook(f"{block.name}.{slot.name}")))

    def _count(self, module, args) -> None:
        self.call += 1

    def _hook(self, key: str):
        def hook(module, args, output):
            if self.call in self.full_steps:
                self.store[key] = output
                return output
            return self.store[key]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_latte_reuse_hands_back_the_last_full_outputs(latte) -> None:
    replay = Replay(latte.transformer, full_steps={0, 2, 4})
    reference = latte_sample(latte)
    replay.remove()
    handle = tc.apply(latte, tc.FORAConfig(interval=2), small_batch_linear=None)
    cached = latte_sample(latte)
    stats = handle.stats()
    handle.remove()
    assert stats.step_kinds == ("full", "reuse") * 3
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-6)


class FreshRows:
    """Records the calls of every token-wise module; afterwards tells, per call, which canonical tokens were
    recomputed (output = the module on this call's input, and not the previous call's output)."""

    def __init__(self, transformer: nn.Module) -> None:
        self.calls: dict[str, list] = {}
        self.handles = []
        self.modules: dict[str, tuple[nn.Module, str]] = {}
        for block in find_blocks(transformer):
            for slot, module in block.slots():
                if slot.partial == "rows":
                    key = f"{block.name}.{slot.name}"
                    self.modules[key] = (module, block.groups(slot))
                    self.handles.append(module.register_forward_hook(
                        lambda m, args, kwargs, out, key=key: self.calls.setdefault(key, []).append(
                            (args, kwargs, out)), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def fresh(self, batch: int, grid: tuple[int, ...]) -> dict[str, list[torch.Tensor | None]]:
        """Per module, per call: the canonical (B, N) mask of recomputed tokens (None for full calls)."""
        masks: dict[str, list[torch.Tensor | None]] = {}
        for key, seen in self.calls.items():
            module, groups = self.modules[key]
            masks[key] = [None]
            for i in range(1, len(seen)):
                args, kwargs, output = seen[i]
                with torch.no_grad():
                    fresh = module(*args, **kwargs)
                is_fresh = (output - fresh).abs().amax(-1) < 1e-5
                is_cached = (output - seen[i - 1][2]).abs().amax(-1) < 1e-7
                assert bool((is_fresh | is_cached).all()), key
                assert not bool((is_fresh & is_cached).any()), key  # every row tells which it is
                mask = canonical_tokens(is_fresh.unsqueeze(-1), groups, batch, grid).squeeze(-1)
                masks[key].append(None if bool(mask.all()) else mask)
        return masks


def check_shared_selection(masks: dict[str, list], k: int, cfg: bool) -> int:
    """Every token-wise module of a partial call recomputed the same k tokens of each sample; returns the number
    of partial calls checked."""
    calls = len(next(iter(masks.values())))
    partial = 0
    for call in range(calls):
        seen = [m[call] for m in masks.values()]
        if all(s is None for s in seen):
            continue
        assert all(s is not None for s in seen), call  # every token-wise module is partial on a partial step
        partial += 1
        for mask in seen[1:]:
            assert torch.equal(mask, seen[0]), call
        assert (seen[0].sum(-1) == k).all(), call
        if cfg:
            half = seen[0].shape[0] // 2
            assert torch.equal(seen[0][:half], seen[0][half:])
    return partial


@pytest.mark.parametrize("score", ["random", "similarity"])
def test_latte_partial_steps_recompute_the_same_tokens_in_spatial_and_temporal_blocks(latte, score) -> None:
    recorder = FreshRows(latte.transformer)
    handle = tc.apply(latte, toca(0.3, score=score, cfg_shared_selection=True), small_batch_linear=None)
    out = latte_sample(latte, batch=2)
    stats = handle.stats()
    handle.remove()
    recorder.remove()
    assert torch.isfinite(out).all() and stats.cfg_shared_selection
    grid = (3, 8, 8)
    masks = recorder.fresh(batch=4, grid=grid)
    assert set(masks) == {"transformer_blocks.0.attn2", "transformer_blocks.0.ff", "temporal_transformer_blocks.0.ff",
                          "transformer_blocks.1.attn2", "transformer_blocks.1.ff", "temporal_transformer_blocks.1.ff"}
    assert check_shared_selection(masks, k=int(0.3 * 192), cfg=True) == 4  # steps 1, 2, 4, 5
    assert stats.fresh_fraction["mlp"] == pytest.approx((2 + 4 * int(0.3 * 192) / 192) / 6)


def test_latte_cfg_batches_frame_changes_plan_and_no_leak(latte) -> None:
    config = toca(0.3, seed=2)
    handle = tc.apply(latte, config)
    two = latte_sample(latte, batch=2)
    stats = handle.stats()
    plan = tc.plan(config, latte.transformer, LATTE_STEPS, batch_size=4, num_tokens=3 * 64, num_frames=3,
                   context_tokens=5)
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    assert plan.step_kinds == stats.step_kinds == ("full", "partial", "partial") * 2
    single_frame = latte_sample(latte, frames=1)  # Latte's image mode: temporal blocks see one frame
    stats = handle.stats()
    plan = tc.plan(config, latte.transformer, LATTE_STEPS, batch_size=2, num_tokens=64, num_frames=1,
                   context_tokens=5)
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    unguided = latte_sample(latte, guidance=1.0)  # batch 1, no CFG
    handle.remove()
    fresh_handle = tc.apply(latte, config)
    alone = latte_sample(latte, frames=1)
    fresh_handle.remove()
    assert two.shape[0] == 2 and torch.isfinite(two).all() and torch.isfinite(unguided).all()
    torch.testing.assert_close(single_frame, alone, rtol=0, atol=0)  # nothing carried over from the 3-frame run


@pytest.mark.parametrize("update", ["anchor", "differences"])
def test_latte_forecasting_stale_tokens_matches_the_plan(latte, update) -> None:
    config = toca(0.3, forecast=tc.ForecastConfig(order=2, expansion="newton", token_update=update),
                  full_step_interval=2)
    handle = tc.apply(latte, config)
    out = latte_sample(latte, steps=8)
    stats = handle.stats()
    handle.remove()
    plan = tc.plan(config, latte.transformer, 8, batch_size=2, num_tokens=3 * 64, num_frames=3, context_tokens=5)
    assert torch.isfinite(out).all() and stats.forecast_flops > 0
    assert (plan.flops, plan.flops_full, plan.forecast_flops) == (stats.flops, stats.flops_full,
                                                                   stats.forecast_flops)


def test_latte_rejects_what_it_cannot_share_before_any_work(latte) -> None:
    transformer = latte.transformer
    for score in ("attention", "cross_attention_entropy", "value_norm"):
        with pytest.raises(ValueError, match=rf"score '{score}' is not supported.*\('random', 'similarity'\)"):
            tc.apply(latte, toca(score=score))
    with pytest.raises(ValueError, match="spatial_cell_size needs a 2-D grid"):
        tc.apply(latte, toca(spatial_cell_size=2))
    with pytest.raises(ValueError, match="module_ratio makes self_attn modules partial"):
        tc.apply(latte, toca(module_ratio={"self_attn": 0.5}))
    assert not getattr(transformer, "_diffusers_hook", None) or not transformer._diffusers_hook.hooks


def test_latte_1_plan() -> None:
    from tokencache.core.shapes import build_transformer

    transformer = build_transformer("latte-1")
    assert len(find_blocks(transformer)) == 56
    plan = tc.plan(tc.FORAConfig(interval=2), transformer, 10, batch_size=2)
    assert plan.num_tokens == 16 * 32 * 32 and plan.count("full") == 5 and 1.8 < plan.speedup < 2.0


# ---- an OpenSora-1.2-like STDiT3, written from the published architecture ---------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary positions along the token axis of (B, heads, n, d)."""
    n, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Self-attention over the tokens of each batch row: qkv, per-head RMS q/k norms, rotary in temporal blocks."""

    def __init__(self, dim: int, num_heads: int, rope: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = rotary(q), rotary(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """Queries of all samples flattened to one sequence; captions packed as (1, sum of lengths, C); a
    block-diagonal mask keeps each sample on its own caption."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: list[int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        lengths = mask if mask is not None else [cond.shape[1] // b] * b
        q = self.q_linear(x).view(1, b * n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query_sample = torch.arange(b).repeat_interleave(n)
        key_sample = torch.arange(b).repeat_interleave(torch.tensor(lengths))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=query_sample[:, None] == key_sample[None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class STDiT3Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, temporal: bool = False) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, num_heads, rope=temporal)
        self.cross_attn = MultiHeadCrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, mask: list[int] | None = None,
                T: int = 1, S: int = 1) -> torch.Tensor:  # noqa: N803 (the published names)
        b, _, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # B (T S) C -> (B S) T C
            x_m = x_m.view(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
            x_m = self.attn(x_m).view(b, S, T, c).transpose(1, 2).reshape(b, T * S, c)
        else:  # B (T S) C -> (B T) S C
            x_m = self.attn(x_m.reshape(b * T, S, c)).reshape(b, T * S, c)
        x = x + gate_msa * x_m
        x = x + self.cross_attn(x, y, mask)
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(x_m)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class STDiT3(nn.Module):
    def __init__(self, in_channels: int = 4, hidden_size: int = 16, depth: int = 2, num_heads: int = 2,
                 caption_channels: int = 12, patch_size: tuple[int, int, int] = (1, 2, 2)) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.x_embedder = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(32, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = nn.Sequential(nn.Linear(caption_channels, hidden_size), nn.GELU(approximate="tanh"),
                                        nn.Linear(hidden_size, hidden_size))
        self.spatial_blocks = nn.ModuleList([STDiT3Block(hidden_size, num_heads) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(hidden_size, num_heads, temporal=True)
                                              for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.final_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.final_linear = nn.Linear(hidden_size, math.prod(patch_size) * self.out_channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                x_mask=None, fps=None, height=None, width=None, **kwargs) -> torch.Tensor:
        b, _, frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        T, H, W = frames // pt, height // ph, width // pw  # noqa: N806
        S = H * W  # noqa: N806
        t = self.t_embedder(timestep_embedding(timestep, 32))
        t_mlp = self.t_block(t)
        y = self.y_embedder(y.squeeze(1))  # (B, 1, L, C) captions
        if mask is not None:
            lengths = mask.sum(dim=1).tolist()
            y = y[mask.bool()].view(1, -1, self.hidden_size)
        else:
            lengths = [y.shape[1]] * b
            y = y.reshape(1, -1, self.hidden_size)
        x = self.x_embedder(x).flatten(3).permute(0, 2, 3, 1).reshape(b, T * S, self.hidden_size)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial(x, y, t_mlp, lengths, T=T, S=S)
            x = temporal(x, y, t_mlp, lengths, T=T, S=S)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(t2i_modulate(self.final_norm(x), shift, scale))
        x = x.view(b, T, H, W, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.out_channels, frames, height, width)


@pytest.fixture(scope="module")
def stdit3() -> STDiT3:
    torch.manual_seed(0)
    return _perturbed(STDiT3())


def rflow_sample(model: nn.Module, steps: int = 8, frames: int = 3, batch: int = 1, size: int = 8,
                 guidance: float = 7.0, handle: tc.CacheHandle | None = None, seed: int = 0) -> torch.Tensor:
    """OpenSora's rectified-flow loop: timesteps 1000 -> 0, the CFG batch cat([z, z]) with captions
    cat([cond, null])."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, frames, size, size, generator=g)
    cond = torch.randn(batch, 1, 6, 12, generator=g)
    null = torch.randn(1, 1, 6, 12, generator=g).expand(batch, -1, -1, -1)
    y = torch.cat([cond, null]) if guidance > 1 else cond
    times = torch.linspace(1000, 0, steps + 1)
    context = handle.sampling(num_steps=steps) if handle is not None else _nothing()
    with context, torch.no_grad():
        for i in range(steps):
            z_in = torch.cat([z, z]) if guidance > 1 else z
            v = model(z_in, times[i].expand(z_in.shape[0]), y)
            if guidance > 1:
                v_cond, v_null = v.chunk(2)
                v = v_null + guidance * (v_cond - v_null)
            z = z + v * (times[i + 1] - times[i]) / 1000
    return z


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def test_stdit3_blocks_run_interleaved_with_their_own_attention_rows(stdit3) -> None:
    blocks = find_blocks(stdit3)
    assert [b.name for b in blocks] == ["spatial_blocks.0", "temporal_blocks.0", "spatial_blocks.1",
                                        "temporal_blocks.1"]
    assert [[b.groups(s) for s, _ in b.slots()] for b in blocks[:2]] == [
        ["frame", "sample", "sample"], ["position", "sample", "sample"]]


def test_stdit3_every_step_full_is_exact_and_remove_is_bitwise(stdit3) -> None:
    reference = rflow_sample(stdit3)
    handle = tc.apply(stdit3, tc.FORAConfig(interval=1))
    cached = rflow_sample(stdit3, handle=handle)
    stats = handle.stats()
    handle.remove()
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    assert stats.flops == stats.flops_full and stats.num_steps == 8
    assert torch.equal(rflow_sample(stdit3), reference)


def test_stdit3_reuse_hands_back_the_last_full_outputs(stdit3) -> None:
    replay = Replay(stdit3, full_steps={0, 2, 4, 6})
    reference = rflow_sample(stdit3)
    replay.remove()
    handle = tc.apply(stdit3, tc.FORAConfig(interval=2), small_batch_linear=None)
    cached = rflow_sample(stdit3, handle=handle)
    stats = handle.stats()
    handle.remove()
    assert stats.step_kinds == ("full", "reuse") * 4
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("score", ["random", "similarity"])
def test_stdit3_partial_steps_recompute_the_same_tokens_in_spatial_and_temporal_blocks(stdit3, score) -> None:
    recorder = FreshRows(stdit3)
    handle = tc.apply(stdit3, toca(0.25, score=score, cfg_shared_selection=True), small_batch_linear=None)
    out = rflow_sample(stdit3, steps=6, batch=2, handle=handle)
    stats = handle.stats()
    handle.remove()
    recorder.remove()
    assert torch.isfinite(out).all() and stats.cfg_shared_selection
    masks = recorder.fresh(batch=4, grid=(3, 4, 4))
    assert len(masks) == 8  # cross-attention and MLP of 4 blocks
    assert check_shared_selection(masks, k=int(0.25 * 48), cfg=True) == 4


def test_stdit3_batches_frame_changes_plan_and_no_leak(stdit3) -> None:
    config = toca(0.25, seed=5)
    handle = tc.apply(stdit3, config)
    first = rflow_sample(stdit3, batch=2, handle=handle)  # CFG batch of 4, selected per sample
    stats = handle.stats()
    plan = tc.plan(config, stdit3, 8, batch_size=4, num_tokens=48, num_frames=3, context_tokens=6)
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    other = rflow_sample(stdit3, frames=2, handle=handle)
    stats = handle.stats()
    plan = tc.plan(config, stdit3, 8, batch_size=2, num_tokens=32, num_frames=2, context_tokens=6)
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    unguided = rflow_sample(stdit3, guidance=1.0, handle=handle)
    handle.remove()
    fresh_handle = tc.apply(stdit3, config)
    alone = rflow_sample(stdit3, frames=2, handle=fresh_handle)
    fresh_handle.remove()
    assert torch.isfinite(first).all() and torch.isfinite(unguided).all()
    torch.testing.assert_close(other, alone, rtol=0, atol=0)


# ---- the official OpenSora setting and per-module intervals ------------------------------------------------------


def test_opensora_preset_places_full_steps_per_module_type(stdit3) -> None:
    config = tc.preset("opensora-rflow30")
    assert config.module_intervals == {"cross_attn": 6} and config.module_ratio["mlp"] * config.fresh_ratio == \
        pytest.approx(0.1495)
    handle = tc.apply(stdit3, config)
    rflow_sample(stdit3, steps=30, handle=handle)
    stats = handle.stats()
    handle.remove()
    full = [i for i, kind in enumerate(stats.step_kinds) if kind == "full"]
    assert full == [0, 1, 2, 6, 12, 18, 24]  # every module full
    plan = tc.plan(config, stdit3, 30, batch_size=2, num_tokens=48, num_frames=3, context_tokens=6)
    assert plan.step_kinds == stats.step_kinds
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    # self-attention and MLP full at 0, 1, 2, 3, 6, ..., 27 (12 of 30); cross-attention at 0, 1, 2, 6, ..., 24 (7)
    assert stats.fresh_fraction["self_attn"] == pytest.approx(12 / 30)
    assert stats.fresh_fraction["cross_attn"] == pytest.approx(7 / 30)
    assert stats.fresh_fraction["mlp"] == pytest.approx((12 + 18 * int(0.1495 * 48) / 48) / 30)


def test_opensora_preset_on_the_published_shape() -> None:
    """STDiT3-XL/2 (depth 28, hidden 1152, 16 heads), 51 frames at 480p 9:16 (15 x 30 x 53 tokens), T5 captions
    of 300 tokens, CFG batch 2, 30 steps."""
    with torch.device("meta"):
        model = STDiT3(hidden_size=1152, depth=28, num_heads=16, caption_channels=4096)
    full = tc.plan(tc.FORAConfig(interval=1), model, 30)
    cached = tc.plan(tc.preset("opensora-rflow30"), model, 30)
    assert full.num_tokens == 15 * 30 * 53 and cached.count("full") == 7
    assert cached.flops_full == full.flops_full
    # 3398.2 -> 1421.9 TFLOPs, 2.39x (the ToCa README reports 2.36x on OpenSora, its own count not published)
    assert full.flops_full / 1e12 == pytest.approx(3398.23, rel=1e-4)
    assert cached.flops / 1e12 == pytest.approx(1421.88, rel=1e-4)


def test_module_intervals_are_validated() -> None:
    with pytest.raises(ValueError, match=r"ToCaConfig.module_intervals must be a mapping from keys of"):
        tc.ToCaConfig(module_intervals={"attention": 2})
    with pytest.raises(ValueError, match=r"ToCaConfig.module_intervals\['mlp'\] must be an integer >= 1"):
        tc.ToCaConfig(module_intervals={"mlp": 0})
    with pytest.raises(ValueError, match="ToCaConfig.module_intervals must be a mapping"):
        tc.ToCaConfig(module_intervals=[("mlp", 2)])
    with pytest.raises(ValueError, match="full_step_placement must be one of"):
        tc.ToCaConfig(full_step_placement="modulo")


def test_module_intervals_on_an_image_model_match_the_plan() -> None:
    """PixArt with the MLP refreshed every 2 steps and the rest every 4: a real run counts what the plan counts."""
    from models import prompt_embeds, tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    config = tc.ToCaConfig(fresh_ratio=0.3, module_ratio={"cross_attn": 1.0, "mlp": 1.0}, full_step_interval=4,
                           module_intervals={"mlp": 2}, score="random")
    handle = tc.apply(pipe, config)
    with torch.no_grad():
        pipe(prompt=None, negative_prompt=None, num_inference_steps=8, height=8, width=8,
             use_resolution_binning=False, generator=torch.Generator().manual_seed(3), output_type="latent",
             **prompt_embeds(1))
    stats = handle.stats()
    handle.remove()
    plan = tc.plan(config, pipe.transformer, 8, batch_size=2, num_tokens=16, context_tokens=6)
    assert (plan.flops, plan.flops_full) == (stats.flops, stats.flops_full)
    assert stats.step_kinds == ("full", "partial", "partial", "partial", "full", "partial", "partial", "partial")
    # the MLP is full on steps 0, 2, 4, 6 and partial on the others; self-attention full on 0 and 4 only
    assert stats.fresh_fraction["mlp"] == pytest.approx((4 + 4 * int(0.3 * 16) / 16) / 8)
    assert stats.fresh_fraction["self_attn"] == pytest.approx(2 / 8)
