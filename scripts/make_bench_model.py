"""Write an HF-format MoE checkpoint with random weights at a benchmark size, and convert it.

Real checkpoints cannot be downloaded on the project's machines, and throughput depends on the
shapes, not on the values, so `klotski bench` runs on random weights of the right dimensions.
A preset is a family's base config.json (Mixtral, DeepSeek-V2, DeepSeek-V3) plus its sizes. The
tensors, their HF names and their stored dtypes come from the same declarative key map the
converter reads (`klotski_jax.models.specs.weight_specs` through
`klotski_jax.checkpoints.default_model.hf_tensors`), so the converter accepts the result as is.
Weights are written one layer per safetensors shard (with `model.safetensors.index.json`), so
peak memory stays near one layer even for Mixtral-8x7B shapes. No tokenizer: bench with token-id
prompts (its default).

Random weights follow HF's init where it matters for the run: N(0, 0.02) matrices, RMSNorm
weights 1, biases 0, except DeepSeek-V3's router correction bias (`e_score_correction_bias`),
N(0, 0.01) so that the noaux_tc choice (scores + bias) differs from the plain top-k as in a
trained model. The router weight and that bias are float32, as in HF's DeepSeek checkpoints;
everything else is in the preset's dtype (bf16).

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
  deepseek-v2-lite  DeepSeek-V2-Lite's layer shapes (hidden 2048, 16 heads, latent attention
                without q_lora: kv_lora 512, qk_nope 128, qk_rope 64, v_head 128; 64 routed
                experts of 1408, top-6 greedy softmax, 2 shared experts; a dense first layer of
                10944; vocab 102400; its yarn RoPE), 4 layers (1 dense + 3 MoE): 4.5 GB in
                bf16, an expert 17 MB (the real model has 27 layers, 31 GB).
  deepseek-mini DeepSeek-V3's architecture at CPU size: hidden 512, 8 heads, latent attention
                with q_lora 192 (kv_lora 128, qk_nope 64, qk_rope 32, v_head 64), V3's yarn
                RoPE (factor 40, mscale 1), V3's router (sigmoid scores, noaux_tc over 8 groups
                of which 4 compete, correction bias, renormalised, routed scaling 2.5),
                64 routed experts of 448, top-8, 1 shared, a dense first layer of 2048,
                vocab 8192, 11 layers (1 dense + 10 MoE): 0.94 GB in bf16, an expert 1.4 MB.
                Ten MoE layers so that a quarter of the model holds two of them (88 MB each),
                flexgen's minimum; a full `klotski bench` at 25% with --cold-disk runs in
                minutes on 2 cores (scripts/bench_deepseek.sh).

Usage:
  .venv/bin/python scripts/make_bench_model.py cpu-mid /tmp/cpu-mid-hf --convert /tmp/cpu-mid
  .venv/bin/python scripts/make_bench_model.py mixtral-8x7b /data/m87-hf --layers 2 --convert /data/m87
  .venv/bin/python scripts/make_bench_model.py deepseek-mini /tmp/dsm-hf --convert /tmp/dsm
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

# Family base configs: what a preset does not set. Keys as transformers 5 writes them.
_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
            "num_experts_per_tok": 2, "num_local_experts": 8, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
            "max_position_embeddings": 32768, "sliding_window": None, "attention_dropout": 0.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "initializer_range": 0.02, "router_jitter_noise": 0.0,
            "router_aux_loss_coef": 0.02, "output_router_logits": False, "use_cache": True,
            "dtype": "bfloat16"}
# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite) in transformers 5's names.
_DEEPSEEK_V2 = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
                "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1,
                "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512,
                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
                "rms_norm_eps": 1e-6, "vocab_size": 102400, "max_position_embeddings": 163840,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 0.707, "mscale_all_dim": 0.707,
                                 "original_max_position_embeddings": 4096},
                "attention_bias": False, "attention_dropout": 0.0,
                "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
                "pad_token_id": None, "initializer_range": 0.02, "use_cache": True,
                "dtype": "bfloat16"}
# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3) in transformers 5's names; presets
# override the sizes.
_DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                "num_attention_heads": 128, "num_key_value_heads": 128,
                "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1,
                "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536,
                "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
                "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "vocab_size": 129280,
                "max_position_embeddings": 163840, "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096},
                "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
                "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
                "pad_token_id": None, "initializer_range": 0.02, "use_cache": True,
                "dtype": "bfloat16"}
BASES: dict[str, dict[str, Any]] = {"mixtral": _MIXTRAL, "deepseek_v2": _DEEPSEEK_V2,
                                    "deepseek_v3": _DEEPSEEK_V3}

# preset -> (base, its overrides of the base)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": ("mixtral", {"hidden_size": 4096, "intermediate_size": 14336,
                                 "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "head_dim": 128, "vocab_size": 32000, "num_hidden_layers": 4}),
    "cpu-mid": ("mixtral", {"hidden_size": 1024, "intermediate_size": 1792,
                            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
                            "vocab_size": 8192, "num_hidden_layers": 12}),
    "mid16": ("mixtral", {"hidden_size": 512, "intermediate_size": 1792,
                          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                          "vocab_size": 8000, "num_hidden_layers": 16}),
    "tiny": ("mixtral", {"hidden_size": 256, "intermediate_size": 448, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 2048,
                         "num_hidden_layers": 4}),
    "deepseek-v2-lite": ("deepseek_v2", {"num_hidden_layers": 4}),
    "deepseek-mini": ("deepseek_v3", {"hidden_size": 512, "intermediate_size": 2048,
                                      "moe_intermediate_size": 448, "num_attention_heads": 8,
                                      "num_key_value_heads": 8, "n_routed_experts": 64,
                                      "num_experts_per_tok": 8, "n_shared_experts": 1,
                                      "first_k_dense_replace": 1, "q_lora_rank": 192,
                                      "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                                      "qk_rope_head_dim": 32, "v_head_dim": 64, "n_group": 8,
                                      "topk_group": 4, "vocab_size": 8192,
                                      "num_hidden_layers": 11}),
}


def hf_config(preset: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a preset (with `layers` decoder layers if given)."""
    base, sizes = PRESETS[preset]
    cfg = {**BASES[base], **sizes}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


