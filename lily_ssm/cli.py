"""The ``lily-ssm`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, seed=args.seed, out_dir=args.out)
    if not result["loss_after"] < result["loss_before"]:
        print("error: the demo's loss did not decrease", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lily-ssm", description="Lily adapters for Mamba / state-space models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train Lily on a tiny Falcon-Mamba for a few steps (CPU, no downloads)")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="lily-demo-adapter", help="folder for the trained adapter")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
