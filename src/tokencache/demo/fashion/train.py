"""Train the Fashion-MNIST transformer with flow matching; checkpoints atomically and resumes.

    python -m tokencache.demo.fashion train --out /work/runs/fashion        # the same command resumes

Rectified flow: ``x_t = (1 - t) x0 + t noise``, the model predicts ``v = noise - x0`` (so
``FlowMatchEulerDiscreteScheduler.step``'s ``x + (sigma_next - sigma) v`` walks from noise to data), with
``t`` logit-normal (SD3's default) and the model fed ``1000 t``. Every random draw comes from one seeded
generator whose state is checkpointed with the data order, so a resumed run reproduces an uninterrupted one.

Architecture choice, by measured training cost (batch 64, 8 blocks, 196 tokens, 2 threads, 2026-11-23, on a
2-core machine other jobs were using at the same time, so only the ratios mean much): DiT width 128 6.0-6.5
images/s, DiT width 192 4.0, PixArt-style width 128 with 4 class tokens 6.7 (fewer parameters: one shared
adaLN-single instead of a modulation MLP per block; cross-attention to 4 tokens is cheap). The PixArt-style
model costs no more and has a cross-attention path, so the cross-attention-entropy score can be tested on
trained weights: it is the default. On the busy machine 1 thread trained at 16.4 images per CPU-second
against about 5.8 for 2 threads (the threads wait for each other when descheduled), hence 1 thread.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...core.loading import load_kwargs
from ..train import _ema_update, _optimizer_step, _set_builtin_label_dropout
from .data import NUM_CLASSES, load_fashion
from .model import build_transformer, make_scheduler, predict_velocity

__all__ = ["CHECKPOINT", "export_weights", "flow_matching_loss", "train_fashion"]

CHECKPOINT = "checkpoint.pt"
#: Keys of the hyper-parameters that may change when a run is resumed (the rest must match the checkpoint): how
#: long it runs, how it checkpoints, and when the learning rate cools down.
RESUMABLE_CHANGES = ("steps", "num_threads", "checkpoint_seconds", "checkpoint_every", "warm_started_from",
                     "cooldown_steps", "lr_schedule")


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """Velocity MSE at logit-normal ``t`` with fresh noise, all drawn from ``gen``."""
    t = torch.sigmoid(torch.randn(len(x0), generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    return F.mse_loss(predict_velocity(model, xt, t, labels), noise - x0)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 1234,
                 batch_size: int = 250) -> float:
    """Velocity MSE on ``images`` with seeded ``t`` and noise (comparable across checkpoints)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        total += flow_matching_loss(model, images[i:i + batch_size], labels[i:i + batch_size], gen).item() * \
            len(images[i:i + batch_size])
    model.train(was_training)
    return total / len(images)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a run cut off mid-write leaves the previous checkpoint intact


