"""The few-row linear route: same values as ``nn.Linear``, only where it applies, removable exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokencache as tc
from tokencache.core.small_linear import SMALL_LINEAR_HOOK

from models import tiny_dit_pipeline
from test_equivalence import dit_pipe_run


def _hooked(linear: nn.Linear) -> bool:
    registry = getattr(linear, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(SMALL_LINEAR_HOOK) is not None


def _linears(pipe) -> list[nn.Linear]:
    """The linears outside the blocks' attention and MLP modules (conditioning path, final layer)."""
    token_path = {id(m) for block in pipe.transformer.transformer_blocks for name in ("attn1", "ff")
                  for m in getattr(block, name).modules()}
    return [m for m in pipe.transformer.modules() if isinstance(m, nn.Linear) and id(m) not in token_path]


def _token_linears(pipe) -> list[nn.Linear]:
    ours = {id(m) for m in _linears(pipe)}
    return [m for m in pipe.transformer.modules() if isinstance(m, nn.Linear) and id(m) not in ours]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (4, 24), (2, 1, 24), (2, 2, 24)])
def test_rerouted_rows_equal_w_at_x_transposed(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    x = torch.randn(shape)
    stock = linear(x)
    handle = tc.apply_small_batch_linear(linear)
    out = linear(x)
    flat = x.reshape(-1, 24)
    want = (linear.weight @ flat.T + (linear.bias[:, None] if bias else 0)).T.reshape(*shape[:-1], 40)
    assert out.shape == stock.shape and out.is_contiguous()
    assert torch.allclose(out, want, atol=1e-6) and torch.allclose(out, stock, atol=1e-5)
    handle.remove()


def test_calls_it_does_not_apply_to_are_left_to_the_module():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    many = torch.randn(5, 24)  # above max_rows
    half = torch.randn(2, 24, dtype=torch.float64)
    stock_many = linear(many)
    stock_half = linear.double()(half)
    linear.float()
    tc.apply_small_batch_linear(linear, tc.SmallBatchLinearConfig(max_rows=4))
    assert torch.equal(linear(many), stock_many)
    assert torch.equal(linear.double()(half), stock_half)
    assert linear.float()(torch.randn(0, 24)).shape == (0, 40)


def test_reroutes_exactly_the_small_calls():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    calls = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real_addmm(*args, **kwargs)

    tc.apply_small_batch_linear(linear, tc.SmallBatchLinearConfig(max_rows=3))
    torch.addmm = spy
    try:
        linear(torch.randn(3, 24))
        linear(torch.randn(4, 24))
        linear(torch.randn(1, 2, 24))
    finally:
        torch.addmm = real_addmm
    assert calls == [(40, 24), (40, 24)]  # the 4-row call went to F.linear


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_config_rejects_bad_max_rows(value):
    with pytest.raises(ValueError, match=r"SmallBatchLinearConfig\.max_rows must be an integer >= 1"):
        tc.SmallBatchLinearConfig(max_rows=value)


def test_bad_arguments_are_named():
    pipe = tiny_dit_pipeline()
    with pytest.raises(TypeError, match="config must be a SmallBatchLinearConfig"):
        tc.apply_small_batch_linear(pipe, tc.FORAConfig())
    with pytest.raises(TypeError, match="small_batch_linear must be a SmallBatchLinearConfig or None"):
        tc.apply(pipe, tc.FORAConfig(), small_batch_linear=4)
    with pytest.raises(TypeError, match="target must be a diffusers pipeline"):
        tc.apply_small_batch_linear("pipe")
    assert not any(_hooked(m) for m in _linears(pipe))


def test_standalone_on_a_pipeline_matches_and_removes_exactly():
    pipe = tiny_dit_pipeline()
    reference = dit_pipe_run(pipe)
    handle = tc.apply_small_batch_linear(pipe)
    assert handle.num_linears == len(_linears(pipe))
    names = {n for n, m in pipe.transformer.named_modules() if _hooked(m)}
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"} <= names
    assert _token_linears(pipe) and not any(_hooked(m) for m in _token_linears(pipe))  # rows are tokens there
    routed = dit_pipe_run(pipe)
    assert torch.allclose(torch.from_numpy(routed), torch.from_numpy(reference), atol=1e-5)
    handle.remove()
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in _linears(pipe))
    assert (dit_pipe_run(pipe) == reference).all()
    with pytest.raises(RuntimeError, match="removed"):
        handle.remove()


def test_cache_installs_it_by_default_and_shares_a_standalone_one():
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.FORAConfig())
    assert handle.small_batch_linear == tc.SmallBatchLinearConfig()
    assert all(_hooked(m) for m in _linears(pipe))
    cached = dit_pipe_run(pipe)
    handle.remove()
    assert not any(_hooked(m) for m in _linears(pipe))

    handle = tc.apply(pipe, tc.FORAConfig(), small_batch_linear=None)
    assert handle.small_batch_linear is None and not any(_hooked(m) for m in _linears(pipe))
    stock_cached = dit_pipe_run(pipe)
    handle.remove()
    assert torch.allclose(torch.from_numpy(cached), torch.from_numpy(stock_cached), atol=1e-5)

    # a standalone route already there is kept, not doubled, and outlives the cache
    standalone = tc.apply_small_batch_linear(pipe)
    handle = tc.apply(pipe, tc.FORAConfig())
    assert all(len(m._diffusers_hook.hooks) == 1 for m in _linears(pipe))
    handle.remove()
    assert all(_hooked(m) for m in _linears(pipe))
    standalone.remove()
    assert not any(hasattr(m, "_diffusers_hook") for m in _linears(pipe))


def test_wide_input_matches_f_linear_at_real_shapes():
    """DiT-XL/2's modulation shape, where the route is taken in practice: float32 rounding only."""
    torch.manual_seed(0)
    linear = nn.Linear(1152, 6912)
    x = torch.randn(2, 1152)
    tc.apply_small_batch_linear(linear)
    got = linear(x)
    want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert (got.double() - want).abs().max() < 1e-4


def test_only_float32_cpu_linears_get_the_hook():
    half = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.bfloat16)
    assert tc.apply_small_batch_linear(half).num_linears == 0
    assert not any(hasattr(m, "_diffusers_hook") for m in half)
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    assert tc.apply_small_batch_linear(mixed).num_linears == 1
