"""Option types and the options several `klotski` subcommands share (argparse parent parsers):
one definition of the memory budgets and of the expert I/O mode."""

from __future__ import annotations

import argparse

from klotski_jax.planning.policy import IO_MODES, Policy  # no JAX import


# ---- option types: argparse rejects bad values with exit status 2 -------------------------------
def int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(1, text)


def non_negative_int(text: str) -> int:
    return int_at_least(0, text)


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# ---- shared options (parent parsers) ----------------------------------------------------------
SIZE_FORMS = "512MB, 2GiB, 30%% of the weight bytes, or none"


def budget_options(*, device_required: bool = False, host: bool = True) -> argparse.ArgumentParser:
    """--device-budget (and --host-budget): sizes stay text until the checkpoint is known, since
    a percentage is of its weight bytes (`generate_io.resolve_size`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device-budget", metavar="SIZE", required=device_required,
                   help=f"device memory cap: {SIZE_FORMS}"
                        + ("" if device_required else " (default: unlimited)"))
    if host:
        p.add_argument("--host-budget", metavar="SIZE",
                       help="host RAM cap, same forms (default: unlimited)")
    return p


def io_options() -> argparse.ArgumentParser:
    """--io-mode: how expert chunk files are read."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--io-mode", choices=IO_MODES, default="buffered",
                   help="expert reads: buffered readinto (default), direct (O_DIRECT: every read "
                        "from the disk), or tensorstore")
    return p


def power_of_two(text: str) -> int:
    """A positive power of two (1, 2, 4, 8, ...)."""
    n = positive_int(text)
    if n & (n - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two (1, 2, 4, 8, ...), got {n}")
    return n


def compute_options() -> argparse.ArgumentParser:
    """--expert-batch: ready experts of few rows per jitted call."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--expert-batch", type=power_of_two, default=Policy.expert_batch, metavar="N",
                   help="decode steps: compute up to N ready experts with at most 8 tokens "
                        "each in one call (a power of two; 1: one call per expert; default: "
                        f"{Policy.expert_batch})")
    return p


def devices_arg(text: str) -> int | str:
    """--devices: a positive count of local devices, or "all"."""
    if text.strip().lower() == "all":
        return "all"
    return positive_int(text)


def device_options() -> argparse.ArgumentParser:
    """--devices: how many local devices the run spans (expert parallelism on a 1-D mesh)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--devices", type=devices_arg, default=None, metavar="N|all",
                   help="run on N local devices (or all): each MoE layer's experts are spread "
                        "over them, attention runs on each, and --device-budget applies to each "
                        "device (default: all local accelerators; one device on a CPU)")
    return p


def size(text: str | None, ckpt: str) -> int | None:
    """A SIZE option in bytes; a percentage is of the checkpoint's weight bytes."""
    from klotski_jax.generate_io import checkpoint_weight_bytes, resolve_size

    return None if text is None else resolve_size(text, weight_bytes=checkpoint_weight_bytes(ckpt))
