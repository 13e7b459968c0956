"""Issue 13, item 6: files and inputs are validated before any work, and errors name the file/argument/field."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tokencache as tc
from tokencache.core.shapes import build_transformer
from tokencache.methods.token_cache import MAX_BUDGET
from tokencache.methods.token_cache_calibration import CalibrationConfig

from models import tiny_dit

SCHEDULE = dict(early_cached_steps=1, late_cached_steps=1, boundary=0.5)


def hand_predictor(num_tokens: int = 16, **calibration) -> tc.TokenCachePredictor:
    """A predictor for ``tiny_dit()`` (3 blocks, 16 tokens) without calibrating it."""
    values = {"budget": 0.5, "schedule": SCHEDULE, "block_sensitivity": [1.0, 2.0, 3.0], **calibration}
    return tc.TokenCachePredictor(3, num_tokens, 6, "features", calibration=values,
                                  model=dict(class_name="DiTTransformer2DModel", num_blocks=3, num_tokens=num_tokens,
                                             num_steps=6))


# ---- numeric config fields: integers beyond float range -------------------------------------------------------

def _numeric_fields(cls: type) -> list[str]:
    """The fields whose default is a plain number (int or float, not bool)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            out.append(f.name)
    return out


CONFIG_CLASSES = {
    "ToCaConfig": (tc.ToCaConfig, {}),
    "FORAConfig": (tc.FORAConfig, {}),
    "TPRR": (tc.TPRR, {}),
    "StepRamp": (tc.StepRamp, {}),
    "DepthRamp": (tc.DepthRamp, {}),
    "TokenCacheConfig": (tc.TokenCacheConfig, {"predictor": hand_predictor()}),
    "CalibrationConfig": (CalibrationConfig, {}),
}
NUMERIC_FIELDS = [(name, f) for name, (cls, _) in CONFIG_CLASSES.items() for f in _numeric_fields(cls)]
# numeric fields whose default is None, which the generic scan misses
NUMERIC_FIELDS += [("TokenCacheConfig", "budget"), ("ToCaConfig", "spatial_cell_size")]


def test_every_numeric_field_is_covered():
    fields = {f"{c}.{f}" for c, f in NUMERIC_FIELDS}
    assert {"ToCaConfig.fresh_ratio", "StepRamp.start", "DepthRamp.slope", "TPRR.boundary", "FORAConfig.interval",
            "CalibrationConfig.learning_rate", "TokenCacheConfig.budget", "ToCaConfig.seed"} <= fields


@pytest.mark.parametrize(("owner", "field"), NUMERIC_FIELDS, ids=[f"{c}.{f}" for c, f in NUMERIC_FIELDS])
def test_integers_beyond_float_range_raise_value_error_naming_the_field(owner, field):
    cls, required = CONFIG_CLASSES[owner]

    @settings(max_examples=10, deadline=None)
    @given(st.integers(min_value=2**1024, max_value=10**600), st.booleans())
    def check(magnitude, negative):
        value = -magnitude if negative else magnitude
        with pytest.raises(ValueError, match=rf"{owner}\.{field}") as info:
            cls(**{**required, field: value})
        assert len(str(info.value)) < 400  # the message does not print hundreds of digits

    check()


@pytest.mark.parametrize("value", [{"mlp": 10**400}, (0.0, 10**400), (-(10**400), 0.5)])
def test_integers_beyond_float_range_inside_containers(value):
    field = "module_ratio" if isinstance(value, dict) else "sensitive_window"
    with pytest.raises(ValueError, match=rf"ToCaConfig\.{field}"):
        tc.ToCaConfig(**{field: value})


def test_overflowing_integer_examples_from_the_issue():
    with pytest.raises(ValueError, match="ToCaConfig.fresh_ratio"):
        tc.ToCaConfig(fresh_ratio=10**400)
    with pytest.raises(ValueError, match="StepRamp.start"):
        tc.StepRamp(start=10**400)
    assert tc.StepRamp(start=10**300).start == 10**300  # large but representable: the range decides


