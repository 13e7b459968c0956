"""``python -m tokencache.demo.fashion {train,classifier,quality}``: the Fashion-MNIST model's recipes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the diffusion-model training (shared with ``tokencache train-demo --model fashion``)."""
    p.add_argument("--out", default="/work/runs/fashion", help="run folder; the same command resumes from it")
    p.add_argument("--steps", type=int, default=20000, help="total optimiser steps planned (default 20000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["pixart", "dit"], default="pixart")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine, "
                   "2 threads wasted most CPU time waiting for each other)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--cooldown-steps", type=int, default=0,
                   help="decay the learning rate linearly to 0 over the last N of --steps (default 0: constant); "
                   "a resumed run may set it")
    p.add_argument("--init-from", default=None,
                   help="warm start a run folder without checkpoint from these weights (e.g. the shipped ones)")


def run_train(args: argparse.Namespace) -> dict:
    from .train import train_fashion

    return train_fashion(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         arch=args.arch, num_threads=args.threads, checkpoint_seconds=60 * args.checkpoint_minutes,
                         cooldown_steps=args.cooldown_steps,
                         init_from=getattr(args, "init_from", None))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokencache.demo.fashion")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train (or resume) the flow-matching transformer"))
    p = sub.add_parser("classifier", help="train the classifier and write the FD reference statistics")
    p.add_argument("--out", default="/work/runs/fashion-classifier")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("quality", help="accuracy and FD over guidance scales; writes quality.json")
    p.add_argument("--folder", default=None, help="model folder (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="folder of classifier + FD reference (default: --folder)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the shipped setting)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="apply guidance only at flow times t in (LOW, HIGH], 0 <= LOW < HIGH <= 1 "
                   "(default: the shipped setting)")
    p.add_argument("--seed", type=int, default=0, help="class c is sampled with seed + c (default 0)")
    p.add_argument("--out", default=None, help="report path (default FOLDER/quality.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in the report (same training step) that this call does not re-measure "
                   "(same guidance, sample count, steps, seed), e.g. a 200-sample curve next to a 1,000-sample run")
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "quality":
        from .model import DEFAULT_GUIDANCE_INTERVAL, DEFAULT_STEPS, check_guidance_interval
        from .quality import write_quality_report

        interval = DEFAULT_GUIDANCE_INTERVAL if args.guidance_interval is None else args.guidance_interval
        try:
            interval = check_guidance_interval(interval)
        except ValueError as err:
            parser.error(f"--guidance-interval: {err}")
        write_quality_report(args.folder, args.guidance, args.per_class, args.steps or DEFAULT_STEPS,
                             classifier_folder=args.classifier, num_threads=args.threads, out=args.out,
                             merge=args.merge, guidance_interval=interval, seed=args.seed)
    if args.command == "classifier":
        from .reference import train_fashion_classifier

        summary = train_fashion_classifier(args.out, epochs=args.epochs, seed=args.seed, num_threads=args.threads)
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "train_accuracy", "fd_real_halves",
                                                  "fd_train10k_vs_test", "total_seconds")}))
    if args.command == "train":
        rec = run_train(args)
        print(json.dumps({k: rec[k] for k in ("steps_done", "steps_planned", "loss_last_200", "heldout_loss_ema",
                                              "images_per_second")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