def export_weights(out: Path, ema: torch.nn.Module, record: dict[str, Any]) -> None:
    """Write the EMA weights as a diffusers folder (``transformer/``, ``scheduler/``) and ``training.json``."""
    tmp = out / "export.tmp"
    ema.save_pretrained(tmp / "transformer", safe_serialization=True)
    make_scheduler().save_pretrained(tmp / "scheduler")
    for name in ("transformer", "scheduler"):
        target = out / name
        if target.exists():
            old = out / f"{name}.old"
            os.replace(target, old)
            os.replace(tmp / name, target)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            os.replace(tmp / name, target)
    tmp.rmdir()
    (out / "training.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(out / "training.json.tmp", out / "training.json")


def train_fashion(
    out_dir: str | Path,
    steps: int = 20000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    *,
    arch: str = "pixart",
    num_layers: int = 8,
    width: int = 128,
    head_dim: int = 32,
    warmup_steps: int = 300,
    cooldown_steps: int = 0,
    ema_decay: float = 0.999,
    class_dropout: float = 0.1,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    checkpoint_seconds: float = 600.0,
    checkpoint_every: int = 0,
    heldout_images: int = 250,
    num_threads: int | None = 1,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) toward ``steps`` optimiser steps; checkpoint into ``out_dir``; return the record.

    Learning rate: linear warmup over ``warmup_steps``, then constant (so ``steps`` can be raised on resume
    and the EMA does the averaging); ``cooldown_steps`` > 0 decays it linearly toward 0 over the last
    ``cooldown_steps`` of ``steps`` (a resumed run may set it, to finish a run whose quality has levelled off).
    Labels become the null class with probability ``class_dropout``.
    ``out_dir/checkpoint.pt`` (model, EMA, optimiser, generator, data order) is rewritten every
    ``checkpoint_seconds`` (and every ``checkpoint_every`` steps if > 0), on SIGTERM/SIGINT and at the end,
    together with the EMA weights as ``transformer/`` + ``scheduler/`` and ``training.json``.
    ``data``/``heldout`` replace the Fashion-MNIST train/test sets (tests).

    ``init_from`` (a folder with ``transformer/`` + ``training.json``, e.g. the shipped weights) warm-starts a run
    that has no checkpoint yet: model and EMA from those (EMA) weights, the step count from its record, a fresh
    optimiser and data order (so not bit-identical to an uninterrupted run; for a new machine without the run
    folder).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if not 0 <= cooldown_steps <= steps:
        raise ValueError(f"cooldown_steps must be between 0 and steps ({steps}); got {cooldown_steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    hparams = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "arch": arch, "num_layers": num_layers,
        "width": width, "head_dim": head_dim, "warmup_steps": warmup_steps, "ema_decay": ema_decay,
        "class_dropout": class_dropout, "grad_clip": grad_clip, "weight_decay": weight_decay,
        "optimizer": "AdamW(betas=(0.9, 0.99))", "cooldown_steps": cooldown_steps,
        "lr_schedule": "linear warmup, then constant" + (
            f", then linear decay to 0 over steps {steps - cooldown_steps}-{steps}" if cooldown_steps else ""),
        "objective": "rectified flow, v = noise - x0, t ~ sigmoid(N(0, 1)), model timestep 1000 t",
        "checkpoint_seconds": checkpoint_seconds, "checkpoint_every": checkpoint_every,
        "num_threads": torch.get_num_threads(),
    }
    images, labels = data if data is not None else load_fashion("train")
    h_images, h_labels = heldout if heldout is not None else load_fashion("test")
    h_images, h_labels = h_images[:heldout_images], h_labels[:heldout_images]
    n = len(images)
    hparams["train_images"] = n

    torch.manual_seed(seed)  # parameter init
    model = build_transformer(arch, num_layers, width, head_dim)  # type: ignore[arg-type]
    model.train()
    _set_builtin_label_dropout(model, 0.0)  # we drop labels once per image, not per block
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    perm, pos, step = torch.randperm(n, generator=gen), 0, 0
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    seconds_before = 0.0

    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = {k: (ckpt["hparams"].get(k), v) for k, v in hparams.items()
                   if k not in RESUMABLE_CHANGES and ckpt["hparams"].get(k) != v}
        if changed:
            raise ValueError(f"{ckpt_path} was written with other settings {changed} (checkpoint, now); use "
                             f"the same settings or another --out")
        if "warm_started_from" in ckpt["hparams"]:
            hparams["warm_started_from"] = ckpt["hparams"]["warm_started_from"]
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        perm, pos, step = ckpt["perm"], ckpt["pos"], ckpt["step"]
        losses, history, sessions = ckpt["losses"], ckpt["history"], ckpt["sessions"]
        seconds_before = sum(s["seconds"] for s in sessions)
    elif init_from is not None:
        prior = json.loads((Path(init_from) / "training.json").read_text())
        for key in ("arch", "num_layers", "width", "head_dim"):
            if prior["hyper_parameters"][key] != hparams[key]:
                raise ValueError(f"--init-from {init_from}: {key} is {prior['hyper_parameters'][key]!r} there, "
                                 f"{hparams[key]!r} now")
        weights = type(model).from_pretrained(Path(init_from) / "transformer", **load_kwargs()).state_dict()
        model.load_state_dict(weights)
        ema.load_state_dict(weights)
        step = prior["steps_done"]
        gen.manual_seed(seed + step)  # a new data order from here
        perm = torch.randperm(n, generator=gen)
        history, sessions = prior.get("history", []), prior.get("sessions", [])
        seconds_before = sum(s["seconds"] for s in sessions)
        hparams["warm_started_from"] = {"folder": str(init_from), "steps_done": step}
    n_params = sum(p.numel() for p in model.parameters())
    session = {"start_step": step, "end_step": step, "seconds": 0.0, "images_per_second": None,
               "threads": torch.get_num_threads(), "lr_schedule": hparams["lr_schedule"]}
    sessions.append(session)
    start = time.perf_counter()
    last_save = start

    def record(complete: bool) -> dict[str, Any]:
        tail = losses[-200:]
        total_seconds = seconds_before + session["seconds"]
        return {
            "complete": complete, "steps_done": step, "steps_planned": steps,
            "images_seen": step * batch_size, "epochs": step * batch_size / n,
            "loss_last_200": sum(tail) / len(tail) if tail else None,
            "heldout_loss_ema": history[-1]["heldout_loss_ema"] if history else None,
            "seconds": total_seconds,
            "images_per_second": step * batch_size / total_seconds if total_seconds else None,
            "parameters": n_params, "hyper_parameters": hparams, "history": history, "sessions": sessions,
            "torch": torch.__version__,
        }

    def checkpoint(complete: bool) -> dict[str, Any]:
        session["seconds"] = time.perf_counter() - start
        session["end_step"] = step
        done = step - session["start_step"]
        session["images_per_second"] = done * batch_size / session["seconds"] if session["seconds"] else None
        h_loss = heldout_loss(ema, h_images, h_labels) if len(h_images) else None
        if not history or history[-1]["step"] != step:
            history.append({"step": step, "heldout_loss_ema": h_loss, "loss_last_200":
                            sum(losses[-200:]) / max(len(losses[-200:]), 1), "seconds": seconds_before
                            + session["seconds"]})
        _atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "gen": gen.get_state(), "perm": perm, "pos": pos, "step": step, "losses": losses,
                      "history": history, "sessions": sessions, "hparams": hparams}, ckpt_path)
        rec = record(complete)
        export_weights(out, ema, rec)
        return rec

    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum  # finish the current step, checkpoint, return

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _main_thread() else {}
    try:
        bar = tqdm(total=steps, initial=step, desc="train-fashion", disable=not progress, mininterval=5.0)
        while step < steps and stop["signal"] is None:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            x0, y = images[idx], labels[idx].clone()
            y[torch.rand(len(y), generator=gen) < class_dropout] = NUM_CLASSES
            for group in opt.param_groups:
                group["lr"] = lr * learning_rate_factor(step, steps, warmup_steps, cooldown_steps)
            loss = flow_matching_loss(model, x0, y, gen)
            _optimizer_step(model, opt, loss, grad_clip)
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
            now = time.perf_counter()
            if step < steps and ((checkpoint_every and step % checkpoint_every == 0)
                                 or now - last_save >= checkpoint_seconds):
                rec = checkpoint(False)
                last_save = time.perf_counter()
                bar.write(f"checkpoint step {step}: loss {rec['loss_last_200']:.4f}, held-out EMA "
                          f"{rec['heldout_loss_ema']}, {rec['images_per_second']:.1f} images/s")
        bar.close()
        return checkpoint(step >= steps)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def learning_rate_factor(step: int, steps: int, warmup_steps: int, cooldown_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) over the base rate: a linear warmup, then 1, then
    (``cooldown_steps`` > 0) a linear decay whose last step still moves (1 / ``cooldown_steps``)."""
    factor = min(1.0, (step + 1) / max(warmup_steps, 1))
    if cooldown_steps:
        factor *= min(1.0, (steps - step) / cooldown_steps)
    return factor


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
