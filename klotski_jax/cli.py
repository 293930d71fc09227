"""`klotski` command line: thin, typed wrappers over the Python API.

Every subcommand is a function taking parsed options; errors that are the user's (bad input,
budgets, existing outputs) print one `error: ...` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from klotski_jax.config import ConfigError

EXIT_USER_ERROR = 2


def _cmd_convert(args: argparse.Namespace) -> int:
    from klotski_jax.checkpoints.convert import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(f"converted {args.hf_dir} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from klotski_jax.demo import run_demo

    run_demo(cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens, rebuild=args.rebuild)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klotski", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an HF MoE checkpoint to the klotski-jax format")
    p.add_argument("hf_dir", help="local HF model directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="store weights in this dtype (default: the config's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="build the embedded default model and run the main job")
    p.add_argument("--cache-dir", default=None,
                   help="where the default model is built (default: ~/.cache/klotski-jax)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached default model")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `klotski` console script; returns the exit status."""
    from klotski_jax.checkpoints.errors import ConversionError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
