"""Shared constants and the two errors every layer raises, in one JAX-free module at the bottom.

Everything here is plain Python: the models, the checkpoint code, the planner (which must not
import JAX) and the runtime all import it, so each value has exactly one definition.

- `__version__`: the package version (also written into checkpoint manifests);
- `CACHE_ROUND` / `cache_len`: KV cache lengths are rounded up to a multiple, so nearby prompt
  lengths share compiled shapes;
- `bucket` / `buckets_upto`: the padded row counts of an expert computation;
- `ALIGN` / `round_up`: host buffer alignment (pages for O_DIRECT and zero-copy device puts);
- `PolicyError` / `BudgetError`: a run that cannot be made / memory accounting that cannot work;
- `cache_root`: the per-user cache folder (default model, profiles).
"""

from __future__ import annotations

import os
import pathlib

__version__ = "0.1.0"

CACHE_ROUND = 32  # cache lengths are rounded up to this, so nearby lengths share compiles

MIN_BUCKET = 2  # a one-row matmul takes a slower XLA CPU kernel (`layers.linear` doubles it anyway)
FINE_BUCKETS_FROM = 64  # above this, buckets also at 1.5 x a power of two

ALIGN = 4096  # staging-buffer alignment: pages for O_DIRECT, and XLA's 64-byte zero-copy rule


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def cache_len(tokens: int) -> int:
    """KV cache slots for a sequence of `tokens` tokens: rounded up to CACHE_ROUND."""
    return round_up(tokens, CACHE_ROUND)


def bucket(n: int) -> int:
    """The padded row count of an expert computation over n tokens (the scheduler pads to it,
    so a run compiles a handful of shapes during warm-up and never again): the next power of
    two, at least MIN_BUCKET; above FINE_BUCKETS_FROM also 1.5 x a power of two (96, 192, 384,
    768, 1536, ...), so a large prefill pads at most a third of an expert's rows instead of
    nearly half of them."""
    p = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return p * 3 // 4 if p > FINE_BUCKETS_FROM and p * 3 // 4 >= n else p


def buckets_upto(n: int) -> list[int]:
    """Every bucket a count in 1..n can map to, ascending (for warm-up and the profile)."""
    out, b = [], MIN_BUCKET
    top = bucket(n)
    while b < top:
        out.append(b)
        if b >= FINE_BUCKETS_FROM and b + b // 2 < top:
            out.append(b + b // 2)
        b *= 2
    return [*out, top]


class PolicyError(ValueError):
    """A policy that cannot run: bad option values, or budgets below what the schedule needs."""


class BudgetError(PolicyError):
    """A reservation that can never be satisfied, or accounting that went wrong."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The per-user cache: `cache_dir`, else $KLOTSKI_JAX_CACHE, else the XDG cache."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if env := os.environ.get("KLOTSKI_JAX_CACHE"):
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(xdg).expanduser() / "klotski-jax"

# The one axis of the device mesh a multi-device run spans (expert parallelism).
MESH_AXIS = "devices"
