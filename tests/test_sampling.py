"""Tests of ``tokencache sample`` / ``tokencache eval`` (tokencache.sampling): sharding, resuming, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from tokencache import sampling  # noqa: E402
from tokencache.demo import DEFAULT_GUIDANCE, assets_dir  # noqa: E402

N, BATCH, STEPS, SEED, METHOD = 10, 4, 4, 7, "dit-ddim50"  # 3 fixed batches, the last one ragged (2 samples)
TIMEOUT = 300
_DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process runs use one thread, as the torchrun processes do (bitwise equality across thread counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shipped model, so that every run of this module reads the same weights."""
    folder = tmp_path_factory.mktemp("model")
    for sub in ("transformer", "scheduler"):
        shutil.copytree(assets_dir() / sub, folder / sub)
    return folder


def _args(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--method", METHOD, "--num-samples", str(N), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--seed", str(SEED), *extra]


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished single-process run (in-process, one thread)."""
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sampling.main_sample(_args(model_dir, out)) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _load(folder: Path) -> dict[int, dict]:
    return {int(p.stem): torch.load(p, weights_only=True) for p in sorted((folder / "samples").glob("*.pt"))}


def _assert_same_samples(folder: Path, reference: Path) -> None:
    got, want = _load(folder), _load(reference)
    assert sorted(got) == sorted(want) == list(range(N))
    for i in range(N):
        assert torch.equal(got[i]["image"], want[i]["image"]), f"sample {i} differs"
        assert got[i]["class"] == want[i]["class"] == i % 10 and got[i]["seed"] == SEED + i


def _assert_index(folder: Path, world_size: int) -> dict:
    index = json.loads((folder / "index.json").read_text())
    assert index["num_samples"] == N and index["ids"] == list(range(N))
    assert sorted(index["files"]) == index["files"] and len(set(index["files"])) == N
    assert index["files"] == [f"samples/{i:06d}.pt" for i in range(N)]
    assert index["classes"] == [i % 10 for i in range(N)] and index["seeds"] == [SEED + i for i in range(N)]
    assert (index["method"], index["steps"], index["seed"], index["world_size"]) == (METHOD, STEPS, SEED, world_size)
    assert index["guidance"] == DEFAULT_GUIDANCE and index["batch_size"] == BATCH and index["num_batches"] == 3
    assert index["stats"]["batches_with_stats"] == 3 and index["stats"]["speedup"] > 1
    return index


def test_contract_helpers() -> None:
    assert list(sampling.batch_ids(2, 4, 10)) == [8, 9]
    assert sampling.rank_batches(5, 1, 2) == [1, 3] and sampling.rank_batches(5, 0, 1) == [0, 1, 2, 3, 4]
    assert sampling.sample_seed(3, 100) == 103 and sampling.sample_class(13) == 3
    assert sampling.batch_seed(0, 1) != sampling.batch_seed(0, 2) != sampling.batch_seed(1, 2)
    assert sampling.batch_seed(5, 1) == sampling.batch_seed(5, 1)
    assert sampling.sample_file(123) == "000123.pt"


def test_single_process_run_writes_samples_index_and_stats(reference: Path) -> None:
    samples = _load(reference)
    assert sorted(samples) == list(range(N))
    image = samples[3]["image"]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1
    assert samples[3]["class"] == 3 and samples[3]["prompt"] is None
    _assert_index(reference, world_size=1)
    stats = json.loads((reference / "stats" / "rank0.json").read_text())
    assert sorted(stats["batches"]) == ["0", "1", "2"]
    assert stats["batches"]["2"]["cache"]["method"] == "ToCa" and stats["batches"]["2"]["ids"] == [8, 10]
    assert json.loads((reference / "run.json").read_text())["method"] == METHOD
    assert not list((reference / "samples").glob(".*"))  # no temporary file left


def test_torchrun_two_processes_equal_single_process(reference: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokencache.sampling", "sample", *_args(model_dir, out)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_samples(out, reference)
    # every rank's files count, not rank 0's alone (which made 6 of the 10)
    assert "10 samples in" in result.stdout and "(10 made now, 2 process(es))" in result.stdout, result.stdout
    index = _assert_index(out, world_size=2)
    assert index["stats"]["flops"] == json.loads((reference / "index.json").read_text())["stats"]["flops"]
    ranks = {p.name: json.loads(p.read_text()) for p in (out / "stats").glob("rank*.json")}
    assert sorted(ranks) == ["rank0.json", "rank1.json"]
    assert sorted(ranks["rank0.json"]["batches"]) == ["0", "2"] and sorted(ranks["rank1.json"]["batches"]) == ["1"]


def test_killed_run_resumes_without_missing_or_doubled_samples(reference: Path, model_dir: Path, tmp_path: Path,
                                                               one_thread: None) -> None:
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "tokencache.sampling", "sample", *_args(model_dir, out), "--stop-after", "5"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 75, result.stderr[-3000:]  # died abruptly after sample 4 (inside batch 1)
    done = sorted((out / "samples").glob("*.pt"))
    assert [p.name for p in done] == [f"{i:06d}.pt" for i in range(5)] and not (out / "index.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    (out / "samples" / ".000006.pt.tmp-99999").write_bytes(b"half a sample")  # as a kill during a write leaves

    assert sampling.main_sample(_args(model_dir, out)) == 0
    assert not list((out / "samples").glob(".*"))
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps  # finished samples were not rewritten
    _assert_same_samples(out, reference)
    _assert_index(out, world_size=1)
    stats = json.loads((out / "stats" / "rank0.json").read_text())
    # batch 0 was finished (and its statistics kept) by the killed run; batch 1 was regenerated for 3 missing files
    assert stats["batches"]["0"]["written"] == 4 and stats["batches"]["1"]["written"] == 3

    assert sampling.main_sample(_args(model_dir, out)) == 0  # a finished run: nothing to do
    _assert_same_samples(out, reference)


def test_resume_with_other_settings_is_refused(reference: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (reference / "samples").glob("*.pt")}
    assert sampling.main_sample(_args(model_dir, reference, "--guidance", "3")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and f"guidance {DEFAULT_GUIDANCE} (now 3.0)" in err
    args = _args(model_dir, reference)
    args[args.index("--num-samples") + 1] = "4"
    assert sampling.main_sample(args) == 2
    assert "--num-samples" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (reference / "samples").glob("*.pt")} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--method", "bogus"), "argument --method: invalid choice: 'bogus'"),
        (("--model", "/no/such/folder"), "--model: '/no/such/folder' is not a folder; expected 'demo'"),
        (("--num-samples", "0"), "argument --num-samples: must be a positive integer, got '0'"),
        (("--batch-size", "x"), "argument --batch-size: must be a positive integer"),
        (("--method", "pixart-dpm20"), "--method 'pixart-dpm20' does not fit this model"),
        (("--prompts", "prompts.txt"), "--prompts"),
    ],
)
def test_bad_options_exit_2_before_sampling(change: tuple[str, str], message: str, model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = _args(model_dir, out)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        (tmp_path / change[1]).write_text("a digit\n")
        args += [change[0], str(tmp_path / change[1])]
    assert sampling.main_sample(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if change[1] == "bogus":
        assert "none" in err and "dit-ddim50" in err and "fora" in err  # the accepted values
    assert not out.exists()  # failed before any work


def test_missing_required_option_and_parser_registration(capsys: pytest.CaptureFixture) -> None:
    assert sampling.main_sample(["--method", "none", "--num-samples", "2", "--out", "x"]) == 2
    assert "--model" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser(prog="tokencache")
    sampling.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--samples", "somewhere"])
    assert args.func is sampling._cmd_eval
    args = parser.parse_args(["sample", "--model", "demo", "--method", "none", "--num-samples", "3", "--out", "o"])
    assert args.func is sampling._cmd_sample and args.steps == 50 and args.guidance is None


def test_eval_reports_accuracy_and_fd(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "eval.json"
    assert sampling.main_eval(["--samples", str(reference), "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "FD" in out
    result = json.loads(target.read_text())
    assert result["num_samples"] == N and result["method"] == METHOD
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["fd"]) and result["fd"] >= 0
    assert sorted(result["per_class_accuracy"]) == [str(c) for c in range(10)]

    images, classes, index = sampling.load_samples(reference)
    assert images.shape == (N, 1, 16, 16) and classes == [i % 10 for i in range(N)] and index["num_samples"] == N


def test_eval_detects_broken_folders(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sampling.main_eval(["--samples", str(tmp_path)]) == 2
    assert "has no index.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    (broken / "samples" / "000004.pt").unlink()
    assert sampling.main_eval(["--samples", str(broken)]) == 1
    assert "000004.pt is missing" in capsys.readouterr().err
    with pytest.raises(sampling.SampleFolderError):
        sampling.load_samples(broken)


def test_changed_model_weights_refuse_resume(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(model_dir, model)
    args = ["--model", str(model), "--method", "none", "--num-samples", "2", "--out", str(out), "--steps", "1"]
    assert sampling.main_sample(args) == 0
    assert json.loads((out / "index.json").read_text())["model_fingerprint"]
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"beta_end": 0.02', '"beta_end": 0.03'))
    assert sampling.main_sample(args) == 2
    assert "model_fingerprint" in capsys.readouterr().err


def test_diffusers_class_conditional_pipeline(tmp_path: Path) -> None:
    from models import tiny_dit_pipeline

    model, out = tmp_path / "tiny-dit", tmp_path / "out"
    tiny_dit_pipeline().save_pretrained(model)
    args = ["--model", str(model), "--method", "fora", "--num-samples", "3", "--out", str(out), "--steps", "3",
            "--batch-size", "2"]
    assert sampling.main_sample(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["model_kind"] == "class" and index["classes"] == [0, 1, 2] and index["guidance"] == 4.0
    assert index["image_shape"] == [3, 8, 8] and index["stats"]["speedup"] > 1
    first = _load(out)
    shutil.rmtree(out / "samples")
    assert sampling.main_sample(args) == 0  # the same values again (DiTPipeline's scheduler noise is seeded)
    assert all(torch.equal(first[i]["image"], _load(out)[i]["image"]) for i in range(3))


def _tiny_text_pipeline(folder: Path) -> None:
    """A tiny PixArt-alpha pipeline with a T5 tokenizer built from a hand-written vocabulary (works offline)."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from models import tiny_pixart

    words = ["a", "red", "cat", "one", "digit"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    tokenizer = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(vocab), d_model=12, d_kv=4, d_ff=16,
                                                                num_layers=1, num_heads=2)).eval()
    # four VAE levels (scale factor 8): PixArt's resolution binning then asks for 256 px = 32x32 latents
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=2, layers_per_block=1, sample_size=32).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                               transformer=tiny_pixart(sample_size=32), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)


