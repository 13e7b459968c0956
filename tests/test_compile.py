"""torch.compile: tc.compile's regional recipe matches the eager cache with a bounded number of compiles.

Compiles are counted with dynamo's counting backend around ``aot_eager`` (traced and partitioned like inductor
would get them, but no C++ compile, which is slow on a small CPU): one count per graph dynamo produces.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import tokencache as tc

from models import tiny_dit, tiny_dit_pipeline, tiny_pixart_pipeline
from test_equivalence import dit_pipe_run, pixart_pipe_run

PARTIAL = dict(fresh_ratio=0.5, module_ratio={"self_attn": 1.0, "cross_attn": 1.0, "mlp": 1.0}, full_step_interval=3)
# Fresh tokens varying over steps and blocks, from 0 to 5 of the tiny DiT's 16, with single-token steps.
RAMPED = dict(fresh_ratio=0.1, step_ratio=tc.StepRamp(0.2, 3.0), depth_ratio=tc.DepthRamp(0.8, 0.4),
              module_ratio={"self_attn": 1.0, "mlp": 1.0}, full_step_interval=4)
# Graphs per run, at most (the README's torch.compile section states it): per cached module type, one for all
# tokens and one for the fresh tokens (attention: fresh queries against all keys), each with a dynamic token
# dimension, and one more when a step computes a single fresh token (dynamo specialises sizes 0 and 1).
DIT_CONFIGS = {
    # ToCa's attention score: full-step attention reports the score on the eager path; fresh queries, MLP.
    "toca-attention": (tc.ToCaConfig(**PARTIAL), 2),
    # random score: attention on all tokens (full steps) and on fresh queries, MLP.
    "toca-random": (tc.ToCaConfig(**PARTIAL, score="random"), 3),
    # k from 0 to 5 within a run: the single-token steps add one graph per module type, the other k none.
    "toca-ramped": (tc.ToCaConfig(**RAMPED, score="random"), 5),
    "fora": (tc.FORAConfig(interval=3), 2),
}
MAX_GRAPHS_PER_MODULE_TYPE = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_twice(pipe, run, config, max_graphs: int, model: bool = False) -> None:
    """Eager cached run, then two tc.compile'd runs: equal outputs, at most ``max_graphs`` graphs, none new in
    the second run; without ``model`` (only the cached modules compiled), no graph break."""
    handle = tc.apply(pipe, config, **({"small_batch_linear": None} if model else {}))
    eager = torch.from_numpy(run(pipe))
    eager_stats = handle.stats()
    backend = CompileCounterWithBackend("aot_eager")
    assert tc.compile(handle, backend=backend) == sum(len(list(b.slots())) for b in handle._engine.blocks)
    first = torch.from_numpy(run(pipe))
    graphs = backend.frame_count
    second = torch.from_numpy(run(pipe))
    assert 1 <= graphs <= max_graphs, f"{graphs} graphs"
    assert backend.frame_count == graphs, "the second run compiled again"
    if not model:
        assert not counters["graph_break"], dict(counters["graph_break"])
    assert handle.stats().step_kinds == eager_stats.step_kinds
    assert "partial" in eager_stats.step_kinds or "reuse" in eager_stats.step_kinds
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, eager, atol=1e-5, rtol=1e-5)
    handle.remove()


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_compiled_matches_eager_with_bounded_compiles(name):
    config, max_graphs = DIT_CONFIGS[name]
    assert max_graphs <= 2 * MAX_GRAPHS_PER_MODULE_TYPE  # self-attention and MLP
    compiled_twice(tiny_dit_pipeline(), dit_pipe_run, config, max_graphs)


def test_pixart_compiled_matches_eager_with_bounded_compiles():
    """Cross-attention is cached too (position-wise: fresh queries against the text); CFG halves share the
    selection. Self-attention, cross-attention and MLP: at most 2 graphs each."""
    config = tc.ToCaConfig(**PARTIAL, score="cross_attention_entropy", cfg_shared_selection=True)
    compiled_twice(tiny_pixart_pipeline(), pixart_pipe_run, config, 2 * 3)


# The transformer's own graphs when tc.compile compiles it in place too (the few-row linear route off, as on a
# GPU): DiT's forward and each block's, up to and between the cache's hooks, shared by all blocks.
DIT_MODEL_GRAPHS = 7


@pytest.mark.parametrize("name", ["toca-attention", "toca-ramped"])
def test_dit_compiled_with_the_model_matches_eager_with_bounded_compiles(name):
    config, max_graphs = DIT_CONFIGS[name]
    compiled_twice(tiny_dit_pipeline(), dit_pipe_run, config, max_graphs + DIT_MODEL_GRAPHS, model=True)


@pytest.mark.parametrize("small_batch_linear", [True, False])
def test_graph_count_does_not_grow_with_depth(small_batch_linear):
    """All blocks share the graphs: 6 blocks compile what 2 do (with the route on, only the cached modules are
    compiled; with it off, the transformer too)."""
    counts = []
    for layers in (2, 6):
        torch._dynamo.reset()
        pipe = tiny_dit_pipeline(num_layers=layers)
        handle = tc.apply(pipe, tc.ToCaConfig(**PARTIAL, score="random"),
                          **({} if small_batch_linear else {"small_batch_linear": None}))
        backend = CompileCounterWithBackend("aot_eager")
        tc.compile(handle, backend=backend)
        dit_pipe_run(pipe, steps=6)
        counts.append(backend.frame_count)
        handle.remove()
    assert counts[0] == counts[1]
    assert counts[0] == 3 if small_batch_linear else counts[0] > 3


def test_model_compile_needs_the_route_off():
    handle = tc.apply(tiny_dit(), tc.FORAConfig())
    with pytest.raises(ValueError, match="small_batch_linear=None"):
        tc.compile(handle, model=True)


def test_remove_drops_the_compiled_modules():
    pipe = tiny_dit_pipeline()
    reference = dit_pipe_run(pipe)
    handle = tc.apply(pipe, tc.FORAConfig(interval=3))
    tc.compile(pipe, backend=CompileCounterWithBackend("aot_eager"))  # a pipeline names its cache too
    dit_pipe_run(pipe, steps=6)
    handle.remove()
    assert (dit_pipe_run(pipe) == reference).all()
    with pytest.raises(RuntimeError, match="removed"):
        tc.compile(handle)


def test_compile_needs_a_cache():
    with pytest.raises(ValueError, match="tc.apply"):
        tc.compile(tiny_dit())


def test_torch_compiled_model_is_rejected_by_apply():
    """torch.compile(model) hides the modules behind a wrapper: tc.apply refuses it and says what to do."""
    pipe = tiny_dit_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with pytest.raises(TypeError, match="torch.compile"):
        tc.apply(pipe, tc.FORAConfig())
    with pytest.raises(TypeError, match="torch.compile"):
        tc.apply(pipe.transformer, tc.FORAConfig())


def test_in_place_compile_after_apply_runs_eagerly_where_the_cache_decides():
    """transformer.compile() after tc.apply (route on) is correct: the cache's bookkeeping and decisions are
    graph breaks (torch.compiler.disable), never traced. It is not the recipe: the cached modules' compute
    stays eager, and the route's per-module hooks (guarded by identity) make each block compile anew."""
    pipe = tiny_dit_pipeline()
    handle = tc.apply(pipe, tc.ToCaConfig(**PARTIAL))
    eager = torch.from_numpy(dit_pipe_run(pipe, steps=6))
    backend = CompileCounterWithBackend("eager")
    pipe.transformer.compile(backend=backend)
    compiled = torch.from_numpy(dit_pipe_run(pipe, steps=6))
    graphs = backend.frame_count
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert handle.stats().partial_steps > 0
    dit_pipe_run(pipe, steps=6)
    assert backend.frame_count == graphs
    handle.remove()
