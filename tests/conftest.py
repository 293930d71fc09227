"""Test-wide setup: JAX on CPU with exact float32 matmuls, a persistent compile cache, and
`tests/` on sys.path so helpers such as `hf_models` import by name.

The environment is set before JAX is imported anywhere, so plain `pytest` gets the same setup as
`make test`. `JAX_PLATFORMS` is only defaulted: an explicit `JAX_PLATFORMS=cuda` still runs the
suite on an accelerator.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

_TESTS = pathlib.Path(__file__).resolve().parent
_ROOT = _TESTS.parent

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Profiles (which make the engine's planner choose n) come from a folder of this session only,
# never from the user's cache: runs without --groups stay deterministic.
if "KLOTSKI_JAX_PROFILES" not in os.environ:
    os.environ["KLOTSKI_JAX_PROFILES"] = tempfile.mkdtemp(prefix="klotski-profiles-")
    atexit.register(shutil.rmtree, os.environ["KLOTSKI_JAX_PROFILES"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import jax  # noqa: E402  (after the environment above)

# Parity with HF torch float32 needs true float32 matmuls (no bf16 passes / TF32).
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
