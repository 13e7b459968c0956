"""Each score, the spatial bonus, the frequency counter and each schedule formula on small hand cases."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import tokencache as tc
from tokencache.core.processors import ScoringAttnProcessor
from tokencache.core.schedule import fresh_tokens
from tokencache.core.scores import frequency_term, score_from_raw, spatial_bonus
from tokencache.core.state import SlotState, StepContext, StreamState
from tokencache.methods.toca import ToCaPolicy, ToCaSelector, toca_full_steps

from models import tiny_dit


def capture(attn, statistic, x, context=None, mask=None, chunk=2):
    seen = {}
    def sink(value):
        seen["v"] = value
    attn.set_processor(ScoringAttnProcessor(AttnProcessor2_0(), statistic, lambda: sink, chunk))
    out = attn(x, encoder_hidden_states=context, attention_mask=mask)
    attn.set_processor(AttnProcessor2_0())
    reference = attn(x, encoder_hidden_states=context, attention_mask=mask)
    assert torch.allclose(out, reference, atol=1e-5)  # the explicit path computes the same attention
    return seen["v"]


def test_attention_received_is_column_sum_of_head_mean():
    torch.manual_seed(0)
    attn = Attention(query_dim=4, heads=2, dim_head=2)
    x = torch.randn(1, 3, 4)
    received = capture(attn, "received", x)
    q = attn.to_q(x).view(1, 3, 2, 2).transpose(1, 2)
    k = attn.to_k(x).view(1, 3, 2, 2).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), dim=-1)  # (1, heads, q, k)
    expected = probs.mean(dim=1).sum(dim=1)
    assert torch.allclose(received, expected, atol=1e-6)
    assert torch.allclose(received.sum(), torch.tensor(3.0))  # every query distributes mass 1


def test_cross_attention_entropy_of_uniform_attention_is_log_of_valid_keys():
    attn = Attention(query_dim=4, cross_attention_dim=4, heads=1, dim_head=4)
    with torch.no_grad():
        attn.to_k.weight.zero_()  # all keys equal: every query attends uniformly
        attn.to_k.bias = None
    x, text = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
    entropy = capture(attn, "entropy", x, text, chunk=3)
    assert torch.allclose(entropy, torch.full((2, 5), math.log(6)), atol=1e-5)
    mask = torch.zeros(2, 1, 6)
    mask[..., 4:] = -10000.0  # two padding tokens, as PixArt's transformer turns its mask into a bias
    entropy = capture(attn, "entropy", x, text, mask=mask, chunk=2)
    assert torch.allclose(entropy, torch.full((2, 5), math.log(4)), atol=1e-4)
    score = score_from_raw("cross_attention_entropy", entropy)
    assert torch.allclose(score, torch.full((2, 5), 1 / math.sqrt(5)), atol=1e-5)  # normalise(1 + H)


def test_value_norm_is_norm_of_value_vectors():
    attn = Attention(query_dim=4, heads=1, dim_head=4)
    with torch.no_grad():
        attn.to_v.weight.copy_(torch.eye(4))
    x = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    norms = capture(attn, "value_norm", x)
    assert torch.allclose(norms, torch.tensor([[5.0, 1.0]]))


def test_spatial_bonus_hand_case():
    score = torch.tensor([[1.0, 2.0, 0.0, 0.5,
                           0.1, 0.2, 3.0, 0.4,
                           0.0, 0.0, 0.0, 0.0,
                           0.0, 0.9, 0.0, 0.3]])
    out = spatial_bonus(score, (4, 4), cell=2, bonus=0.5)
    expected = score.clone()
    for best in (1, 6, 13, 15):  # the best token of each 2x2 cell
        expected[0, best] *= 1.5
    assert torch.allclose(out, expected)
    # cells that do not divide the grid: a 3x3 grid in 2x2 cells has 4 (smaller) cells
    out = spatial_bonus(torch.arange(9.0).view(1, 9), (3, 3), cell=2, bonus=1.0)
    assert torch.equal(out[0], torch.tensor([0, 1, 2, 3, 8, 10, 6, 14, 16.0]))
    assert torch.equal(spatial_bonus(score, (4, 4), 2, 0.0), score)


def test_frequency_term_and_counter_in_the_engine():
    assert torch.allclose(frequency_term(torch.tensor([[0, 1, 3]]), 4, 0.25), torch.tensor([[0.0, 0.0625, 0.1875]]))
    transformer = tiny_dit(num_layers=1)
    config = tc.ToCaConfig(fresh_ratio=0.25, full_step_interval=10, score="random", frequency_weight=0.25)
    handle = tc.apply(transformer, config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    counters = []
    with handle.sampling(num_steps=4):  # the run's cache is freed at its end: read it before
        for i in range(3):
            transformer(x, timestep=torch.tensor([900 - 100 * i] * 2), class_labels=torch.tensor([1, 2]))
            counters.append(handle._engine.streams[0].slots[(0, "ff")].steps_since_fresh.clone())
    assert counters[0].abs().sum() == 0  # reset at the full step
    k = fresh_tokens(0.25, 16)
    # after 2 partial steps: 2*k tokens recomputed once each at most, the rest count 2
    assert counters[2].max() == 2 and ((counters[2] == 0).sum(-1) == k).all()
    handle.remove()


def test_selection_random_halves_share_one_draw():
    config = tc.ToCaConfig(score="random", frequency_weight=0.0, cfg_shared_selection=True, seed=7)
    selector = ToCaSelector(config)
    selector.reset(None)
    stream = StreamState(batch=4, num_tokens=8, cfg_shared=True)
    slot = SlotState(steps_since_fresh=torch.zeros(4, 8, dtype=torch.int32))
    ctx = StepContext(1, 10, False, stream, (2, 4), {})
    index = selector.select(ctx, 0, slot, torch.zeros(4, 8, 3), 3)
    assert torch.equal(index[:2], index[2:]) and not torch.equal(index[0], index[1])
    selector.reset(None)
    assert torch.equal(selector.select(ctx, 0, slot, torch.zeros(4, 8, 3), 3), index)  # re-seeded per run


def test_selection_similarity_picks_changed_tokens():
    config = tc.ToCaConfig(score="similarity", frequency_weight=0.0)
    selector = ToCaSelector(config)
    last = torch.randn(1, 6, 4)
    now = last.clone()
    now[0, 2] = -last[0, 2]
    now[0, 5] = last[0, 5] + torch.tensor([1.0, -2.0, 0.5, 0.0])
    slot = SlotState(steps_since_fresh=torch.zeros(1, 6, dtype=torch.int32), last_input=last)
    ctx = StepContext(1, 10, False, StreamState(1, 6, False), (2, 3), {})
    assert set(selector.select(ctx, 0, slot, now, 2)[0].tolist()) == {2, 5}


def test_selection_attention_score_with_frequency():
    config = tc.ToCaConfig(score="attention", frequency_weight=1.0, full_step_interval=1)
    selector = ToCaSelector(config)
    stream = StreamState(1, 4, False)
    stream.raw_scores[0] = torch.tensor([[4.0, 3.0, 0.0, 0.0]])  # normalised: 0.8, 0.6, 0, 0
    slot = SlotState(steps_since_fresh=torch.tensor([[0, 0, 0, 1]], dtype=torch.int32))
    ctx = StepContext(1, 10, False, stream, (2, 2), {})
    assert set(selector.select(ctx, 0, slot, torch.zeros(1, 4, 2), 2)[0].tolist()) == {0, 3}  # 0.8, 1.0


def test_step_and_depth_ramps():
    assert tc.StepRamp(-1.0, 4.0, offset=1)(0, 50) == pytest.approx(-0.92)
    assert tc.StepRamp(1.9, -1.8)(10, 20) == pytest.approx(1.0)
    assert tc.DepthRamp(0.8, 0.4)(27, 28) == pytest.approx(1.2)
    assert tc.DepthRamp(0.8, 0.4)(0, 1) == pytest.approx(0.8)


def test_fresh_tokens_floor_and_clamp():
    assert fresh_tokens(0.3, 10) == 3
    assert fresh_tokens(0.39, 10) == 3
    assert fresh_tokens(-0.5, 10) == 0
    assert fresh_tokens(1.7, 10) == 10


def test_fresh_ratio_formula():
    config = tc.ToCaConfig.preset("pixart-dpm20")
    policy = ToCaPolicy(config, 20, 28)
    expected = 0.30 * (1.9 - 1.8 * 5 / 20) * (1.6 - 1.2 * 7 / 27) * 0.6
    assert policy.fresh_ratio(5, 7, "cross_attn") == pytest.approx(expected)
    assert policy.fresh_ratio(5, 7, "self_attn") == 0.0
    dit = ToCaPolicy(tc.ToCaConfig.preset("dit-ddim50"), 50, 28)
    assert dit.fresh_ratio(0, 0, "mlp") == 1.0  # step 0 is full
    assert dit.fresh_ratio(1, 0, "mlp") == 0.0  # negative step factor clamps to 0
    assert dit.fresh_ratio(48, 27, "mlp") == pytest.approx(0.07 * (-1 + 4 * 49 / 50) * 1.2 * 2.5)


def test_full_step_schedule_hand_cases():
    plain = tc.ToCaConfig(full_step_interval=3)
    assert [i for i, f in enumerate(toca_full_steps(plain, 10)) if f] == [0, 3, 6, 9]
    ramp = tc.ToCaConfig(full_step_interval=3, interval_ramp=tc.StepRamp(0.6, 0.8, offset=1))
    # interval at a full step i is round(3 / (0.6 + 0.8 (i+1)/10)): 4 at i=0, 3 at i=4, 2 at i=7
    assert [i for i, f in enumerate(toca_full_steps(ramp, 10)) if f] == [0, 4, 7, 9]
    window = tc.ToCaConfig(full_step_interval=4, sensitive_window=(0.5, 0.8), sensitive_interval=1)
    # progress 8/12 and 9/12 fall in the window (interval 1); 10/12 does not (interval 4)
    assert [i for i, f in enumerate(toca_full_steps(window, 12)) if f] == [0, 4, 8, 9, 10]
    first = tc.ToCaConfig(full_step_interval=5, first_full_steps=3)
    assert [i for i, f in enumerate(toca_full_steps(first, 10)) if f] == [0, 1, 2, 7]
