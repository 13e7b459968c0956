"""TokenCache: calibration, the predictor, block allocation, TPRR, persistence."""

import dataclasses
import json

import pytest
import torch

import tokencache as tc
from tokencache.core.layouts import find_blocks
from tokencache.methods.token_cache import allocate_block_ratios
from tokencache.methods.token_cache_calibration import (
    CalibrationConfig,
    _Relaxation,
    calibrate,
    class_calls,
    record_trajectories,
)

from models import tiny_dit, tiny_dit_pipeline, tiny_pixart
from test_equivalence import cached_run_and_plan, dit_kwargs, dit_pipe_run, hand_loop

STEPS = 10


@pytest.fixture(scope="module")
def calibrated():
    pipe = tiny_dit_pipeline()
    config = CalibrationConfig(calls=class_calls(10, 2, 3, output_type="np"), num_steps=STEPS, budget=0.5,
                               iterations=30, schedule=tc.TPRR(2, 1, 0.5), progress=False)
    return pipe, calibrate(pipe, config)


def test_training_reduces_the_loss(calibrated):
    _, predictor = calibrated
    c = predictor.calibration
    # The training objective on fixed pairs, before and after training.
    assert len(c["losses"]) == 30 and c["objective_after"] < 0.97 * c["objective_before"]
    assert len(c["block_sensitivity"]) == 3 and all(s > 0 for s in c["block_sensitivity"])
    assert sum(c["block_ratios"]) / 3 == pytest.approx(0.5)


def test_calibration_records_the_guidance_it_sampled_with(calibrated, tmp_path):
    """The calls set no guidance, so the pipeline's default (DiTPipeline: 4.0) is what the predictor was fitted to;
    it survives a save and load."""
    pipe, predictor = calibrated
    assert predictor.calibration["sampler_settings"] == [{"guidance_scale": 4.0}]
    predictor.save_pretrained(tmp_path / "p")
    assert tc.TokenCachePredictor.from_pretrained(tmp_path / "p").calibration["sampler_settings"] == [
        {"guidance_scale": 4.0}]


def test_guidance_settings_take_the_call_over_the_default():
    from tokencache.core.call_settings import guidance_settings

    class Pipe:
        def __call__(self, labels, guidance_scale=1.75, guidance_interval=(0.2, 0.85), steps=30):
            pass

    class NoGuidance:
        def __call__(self, labels, steps=30):
            pass

    assert guidance_settings(Pipe(), {}) == {"guidance_scale": 1.75, "guidance_interval": [0.2, 0.85]}
    assert guidance_settings(Pipe(), {"guidance_scale": 3, "guidance_interval": (0, 1)}) == {
        "guidance_scale": 3.0, "guidance_interval": [0.0, 1.0]}
    assert guidance_settings(NoGuidance(), {}) == {}


def test_calibration_leaves_the_model_unchanged(calibrated):
    pipe, _ = calibrated
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # restored after calibration
    fresh = tiny_dit_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), fresh.transformer.parameters(),
                                                 strict=True))


def test_inference_flops_equal_plan_and_budget(calibrated):
    pipe, predictor = calibrated
    stats, plan = cached_run_and_plan(pipe, tc.TokenCacheConfig(predictor), STEPS)
    assert stats.flops == plan.flops and stats.step_kinds == plan.step_kinds
    assert stats.step_kinds == tuple("full" if f else "partial" for f in tc.TPRR(2, 1, 0.5).full_steps(STEPS))
    assert stats.speedup > 1.3


def test_all_weights_one_reproduce_the_uncached_output():
    """Relaxation with w = 1 on every module is the uncached network; so is inference with nothing pruned."""
    pipe = tiny_dit_pipeline()
    transformer = pipe.transformer
    blocks = find_blocks(transformer)
    runs = record_trajectories(transformer, blocks, lambda i: dit_pipe_run(pipe, steps=4), 1, 4)
    relax = _Relaxation(blocks, {"self_attn", "mlp"})
    relax.weight_fn = lambda block, key, tokens, last: torch.ones(tokens.shape[:2])
    with relax.attached(), torch.no_grad():
        relax.cache = runs[0][1]
        record = runs[0][3]
        out = transformer(*record.args, **record.kwargs).sample
    assert torch.allclose(out, record.output, atol=1e-6)

    predictor = tc.TokenCachePredictor(3, 16, 6, "features", model=dict(class_name="DiTTransformer2DModel"),
                                       calibration=dict(budget=0.0, schedule=dict(early_cached_steps=1,
                                                        late_cached_steps=1, boundary=0.5),
                                                        block_sensitivity=[1.0, 1.0, 1.0]))
    reference = dit_pipe_run(pipe, steps=6)
    handle = tc.apply(pipe, tc.TokenCacheConfig(predictor, partial_modules=("self_attn", "mlp")))
    cached = dit_pipe_run(pipe, steps=6)
    assert handle.stats().partial_steps == 3
    handle.remove()
    assert torch.allclose(torch.from_numpy(cached), torch.from_numpy(reference), atol=1e-5)


