"""The Fashion-MNIST model: IDX reader, data loading, builders, resumable flow-matching training, pipeline."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tokencache as tc
from tokencache.core.scores import FORECAST_SCORES, SCORES
from tokencache.demo.fashion import (
    DEFAULT_GUIDANCE_INTERVAL,
    FashionMNISTMissing,
    FashionPipeline,
    build_transformer,
    load_fashion,
    make_scheduler,
    read_idx,
    split_test_halves,
)
from tokencache.demo.fashion.data import IDXFormatError
from tokencache.demo.fashion.train import learning_rate_factor, train_fashion

TINY = dict(num_layers=2, width=32, head_dim=16)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, n_train: int = 20, n_test: int = 20, gz: bool = True) -> None:
    """A synthetic Fashion-MNIST folder: class c brightens row band c."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 8] = 255
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = _idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gz_and_plain(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(arr)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(IDXFormatError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8))[:-3])
    with pytest.raises(IDXFormatError, match="payload"):
        read_idx(short)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_synthetic(tmp_path, gz):
    _write_fashion(tmp_path, gz=gz)
    images, labels = load_fashion("train", tmp_path)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) == 1.0
    assert labels.tolist() == [i % 10 for i in range(20)]
    a, b = split_test_halves(tmp_path)
    assert len(a) == len(b) == 10
    with pytest.raises(ValueError, match="split"):
        load_fashion("valid", tmp_path)


def test_missing_data_set_names_the_package(tmp_path):
    with pytest.raises(FashionMNISTMissing, match="apt-get install dataset-fashion-mnist"):
        load_fashion("test", tmp_path / "nowhere")


@pytest.mark.parametrize("arch", ["pixart", "dit"])
def test_builder_tokens_and_blocks(arch):
    model = build_transformer(arch)
    assert len(model.transformer_blocks) == 8
    assert model.pos_embed.height * model.pos_embed.width == 196
    assert tc.plan(tc.ToCaConfig(), model, 10).num_tokens == 196 if hasattr(tc, "plan") else True


def test_flow_matching_convention_reaches_the_data_point():
    """The training target v = noise - x0 driven through FlowMatchEulerDiscreteScheduler lands on x0."""
    x0 = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler()
    sched.set_timesteps(10)
    for t in sched.timesteps:
        sigma = float(t) / 1000
        v = (x - x0) / sigma  # exact velocity of the straight path through (x0, x)
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


