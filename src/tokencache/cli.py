"""The ``tokencache`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import sampling
from .core.flops import FLOP_CONVENTIONS
from .core.plan import plan
from .core.presets import preset, presets
from .core.shapes import MODEL_SHAPES, PLAN_DEFAULTS, build_transformer
from .methods.token_cache import TOKEN_SELECTIONS
from .methods.token_cache_calibration import CalibrationConfig

_CALIBRATION_DEFAULTS = CalibrationConfig()


def _cmd_plan(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    if args.model == "demo":  # the shipped digits DiT, as `sample` and `calibrate` name it; shapes only
        from .demo import assets_dir

        transformer = build_transformer(str(assets_dir()), device="meta")
    else:
        transformer = build_transformer(args.model)
    defaults = PLAN_DEFAULTS.get(args.model, {})
    tokens = args.tokens if args.tokens is not None else defaults.get("num_tokens")
    context = args.context_tokens if args.context_tokens is not None else defaults.get("context_tokens")
    result = plan(config, transformer, args.steps, batch_size=args.batch, num_tokens=tokens, context_tokens=context,
                  counting=args.counting)
    print(result)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name, description in presets().items():
        print(f"{name:<14} {description}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "fashion":
        from .demo.fashion.model import DEFAULT_GUIDANCE as FASHION_GUIDANCE
        from .demo.fashion.runner import run_fashion_demo

        run_fashion_demo(args.out, quick=args.quick, samples=args.samples, repeats=args.repeats,
                         guidance=FASHION_GUIDANCE if args.guidance is None else args.guidance)
        return 0
    from .demo import DEFAULT_GUIDANCE
    from .demo.runner import run_demo

    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    run_demo(args.out, quick=args.quick, samples=args.samples, repeats=args.repeats, ddpm=not args.no_ddpm,
             guidance=guidance)
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo.train import train_classifier, train_demo

    # The shipped model's recipe: stage 1 from scratch, stage 2 a fine-tune with more class dropout (for CFG).
    out = Path(args.out)
    stage1 = out / "stage1" if args.finetune_steps else out
    train_demo(stage1, steps=args.steps, lr=8e-4, seed=args.seed, class_dropout=0.1)
    if args.finetune_steps:
        train_demo(out, steps=args.finetune_steps, lr=3e-4, seed=args.seed + 1, warmup_steps=100,
                   class_dropout=0.25, init_from=stage1)
    if not args.skip_classifier:
        train_classifier(out, epochs=args.classifier_epochs, seed=args.seed)
    return 0


# CalibrationConfig fields as the `calibrate` command sets them, for errors a CLI user can act on.
_CALIBRATE_OPTIONS = {"num_steps": "--steps", "budget": "--budget", "schedule": "--tprr", "variant": "--variant",
                      "adaptive_blocks": "--uniform-blocks", "seed": "--seed",
                      "calls": "--runs / --per-call / --num-classes / --seed", "token_selection": "--token-selection"}


def _cmd_train_fashion(args: argparse.Namespace) -> int:
    from .demo.fashion.__main__ import run_train

    run_train(args)  # resumes from --out/checkpoint.pt when there is one
    if args.classifier_out:
        from .demo.fashion.reference import train_fashion_classifier

        train_fashion_classifier(args.classifier_out, epochs=args.classifier_epochs, num_threads=args.threads)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .methods.token_cache import TPRR
    from .methods.token_cache_calibration import (
        CalibrationConfig,
        CheckpointMismatchError,
        calibrate,
        class_calls,
        load_checkpoint,
    )

    # every setting and the resume checkpoint are checked before the model is loaded or anything sampled
    k1, k2, boundary = args.tprr
    if not (float(k1).is_integer() and float(k2).is_integer()):
        raise ValueError(f"--tprr: K1 and K2 must be whole numbers of cached steps; got {k1:g} {k2:g}")
    option = {"iterations": "--iterations", **_CALIBRATE_OPTIONS}
    try:
        config = CalibrationConfig(
            calls=class_calls(args.num_classes, args.per_call, args.runs, seed=args.seed), num_steps=args.steps,
            budget=args.budget, schedule=TPRR(int(k1), int(k2), boundary), variant=args.variant,
            adaptive_blocks=not args.uniform_blocks, iterations=args.iterations, seed=args.seed,
            checkpoint_dir=args.out, token_selection=args.token_selection)
    except ValueError as error:
        text = str(error)
        for field_name, flag in option.items():
            text = text.replace(f"CalibrationConfig.{field_name} ", f"{flag} (CalibrationConfig.{field_name}) ")
        raise ValueError(text.replace("TPRR.", "--tprr: TPRR.")) from error
    try:
        load_checkpoint(config)
    except CheckpointMismatchError as error:
        details = "; ".join(f"{_CALIBRATE_OPTIONS.get(k, k)}: {_cli_value(k, a)} there, {_cli_value(k, b)} now"
                            for k, (a, b) in error.differences.items())
        raise ValueError(f"--out {args.out} holds a calibration checkpoint made with other options ({details}). "
                         f"Give the same options to resume, another --out, or delete {error.path}") from error

    from .demo import load_model, load_pipeline_from

    if args.model == "fashion":
        from .demo import fashion

        pipe = fashion.load_model()
    else:
        pipe = load_model() if args.model == "demo" else load_pipeline_from(args.model)
    predictor = calibrate(pipe, config)
    predictor.save_pretrained(args.out)
    c = predictor.calibration
    print(f"saved {args.out}: budget {c['budget']}, token selection {c['token_selection']!r}, block ratios "
          f"{[round(r, 3) for r in c['block_ratios']]}, held-out error {c['holdout_error_trained']:.4g} "
          f"(untrained {c['holdout_error_untrained']:.4g}, random tokens {c['holdout_error_random']:.4g}); "
          f"sampled with {c.get('sampler_settings') or 'the pipeline defaults'}")
    return 0


def _cli_value(field_name: str, value: object) -> str:
    """A checkpoint setting as the `calibrate` options spell it."""
    if field_name == "schedule" and isinstance(value, dict):
        return " ".join(str(value.get(k)) for k in ("early_cached_steps", "late_cached_steps", "boundary"))
    if field_name == "adaptive_blocks":
        return "without --uniform-blocks" if value else "with --uniform-blocks"
    if field_name == "calls":
        return "other trajectory calls"
    return repr(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencache", description="Token-wise feature caching for diffusion "
                                     "transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the step x block schedule and FLOPs of a preset on a model")
    p.add_argument("--preset", required=True, choices=sorted(presets()), help="cache settings")
    p.add_argument("--model", default="dit-xl-2",
                   help=f"'demo' (the shipped digits DiT), one of {', '.join(sorted(MODEL_SHAPES))}, or a local "
                        "diffusers checkpoint directory")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--batch", type=int, default=2, help="transformer batch, 2 = one image with CFG in one batch "
                   "(default 2); 1 for FLUX-dev (guidance embedding) and per call for Wan (CFG in two calls)")
    p.add_argument("--tokens", type=int, default=None,
                   help="image tokens (default: the model's published resolution)")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="text tokens (default: the model family's caption length: PixArt 120, FLUX 512)")
    p.add_argument("--counting", choices=sorted(FLOP_CONVENTIONS), default="engine",
                   help="FLOP convention: 'engine' (default) as a real run's statistics count, 'toca' as the "
                        "official DiT-ToCa counter behind the ToCa paper's DiT figures, 'toca-flux' as the "
                        "official FLUX ToCa code (which also recomputes the joint attention's output projections)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("demo", help="compare every method on the shipped digits model (table and pictures)")
    p.add_argument("--out", default="tokencache-demo", help="output folder (default ./tokencache-demo)")
    p.add_argument("--model", choices=["digits", "fashion"], default="digits",
                   help="the shipped digits DiT (default, quick) or the Fashion-MNIST flow-matching model (196 "
                        "tokens; its rows compare every token score at the same FLOPs)")
    p.add_argument("--quick", action="store_true", help="20 samples, DDIM only, a few methods (< 1 minute)")
    p.add_argument("--samples", type=int, default=None, help="samples per method, a multiple of 10 (default 50)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds, median (default 2; 1 with --quick)")
    p.add_argument("--no-ddpm", action="store_true", help="skip the DDPM-250 rows")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the shipped model's, see quality.json)")
    p.set_defaults(func=_cmd_demo, needs_demo_extra=True)

    p = sub.add_parser("train-demo", help="train the digits DiT (and its classifier) from scratch")
    p.add_argument("--out", required=True, help="output folder (transformer/, scheduler/, classifier)")
    p.add_argument("--steps", type=int, default=4000, help="stage-1 training steps (default 4000, as shipped)")
    p.add_argument("--finetune-steps", type=int, default=1500,
                   help="stage-2 fine-tune steps with class dropout 0.25 (default 1500, as shipped; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-classifier", action="store_true", help="train only the diffusion model")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.set_defaults(func=_cmd_train_demo, needs_demo_extra=True)

    p = sub.add_parser("train-fashion", help="train (or resume) the Fashion-MNIST flow-matching model; needs "
                       "the data set (apt-get install dataset-fashion-mnist)")
    from .demo.fashion.__main__ import add_train_arguments

    add_train_arguments(p)
    p.add_argument("--classifier-out", default=None,
                   help="also train the classifier and write the FD reference statistics into this folder")
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.set_defaults(func=_cmd_train_fashion, needs_demo_extra=True)

    p = sub.add_parser("calibrate", help="calibrate a TokenCache predictor for a class-conditional model")
    p.add_argument("--model", default="demo",
                   help="'demo', 'fashion' (use --steps 30) or a folder with transformer/ and scheduler/")
    p.add_argument("--out", required=True, help="folder for predictor.safetensors/.json (and a checkpoint)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps to calibrate for (default 50)")
    p.add_argument("--budget", type=float, default=_CALIBRATION_DEFAULTS.budget,
                   help=f"mean fraction of tokens reused on cached steps, in [0, 0.95] (default "
                        f"{_CALIBRATION_DEFAULTS.budget}: ToCa N=4's FLOPs on the digits DiT)")
    p.add_argument("--token-selection", default=_CALIBRATION_DEFAULTS.token_selection, choices=TOKEN_SELECTIONS,
                   help=f"ranking recorded as the predictor's default (default "
                        f"{_CALIBRATION_DEFAULTS.token_selection}, the ablation's winner; 'predictor' = learned)")
    p.add_argument("--tprr", type=float, nargs=3, default=(3, 2, 0.5), metavar=("K1", "K2", "BOUNDARY"),
                   help="cached steps per full step early / late, and the phase boundary (default 3 2 0.5)")
    p.add_argument("--variant", choices=["features", "position"], default="features")
    p.add_argument("--uniform-blocks", action="store_true", help="no adaptive block selection")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--runs", type=int, default=4, help="pipeline calls sampling trajectories (default 4)")
    p.add_argument("--per-call", type=int, default=16, help="trajectories per call (default 16)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_calibrate)

    sampling.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = sampling.missing_demo_extra(args)
    if missing:  # say so before any work starts
        parser.exit(2, f"tokencache {args.command}: error: {missing}\n")
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        parser.exit(2, f"tokencache {args.command}: error: {error}\n")
    except sampling.SampleFolderError as error:
        parser.exit(1, f"tokencache {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
