"""A persistent XLA compilation cache shared by every run of this user.

A run compiles its attention, router and expert steps for every shape its workload produces
(`Scheduler.warm_up`): seconds on a CPU, more on a GPU, paid again by every `klotski` command
and every new Python process. JAX can keep compiled executables on disk, keyed by the program,
the backend, the flags and the JAX version, so a later run of the same shapes loads them
instead. The `klotski` command turns this on (`use_compilation_cache`); Python API users call it
themselves (a library does not set global JAX options behind its caller's back).

Where: $JAX_COMPILATION_CACHE_DIR when set (JAX's own variable; also a directory set with
`jax.config.update("jax_compilation_cache_dir", ...)` before), else `<cache>/xla` under the
per-user klotski-jax cache ($KLOTSKI_JAX_CACHE, else $XDG_CACHE_HOME/klotski-jax, else
~/.cache/klotski-jax). KLOTSKI_JAX_COMPILE_CACHE=off turns it off.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

from klotski_jax.constants import cache_root

log = logging.getLogger(__name__)

OFF = ("0", "off", "false", "no")


def use_compilation_cache(path: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache (call before the first compile); returns its
    directory, or None when KLOTSKI_JAX_COMPILE_CACHE=off.

    `path`: the directory (default: an already configured one, else `<cache>/xla`). Every
    compile is cached, not only those over JAX's default of one second: a run's many small
    steps (0.1-0.6 s each on a CPU) are most of its compile time. An explicit
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is kept."""
    if os.environ.get("KLOTSKI_JAX_COMPILE_CACHE", "").strip().lower() in OFF:
        return None
    configured = jax.config.jax_compilation_cache_dir
    if path is not None:
        where = pathlib.Path(path).expanduser()
    elif configured:
        where = pathlib.Path(configured).expanduser()
    else:
        where = cache_root() / "xla"
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        log.warning("compilation cache %s cannot be created (%s): compiling every run", where, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.debug("XLA compilation cache: %s", where)
    return where
