"""benchmarks/cache_memory.py: the counts it reports equal what the caches' state fields hold."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cache_memory  # noqa: E402

STEPS = 8  # enough for every row's cache to fill (forecast warm-up, TaylorSeer's 3 warm-up steps + 1 update)
LABELS = [3]  # CFG batch 2


@pytest.fixture(scope="module")
def pipe():
    from tokencache.demo import load_model

    torch.set_num_threads(1)
    pipe = load_model()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokencache_bytes_equal_the_analytic_count(pipe):
    for method, settings, config in cache_memory.tokencache_methods():
        row = cache_memory.tokencache_row(pipe, config, LABELS, STEPS, seed=0)
        assert row["bytes"] == row["analytic_bytes"], (method, settings)
    # the reference by hand: 12 modules x (output float32 (2, 64, 128) + int32 counter (2, 64))
    reuse = cache_memory.tokencache_methods()[0][2]
    assert cache_memory.analytic_bytes(reuse, 2, 64, 128, 12) == 12 * (2 * 64 * 128 * 4 + 2 * 64 * 4)


def test_taylorseer_bytes_are_its_factors(pipe):
    peer = cache_memory.taylorseer_peer(1, torch.bfloat16)
    row = cache_memory.peer_row(pipe, peer, lambda p: cache_memory.taylorseer_tensors(p.transformer), LABELS,
                                STEPS, seed=0)
    # 12 hooked modules x (value + first difference) x (2, 64, 128) in bfloat16
    assert row["hooked_modules"] == 12
    assert row["bytes"] == row["element_bytes"] == row["end_bytes"] == 12 * 2 * 2 * 64 * 128 * 2
    assert not cache_memory.taylorseer_tensors(pipe.transformer)  # removed with the peer