def test_text_conditional_pipeline_with_prompts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "tiny-pixart"
    _tiny_text_pipeline(model)
    prompts = tmp_path / "prompts.txt"
    out = tmp_path / "text"
    base = ["--model", str(model), "--method", "pixart-dpm20", "--num-samples", "3", "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--guidance", "2.0"]

    assert sampling.main_sample([*base, "--prompts", str(prompts)]) == 2  # no such file
    prompts.write_text("\n  \n")
    assert sampling.main_sample([*base, "--prompts", str(prompts)]) == 2  # no prompt in it
    assert sampling.main_sample(base) == 2  # a text pipeline without --prompts
    err = capsys.readouterr().err
    assert "is not a file" in err and "holds no prompt" in err and "give --prompts FILE" in err
    assert not out.exists()

    prompts.write_text("a red cat\none digit\n")
    assert sampling.main_sample([*base, "--prompts", str(prompts)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["model_kind"] == "text" and index["classes"] is None and index["image_range"] == [0.0, 1.0]
    assert index["prompts"] == ["a red cat", "one digit", "a red cat"] and index["image_shape"] == [3, 256, 256]
    assert index["stats"]["speedup"] > 1
    sample = torch.load(out / "samples" / "000002.pt", weights_only=True)
    assert sample["prompt"] == "a red cat" and sample["class"] is None
    assert sampling.main_eval(["--samples", str(out)]) == 2  # eval is for the digits model
    assert "eval needs class-conditional digits samples" in capsys.readouterr().err


# ---- issue 13, item 7: resume after a machine crash; the index's totals; load-robust timing -----------------------


def _finished_copy(reference: Path, target: Path) -> Path:
    shutil.copytree(reference, target)
    (target / "index.json").unlink()
    return target


def test_resume_regenerates_empty_and_truncated_sample_files(reference: Path, model_dir: Path, tmp_path: Path,
                                                             one_thread: None) -> None:
    """A crash of the machine can leave a renamed sample file empty or cut short: resume must remake it."""
    out = _finished_copy(reference, tmp_path / "crashed")
    truncated = out / "samples" / "000003.pt"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (out / "samples" / "000006.pt").write_bytes(b"")
    untouched = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.pt")
                 if p.name not in ("000003.pt", "000006.pt")}
    assert sampling.main_sample(_args(model_dir, out)) == 0
    _assert_same_samples(out, reference)
    _assert_index(out, world_size=1)
    assert {n: (out / "samples" / n).stat().st_mtime_ns for n in untouched} == untouched


def test_unreadable_sample_in_the_index_check_names_the_file(reference: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    (broken / "samples" / "000002.pt").write_bytes(b"")
    assert sampling.main_eval(["--samples", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "000002.pt: unreadable sample file" in err and "Traceback" not in err


def test_resume_removes_stale_temporary_stats_and_index_files(reference: Path, model_dir: Path,
                                                             tmp_path: Path) -> None:
    out = _finished_copy(reference, tmp_path / "stale")
    (out / "stats" / ".rank0.json.tmp-99999").write_text('{"batches": {')
    (out / ".index.json.tmp-99999").write_text("{")
    assert sampling.main_sample(_args(model_dir, out)) == 0
    assert not list((out / "stats").glob(".*")) and not list(out.glob(".*"))


def test_lost_statistics_are_remade_so_the_index_covers_every_batch(reference: Path, model_dir: Path,
                                                                   tmp_path: Path, one_thread: None) -> None:
    """Killed after a batch's files and before its statistics: the index must not total 2 batches of 3."""
    out = _finished_copy(reference, tmp_path / "lost-stats")
    stats_path = out / "stats" / "rank0.json"
    stats = json.loads(stats_path.read_text())
    del stats["batches"]["1"]
    stats_path.write_text(json.dumps(stats))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.pt")}
    assert sampling.main_sample(_args(model_dir, out)) == 0
    index = _assert_index(out, world_size=1)
    want = json.loads((reference / "index.json").read_text())["stats"]
    assert index["stats"]["batches_with_stats"] == index["stats"]["batches"] == 3
    assert index["stats"]["flops"] == want["flops"] and index["stats"]["full_steps"] == want["full_steps"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.pt")} == stamps  # no file rewritten
    assert json.loads(stats_path.read_text())["batches"]["1"]["written"] == 0


class _Scripted:
    """A fake clock: each timed interval lasts the next of ``durations``."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.running = list(durations), 0.0, False

    def __call__(self) -> float:
        if self.running:
            self.now += self.durations.pop(0)
        self.running = not self.running
        return self.now


@pytest.mark.parametrize("busy", [True, False])
def test_sample_times_batches_in_cpu_time_and_flags_disagreement(busy: bool, model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    from tokencache.core.timing import Clocks

    # three batches (4, 4 and 2 samples); the wall clock is what a busy machine gives, the CPU clock decides
    cpu = [4.0, 12.0 if busy else 4.2, 2.0]
    monkeypatch.setattr(sampling, "_CLOCKS", Clocks(wall=_Scripted([40.0, 4.0, 90.0]), cpu=_Scripted(cpu)))
    out = tmp_path / "timed"
    assert sampling.main_sample(_args(model_dir, out, "--steps", "2")) == 0
    stats = json.loads((out / "index.json").read_text())["stats"]
    assert stats["cpu_seconds"] == pytest.approx(sum(cpu)) and stats["seconds"] == pytest.approx(134.0)
    timing = stats["timing"]
    assert timing["rounds"] == 2 and timing["low"] == pytest.approx(1.0)  # the ragged last batch is left out
    assert timing["consistent"] is (not busy)
    err = capsys.readouterr().err
    assert ("CPU time per sample differs between batches" in err) is busy


def test_eval_warns_about_small_sample_fd(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "eval.json"
    assert sampling.main_eval(["--samples", str(reference), "--json", str(target)]) == 0
    err = capsys.readouterr().err
    assert f"FD on {N} samples is dominated by small-sample bias" in err and str(sampling.FD_MIN_SAMPLES) in err
    assert json.loads(target.read_text())["small_sample_fd"] is True