Tensor = tuple[str, tuple[int, ...], str]  # HF key, shape, stored dtype


def shards(hf: dict[str, Any]) -> dict[str, list[Tensor]]:
    """Shard file name -> [(HF key, shape, dtype)]: the globals, then one shard per decoder
    layer. The dtype is the converter's stored dtype (float32 for DeepSeek's router)."""
    from klotski_jax.checkpoints.default_model import hf_tensors
    from klotski_jax.config import ModelConfig
    from klotski_jax.models.families import TensorSource, hf_sources
    from klotski_jax.models.specs import Kind, weight_specs

    cfg = ModelConfig.from_hf_config(hf)
    sources = hf_sources(cfg)
    dtypes = {}
    for spec in weight_specs(cfg):
        src = sources[spec.name]
        if spec.kind is Kind.DENSE and isinstance(src, TensorSource):
            dtypes[src.key] = spec.stored_dtype(cfg)
    n = cfg.num_layers + 1
    out: dict[str, list[Tensor]] = {}
    for key, shape in hf_tensors(cfg):
        parts = key.split(".")
        index = int(parts[2]) + 1 if parts[:2] == ["model", "layers"] else 0
        out.setdefault(f"model-{index + 1:05d}-of-{n:05d}.safetensors", []).append(
            (key, shape, dtypes.get(key, cfg.dtype)))
    return dict(sorted(out.items()))


def _init(rng: np.random.Generator, key: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Norm weights are ones, biases zeros, like HF's init; DeepSeek's router correction bias
    small random values (a trained model's is not zero, and it steers the choice); everything
    else N(0, std)."""
    if key.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    if key.endswith("e_score_correction_bias"):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    if key.endswith(".bias"):
        return np.zeros(shape, np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def write_checkpoint(out_dir: pathlib.Path, hf: dict[str, Any], seed: int = 0) -> int:
    """Write config, generation config, shards and index into out_dir; returns the weight bytes."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}) + "\n")
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in shards(hf).items():
        arrays = {k: _init(rng, k, s, hf["initializer_range"]).astype(_np_dtype(dt))
                  for k, s, dt in tensors}
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
    return sum(int(np.prod(s)) * _np_dtype(dt).itemsize
               for t in shards(hf).values() for _, s, dt in t)


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
