"""`klotski` command line: thin, typed wrappers over the Python API, one module per subcommand.

Every subcommand is a function taking parsed options; errors that are the user's (bad input,
budgets, existing outputs) print one `error: ...` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from klotski_jax.cli import bench, calibrate, convert, demo, generate, plan, profile, verify
from klotski_jax.config import ConfigError
from klotski_jax.constants import PolicyError

DESCRIPTION = "`klotski` command line: thin, typed wrappers over the Python API."
EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klotski", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in (convert, verify, demo, generate, profile, plan, calibrate, bench):
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `klotski` console script; returns the exit status."""
    from klotski_jax.checkpoints.errors import ConversionError
    from klotski_jax.generate_io import InputError

    # The device budget must be what the process holds: XLA's GPU client otherwise preallocates
    # 75% of the memory at start-up (before JAX starts; an explicit setting is kept).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench
    if check := getattr(args, "check", None):  # checks across options of one subcommand
        check(parser, args)
    from klotski_jax.runtime.compile_cache import use_compilation_cache

    use_compilation_cache()  # a later run of the same shapes loads its compiled steps
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # e.g. "Unable to initialize backend 'tpu'" on every CPU/GPU start
        logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ConversionError, ConfigError, PolicyError, InputError, FileNotFoundError,
            FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
