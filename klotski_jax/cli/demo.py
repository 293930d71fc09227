"""`klotski demo`: build the embedded default model and run the main job."""

from __future__ import annotations

import argparse
from typing import Any

from klotski_jax.cli.options import positive_int


def _cmd_demo(args: argparse.Namespace) -> int:
    from klotski_jax.demo import run_demo

    run_demo(cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens, rebuild=args.rebuild)
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("demo", help="build the embedded default model and run the main job")
    p.add_argument("--cache-dir", default=None,
                   help="where the default model is built (default: ~/.cache/klotski-jax)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached default model")
    p.set_defaults(func=_cmd_demo)
