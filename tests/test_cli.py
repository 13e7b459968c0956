import subprocess
import sys

import pytest
import torch

from tokencache.cli import main


def test_plan_command_prints_grid_and_flops(capsys):
    assert main(["plan", "--preset", "dit-ddim50", "--model", "dit-xl-2", "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs: 10.252 T of 23.744 T uncached -> 2.32x" in out
    assert out.count("FFFFFFFFFFFFFFFFFFFFFFFFFFFF") == 18
    assert main(["plan", "--preset", "dit-ddim50", "--steps", "50", "--counting", "toca"]) == 0
    assert "FLOPs (toca counter): 10.233 T of 23.735 T uncached -> 2.32x" in capsys.readouterr().out


def test_plan_command_pixart_and_local_checkpoint(tmp_path, capsys):
    from models import tiny_pixart

    tiny_pixart().save_pretrained(tmp_path / "transformer")
    assert main(["plan", "--preset", "pixart-dpm20", "--model", str(tmp_path), "--steps", "20",
                 "--context-tokens", "6"]) == 0
    assert "3 blocks" in capsys.readouterr().out
    assert main(["plan", "--preset", "pixart-dpm20", "--model", "pixart-alpha-512", "--steps", "20"]) == 0
    assert "1024 tokens" in capsys.readouterr().out


def test_plan_command_flux_uses_its_published_token_counts(capsys):
    assert main(["plan", "--preset", "flux-dev-toca5", "--model", "flux-dev", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "50 steps x 57 blocks, 4096 tokens, batch 1" in out
    assert "FLOPs: 1065.248 T of 3725.953 T uncached -> 3.50x" in out
    assert main(["plan", "--preset", "flux-dev-toca5", "--model", "flux-schnell", "--batch", "1", "--steps", "4"]) == 0
    assert "4 steps x 57 blocks, 4096 tokens" in capsys.readouterr().out


def test_plan_command_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "dit-ddim50", "--model", "no-such-model"])
    assert exit_info.value.code == 2
    assert "model must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--preset", "bogus"])


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "tokencache.cli", "presets"], capture_output=True, text=True)
    assert result.returncode == 0 and "dit-ddim50" in result.stdout


def test_demo_without_the_demo_extra_names_it():
    """A fresh interpreter where scikit-learn cannot be imported: the demo says which extra to install."""
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from tokencache.cli import main\n"
            "main(['demo', '--quick', '--out', 'unused'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'tokencache[demo]'" in result.stderr and "'sklearn'" in result.stderr


def test_sampling_eval_entry_without_the_demo_extra_names_it(tmp_path):
    """The torchrun entry (python -m tokencache.sampling eval) checks the extra before reading the folder."""
    code = ("import sys; sys.modules['scipy'] = None\n"
            "from tokencache.sampling import main\n"
            f"sys.exit(main(['eval', '--samples', {str(tmp_path / 'missing')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'tokencache[demo]'" in result.stderr and "'scipy'" in result.stderr


# ---- issue 13, item 10 ------------------------------------------------------------------------------------------


def test_plan_accepts_the_demo_model_like_sample_and_calibrate(capsys):
    assert main(["plan", "--preset", "dit-ddim50", "--model", "demo", "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "50 steps x 6 blocks, 64 tokens, batch 2" in out and "FLOPs:" in out


def test_calibrate_settings_mismatch_names_the_cli_option_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import tokencache.demo as demo
    from tokencache.methods.token_cache import TPRR
    from tokencache.methods.token_cache_calibration import CHECKPOINT_NAME, CalibrationConfig, class_calls

    # a checkpoint the default command line would have written, but with --budget 0.5
    config = CalibrationConfig(calls=class_calls(10, 16, 4, seed=0), budget=0.5, schedule=TPRR(3, 2, 0.5))
    torch.save(dict(fingerprint=config.fingerprint()), tmp_path / CHECKPOINT_NAME)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(demo, "load_model", no_loading)
    monkeypatch.setattr(demo, "load_pipeline_from", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--budget: 0.5 there, 0.8125 now" in err and "CalibrationConfig" not in err
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", str(tmp_path / "new"), "--budget", "0.99"])
    assert "--budget (CalibrationConfig.budget) must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", str(tmp_path / "new"), "--tprr", "3.5", "2", "0.5"])
    assert "--tprr" in capsys.readouterr().err


def test_loading_the_shipped_models_prints_no_accelerate_warning(tmp_path):
    """diffusers warned on every load that `accelerate` is missing (the Fashion loader still did); tokencache
    asks for its fallback directly, without touching the user's diffusers logging settings."""
    from models import tiny_dit

    tiny_dit().save_pretrained(tmp_path / "transformer")
    code = ("import diffusers\n"
            "from tokencache.demo import load_model\n"
            "from tokencache.demo import fashion\n"
            "from tokencache.core.shapes import build_transformer\n"
            "before = diffusers.utils.logging.get_verbosity()\n"
            f"load_model(); fashion.load_model(); build_transformer({str(tmp_path)!r})\n"
            "assert diffusers.utils.logging.get_verbosity() == before\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "accelerate" not in result.stderr, result.stderr


def test_demo_default_output_folder_is_git_ignored():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "tokencache-demo/results.json"], cwd=root)
    assert result.returncode == 0  # `tokencache demo` writes there by default
