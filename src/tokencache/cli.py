"""The ``tokencache`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .plan import DEFAULT_CONTEXT_TOKENS, plan
from .presets import preset, presets
from .shapes import MODEL_SHAPES, build_transformer


def _cmd_plan(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    transformer = build_transformer(args.model)
    result = plan(config, transformer, args.steps, batch_size=args.batch, num_tokens=args.tokens,
                  context_tokens=args.context_tokens)
    print(result)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name, description in presets().items():
        print(f"{name:<14} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencache", description="Token-wise feature caching for diffusion "
                                     "transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the step x block schedule and FLOPs of a preset on a model")
    p.add_argument("--preset", required=True, choices=sorted(presets()), help="cache settings")
    p.add_argument("--model", default="dit-xl-2",
                   help=f"one of {', '.join(sorted(MODEL_SHAPES))}, or a local diffusers checkpoint directory")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--batch", type=int, default=2, help="transformer batch, 2 = one image with CFG (default 2)")
    p.add_argument("--tokens", type=int, default=None, help="image tokens (default: from the model's sample size)")
    p.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS,
                   help=f"text tokens of cross-attention (default {DEFAULT_CONTEXT_TOKENS})")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        parser.exit(2, f"tokencache {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