def _tiny_train(folder, steps, data, **kw):
    return train_fashion(folder, steps=steps, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=0,
                         data=data, heldout=(data[0][:4], data[1][:4]), progress=False, num_threads=None,
                         **TINY, **kw)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    _write_fashion(tmp_path, n_train=10)
    data = load_fashion("train", tmp_path)
    full = _tiny_train(tmp_path / "full", 5, data)
    _tiny_train(tmp_path / "cut", 2, data)  # a session cut off after 2 steps (epoch boundary inside the run)
    resumed = _tiny_train(tmp_path / "cut", 5, data)
    assert resumed["steps_done"] == full["steps_done"] == 5 and resumed["complete"]
    assert len(resumed["sessions"]) == 2
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for key in ("model", "ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert a["losses"] == b["losses"] and a["pos"] == b["pos"]
    rec = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert rec["steps_done"] == 5 and rec["images_per_second"] > 0
    with pytest.raises(ValueError, match="other settings"):
        _tiny_train(tmp_path / "cut", 6, data, class_dropout=0.3)
    warm = _tiny_train(tmp_path / "warm", 7, data, init_from=tmp_path / "full")  # a new machine, shipped weights
    assert warm["steps_done"] == 7 and warm["hyper_parameters"]["warm_started_from"]["steps_done"] == 5
    with pytest.raises(ValueError, match="width"):
        train_fashion(tmp_path / "warm2", steps=7, data=data, init_from=tmp_path / "full", num_layers=2, width=64,
                      head_dim=16, progress=False, num_threads=None)


def test_cooldown_decays_the_learning_rate_and_may_be_set_on_resume(tmp_path):
    assert [learning_rate_factor(s, 10, 2, 4) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [learning_rate_factor(s, 4, 2, 0) for s in range(4)] == [0.5, 1, 1, 1]
    _write_fashion(tmp_path, n_train=10)
    data = load_fashion("train", tmp_path)
    _tiny_train(tmp_path / "run", 3, data)  # constant rate so far
    record = _tiny_train(tmp_path / "run", 6, data, cooldown_steps=2)  # resumed: cool down over steps 4-5
    last_lr = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["opt"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(1e-3 * 0.5)
    assert record["hyper_parameters"]["cooldown_steps"] == 2
    assert [s["lr_schedule"] for s in record["sessions"]] == [
        "linear warmup, then constant", "linear warmup, then constant, then linear decay to 0 over steps 4-6"]
    with pytest.raises(ValueError, match="cooldown_steps must be between 0 and steps"):
        _tiny_train(tmp_path / "bad", 3, data, cooldown_steps=4)


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    pipe = FashionPipeline(build_transformer("pixart", **TINY).eval(), make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_samples_with_flow_match(tiny_pipe):
    assert isinstance(tiny_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    out = tiny_pipe(class_labels=[0, 9], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 28, 28)
    again = tiny_pipe(class_labels=[0, 9], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.images, again.images)
    with pytest.raises(ValueError, match="class labels"):
        tiny_pipe(class_labels=[10])


def test_guidance_interval_guides_only_inside_its_flow_times(tiny_pipe):
    from tokencache.demo.fashion.model import TIME_SCALE, predict_velocity

    labels, steps, gen = [3, 7], 4, lambda: torch.Generator().manual_seed(2)
    latents = torch.randn(2, 1, 28, 28, generator=gen())

    def oracle(guided_times):  # the sampler written out: guidance 3 at the listed flow times, conditional elsewhere
        x, sched = latents.clone(), make_scheduler()
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            flow_t = (t / TIME_SCALE).reshape(1).expand(4)
            cond, uncond = predict_velocity(tiny_pipe.transformer, torch.cat([x, x]), flow_t,
                                            torch.tensor(labels + [10, 10])).chunk(2)
            v = uncond + 3.0 * (cond - uncond) if round(float(t) / TIME_SCALE, 3) in guided_times else cond
            x = sched.step(v, t, x).prev_sample
        return x.clamp(-1, 1)  # the pipeline's "pt" output

    def run(interval):
        return tiny_pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, latents=latents,
                         guidance_interval=interval).images

    # 4 steps sample at flow times 1, 0.667, 0.334, 0.001; the interval is open below and closed above
    torch.testing.assert_close(run((0.5, 1.0)), oracle({1.0, 0.667}))
    torch.testing.assert_close(run((0.334, 0.667)), oracle({0.667}))
    torch.testing.assert_close(run((0.0, 1.0)), oracle({1.0, 0.667, 0.334, 0.001}))
    assert not torch.allclose(run((0.5, 1.0)), run((0.0, 1.0)))
    default = tiny_pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, latents=latents).images
    torch.testing.assert_close(default, run(DEFAULT_GUIDANCE_INTERVAL))


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.6, 0.2), (-0.1, 1.0), (0.0, 1.5), (0.1,), "ab", None,
                                      (0.1, 0.2, 0.3)])