# ---- presets ---------------------------------------------------------------------------------------------------

def test_preset_of_another_config_class_names_the_owner():
    with pytest.raises(ValueError, match=r"'fora' is a FORAConfig preset.*FORAConfig.preset\('fora'\)"):
        tc.ToCaConfig.preset("fora")
    with pytest.raises(ValueError, match="'dit-ddim50' is a ToCaConfig preset"):
        tc.FORAConfig.preset("dit-ddim50")
    with pytest.raises(ValueError, match="FORAConfig: .*'fora'"):
        tc.preset("nope")


# ---- TokenCacheConfig.budget accepts exactly what the run accepts -------------------------------------------

@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5, MAX_BUDGET])
def test_budgets_the_config_accepts_plan_and_run(budget, adaptive):
    config = tc.TokenCacheConfig(hand_predictor(), budget=budget, adaptive_blocks=adaptive)
    result = tc.plan(config, tiny_dit(), 6)
    assert result.flops <= result.flops_full
    assert all(0 <= r <= MAX_BUDGET for r in config.block_ratios())


@pytest.mark.parametrize("budget", [-1e-9, MAX_BUDGET + 1e-9, 0.99, 1.0])
def test_budgets_the_run_rejects_are_rejected_by_the_config(budget):
    with pytest.raises(ValueError, match="TokenCacheConfig.budget"):
        tc.TokenCacheConfig(hand_predictor(), budget=budget, adaptive_blocks=False)
    with pytest.raises(ValueError, match="CalibrationConfig.budget"):
        CalibrationConfig(budget=budget)


# ---- predictor files ---------------------------------------------------------------------------------------------

@pytest.fixture()
def saved(tmp_path):
    hand_predictor().save_pretrained(tmp_path)
    return tmp_path


def _edit(folder, change):
    path = folder / "predictor.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_valid_file_loads(saved):
    loaded = tc.TokenCachePredictor.from_pretrained(saved)
    assert loaded.num_tokens == 16 and loaded.calibration["budget"] == 0.5


@pytest.mark.parametrize("key", ["num_blocks", "num_tokens", "num_steps", "variant", "hidden", "version",
                                 "calibration"])
def test_missing_top_level_key_names_file_and_field(saved, key):
    _edit(saved, lambda c: c.pop(key))
    with pytest.raises(ValueError, match=rf"predictor.json.*{key}"):
        tc.TokenCachePredictor.from_pretrained(saved)


@pytest.mark.parametrize("key", ["budget", "schedule", "block_sensitivity"])
def test_missing_calibration_key_names_file_and_field(saved, key):
    _edit(saved, lambda c: c["calibration"].pop(key))
    with pytest.raises(ValueError, match=rf"predictor.json.*calibration\.{key}"):
        tc.TokenCachePredictor.from_pretrained(saved)


@pytest.mark.parametrize(("key", "value"), [
    ("block_sensitivity", [1.0, 2.0]),
    ("block_sensitivity", [1.0, "NaN", 3.0]),
    ("block_sensitivity", [1.0, -2.0, 3.0]),
    ("token_selection", "best"),
    ("budget", 0.99),
    ("budget", "0.8"),
    ("schedule", {"early_cached_steps": -1, "late_cached_steps": 1, "boundary": 0.5}),
    ("schedule", [3, 2, 0.5]),
])
def test_bad_calibration_values_name_file_and_field(saved, key, value):
    _edit(saved, lambda c: c["calibration"].__setitem__(key, value))
    with pytest.raises(ValueError, match=rf"predictor.json.*calibration\.{key}"):
        tc.TokenCachePredictor.from_pretrained(saved)


def test_nan_block_sensitivity_in_json_text(saved):
    path = saved / "predictor.json"
    config = json.loads(path.read_text())
    config["calibration"]["block_sensitivity"] = [1.0, math.nan, 3.0]
    path.write_text(json.dumps(config))  # Python writes NaN, which json.loads reads back as a float nan
    with pytest.raises(ValueError, match=r"predictor.json.*calibration\.block_sensitivity"):
        tc.TokenCachePredictor.from_pretrained(saved)


