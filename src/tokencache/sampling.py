"""``tokencache sample`` / ``tokencache eval``: resumable, shardable sample generation and its evaluation.

    tokencache sample --model demo --method fora --num-samples 1000 --out runs/fora
    torchrun --nproc_per_node=8 -m tokencache.sampling sample --model demo --method fora --num-samples 50000 --out X
    tokencache eval --samples runs/fora

Reproducibility contract
    Sample ``i`` (``0 <= i < N``) has seed ``S + i`` (``--seed S``) and, for a class-conditional model,
    class ``i % 10``; for a text-conditional model (``--prompts FILE``) prompt ``i % len(prompts)`` of the file.
    Its initial noise is drawn from its own generator ``torch.Generator().manual_seed(S + i)``. Samples are
    generated in FIXED batches of ``--batch-size B``: batch ``b`` holds samples ``[b*B, (b+1)*B)`` and any
    other randomness of that batch (a stochastic scheduler's noise) comes from generators seeded by
    :func:`batch_seed`, which depends only on ``S`` and ``b``. The cache is attached fresh for every batch.
    So a sample's value depends on (model, method, steps, guidance, S, B, i) only, not on how many processes
    ran, which rank made it, or whether the run was interrupted and resumed. Bitwise equality across runs
    also needs the same hardware, library versions and per-process thread count (``torchrun`` sets
    ``OMP_NUM_THREADS=1`` unless it is set already).

Sharding
    Under ``torchrun`` (``WORLD_SIZE > 1``) the processes join a gloo process group; rank ``r`` makes the
    batches ``b`` with ``b % world_size == r``. Every sample is its own file ``OUT/samples/<id:06d>.pt``
    (a dict: ``id``, ``image``, ``class`` or ``prompt``, ``seed``), written to a temporary name and then
    renamed, so a crash never leaves a half-written sample. Cache statistics go to ``OUT/stats/rank<r>.json``.
    After a barrier rank 0 checks that every id ``0..N-1`` exists exactly once and writes ``OUT/index.json``.

Resuming
    Rerunning the same command skips batches whose samples all exist and regenerates partial batches,
    writing only their missing files; a sample file that does not load (empty or cut short by a crash of the
    machine) counts as missing, and a finished batch whose statistics were lost is run again for them (writing
    no file), so the index's totals always cover every batch it lists. Stale temporary files of a killed run
    (samples, statistics, index) are deleted. ``OUT/run.json``
    records the settings that determine sample values (including a fingerprint of the model files); a rerun
    with different settings is refused. ``--num-samples`` (upwards) and the number of processes may change.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .core.call_settings import call_default
from .core.timing import DEFAULT_CLOCKS, spread, timed

__all__ = [
    "INDEX_FILE",
    "NUM_CLASSES",
    "RUN_FILE",
    "SAMPLES_DIR",
    "STATS_DIR",
    "SampleFolderError",
    "UsageError",
    "batch_ids",
    "batch_seed",
    "build_parser",
    "load_samples",
    "main",
    "main_eval",
    "main_sample",
    "rank_batches",
    "register",
    "sample_class",
    "sample_file",
    "sample_seed",
]

SAMPLES_DIR = "samples"
STATS_DIR = "stats"
INDEX_FILE = "index.json"
RUN_FILE = "run.json"
NUM_CLASSES = 10
FORMAT_VERSION = 1
_SAMPLE_NAME = re.compile(r"^(\d+)\.pt$")
_TMP_MARK = ".tmp-"
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)  # a rank with no work left waits at the final barrier
FD_MIN_SAMPLES = 1000
"""Below this many samples ``eval`` warns that the FD is dominated by small-sample bias: with the shipped classifier
50 real digits score FD 32 against the held-out ones (README, the demo), two halves of the real data (~900 each)
3.7 (``quality.json``), so only from about 1,000 samples does the bias stop swamping the differences between
methods."""
_CLOCKS = DEFAULT_CLOCKS  # the batch timer's clocks (tests inject fakes)


class UsageError(ValueError):
    """A bad command-line option or an unusable output folder; the commands exit with code 2."""


class SampleFolderError(RuntimeError):
    """A sample folder that fails verification (missing, doubled or inconsistent samples); exit code 1."""


# ---- the reproducibility contract ----------------------------------------------------------------------------


def sample_seed(index: int, seed: int) -> int:
    """Seed of sample ``index``: ``seed + index``."""
    return seed + index


def sample_class(index: int) -> int:
    """Class of sample ``index`` for class-conditional models: ``index % 10``."""
    return index % NUM_CLASSES


def batch_ids(batch: int, batch_size: int, num_samples: int) -> range:
    """The sample ids of fixed batch ``batch``: ``[batch * batch_size, min((batch + 1) * batch_size, N))``."""
    return range(batch * batch_size, min((batch + 1) * batch_size, num_samples))


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` of ``world_size`` makes: those with ``b % world_size == rank``."""
    return list(range(rank, num_batches, world_size))