def test_guidance_interval_is_validated_before_sampling(tiny_pipe, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        tiny_pipe(class_labels=[1], num_inference_steps=2, guidance_interval=interval)


def test_quality_command_rejects_a_bad_guidance_interval(capsys):
    from tokencache.demo.fashion.__main__ import main as fashion_main

    with pytest.raises(SystemExit):
        fashion_main(["quality", "--folder", "/nonexistent", "--guidance-interval", "0.9", "0.1"])
    assert "--guidance-interval" in capsys.readouterr().err


ALL_FRESH = dict(fresh_ratio=1.0, module_ratio={"self_attn": 1.0, "cross_attn": 1.0, "mlp": 1.0})


@pytest.mark.parametrize("arch", ["pixart", "dit"])
@pytest.mark.parametrize("score", ["attention", "cross_attention_entropy"])
def test_every_token_fresh_equals_uncached(arch, score):
    if arch == "dit" and score == "cross_attention_entropy":
        pytest.skip("the DiT has no cross-attention")
    torch.manual_seed(0)
    pipe = FashionPipeline(build_transformer(arch, **TINY).eval(), make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=5, guidance_scale=2.0)
    ref = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    handle = tc.apply(pipe, tc.ToCaConfig(**ALL_FRESH, score=score))
    try:
        cached = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    finally:
        handle.remove()
    torch.testing.assert_close(cached, ref, rtol=1e-5, atol=1e-5)


def test_cli_knows_the_fashion_model():
    from tokencache.cli import build_parser
    from tokencache.sampling import _resolve_model

    parser = build_parser()
    assert parser.parse_args(["demo", "--model", "fashion", "--quick"]).model == "fashion"
    assert parser.parse_args(["demo"]).model == "digits"  # the quick default stays
    args = parser.parse_args(["train-fashion", "--out", "x", "--steps", "3"])
    assert (args.steps, args.arch) == (3, "pixart")
    assert _resolve_model("fashion", has_prompts=False).kind == "fashion"


def test_fashion_demo_methods_compare_scores_at_equal_ratio(monkeypatch):
    from tokencache.demo.fashion import runner

    monkeypatch.setattr(runner, "shipped_predictor", lambda: None)
    methods = runner.fashion_methods(quick=False)
    toca = [m for m in methods if m.family.startswith("ToCa")]
    assert {m.extra["score"] for m in toca} == set(SCORES) - set(FORECAST_SCORES)  # the five that need no forecast
    ratios = {(m.extra["interval"], m.config.fresh_ratio) for m in toca}
    assert len(ratios) == 2  # one fresh ratio per interval, whatever the score: the same FLOPs
    assert all(m.sampler == "flow" for m in methods)
    assert any("TokenCache" in m.name and m.unavailable for m in methods)


def test_fashion_demo_runs_and_records_its_sampler(tmp_path, monkeypatch, tiny_pipe):
    from tokencache.demo.classifier import DigitClassifier
    from tokencache.demo.fashion import runner
    from tokencache.demo.fashion.model import describe_guidance
    from tokencache.demo.fashion.reference import feature_stats

    torch.manual_seed(0)
    clf = DigitClassifier(image_size=28).eval()
    monkeypatch.setattr(runner, "load_model", lambda: tiny_pipe)
    monkeypatch.setattr(runner, "load_classifier", lambda: clf)
    monkeypatch.setattr(runner, "load_reference", lambda folder: feature_stats(torch.rand(30, 1, 28, 28), clf))
    monkeypatch.setattr(runner, "real_data_floor", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "shipped_predictor", lambda: None)
    records = runner.run_fashion_demo(tmp_path, quick=True, samples=10, repeats=1, guidance=2.0, steps=4)
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["guidance_interval"] == [float(v) for v in DEFAULT_GUIDANCE_INTERVAL]
    assert meta["title"].endswith("guidance " + describe_guidance(2.0, DEFAULT_GUIDANCE_INTERVAL))
    done = [r for r in records if "unavailable" not in r]
    assert done and all(0.0 <= r["accuracy"] <= 1.0 for r in done)


def test_fd_from_statistics_matches_the_metric():
    from tokencache.demo.classifier import DigitClassifier
    from tokencache.demo.fashion.reference import fd_to_reference, feature_stats
    from tokencache.metrics import frechet_distance

    torch.manual_seed(0)
    clf = DigitClassifier(image_size=28).eval()
    a = torch.rand(60, 1, 28, 28) * 2 - 1
    b = torch.rand(40, 1, 28, 28) * 2 - 1.2
    assert fd_to_reference(a, clf, feature_stats(b, clf)) == pytest.approx(frechet_distance(a, b, clf), rel=1e-4)


def test_quality_measure_on_a_tiny_model(tiny_pipe):
    from tokencache.demo.classifier import DigitClassifier
    from tokencache.demo.fashion.quality import measure_quality
    from tokencache.demo.fashion.reference import feature_stats

    torch.manual_seed(0)
    clf = DigitClassifier(image_size=28).eval()
    ref = feature_stats(torch.rand(30, 1, 28, 28) * 2 - 1, clf)
    rec = measure_quality(tiny_pipe, clf, ref, fd_real_halves=1.0, n_per_class=1, steps=2, guidance=1.5)
    assert rec["n_samples"] == 10 and rec["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert 0 <= rec["accuracy"] <= 1 and rec["fd_ratio"] == rec["fd_test"]


def test_sample_and_eval_on_the_shipped_fashion_model(tmp_path, capsys):
    from tokencache.cli import main
    from tokencache.demo import fashion

    try:
        fashion.assets_dir()
    except FileNotFoundError:
        pytest.skip("no shipped Fashion-MNIST weights")
    out = tmp_path / "samples"
    assert main(["sample", "--model", "fashion", "--method", "none", "--num-samples", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    assert main(["eval", "--samples", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_samples"] == 2 and result["num_real"] == 10000
    shipped = [float(v) for v in DEFAULT_GUIDANCE_INTERVAL]  # the samples depend on it: recorded and checked on resume
    assert json.loads((out / "run.json").read_text())["guidance_interval"] == shipped
    assert json.loads((out / "index.json").read_text())["guidance_interval"] == result["guidance_interval"] == shipped


def test_quality_report_merges_sample_counts_and_judges_the_bar_only_at_its_count(tmp_path, monkeypatch, tiny_pipe):
    from safetensors.torch import save_file

    from tokencache.demo.classifier import DigitClassifier, save_classifier
    from tokencache.demo.fashion import quality
    from tokencache.demo.fashion.reference import FD_REFERENCE, feature_stats

    torch.manual_seed(0)
    tiny_pipe.transformer.save_pretrained(tmp_path / "transformer")
    tiny_pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "training.json").write_text(json.dumps({"steps_done": 5}))
    clf = DigitClassifier(image_size=28).eval()
    save_classifier(clf, tmp_path, extra={"fd_real_halves": 1e9, "fd_real_same_n": {"10": 1e9, "20": 1e9}})
    save_file(feature_stats(torch.rand(30, 1, 28, 28) * 2 - 1, clf), str(tmp_path / FD_REFERENCE))
    # a bar every run meets, defined at 20 samples: only the 20-sample run may say so
    monkeypatch.setattr(quality, "ACCURACY_BAR", 0.0)
    monkeypatch.setattr(quality, "BAR_SAMPLES", 20)
    kw = dict(steps=2, num_threads=None)

    report = quality.write_quality_report(tmp_path, (1.0, 2.0), n_per_class=1, **kw)  # the curve, 10 samples
    assert [r["meets_bar"] for r in report["runs"]] == [None, None] and report["bar_met_at"] == []
    report = quality.write_quality_report(tmp_path, (2.0,), n_per_class=2, merge=True, **kw)
    assert [(r["n_samples"], r["guidance"]) for r in report["runs"]] == [(10, 1.0), (10, 2.0), (20, 2.0)]
    assert [r["meets_bar_same_n"] for r in report["runs"]] == [None, None, True]
    shipped = [float(v) for v in DEFAULT_GUIDANCE_INTERVAL]  # the default of write_quality_report
    full = {"guidance": 2.0, "guidance_interval": shipped, "seed": 0}
    assert report["bar_met_at"] == report["same_n_bar_met_at"] == [full]
    assert json.loads((tmp_path / "quality.json").read_text()) == json.loads(json.dumps(report))
    # the same guidance in another interval is another run, recorded with its interval
    report = quality.write_quality_report(tmp_path, (2.0,), n_per_class=2, merge=True, guidance_interval=(0.0, 1.0),
                                          **kw)
    assert [(r["n_samples"], r["guidance"], r["guidance_interval"]) for r in report["runs"]] == [
        (10, 1.0, shipped), (10, 2.0, shipped), (20, 2.0, [0.0, 1.0]), (20, 2.0, shipped)]
    assert report["bar_met_at"] == [{"guidance": 2.0, "guidance_interval": [0.0, 1.0], "seed": 0}, full]
    with pytest.raises(ValueError, match="guidance_interval"):
        quality.write_quality_report(tmp_path, (2.0,), n_per_class=2, merge=True, guidance_interval=(0.8, 0.2), **kw)
    # a run recorded before intervals existed guided at every step, whatever the default is now
    legacy = dict(report["runs"][0], guidance=4.0)
    del legacy["guidance_interval"]
    assert quality.quality_report([legacy], {"fd_real_halves": 1e9}, 5)["runs"][0]["guidance_interval"] == [0.0, 1.0]
    # re-measuring a run replaces it; without merge only the new runs are written
    report = quality.write_quality_report(tmp_path, (1.0,), n_per_class=1, merge=True, **kw)
    assert [(r["n_samples"], r["guidance"]) for r in report["runs"]] == [(10, 1.0), (10, 2.0), (20, 2.0), (20, 2.0)]
    fresh = quality.write_quality_report(tmp_path, (1.0,), n_per_class=1, **kw)
    assert len(fresh["runs"]) == 1
    # runs of other weights are not merged
    (tmp_path / "training.json").write_text(json.dumps({"steps_done": 6}))
    with pytest.raises(ValueError, match="training step 5"):
        quality.write_quality_report(tmp_path, (1.0,), n_per_class=1, merge=True, **kw)


@pytest.mark.parametrize("arch", ["pixart", "dit"])
def test_compare_prices_the_uncached_run_with_the_pipelines_context(arch):
    """The FLOPs speed-up divides the planned uncached run by the run's own count: the plan must see the 4 class
    tokens, not PixArt's usual 120 captions (that inflated every cached row's FLOPs speed-up by 18 %)."""
    from tokencache.demo.classifier import DigitClassifier
    from tokencache.demo.compare import Method, compare

    torch.manual_seed(0)
    pipe = FashionPipeline(build_transformer(arch, **TINY).eval(), make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    clf = DigitClassifier(image_size=28).eval()
    methods = [Method("FORA N=2", "FORA", sampler="flow", steps=4, config=tc.FORAConfig(interval=2)),
               Method("Euler-2", "fewer steps", sampler="flow", steps=2)]
    records = compare(pipe, clf, methods, labels=[0, 1], guidance=2.0, repeats=1, reference_steps={"flow": 4},
                      progress=False, fd_to_real=lambda images: 0.0)
    fora, fewer = records
    handle = tc.apply(pipe, tc.FORAConfig(interval=2))
    try:
        pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=2.0)
        stats = handle.stats()
    finally:
        handle.remove()
    assert fora["flops_speedup"] == pytest.approx(stats.speedup, rel=1e-12)
    assert fewer["flops_speedup"] == pytest.approx(2.0, rel=1e-12)
