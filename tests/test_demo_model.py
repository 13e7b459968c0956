"""Tests of the shipped digits DiT, its sampling pipeline, the training entry points and the classifier."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")

from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel  # noqa: E402

from tokencache.demo import (  # noqa: E402
    DigitClassifier,
    DigitsPipeline,
    assets_dir,
    load_classifier,
    load_digits_split,
    load_model,
    load_pipeline_from,
    to_unit_range,
)
from tokencache.demo.classifier import load_classifier_from  # noqa: E402
from tokencache.demo.train import (  # noqa: E402
    NOISE_SCHEDULE,
    build_transformer,
    make_training_scheduler,
    train_classifier,
    train_demo,
)


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    p = load_model()
    p.set_progress_bar_config(disable=True)
    return p


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_data_splits_are_fixed_stratified_and_in_range() -> None:
    train, ytrain = load_digits_split("train")
    held, yheld = load_digits_split("heldout")
    assert train.shape == (1347, 1, 16, 16) and held.shape == (450, 1, 16, 16)
    assert train.dtype == torch.float32 and ytrain.dtype == torch.long
    assert train.min() >= -1 and train.max() <= 1 and train.min() == -1 and train.max() == 1
    assert (ytrain.bincount(minlength=10) > 125).all() and (yheld.bincount(minlength=10) > 40).all()
    train2, _ = load_digits_split("train")
    assert torch.equal(train, train2)
    with pytest.raises(ValueError):
        load_digits_split("test")  # type: ignore[arg-type]


def test_shipped_model_layout_and_size() -> None:
    folder = assets_dir()
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 20 * 2**20
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    info = json.loads((folder / "training.json").read_text())
    assert info["complete"] is True and info["steps"] > 0


def test_shipped_model_samples_shape_range_and_determinism(pipe: DigitsPipeline) -> None:
    assert isinstance(pipe.transformer, DiTTransformer2DModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.transformer.config.num_embeds_ada_norm == 10 and pipe.null_class == 10
    out = pipe(class_labels=[0, 3, 7], num_inference_steps=8, generator=_gen(0))
    x = out.images
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    u = out.unit_images()
    assert u.min() >= 0 and u.max() <= 1 and torch.allclose(u, to_unit_range(x))
    again = pipe(class_labels=torch.tensor([0, 3, 7]), num_inference_steps=8, generator=_gen(0)).images
    assert torch.equal(x, again)
    other = pipe(class_labels=[0, 3, 7], num_inference_steps=8, generator=_gen(1)).images
    assert not torch.equal(x, other)


def test_pipeline_calls_transformer_once_per_step_on_cfg_batch(pipe: DigitsPipeline) -> None:
    seen: list[tuple[int, list[int], list[int]]] = []

    def hook(_module, args, kwargs):
        seen.append((args[0].shape[0], kwargs["timestep"].tolist(), kwargs["class_labels"].tolist()))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=1.5, generator=_gen(0))
        assert len(seen) == 4
        for batch, steps, labels in seen:
            assert batch == 4 and labels == [1, 2, 10, 10] and len(set(steps)) == 1 and len(steps) == 4
        assert [s[1][0] for s in seen] == pipe.scheduler.timesteps.tolist()
        seen.clear()
        pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.0, generator=_gen(0))
        assert len(seen) == 3 and all(b == 2 and lab == [1, 2] for b, _, lab in seen)
    finally:
        handle.remove()


def test_pipeline_with_ddpm_scheduler_is_seeded(pipe: DigitsPipeline) -> None:
    ddpm = DigitsPipeline(transformer=pipe.transformer, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    ddpm.set_progress_bar_config(disable=True)
    a = ddpm(class_labels=[5], num_inference_steps=250, generator=_gen(3)).images
    assert a.shape == (1, 1, 16, 16) and torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert len(ddpm.scheduler.timesteps) == 250
    # DDPM adds noise at every step: it must come from the caller's generator
    b = ddpm(class_labels=[5, 6], num_inference_steps=20, generator=_gen(3)).images
    c = ddpm(class_labels=[5, 6], num_inference_steps=20, generator=_gen(3)).images
    assert torch.equal(b, c)


def test_pipeline_rejects_bad_labels(pipe: DigitsPipeline) -> None:
    with pytest.raises(ValueError):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError):
        pipe(class_labels=[1], num_inference_steps=2, output_type="latent")


def test_sampling_scheduler_matches_training_schedule() -> None:
    folder = assets_dir()
    ddim = DDIMScheduler.from_pretrained(folder / "scheduler")
    train = make_training_scheduler()
    assert ddim.config.num_train_timesteps == NOISE_SCHEDULE["num_train_timesteps"]
    assert ddim.config.prediction_type == "epsilon"
    assert torch.allclose(ddim.alphas_cumprod, train.alphas_cumprod)


def test_train_demo_tiny_run_writes_loadable_folder(tmp_path) -> None:
    summary = train_demo(tmp_path / "m", steps=3, batch_size=4, seed=0, num_layers=1, num_heads=2, head_dim=16,
                         eval_heldout=False, progress=False)
    out = tmp_path / "m"
    assert (out / "transformer" / "config.json").is_file()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["complete"] is True and summary["final_loss"] == info["final_loss"]
    assert {"seconds", "final_loss", "hyper_parameters"} <= set(info)
    assert info["hyper_parameters"]["num_layers"] == 1
    model = DiTTransformer2DModel.from_pretrained(out / "transformer")
    assert model.config.sample_size == 16 and model.config.num_layers == 1
    assert DDIMScheduler.from_pretrained(out / "scheduler").config.prediction_type == "epsilon"
    p = load_pipeline_from(out)
    p.set_progress_bar_config(disable=True)
    assert p(class_labels=[4], num_inference_steps=2, generator=_gen(0)).images.shape == (1, 1, 16, 16)
    # same seed, same weights
    train_demo(tmp_path / "m2", steps=3, batch_size=4, seed=0, num_layers=1, num_heads=2, head_dim=16,
               eval_heldout=False, progress=False)
    other = DiTTransformer2DModel.from_pretrained(tmp_path / "m2" / "transformer")
    theirs = other.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_builtin_label_dropout_is_replaced_by_our_own() -> None:
    from tokencache.demo.train import _label_embeddings, _set_builtin_label_dropout

    model = build_transformer(num_layers=2, num_heads=2, head_dim=16)
    mods = _label_embeddings(model)
    assert len(mods) == 2 and all(m.dropout_prob == 0.1 for m in mods)  # one per block, independent
    assert all(m.embedding_table.num_embeddings == 11 for m in mods)  # 10 classes + the null row
    old = _set_builtin_label_dropout(model, 0.0)
    assert old == [0.1, 0.1]
    model.train()
    labels = torch.zeros(1000, dtype=torch.long)
    assert torch.equal(mods[0](labels), mods[0].embedding_table(labels))


def test_shipped_classifier_loads_and_classifies() -> None:
    clf = load_classifier()
    assert isinstance(clf, DigitClassifier) and not clf.training and clf.num_features == 128
    images, labels = load_digits_split("heldout")
    with torch.no_grad():
        acc = (clf(images).argmax(1) == labels).float().mean().item()
        feats = clf.features(images[:5])
    assert acc >= 0.95 and feats.shape == (5, 128)
    meta = json.loads((assets_dir() / "classifier.json").read_text())
    assert meta["heldout_accuracy"] >= 0.95 and meta["config"]["hidden"] == 128


def test_train_classifier_tiny_run(tmp_path) -> None:
    info = train_classifier(tmp_path, epochs=1, seed=0, channels=(4, 8), hidden=16, progress=False)
    assert 0.0 <= info["heldout_accuracy"] <= 1.0
    clf = load_classifier_from(tmp_path)
    assert clf.num_features == 16 and clf(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_measure_quality_smoke(pipe: DigitsPipeline) -> None:
    from tokencache.demo.quality import measure_quality

    clf = load_classifier()
    base = {"fd_real_halves": 1.0, "fd_train_vs_heldout": 1.0}
    r = measure_quality(pipe, clf, n_per_class=1, steps=2, guidance=1.5, seed=0, baselines=base)
    assert r["n_samples"] == 10 and 0.0 <= r["accuracy"] <= 1.0
    assert r["fd_heldout"] > 0 and r["fd_ratio"] == pytest.approx(r["fd_heldout"])
    assert isinstance(r["meets_bar"], bool)