def batch_seed(seed: int, batch: int) -> int:
    """Seed of the batch-level randomness (scheduler noise) of batch ``batch``; decorrelated from sample seeds."""
    digest = hashlib.sha256(f"tokencache-batch:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_file(index: int) -> str:
    """File name of sample ``index`` inside ``OUT/samples``."""
    return f"{index:06d}.pt"


# ---- processes -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _init_distributed() -> _Dist:
    """Join the gloo process group that ``torchrun`` describes in the environment (single process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return _Dist(0, 1, 0)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method="env://", timeout=_BARRIER_TIMEOUT)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))


def _barrier(world: _Dist) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def _sum_over_ranks(world: _Dist, value: int) -> int:
    if not world.active:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(total)
    return int(total.item())


def _shutdown(world: _Dist) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---- models --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelSpec:
    """What ``--model`` names: ``kind`` is ``digits`` (DigitsPipeline), ``fashion`` (the shipped Fashion-MNIST
    FashionPipeline), ``class`` or ``text`` (diffusers)."""

    name: str
    path: Path | None
    kind: str


def _resolve_model(value: str, has_prompts: bool) -> _ModelSpec:
    """Check ``--model`` without loading anything."""
    if value == "demo":
        if has_prompts:
            raise UsageError("--prompts: the demo model is class-conditional and takes no prompts")
        return _ModelSpec("demo", None, "digits")
    if value == "fashion":
        if has_prompts:
            raise UsageError("--prompts: the fashion model is class-conditional and takes no prompts")
        return _ModelSpec("fashion", None, "fashion")
    path = Path(value).expanduser()
    expected = ("expected 'demo', a folder with transformer/ and scheduler/ subfolders (a DigitsPipeline), "
                "or a diffusers pipeline folder with model_index.json")
    if not path.is_dir():
        raise UsageError(f"--model: {value!r} is not a folder; {expected}")
    index = path / "model_index.json"
    class_name = None
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError) as error:
            raise UsageError(f"--model: cannot read {index}: {error}") from error
    if class_name is not None and class_name != "DigitsPipeline":
        return _ModelSpec(str(path.resolve()), path.resolve(), "text" if has_prompts else "class")
    if not ((path / "transformer").is_dir() and (path / "scheduler").is_dir()):
        raise UsageError(f"--model: {value!r} has no model_index.json and no transformer/ + scheduler/; {expected}")
    if has_prompts:
        raise UsageError(f"--prompts: {value!r} is a class-conditional DigitsPipeline and takes no prompts")
    return _ModelSpec(str(path.resolve()), path.resolve(), "digits")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model")
_FINGERPRINT_CHUNK = 1 << 20


def _model_fingerprint(spec: _ModelSpec) -> str:
    """A cheap digest of the model files (names, sizes, first and last MiB), so a resume never mixes weights.

    For a DigitsPipeline only ``transformer/`` and ``scheduler/`` count, so ``demo`` and a copy of it agree.
    """
    root = spec.path
    if root is None:
        if spec.kind == "fashion":
            from .demo.fashion import assets_dir
        else:
            from .demo import assets_dir

        root = assets_dir()
    folders = [root / "transformer", root / "scheduler"] if spec.kind in ("digits", "fashion") else [root]
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    digest = hashlib.sha256()
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}:{size}:".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_CHUNK))
            if size > _FINGERPRINT_CHUNK:
                handle.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _read_prompts(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--prompts: {value!r} is not a file (expected one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts: {value!r} holds no prompt (expected one prompt per line)")
    return prompts


def _load_pipeline(spec: _ModelSpec, device: torch.device) -> Any:
    if spec.kind == "digits":
        from .demo import load_model, load_pipeline_from

        pipe = load_model(device) if spec.path is None else load_pipeline_from(spec.path, device)
    elif spec.kind == "fashion":
        from .demo import fashion

        pipe = fashion.load_model(device)
    else:
        from diffusers import DiffusionPipeline

        from .core.loading import load_kwargs

        pipe = DiffusionPipeline.from_pretrained(spec.path, **load_kwargs()).to(device)
        params = inspect.signature(pipe.__call__).parameters
        needed = "prompt" if spec.kind == "text" else "class_labels"
        if needed not in params:
            hint = "" if spec.kind == "text" else "; give --prompts FILE for a text-conditional pipeline"
            raise UsageError(f"--model: {type(pipe).__name__} takes no {needed!r} argument{hint}")
    with contextlib.suppress(AttributeError):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampler_settings(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """Guidance settings the samples depend on: ``guidance`` (``--guidance`` or the pipeline's default), and the
    pipeline's default ``guidance_interval`` where it has one (the Fashion model)."""
    guidance = args.guidance if args.guidance is not None else call_default(pipe, "guidance_scale")
    found = {"guidance": None if guidance is None else float(guidance)}
    interval = call_default(pipe, "guidance_interval")
    if interval is not None:  # absent otherwise, so run folders written before it existed still resume
        found["guidance_interval"] = [float(v) for v in interval]
    return found


def _as_images(images: Any) -> torch.Tensor:
    """Pipeline output as a float tensor ``(B, C, H, W)`` (``np`` arrays come channel-last)."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    import numpy as np

    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    raise TypeError(f"the pipeline returned {type(images).__name__}, expected a tensor or an array")


def _generate_batch(pipe: Any, spec: _ModelSpec, ids: range, seed: int, batch: int, steps: int,
                    guidance: float | None, prompts: list[str] | None) -> torch.Tensor:
    """Images of the samples ``ids`` (one fixed batch), following the module's reproducibility contract."""
    generators = [torch.Generator().manual_seed(sample_seed(i, seed)) for i in ids]
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pt"}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    torch.manual_seed(batch_seed(seed, batch))  # anything that draws from the global generator
    if spec.kind in ("digits", "fashion"):
        cfg = pipe.transformer.config
        shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        noise = torch.Generator().manual_seed(batch_seed(seed, batch))
        out = pipe(class_labels=[sample_class(i) for i in ids], generator=noise, latents=latents, **kwargs)
    elif spec.kind == "class":
        out = pipe(class_labels=[sample_class(i) for i in ids], generator=generators, **kwargs)
    else:
        assert prompts is not None
        out = pipe(prompt=[prompts[i % len(prompts)] for i in ids], generator=generators, **kwargs)
    return _as_images(out.images if hasattr(out, "images") else out[0])


# ---- files ---------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically; a dict gets one top-level key per line, values compact."""
    if isinstance(data, dict):
        body = ",\n".join(f" {json.dumps(str(key))}: {json.dumps(value)}" for key, value in data.items())
        text = ("{\n" + body + "\n}\n").encode()
    else:
        text = json.dumps(data).encode() + b"\n"
    _atomic_write_bytes(path, lambda handle: handle.write(text))


def _scan_samples(folder: Path) -> tuple[dict[int, list[str]], list[str]]:
    """``({id: [file names]}, [unrecognised names])`` of ``folder`` (hidden and temporary files are ignored)."""
    found: dict[int, list[str]] = {}
    unknown: list[str] = []
    if not folder.is_dir():
        return found, unknown
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        match = _SAMPLE_NAME.match(entry.name)
        if match is None or not entry.is_file():
            unknown.append(entry.name)
        else:
            found.setdefault(int(match.group(1)), []).append(entry.name)
    return found, unknown


def _save_sample(folder: Path, index: int, image: torch.Tensor, seed: int, label: int | None,
                 prompt: str | None) -> None:
    record = {"id": index, "image": image.clone(), "seed": seed, "class": label, "prompt": prompt}
    _atomic_write_bytes(folder / sample_file(index), lambda handle: torch.save(record, handle))


def _load_sample(path: Path) -> dict[str, Any]:
    """The record of a sample file; :class:`SampleFolderError` naming the file when it cannot be read."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # EOFError (empty file), RuntimeError (truncated zip), UnpicklingError, ...
        raise SampleFolderError(f"{path}: unreadable sample file ({type(error).__name__}: {error}); it is empty, "
                                "truncated or corrupt. Rerun the same `tokencache sample` command to regenerate "
                                "it") from error
    if not isinstance(record, dict) or not torch.is_tensor(record.get("image")):
        raise SampleFolderError(f"{path}: not a sample record (expected a dict with an 'image' tensor)")
    return record


def _readable(path: Path) -> bool:
    """Whether a sample file loads (a crash of the machine, not of the process, can leave a renamed file empty or
    cut short: the rename reached the disk before the data)."""
    try:
        _load_sample(path)
    except SampleFolderError:
        return False
    return True


def _remove_stale_temporaries(*folders: Path) -> None:
    """Delete the temporary files a killed run left behind (samples, statistics, index); nobody writes yet."""
    for folder in folders:
        for stale in folder.glob(f".*{_TMP_MARK}*"):
            with contextlib.suppress(OSError):
                stale.unlink()


# ---- tokencache sample ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _method_choices() -> list[str]:
    from .core.presets import presets

    return ["none", *sorted(presets())]


def _build_config(method: str) -> Any | None:
    if method == "none":
        return None
    from .core.presets import preset

    return preset(method)


def _settings(args: argparse.Namespace, spec: _ModelSpec, sampler: dict[str, Any],
              prompts: list[str] | None) -> dict[str, Any]:
    """What determines the values of the samples (recorded in ``run.json``, checked on resume)."""
    prompt_digest = None
    if prompts is not None:
        prompt_digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "format": FORMAT_VERSION,
        "model": spec.name,
        "model_kind": spec.kind,
        "model_fingerprint": _model_fingerprint(spec),
        "method": args.method,
        "steps": args.steps,
        **sampler,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "prompts_sha256": prompt_digest,
    }


_RESUME_IGNORED = ("model",)  # a moved or copied model folder is fine: its fingerprint is compared


def _check_run_file(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` if its ``run.json`` records other sample-determining settings."""
    path = out / RUN_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"--out: {path} is unreadable ({error}); use a fresh --out folder") from error
    diffs = [f"{key} {previous.get(key)!r} (now {value!r})" for key, value in settings.items()
             if key not in _RESUME_IGNORED and previous.get(key) != value]
    if diffs:
        raise UsageError(f"--out: {out} already holds samples made with other settings: {'; '.join(diffs)}. "
                         "Use a fresh --out folder, or the same settings to resume")


def _device(value: str, world: _Dist) -> torch.device:
    if value == "cuda":
        return torch.device("cuda", world.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(value)


def _latest_stats(out: Path, num_batches: int) -> dict[int, dict[str, Any]]:
    """The latest statistics entry of each batch ``0..num_batches-1`` in ``OUT/stats/rank*.json``."""
    latest: dict[int, dict[str, Any]] = {}
    for path in sorted((out / STATS_DIR).glob("rank*.json")):
        try:
            entries = json.loads(path.read_text()).get("batches", {})
        except (OSError, ValueError, AttributeError):
            continue
        for key, entry in entries.items():
            with contextlib.suppress(ValueError):
                b = int(key)
                if 0 <= b < num_batches and (b not in latest or entry.get("time", 0) >= latest[b].get("time", 0)):
                    latest[b] = entry
    return latest


def _merge_stats(out: Path, num_batches: int, batch_size: int) -> dict[str, Any]:
    """Totals over the latest statistics entry of each batch; the caller checks they cover every batch.

    ``timing``: the process CPU seconds per sample over the full-size batches, median and spread, with
    ``consistent`` False when batches disagree beyond the tolerance of :mod:`tokencache.core.timing` (the same work
    should take the same CPU time; wall-clock seconds also count other programs' turns on the CPU)."""
    latest = _latest_stats(out, num_batches)
    caches = [e["cache"] for e in latest.values() if e.get("cache")]
    total: dict[str, Any] = {"batches_with_stats": len(latest), "batches": num_batches,
                             "seconds": sum(e.get("seconds", 0.0) for e in latest.values())}
    cpu = [e["cpu_seconds"] for e in latest.values() if "cpu_seconds" in e]
    if cpu:
        total["cpu_seconds"] = sum(cpu)
        per_sample = [e["cpu_seconds"] / batch_size for e in latest.values()
                      if "cpu_seconds" in e and e["ids"][1] - e["ids"][0] == batch_size]
        if per_sample:
            total["timing"] = {"measure": "process CPU seconds per sample, full-size batches",
                               **spread(per_sample).to_dict()}
    if caches:
        flops, full = sum(c["flops"] for c in caches), sum(c["flops_full"] for c in caches)
        total.update(flops=flops, flops_full=full, speedup=full / flops if flops else None)
        for key in ("full_steps", "partial_steps", "reuse_steps", "forecast_steps"):
            total[key] = sum(c.get(key, 0) for c in caches)  # shards written before forecast_steps existed: 0
    return total


def _write_index(out: Path, args: argparse.Namespace, spec: _ModelSpec, sampler: dict[str, Any],
                 prompts: list[str] | None, world: _Dist) -> dict[str, Any]:
    """Verify that ids ``0..N-1`` exist exactly once and match the contract, then write ``OUT/index.json``."""
    n = args.num_samples
    found, unknown = _scan_samples(out / SAMPLES_DIR)
    problems = []
    if unknown:
        problems.append(f"unrecognised files {sorted(unknown)[:5]}")
    doubled = sorted(i for i, names in found.items() if len(names) > 1)
    if doubled:
        problems.append(f"ids stored more than once {doubled[:10]}")
    missing = [i for i in range(n) if i not in found]
    if missing:
        problems.append(f"{len(missing)} missing ids, first {missing[:10]}")
    extra = sorted(i for i in found if i >= n)
    if extra:
        problems.append(f"{len(extra)} ids beyond --num-samples {n}, first {extra[:10]}")
    if problems:
        raise SampleFolderError(f"{out / SAMPLES_DIR}: " + "; ".join(problems))
    files, classes, shape = [], [], None
    for i in range(n):
        name = found[i][0]
        record = _load_sample(out / SAMPLES_DIR / name)
        expected_class = sample_class(i) if spec.kind != "text" else None
        if record.get("id") != i or record.get("seed") != sample_seed(i, args.seed) \
                or record.get("class") != expected_class:
            raise SampleFolderError(f"{name}: stored id/seed/class {record.get('id')}/{record.get('seed')}/"
                               f"{record.get('class')} do not match the run's settings")
        image_shape = list(record["image"].shape)
        if shape is None:
            shape = image_shape
        elif image_shape != shape:
            raise SampleFolderError(f"{name}: image shape {image_shape} differs from {shape}")
        files.append(f"{SAMPLES_DIR}/{name}")
        classes.append(record.get("class"))
    num_batches = math.ceil(n / args.batch_size)
    stats = _merge_stats(out, num_batches, args.batch_size)
    if stats["batches_with_stats"] != num_batches:
        uncovered = sorted(set(range(num_batches)) - set(_latest_stats(out, num_batches)))
        raise SampleFolderError(f"{out / STATS_DIR}: no statistics for batches {uncovered[:10]} of {num_batches}; "
                                "rerun the same command to fill them (no index is written whose totals miss batches)")
    index = {
        "format": FORMAT_VERSION,
        "num_samples": n,
        "ids": list(range(n)),
        "classes": classes if spec.kind != "text" else None,
        "prompts": [prompts[i % len(prompts)] for i in range(n)] if prompts is not None else None,
        "seeds": [sample_seed(i, args.seed) for i in range(n)],
        "files": files,
        "method": args.method,
        "model": spec.name,
        "model_kind": spec.kind,
        "model_fingerprint": _model_fingerprint(spec),
        "steps": args.steps,
        **sampler,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "num_batches": num_batches,
        "world_size": world.world_size,
        "image_shape": shape,
        "image_range": [-1.0, 1.0] if spec.kind in ("digits", "fashion") else [0.0, 1.0],
        "stats": stats,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out / INDEX_FILE, index)
    return index


def _cmd_sample(args: argparse.Namespace) -> int:
    """Generate the samples of this process's batches, then (rank 0) verify them and write the index."""
    # everything that can be checked without loading a model, before any process group or folder exists
    prompts = _read_prompts(args.prompts)
    spec = _resolve_model(args.model, prompts is not None)
    config = _build_config(args.method)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: 'cuda' requested but no CUDA device is available (accepted: cpu, cuda)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {args.out!r} exists and is not a folder")

    world = _init_distributed()
    try:
        return _sample_distributed(args, spec, config, prompts, out, world)
    finally:
        _shutdown(world)


def _sample_distributed(args: argparse.Namespace, spec: _ModelSpec, config: Any | None, prompts: list[str] | None,
                        out: Path, world: _Dist) -> int:
    from tqdm.auto import tqdm

    from .core.handle import apply

    pipe = _load_pipeline(spec, _device(args.device, world))
    if config is not None:  # the cache must fit the model: check before any sampling
        try:
            apply(pipe, config).remove()
        except (ValueError, TypeError) as error:
            raise UsageError(f"--method {args.method!r} does not fit this model: {error}") from error
    sampler = _sampler_settings(args, pipe)
    guidance = sampler["guidance"]
    settings = _settings(args, spec, sampler, prompts)
    _check_run_file(out, settings)  # every rank reads the same file: all fail or none does

    samples_dir, stats_dir = out / SAMPLES_DIR, out / STATS_DIR
    n, size = args.num_samples, args.batch_size
    existing, unknown = _scan_samples(samples_dir)  # nobody writes before the first barrier
    if unknown:
        raise UsageError(f"--out: {samples_dir} holds files that are not samples: {sorted(unknown)[:5]}")
    beyond = sorted(i for i in existing if i >= n)
    if beyond:
        raise UsageError(f"--num-samples: {out} already holds {len(beyond)} samples with ids >= {n} "
                         f"(first {beyond[:5]}); give at least --num-samples {beyond[-1] + 1} or a fresh --out")
    _barrier(world)
    if world.rank == 0:
        samples_dir.mkdir(parents=True, exist_ok=True)
        stats_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(samples_dir, stats_dir, out)
        if not (out / RUN_FILE).is_file():
            _write_json(out / RUN_FILE, settings)
    _barrier(world)

    num_batches = math.ceil(n / size)
    with_stats = set(_latest_stats(out, num_batches))  # read before the barrier below: nobody writes yet
    todo = []
    for b in rank_batches(num_batches, world.rank, world.world_size):
        ids = batch_ids(b, size, n)
        # a file that does not load is regenerated (this rank owns the batch: nobody else touches the file)
        broken = [i for i in ids if i in existing and not _readable(samples_dir / existing[i][0])]
        for i in broken:
            for name in existing.pop(i):
                with contextlib.suppress(OSError):
                    (samples_dir / name).unlink()
        missing = [i for i in ids if i not in existing]
        # a batch whose files exist but whose statistics were lost (killed between the two writes) is run again for
        # them, writing no file, so that the index's totals cover every batch it lists
        if missing or b not in with_stats:
            todo.append((b, missing))

    stats_path = stats_dir / f"rank{world.rank}.json"
    stats: dict[str, Any] = {"batches": {}}
    if stats_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            stats = json.loads(stats_path.read_text())
    stats.update(rank=world.rank, world_size=world.world_size, method=args.method)

    written = 0
    bar = tqdm(total=sum(len(m) for _, m in todo), unit="sample", disable=world.rank != 0,
               desc=f"sample rank 0/{world.world_size}" if world.active else "sample")
    with bar:
        for b, missing in todo:
            ids = batch_ids(b, size, n)
            handle = apply(pipe, config) if config is not None else None
            try:
                images, timing = timed(lambda ids=ids, b=b: _generate_batch(pipe, spec, ids, args.seed, b, args.steps,
                                                                          guidance, prompts), _CLOCKS)
                cache = handle.stats().to_dict() if handle is not None else None
            finally:
                if handle is not None:
                    handle.remove()
            for i in missing:
                row = i - ids.start
                label = sample_class(i) if spec.kind != "text" else None
                prompt = prompts[i % len(prompts)] if prompts is not None else None
                _save_sample(samples_dir, i, images[row], sample_seed(i, args.seed), label, prompt)
                written += 1
                bar.update(1)
                if args.stop_after is not None and written >= args.stop_after:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(75)  # testing: die abruptly, as a killed job would
            stats["batches"][str(b)] = {"ids": [ids.start, ids.stop], "written": len(missing), "seconds": timing.wall,
                                        "cpu_seconds": timing.cpu, "cache": cache, "time": time.time()}
            _write_json(stats_path, stats)

    _barrier(world)
    written = _sum_over_ranks(world, written)  # every rank's files, not rank 0's alone
    failure: SampleFolderError | None = None
    if world.rank == 0:
        try:
            index = _write_index(out, args, spec, sampler, prompts, world)
            print(f"{index['num_samples']} samples in {out} ({written} made now, {world.world_size} process(es)); "
                  f"index: {out / INDEX_FILE}")
            timing = index["stats"].get("timing") or {}
            if timing.get("consistent") is False:
                print(f"warning: the CPU time per sample differs between batches by {timing['relative_spread']:.0%} "
                      f"(more than {timing['tolerance']:.0%}); the machine was probably busy or the batches "
                      "differ (index.json: stats.timing). Wall-clock seconds are kept but not comparable.",
                      file=sys.stderr)
        except SampleFolderError as error:
            failure = error
    _barrier(world)  # the other ranks wait for the index, then all exit together
    if failure is not None:
        raise failure
    return 0


# ---- tokencache eval -----------------------------------------------------------------------------------------


def load_samples(folder: str | Path) -> tuple[torch.Tensor, list[int | None], dict[str, Any]]:
    """Load ``(images (N, C, H, W), classes, index)`` of a finished ``tokencache sample`` folder.

    Checks the index against the files: every listed file exists, ids are ``0..N-1`` once each and every
    file's stored id and class agree with the index.
    """
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise UsageError(f"--samples: {str(folder)!r} has no {INDEX_FILE} (is the `tokencache sample` run finished?)")
    index = json.loads(path.read_text())
    n, ids, files = index["num_samples"], index["ids"], index["files"]
    if ids != list(range(n)) or len(files) != n or len(set(files)) != n:
        raise SampleFolderError(f"{path}: ids/files do not list samples 0..{n - 1} exactly once")
    classes = index.get("classes") or [None] * n
    images = []
    for i, name in enumerate(files):
        file = folder / name
        if not file.is_file():
            raise SampleFolderError(f"{path}: sample file {name} is missing")
        record = _load_sample(file)
        if record.get("id") != i or record.get("class") != classes[i]:
            raise SampleFolderError(f"{name}: stored id/class {record.get('id')}/{record.get('class')} "
                               f"disagree with the index ({i}/{classes[i]})")
        images.append(record["image"])
    return torch.stack(images), list(classes), index


def _cmd_eval(args: argparse.Namespace) -> int:
    """Class accuracy and Fréchet distance to the real images (held-out digits, or the Fashion-MNIST test
    statistics) of a sample folder; prints and writes JSON."""
    images, classes, index = load_samples(args.samples)
    kind = index.get("model_kind")
    if (kind, list(images.shape[1:])) not in (("digits", [1, 16, 16]), ("fashion", [1, 28, 28])):
        raise UsageError(f"--samples: eval needs class-conditional digits samples (1x16x16) or fashion samples "
                         f"(1x28x28), in [-1, 1]; "
                         f"{args.samples!r} holds {index.get('model_kind')} samples of shape "
                         f"{list(images.shape[1:])}")
    if len(images) < 2:
        raise UsageError("--samples: the Fréchet distance needs at least 2 samples")
    if len(images) < FD_MIN_SAMPLES:
        print(f"warning: FD on {len(images)} samples is dominated by small-sample bias: the feature mean and "
              f"covariance estimated from few samples add a positive error that shrinks only with more samples "
              f"(even {len(images)} real digits score well above 0). Compare FDs only at equal sample counts, or "
              f"use at least {FD_MIN_SAMPLES} samples for a figure that means something on its own.", file=sys.stderr)
    from .metrics import class_accuracy, frechet_distance

    if kind == "fashion":  # FD against the shipped statistics of the real test set: no data set needed
        from .demo import fashion
        from .demo.fashion.reference import fd_to_reference, load_reference

        classifier = fashion.load_classifier()
        reference = load_reference(fashion.assets_dir())
        num_real, fd_name = int(reference["count"]), "FD (real test set)"

        def fd_of(samples: torch.Tensor) -> float:
            return fd_to_reference(samples, classifier, reference)
    else:
        from .demo import load_classifier, load_digits_split

        classifier = load_classifier()
        real, _ = load_digits_split("heldout")
        num_real, fd_name = len(real), "FD (held-out)"

        def fd_of(samples: torch.Tensor) -> float:
            return frechet_distance(real, samples, classifier)
    labels = torch.tensor(classes, dtype=torch.long)
    with torch.no_grad():
        predictions = torch.cat([classifier(images[i:i + 500]).argmax(dim=-1) for i in range(0, len(images), 500)])
    per_class = {str(c): float((predictions[labels == c] == c).float().mean())
                 for c in sorted(set(classes)) if c is not None}
    result = {
        "samples": str(Path(args.samples)),
        "num_samples": len(images),
        "method": index.get("method"),
        "model": index.get("model"),
        "steps": index.get("steps"),
        "guidance": index.get("guidance"),
        **({"guidance_interval": index["guidance_interval"]} if "guidance_interval" in index else {}),
        "accuracy": class_accuracy(images, labels, classifier),
        "fd": fd_of(images),
        "num_real": num_real,
        "per_class_accuracy": per_class,
        "speedup": (index.get("stats") or {}).get("speedup"),
        "small_sample_fd": len(images) < FD_MIN_SAMPLES,
    }
    rows = [("samples", str(result["num_samples"])), ("method", str(result["method"])),
            ("steps", str(result["steps"])), ("accuracy", f"{result['accuracy']:.4f}"),
            (fd_name, f"{result['fd']:.4f}")]
    if result["speedup"] is not None:
        rows.append(("FLOP speedup", f"{result['speedup']:.2f}x"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print("per class: " + " ".join(f"{c}:{a:.2f}" for c, a in per_class.items()))
    json_path = Path(args.json) if args.json else Path(args.samples) / "eval.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(json_path, result)
    print(f"written {json_path}")
    return 0


# ---- command line --------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the ``sample`` and ``eval`` sub-commands to a ``tokencache`` argparse sub-parser set."""
    p = subparsers.add_parser(
        "sample", help="generate samples (resumable; shards over torchrun processes)",
        description="Generate N samples with a cache method, one file per sample. Sample i has seed S+i and "
                    "class i % 10 (or prompt i % len(prompts)); batches [b*B, (b+1)*B) are fixed, so the result "
                    "is the same for any number of processes. Rerun the same command to resume.")
    p.add_argument("--model", required=True,
                   help="'demo' (the shipped digits DiT), 'fashion' (the Fashion-MNIST model), a folder with "
                        "transformer/ and scheduler/ "
                        "(DigitsPipeline), or a diffusers pipeline folder (model_index.json)")
    p.add_argument("--method", required=True, choices=_method_choices(), metavar="METHOD",
                   help=f"'none' (no cache) or a preset: {', '.join(_method_choices()[1:])}")
    p.add_argument("--num-samples", required=True, type=_positive_int, metavar="N", help="samples to make")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    p.add_argument("--steps", type=_positive_int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="classifier-free guidance scale (default: the pipeline's default)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                   help="samples per pipeline call; part of the reproducibility contract (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sample i has seed S+i (default 0)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text-conditional pipelines: one prompt per line, sample i gets prompt i %% len")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu, or cuda (device LOCAL_RANK under torchrun) (default cpu)")
    p.add_argument("--stop-after", type=_positive_int, default=None, help=argparse.SUPPRESS)  # tests: crash
    p.set_defaults(func=_cmd_sample)

    p = subparsers.add_parser("eval", help="class accuracy and Fréchet distance of a `tokencache sample` folder",
                              description="Evaluate digits samples: accuracy of the shipped classifier against the "
                                          "recorded classes, and the Fréchet distance to the held-out digits.")
    p.add_argument("--samples", required=True, metavar="DIR", help="a finished `tokencache sample` folder")
    p.add_argument("--json", default=None, metavar="OUT", help="result JSON (default DIR/eval.json)")
    p.set_defaults(func=_cmd_eval, needs_demo_extra=True)


# Needed by the commands marked ``needs_demo_extra`` (demo, train-demo, eval); installed by the ``demo`` extra.
DEMO_EXTRA_MODULES = ("sklearn", "torchmetrics", "scipy", "matplotlib")


def missing_demo_extra(args: argparse.Namespace) -> str | None:
    """Why the parsed command cannot run (a module of the demo extra is missing), or None."""
    if not getattr(args, "needs_demo_extra", False):
        return None
    for name in DEMO_EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = (error.name or name).split(".")[0]
            return f"it needs {missing!r}, which comes with the demo extra: pip install 'tokencache[demo]'"
    return None


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``tokencache`` parser with only the ``sample`` and ``eval`` commands."""
    parser = argparse.ArgumentParser(prog="tokencache", description="Sample generation and evaluation.")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sample`` or ``eval``; bad options give exit code 2 and a message on stderr."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    missing = missing_demo_extra(args)
    if missing:  # before any work starts
        print(f"tokencache {args.command}: error: {missing}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as error:
        print(f"tokencache {args.command}: error: {error}", file=sys.stderr)
        return 2
    except SampleFolderError as error:
        print(f"tokencache {args.command}: {error}", file=sys.stderr)
        return 1


def main_sample(argv: Sequence[str]) -> int:
    """``tokencache sample ARGV``."""
    return main(["sample", *argv])


def main_eval(argv: Sequence[str]) -> int:
    """``tokencache eval ARGV``."""
    return main(["eval", *argv])


if __name__ == "__main__":
    sys.exit(main())
