"""The `qlora` command: a thin argparse layer over the public API.

    qlora quantize-report [--model PATH] [--output DIR] [--blocksize 64]
"""
from __future__ import annotations

import argparse
import sys


def _quantize_report(args: argparse.Namespace) -> None:
    from .quant.report import run

    run(args.model, args.output, args.blocksize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA: 4-bit base weights, LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("quantize-report", help="compare NF4, FP4 and INT4 on a model's Linear weights")
    p.add_argument("--model", help="model directory or .safetensors file (default: MiniLM-L6 if installed, else synthetic)")
    p.add_argument("--output", default="runs/quantize-report", help="where report.json and report.png go")
    p.add_argument("--blocksize", type=int, default=64, help="elements per scale (power of two, 32..4096)")
    p.set_defaults(func=_quantize_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
