"""Every config field rejects bad values with a ValueError naming the field."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencache as tc
from tokencache.core.scores import FORECAST_SCORES, SCORES

junk = st.one_of(st.none(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2),
                 st.just(float("nan")), st.just(float("inf")))

BAD_VALUES = {
    "fresh_ratio": st.one_of(junk, st.floats(max_value=-1e-6), st.floats(min_value=1.000001, allow_infinity=False)),
    "full_step_interval": st.one_of(junk, st.integers(max_value=0), st.floats(allow_nan=False)),
    "sensitive_interval": st.one_of(junk, st.integers(max_value=0)),
    "first_full_steps": st.one_of(junk, st.integers(max_value=0)),
    "frequency_weight": st.one_of(junk, st.floats(max_value=-1e-6)),
    "spatial_cell_size": st.one_of(st.text(max_size=2), st.booleans(), st.integers(max_value=0)),
    "spatial_bonus": st.one_of(junk, st.floats(max_value=-1e-6)),
    "score": st.one_of(st.none(), st.text(max_size=8).filter(lambda s: s not in SCORES)),
    "cfg_shared_selection": st.one_of(st.none(), st.integers(), st.text(max_size=2)),
    "cache_dtype": st.one_of(st.sampled_from([torch.int8, torch.float64, "float16"]), st.integers()),
    "seed": st.one_of(junk, st.integers(max_value=-1)),
    "score_chunk_size": st.one_of(junk, st.integers(max_value=0)),
    "step_ratio": junk,
    "depth_ratio": junk,
    "interval_ramp": junk,
    "module_ratio": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.floats(0, 1), min_size=1),
                              st.dictionaries(st.sampled_from(["mlp", "self_attn"]), st.floats(max_value=-1e-6),
                                              min_size=1)),
    "sensitive_window": st.one_of(st.floats(), st.tuples(st.floats(0.5, 1), st.floats(0, 0.5)),
                                  st.tuples(st.floats(-5, -0.01), st.floats(0.1, 1)), st.lists(st.floats(0, 1))),
}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_toca_field_rejects_bad_values(field):
    @settings(max_examples=25, deadline=None)
    @given(BAD_VALUES[field])
    def check(value):
        with pytest.raises(ValueError, match=field):
            tc.ToCaConfig(**{field: value})

    check()


@given(st.one_of(junk, st.integers(max_value=0)))
@settings(max_examples=30, deadline=None)
def test_fora_interval_rejects_bad_values(value):
    with pytest.raises(ValueError, match="interval"):
        tc.FORAConfig(interval=value)


@given(st.floats(0, 1), st.integers(1, 10), st.floats(0, 2), st.sampled_from(SCORES))
@settings(max_examples=40, deadline=None)
def test_valid_configs_are_accepted_and_plan(ratio, interval, weight, score):
    forecast = tc.ForecastConfig(order=1) if score in FORECAST_SCORES else None  # they need one
    config = tc.ToCaConfig(fresh_ratio=ratio, full_step_interval=interval, frequency_weight=weight, score=score,
                           forecast=forecast)
    policy = config.build_policy(20, 4)
    assert policy.full_steps[0]
    assert all(0 <= policy.fresh_ratio(i, 1, "mlp") <= 1 for i in range(20))


@given(st.floats(allow_nan=True), st.floats(allow_nan=True))
@settings(max_examples=40, deadline=None)
def test_ramps_reject_non_finite(start, slope):
    if math.isfinite(start) and math.isfinite(slope):
        assert tc.StepRamp(start, slope)(0, 10) == pytest.approx(start + slope * 0)
    else:
        with pytest.raises(ValueError, match="StepRamp"):
            tc.StepRamp(start, slope)


def test_error_message_names_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"ToCaConfig.score must be one of .*'attention'.*got 'attn'"):
        tc.ToCaConfig(score="attn")
    with pytest.raises(ValueError, match=r"ToCaConfig.fresh_ratio must be a finite number >= 0.0 and <= 1.0; got 1.5"):
        tc.ToCaConfig(fresh_ratio=1.5)


def test_presets_listing_and_overrides():
    listing = tc.presets()
    assert {"dit-ddim50", "dit-ddpm250", "pixart-dpm20", "fora"} <= set(listing)
    assert isinstance(tc.preset("fora"), tc.FORAConfig)
    config = tc.ToCaConfig.preset("dit-ddim50", full_step_interval=4)
    assert config.full_step_interval == 4 and config.fresh_ratio == 0.07
    assert config.partial_modules == ("mlp",)
    with pytest.raises(ValueError, match="preset name must be one of"):
        tc.ToCaConfig.preset("dit-ddim49")
    with pytest.raises(ValueError, match="preset name"):
        tc.preset("nope")


def test_module_ratio_is_frozen():
    config = tc.ToCaConfig()
    with pytest.raises(TypeError):
        config.module_ratio["mlp"] = 3.0