@pytest.mark.parametrize(("key", "value"), [("version", 2), ("version", "1"), ("variant", "transformer"),
                                            ("num_tokens", 0), ("hidden", 2.5), ("model", [1])])
def test_bad_top_level_values_name_file_and_field(saved, key, value):
    _edit(saved, lambda c: c.__setitem__(key, value))
    with pytest.raises(ValueError, match=rf"predictor.json.*{key}"):
        tc.TokenCachePredictor.from_pretrained(saved)


def test_nan_weights_name_the_file_and_the_weight(saved):
    path = saved / "predictor.safetensors"
    state = load_file(path)
    state["feature_weight"][0, 0] = float("nan")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"predictor.safetensors.*'feature_weight'.*NaN"):
        tc.TokenCachePredictor.from_pretrained(saved)


def test_hand_built_bad_calibration_fails_at_the_config():
    with pytest.raises(ValueError, match=r"calibration\.token_selection"):
        tc.TokenCacheConfig(hand_predictor(token_selection="best"))
    with pytest.raises(ValueError, match=r"calibration\.block_sensitivity"):
        tc.TokenCacheConfig(hand_predictor(block_sensitivity=[1.0]))
    # fields the config overrides are not needed from the calibration
    bare = tc.TokenCachePredictor(3, 16, 6, "features")
    tc.TokenCacheConfig(bare, budget=0.5, schedule=tc.TPRR(1, 1, 0.5), adaptive_blocks=False)
    with pytest.raises(ValueError, match=r"calibration\.budget"):
        tc.TokenCacheConfig(bare, schedule=tc.TPRR(1, 1, 0.5), adaptive_blocks=False)


def test_wrong_num_tokens_fails_at_apply_naming_both_counts():
    # no recorded model: only the predictor's own shape can tell
    predictor = tc.TokenCachePredictor(3, 32, 6, "features", calibration=dict(budget=0.5, schedule=SCHEDULE))
    with pytest.raises(ValueError, match=r"num_tokens is 32, the model has 16 tokens"):
        tc.apply(tiny_dit(), tc.TokenCacheConfig(predictor, adaptive_blocks=False))
    recorded = hand_predictor(num_tokens=32)
    with pytest.raises(ValueError, match=r"num_tokens: calibrated for 32, the model has 16"):
        tc.apply(tiny_dit(), tc.TokenCacheConfig(recorded))


# ---- tc.plan arguments -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_xl_2():
    return build_transformer("dit-xl-2")


@pytest.mark.parametrize("argument", ["num_steps", "batch_size", "num_tokens"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "16", True])
def test_plan_rejects_bad_counts_naming_the_argument(dit_xl_2, argument, value):
    kwargs = dict(num_steps=10)
    kwargs[argument] = value
    with pytest.raises(ValueError, match=rf"{argument} must be an integer >= 1"):
        tc.plan(tc.FORAConfig(), dit_xl_2, **kwargs)


def test_plan_rejects_bad_context_tokens(dit_xl_2):
    with pytest.raises(ValueError, match="context_tokens"):
        tc.plan(tc.FORAConfig(), dit_xl_2, 10, context_tokens=-1)


def test_plan_without_sample_size_asks_for_num_tokens(dit_xl_2):
    class NoSize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = dit_xl_2.transformer_blocks
            self.config = {"patch_size": 2}

    with pytest.raises(ValueError, match="num_tokens is missing.*pass num_tokens"):
        tc.plan(tc.FORAConfig(), NoSize(), 10)
    assert tc.plan(tc.FORAConfig(), NoSize(), 10, num_tokens=256).num_tokens == 256


def test_plan_defaults_to_the_cfg_batch_the_pipelines_run(dit_xl_2):
    default = tc.plan(tc.ToCaConfig.preset("dit-ddim50"), dit_xl_2, 50)
    assert default.batch_size == 2
    # the published DiT-XL/2 DDIM-50 count is for CFG batch 2
    assert default.flops_full == pytest.approx(23.74e12, rel=0.02)
