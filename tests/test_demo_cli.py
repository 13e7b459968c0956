"""`tokencache demo --quick`: the numbers in its results are real."""

import json
import math

import pytest

import tokencache as tc
from tokencache.cli import main
from tokencache.demo import load_model


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_results_and_pictures(quick_results):
    out, results = quick_results
    assert (out / "samples.png").stat().st_size > 1000 and (out / "tradeoff.png").stat().st_size > 1000
    methods = [r["method"] for r in results["records"]]
    assert methods[0] == "no cache (DDIM-50)" and any(m.startswith("ToCa") for m in methods)


def test_uncached_row_is_identical_and_within_the_quality_bars(quick_results):
    _, results = quick_results
    uncached = results["records"][0]
    assert uncached["psnr"] == "inf" and uncached["ssim"] == pytest.approx(1.0)
    assert uncached["flops_speedup"] == pytest.approx(1.0)
    # the bars of the shipped model: accuracy >= 90 %, FD within 3x of real data at the same sample size
    assert uncached["accuracy"] >= 0.9
    assert uncached["fd"] <= 3 * results["meta"]["fd_real_same_n"]
    for r in results["records"][1:]:
        assert math.isfinite(r["psnr"]) and r["psnr"] > 20 and 0 < r["ssim"] < 1


def test_toca_row_flops_match_the_plan(quick_results):
    _, results = quick_results
    row = next(r for r in results["records"] if r["method"] == "ToCa N=4")
    pipe = load_model()
    plan = tc.plan(tc.ToCaConfig.preset("dit-ddim50", full_step_interval=4), pipe.transformer, 50, batch_size=40)
    assert row["flops_speedup"] == pytest.approx(plan.speedup, rel=1e-9)
    assert row["full_steps"] == plan.count("full") and row["partial_steps"] == plan.count("partial")


def test_train_demo_command_few_steps(tmp_path):
    """`tokencache train-demo` with a handful of steps writes a folder the demo loader reads."""
    from tokencache.demo import load_pipeline_from
    from tokencache.demo.classifier import load_classifier_from

    out = tmp_path / "model"
    assert main(["train-demo", "--out", str(out), "--steps", "2", "--finetune-steps", "1",
                 "--classifier-epochs", "1"]) == 0
    pipe = load_pipeline_from(out)
    images = pipe(class_labels=[3], num_inference_steps=2).images
    assert images.shape == (1, 1, 16, 16) and (out / "stage1").is_dir()
    assert load_classifier_from(out) is not None
