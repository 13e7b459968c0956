"""The peer caches of ``benchmarks/peers.py`` attach to a tiny DiT pipeline and come off without a trace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from tokencache.demo import DigitsPipeline

from models import tiny_dit

pytest.importorskip("diffusers.hooks")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

STEPS = 6


def tiny_pipe() -> DigitsPipeline:
    pipe = DigitsPipeline(transformer=tiny_dit(num_layers=3), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: DigitsPipeline) -> torch.Tensor:
    with torch.no_grad():
        return pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(0)).images


def attributes(pipe: DigitsPipeline) -> list[tuple[str, frozenset[str], frozenset[str]]]:
    return [(name, frozenset(vars(m)), frozenset(m._modules)) for name, m in pipe.transformer.named_modules()]


def check_round_trip(peer: peers.Peer) -> None:
    pipe = tiny_pipe()
    assert peer.check(pipe) is None, peer.check(pipe)
    before, attrs = sample(pipe), attributes(pipe)
    call = type(pipe).__call__
    remover = peer.attach(pipe)
    try:
        first, second = sample(pipe), sample(pipe)
    finally:
        remover()
    assert torch.isfinite(first).all()
    assert torch.equal(first, second), "the peer's state must be reset between sampling runs"
    done = peer.stats.get("skipped_steps", peer.stats.get("predicted_steps"))
    assert done is not None and peer.stats["computed_steps"] + done == 2 * STEPS, peer.stats  # both runs count
    assert torch.equal(sample(pipe), before), "outputs after removal must be bitwise equal to before"
    assert attributes(pipe) == attrs
    assert type(pipe).__call__ is call


DIFFUSERS = [p for p in peers.diffusers_peers(quick=True) if p.probe is None]  # one setting per hook


@pytest.mark.parametrize("peer", DIFFUSERS, ids=[p.name for p in DIFFUSERS])
def test_diffusers_peer_attaches_and_detaches(peer: peers.Peer) -> None:
    check_round_trip(peer)


def test_diffusers_taylorseer_defaults_are_unavailable_on_dit() -> None:
    pipe = tiny_pipe()
    before, attrs = sample(pipe), attributes(pipe)
    reasons = {p.knob["variant"]: p.check(pipe) for p in peers.diffusers_peers() if p.probe is not None}
    assert "attn1" in reasons["default"]
    assert "proj_out" in reasons["lite"]
    assert torch.equal(sample(pipe), before) and attributes(pipe) == attrs


def test_cache_dit_peers_attach_and_detach() -> None:
    pytest.importorskip("cache_dit")
    runnable = peers.cache_dit_peers(quick=True)  # one threshold with and without the calibrator
    assert {p.family for p in runnable} == {"cache-dit DBCache", "cache-dit DBCache+TaylorSeer"}
    for peer in runnable:
        check_round_trip(peer)


def test_cache_dit_default_config_is_unavailable_on_a_small_dit() -> None:
    pytest.importorskip("cache_dit")
    (default,) = [p for p in peers.cache_dit_peers() if p.probe is not None]
    pipe = tiny_pipe()
    before, attrs = sample(pipe), attributes(pipe)
    reason = default.check(pipe)
    assert isinstance(reason, str) and "Fn_compute_blocks" in reason
    assert torch.equal(sample(pipe), before) and attributes(pipe) == attrs


def test_missing_cache_dit_gives_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "cache_dit_version", lambda: None)
    rows = peers.cache_dit_peers()
    assert rows and all("not installed" in p.check(tiny_pipe()) for p in rows)
    with pytest.raises(RuntimeError, match="not installed"):
        rows[0].attach(tiny_pipe())