def test_save_load_round_trip_is_bitwise(calibrated, tmp_path):
    _, predictor = calibrated
    predictor.save_pretrained(tmp_path)
    loaded = tc.TokenCachePredictor.from_pretrained(tmp_path)
    assert loaded.config_dict() == predictor.config_dict()
    for (name, a), (_, b) in zip(predictor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    meta = json.loads((tmp_path / "predictor.json").read_text())
    assert meta["model"] == dict(class_name="DiTTransformer2DModel", num_blocks=3, num_tokens=16, num_steps=STEPS)


def test_mismatched_model_and_steps_raise(calibrated):
    _, predictor = calibrated
    with pytest.raises(ValueError, match="calibrated for another model.*num_blocks"):
        tc.apply(tiny_dit(num_layers=2), tc.TokenCacheConfig(predictor))
    with pytest.raises(ValueError, match="class_name"):
        tc.apply(tiny_pixart(), tc.TokenCacheConfig(predictor))
    with pytest.raises(ValueError, match="num_tokens"):
        tc.apply(tiny_dit(sample_size=16), tc.TokenCacheConfig(predictor))
    transformer = tiny_dit()
    handle = tc.apply(transformer, tc.TokenCacheConfig(predictor))
    with pytest.raises(ValueError, match=f"calibrated for {STEPS} sampling steps"):
        hand_loop(transformer, handle, STEPS + 2, kwargs_fn=dit_kwargs)
    handle.remove()


def test_corrupt_and_truncated_files_raise(calibrated, tmp_path):
    _, predictor = calibrated
    predictor.save_pretrained(tmp_path)
    weights = tmp_path / "predictor.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tc.TokenCachePredictor.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tc.TokenCachePredictor.from_pretrained(tmp_path)
    weights.write_bytes(data)
    (tmp_path / "predictor.json").write_text('{"format": "tokencache-predictor", "num_blocks": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        tc.TokenCachePredictor.from_pretrained(tmp_path)
    config = predictor.config_dict()
    config["num_tokens"] = 32
    (tmp_path / "predictor.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        tc.TokenCachePredictor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="predictor.json"):
        tc.TokenCachePredictor.from_pretrained(tmp_path / "nowhere")


def test_calibration_resumes_from_checkpoint(tmp_path):
    pipe = tiny_dit_pipeline()
    base = dict(calls=class_calls(10, 2, 2, output_type="np"), num_steps=6, iterations=6, progress=False,
                schedule=tc.TPRR(1, 1, 0.5), checkpoint_dir=str(tmp_path), checkpoint_every=3)
    straight = calibrate(pipe, CalibrationConfig(**{**base, "checkpoint_dir": str(tmp_path / "other")}))
    partial = calibrate(pipe, CalibrationConfig(**{**base, "iterations": 3}))  # stops after 3 of them
    assert partial.calibration["iterations"] == 3
    with pytest.raises(ValueError, match="other calibration settings"):
        calibrate(pipe, CalibrationConfig(**{**base, "budget": 0.3}))
    (tmp_path / "calibration-checkpoint.pt").unlink()
    calibrate(pipe, CalibrationConfig(**{**base, "iterations": 3}))
    resumed = calibrate(pipe, CalibrationConfig(**base))
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_block_allocation_and_tprr():
    ratios = allocate_block_ratios([1.0, 2.0, 4.0], 0.35)
    assert sum(ratios) / 3 == pytest.approx(0.35)
    assert ratios[0] > ratios[1] > ratios[2] and ratios[0] == pytest.approx(2 * ratios[1])
    capped = allocate_block_ratios([0.01, 1.0, 1.0], 0.6, max_ratio=0.9)
    assert capped[0] == 0.9 and sum(capped) / 3 == pytest.approx(0.6)
    with pytest.raises(ValueError, match="budget"):
        allocate_block_ratios([1.0], 0.99)
    full = tc.TPRR(early_cached_steps=3, late_cached_steps=1, boundary=0.5).full_steps(12)
    assert [i for i, f in enumerate(full) if f] == [0, 4, 8, 10]
    assert [i for i, f in enumerate(tc.TPRR(2, 2, 0.5).full_steps(9)) if f] == [0, 3, 6]


def test_config_validation(calibrated):
    _, predictor = calibrated
    with pytest.raises(ValueError, match="predictor"):
        tc.TokenCacheConfig(predictor=None)
    with pytest.raises(ValueError, match="budget"):
        tc.TokenCacheConfig(predictor, budget=1.0)
    with pytest.raises(ValueError, match="token_selection"):
        tc.TokenCacheConfig(predictor, token_selection="psychic")
    with pytest.raises(ValueError, match="partial_modules"):
        tc.TokenCacheConfig(predictor, partial_modules=("mlp", "conv"))
    with pytest.raises(ValueError, match="early_cached_steps"):
        tc.TPRR(early_cached_steps=-1)
    with pytest.raises(ValueError, match="boundary"):
        tc.TPRR(boundary=1.5)
    with pytest.raises(ValueError, match="variant"):
        CalibrationConfig(variant="attention")
    with pytest.raises(ValueError, match="calls"):
        calibrate(tiny_dit_pipeline(), CalibrationConfig())
    with pytest.raises(ValueError, match="sampler"):
        calibrate(tiny_dit(), CalibrationConfig())


def test_predictor_cost_is_under_two_percent_of_a_forward():
    """On the demo model's shape (64 tokens, 6 blocks of width 128), per block and call."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                                      num_layers=6, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    full_forward = tc.plan(tc.FORAConfig(interval=1), model, 1, batch_size=2).flops
    predictor = tc.TokenCachePredictor(6, 64, 50, "features")
    per_step = 6 * 2 * predictor.flops_per_call(2)  # every block, both partial modules
    assert per_step < 0.02 * full_forward


def test_ablation_selection_uses_toca_scores(calibrated):
    pipe, predictor = calibrated
    handle = tc.apply(pipe, tc.TokenCacheConfig(predictor, token_selection="random", adaptive_blocks=False))
    dit_pipe_run(pipe, steps=STEPS)
    assert handle.stats().partial_steps > 0
    handle.remove()


# ---- issue 13, item 10: a user's calibration is what the README and the demo call TokenCache -------------------


def test_user_calibration_records_the_shipped_ranking_and_budget(tmp_path):
    from tokencache.demo.runner import shipped_predictor

    shipped = shipped_predictor()
    defaults = CalibrationConfig()
    assert defaults.token_selection == shipped.calibration["token_selection"] == "similarity"
    assert defaults.budget == shipped.calibration["budget"]
    assert dataclasses.asdict(defaults.schedule) == shipped.calibration["schedule"]
    pipe = tiny_dit_pipeline()
    config = CalibrationConfig(calls=class_calls(10, 2, 2, output_type="np"), num_steps=4, iterations=1,
                               schedule=tc.TPRR(1, 1, 0.5), sensitivity_pairs=1, pairs_per_iteration=1,
                               progress=False)
    predictor = calibrate(pipe, config)
    predictor.save_pretrained(tmp_path)
    loaded = tc.TokenCachePredictor.from_pretrained(tmp_path)
    assert loaded.calibration["token_selection"] == "similarity"
    assert loaded.calibration["budget"] == defaults.budget
    assert tc.TokenCacheConfig(loaded).effective_token_selection == "similarity"
    with pytest.raises(ValueError, match="CalibrationConfig.token_selection"):
        CalibrationConfig(token_selection="best")


def test_checkpoint_with_other_settings_fails_before_any_sampling(tmp_path, monkeypatch):
    from tokencache.methods.token_cache_calibration import CheckpointMismatchError

    base = dict(calls=class_calls(10, 2, 2, output_type="np"), num_steps=4, iterations=2, progress=False,
                schedule=tc.TPRR(1, 1, 0.5), checkpoint_dir=str(tmp_path), checkpoint_every=1,
                sensitivity_pairs=1, pairs_per_iteration=1)
    pipe = tiny_dit_pipeline()
    calibrate(pipe, CalibrationConfig(**base))
    calls = []
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: calls.append(1))
    with pytest.raises(CheckpointMismatchError, match=r"CalibrationConfig.budget: 0.8125 there, 0.3 now") as info:
        calibrate(pipe, CalibrationConfig(**{**base, "budget": 0.3}))
    assert info.value.differences == {"budget": (0.8125, 0.3)} and calls == []


def test_calibration_fails_early_when_the_runs_will_not_fit_in_memory(monkeypatch):
    """Every run records as much as the first; when the rest cannot fit, calibration stops after the first run
    with an error naming the settings to lower, instead of being killed for memory later."""
    import tokencache.methods.token_cache_calibration as calibration

    pipe = tiny_dit_pipeline()
    runs_started = []
    config = CalibrationConfig(calls=class_calls(10, 2, 3, output_type="np"), num_steps=4, iterations=2,
                               schedule=tc.TPRR(1, 1, 0.5), progress=False)
    original_call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__",
                        lambda self, *a, **k: runs_started.append(1) or original_call(self, *a, **k))
    monkeypatch.setattr(calibration, "_available_memory_bytes", lambda: 1024)
    with pytest.raises(MemoryError, match=r"other 2 runs need .* --runs R --per-call P"):
        calibrate(pipe, config)
    assert len(runs_started) == 1
    monkeypatch.setattr(calibration, "_available_memory_bytes", lambda: None)  # unknown: no check
    assert calibrate(pipe, config) is not None
