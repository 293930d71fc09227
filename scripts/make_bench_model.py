"""Write an HF-format Mixtral checkpoint with random weights at a benchmark size, and convert it.

Real checkpoints cannot be downloaded on the project's machines, and throughput depends on the
shapes, not on the values, so `klotski bench` runs on random weights of the right dimensions.
The tensors and their HF names come from the same declarative key map the converter reads
(`klotski_jax.checkpoints.default_model.hf_tensors`), so the converter accepts the result as is.
Weights are written one layer per safetensors shard (with `model.safetensors.index.json`), so
peak memory stays near one layer even for Mixtral-8x7B shapes. No tokenizer: bench with token-id
prompts (its default).

Presets (`--layers` overrides the layer count):
  mixtral-8x7b  Mixtral-8x7B's layer shapes (hidden 4096, 8 experts of 14336, 32/8 heads,
                vocab 32000), 4 layers: 11.6 GB in bf16. For GPU VMs (64 GB disk).
  cpu-mid       hidden 1024, 8 experts of 1792 (Mixtral's 3.5x ratio), 16/4 heads, vocab 8192,
                12 layers: 1.16 GB in bf16, an expert 11 MB. A quarter of it holds three layers,
                as 24 GB holds several of Mixtral-8x7B's layers; a full `klotski bench` of it
                finishes in minutes on a 2-core machine.
  mid16         hidden 512, 8 experts of 1792, 8/2 heads, vocab 8000, 16 layers: 0.75 GB in
                bf16, an expert 5.5 MB. A shape no test or default was tuned on: the dominance
                matrix of the benchmarks runs on it beside cpu-mid.
  tiny          hidden 256, 8 experts of 448, 4 layers: 30 MB, for smoke tests.

Usage:
  .venv/bin/python scripts/make_bench_model.py cpu-mid /tmp/cpu-mid-hf --convert /tmp/cpu-mid
  .venv/bin/python scripts/make_bench_model.py mixtral-8x7b /data/m87-hf --layers 2 --convert /data/m87
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger("make_bench_model")

_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
            "num_experts_per_tok": 2, "num_local_experts": 8, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
            "max_position_embeddings": 32768, "sliding_window": None, "attention_dropout": 0.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "initializer_range": 0.02, "router_jitter_noise": 0.0,
            "router_aux_loss_coef": 0.02, "output_router_logits": False, "use_cache": True,
            "dtype": "bfloat16"}

PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
                     "num_hidden_layers": 4},
    "cpu-mid": {"hidden_size": 1024, "intermediate_size": 1792, "num_attention_heads": 16,
                "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192,
                "num_hidden_layers": 12},
    "mid16": {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8000,
              "num_hidden_layers": 16},
    "tiny": {"hidden_size": 256, "intermediate_size": 448, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 2048,
             "num_hidden_layers": 4},
}


def hf_config(preset: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a preset (with `layers` decoder layers if given)."""
    cfg = {**_MIXTRAL, **PRESETS[preset]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def shards(hf: dict[str, Any]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Shard file name -> [(HF key, shape)]: the globals, then one shard per decoder layer."""
    from klotski_jax.checkpoints.default_model import hf_tensors
    from klotski_jax.config import ModelConfig

    cfg = ModelConfig.from_hf_config(hf)
    n = cfg.num_layers + 1
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, shape in hf_tensors(cfg):
        parts = key.split(".")
        index = int(parts[2]) + 1 if parts[:2] == ["model", "layers"] else 0
        out.setdefault(f"model-{index + 1:05d}-of-{n:05d}.safetensors", []).append((key, shape))
    return dict(sorted(out.items()))


def _init(rng: np.random.Generator, key: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Norm weights are ones; everything else N(0, std), like HF's init."""
    if key.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def write_checkpoint(out_dir: pathlib.Path, hf: dict[str, Any], seed: int = 0) -> int:
    """Write config, generation config, shards and index into out_dir; returns the weight bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True)
    dtype = np.dtype(ml_dtypes.bfloat16) if hf["dtype"] == "bfloat16" else np.dtype(hf["dtype"])
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}) + "\n")
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in shards(hf).items():
        arrays = {k: _init(rng, k, s, hf["initializer_range"]).astype(dtype) for k, s in tensors}
        save_file(arrays, str(out_dir / name), metadata={"format": "pt"})
        os.chmod(out_dir / name, 0o644)
        total += sum(a.nbytes for a in arrays.values())
        weight_map |= dict.fromkeys(arrays, name)
        log.info("wrote %s (%d tensors)", name, len(arrays))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return total


def weight_bytes(hf: dict[str, Any]) -> int:
    """Bytes of all weights of an HF config (what the disk check needs)."""
    itemsize = 2 if hf["dtype"] in ("bfloat16", "float16") else 4
    return sum(int(np.prod(s)) for t in shards(hf).values() for _, s in t) * itemsize


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: preset, output directory, layers, seed, --convert, --overwrite."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out_dir", type=pathlib.Path, help="HF checkpoint directory (must not exist)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convert", type=pathlib.Path, default=None, metavar="CKPT_DIR",
                   help="also convert it with klotski_jax.convert into CKPT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Write (and optionally convert) the checkpoint; 2 on a user error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    hf = hf_config(args.preset, args.layers)
    need = weight_bytes(hf) * (2 if args.convert else 1)
    free = shutil.disk_usage(args.out_dir.resolve().parent if args.out_dir.parent.exists()
                             else pathlib.Path.cwd()).free
    if need > 0.9 * free:
        print(f"error: needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free",
              file=sys.stderr)
        return 2
    for d in (args.out_dir, args.convert):
        if d is not None and d.exists():
            if not args.overwrite:
                print(f"error: {d} exists (pass --overwrite)", file=sys.stderr)
                return 2
            shutil.rmtree(d)
    t0 = time.perf_counter()
    total = write_checkpoint(args.out_dir, hf, args.seed)
    print(f"wrote {args.preset} ({hf['num_hidden_layers']} layers, {total / 1e9:.2f} GB) to "
          f"{args.out_dir} in {time.perf_counter() - t0:.0f} s")
    if args.convert:
        import klotski_jax

        t0 = time.perf_counter()
        klotski_jax.convert(args.out_dir, args.convert, progress=True)
        print(f"converted to {args.convert} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
