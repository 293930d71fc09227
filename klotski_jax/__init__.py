"""klotski-jax: expert-aware multi-batch pipeline inference for MoE models on JAX.

Public API (imported lazily so `import klotski_jax` stays cheap):
  convert(hf_dir, out_dir, *, dtype=None, overwrite=False) -> pathlib.Path
  load(ckpt_dir) -> Model            (the all-experts-resident reference model)
  ModelConfig                        (frozen model description)
  Engine(ckpt_dir, policy=Policy(...)).generate(prompts, max_new_tokens=...) -> Generation
                                     (the pipeline: weights streamed under memory budgets)
  Policy, Schedule, parse_size       (schedule, budgets, groups, ablations; '2GiB' / '30%' sizes)
  use_compilation_cache()            (persistent XLA compile cache, as the klotski command uses)
"""

from __future__ import annotations

from typing import Any

from klotski_jax.config import ModelConfig
from klotski_jax.constants import __version__

_LAZY = {
    "convert": ("klotski_jax.checkpoints.convert", "convert"),
    "ConversionError": ("klotski_jax.checkpoints.errors", "ConversionError"),
    "load": ("klotski_jax.checkpoints.loader", "load"),
    "Model": ("klotski_jax.models.reference", "Model"),
    "Engine": ("klotski_jax.engine", "Engine"),
    "Generation": ("klotski_jax.engine", "Generation"),
    "Policy": ("klotski_jax.planning.policy", "Policy"),
    "PolicyError": ("klotski_jax.planning.policy", "PolicyError"),
    "Schedule": ("klotski_jax.planning.policy", "Schedule"),
    "parse_size": ("klotski_jax.planning.policy", "parse_size"),
    "RunStats": ("klotski_jax.runtime.trace", "RunStats"),
    "Tracer": ("klotski_jax.runtime.trace", "Tracer"),
    "use_compilation_cache": ("klotski_jax.runtime.compile_cache", "use_compilation_cache"),
}

__all__ = ["ModelConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'klotski_jax' has no attribute {name!r}")
