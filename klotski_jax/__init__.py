"""klotski-jax: expert-aware multi-batch pipeline inference for MoE models on JAX.

Public API (imported lazily so `import klotski_jax` stays cheap):
  convert(hf_dir, out_dir, *, dtype=None, overwrite=False) -> pathlib.Path
  load(ckpt_dir) -> Model            (the all-experts-resident reference model)
  ModelConfig                        (frozen model description)
"""

from __future__ import annotations

from typing import Any

from klotski_jax.config import ModelConfig

__version__ = "0.1.0"

_LAZY = {
    "convert": ("klotski_jax.checkpoints.convert", "convert"),
    "ConversionError": ("klotski_jax.checkpoints.errors", "ConversionError"),
    "load": ("klotski_jax.checkpoints.loader", "load"),
    "Model": ("klotski_jax.models.reference", "Model"),
}

__all__ = ["ModelConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'klotski_jax' has no attribute {name!r}")
