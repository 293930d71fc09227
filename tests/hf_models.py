"""Tiny random HF MoE models built offline from configs, for parity and conversion tests.

Every test that needs an HF checkpoint goes through `save_hf_model`, so the families and their
config variations are declared once (here) and reused across test files.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from typing import Any

import ml_dtypes
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

# name -> (config class, model class, kwargs). Small enough that a forward pass takes milliseconds.
_BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Mixtral: GQA 2:1, top-2 of 4 experts.
    "mixtral": ("mixtral", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # Mixtral: MHA, odd expert count, top-3, sliding window, head_dim != hidden/heads, tied.
    "mixtral-odd": ("mixtral", dict(intermediate_size=40, num_local_experts=5,
                                    num_experts_per_tok=3, num_key_value_heads=4, head_dim=12,
                                    sliding_window=5, tie_word_embeddings=True)),
    # Qwen2-MoE: biases, shared expert, a dense layer, top-1, GQA 4:1.
    "qwen2_moe": ("qwen2_moe", dict(intermediate_size=56, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, num_experts=6,
                                    num_experts_per_tok=1, num_key_value_heads=1,
                                    mlp_only_layers=[1], norm_topk_prob=False)),
    # Qwen2-MoE: decoder_sparse_step=2 (every other layer dense), norm_topk_prob, top-3 of 7.
    "qwen2_moe-sparse-step": ("qwen2_moe", dict(intermediate_size=56, moe_intermediate_size=24,
                                                shared_expert_intermediate_size=32, num_experts=7,
                                                num_experts_per_tok=3, decoder_sparse_step=2,
                                                norm_topk_prob=True, num_hidden_layers=4)),
    # Qwen3-MoE: per-head q/k norm, head_dim independent of hidden/heads, dense layer 0.
    "qwen3_moe": ("qwen3_moe", dict(intermediate_size=64, moe_intermediate_size=24,
                                    num_experts=8, num_experts_per_tok=2, head_dim=16,
                                    mlp_only_layers=[0], norm_topk_prob=True)),
    # Qwen3-MoE: no renormalisation, odd experts, top-3.
    "qwen3_moe-odd": ("qwen3_moe", dict(intermediate_size=64, moe_intermediate_size=20,
                                        num_experts=5, num_experts_per_tok=3, head_dim=6,
                                        norm_topk_prob=False)),
    # OLMoE: full q/k norm, no renormalisation, top-2 of 6.
    "olmoe": ("olmoe", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                            norm_topk_prob=False)),
    # OLMoE: clip_qkv, renormalised, MHA.
    "olmoe-clip": ("olmoe", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=True, clip_qkv=0.5, num_key_value_heads=4)),
    # Qwen3-MoE with yarn RoPE (long-context configs): factor 4 over a 64-token original.
    "qwen3_moe-yarn": ("qwen3_moe", dict(intermediate_size=64, moe_intermediate_size=24,
                                         num_experts=4, num_experts_per_tok=2, head_dim=16,
                                         norm_topk_prob=True, rope_parameters=dict(
                                             rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=64))),
    # DeepSeek-V2-Lite shape: latent attention without q_lora, greedy softmax routing (no
    # renormalisation), 2 shared experts, one dense first layer, interleaved RoPE.
    "deepseek_v2": ("deepseek_v2", dict(intermediate_size=40, moe_intermediate_size=12,
                                        n_routed_experts=8, num_experts_per_tok=3,
                                        n_shared_experts=2, first_k_dense_replace=1,
                                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=12,
                                        num_key_value_heads=4, topk_method="greedy",
                                        routed_scaling_factor=1.0)),
    # DeepSeek-V2: q_lora, group-limited routing (2 of 4 groups), scaling, attention biases.
    "deepseek_v2-group": ("deepseek_v2", dict(intermediate_size=40, moe_intermediate_size=12,
                                              n_routed_experts=8, num_experts_per_tok=2,
                                              n_shared_experts=1, first_k_dense_replace=0,
                                              q_lora_rank=12, kv_lora_rank=16,
                                              qk_rope_head_dim=4, qk_nope_head_dim=12,
                                              v_head_dim=8, num_key_value_heads=4,
                                              topk_method="group_limited_greedy", n_group=4,
                                              topk_group=2, routed_scaling_factor=2.0,
                                              attention_bias=True)),
    # DeepSeek-V3: q_lora, sigmoid noaux_tc routing with correction bias, renormalised and
    # scaled, a dense first layer, yarn with mscale / mscale_all_dim (softmax scale too).
    "deepseek_v3": ("deepseek_v3", dict(intermediate_size=40, moe_intermediate_size=12,
                                        n_routed_experts=8, num_experts_per_tok=3,
                                        n_shared_experts=1, first_k_dense_replace=1,
                                        q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=12, n_group=4,
                                        topk_group=2, routed_scaling_factor=2.5,
                                        norm_topk_prob=True, num_key_value_heads=4,
                                        rope_parameters=dict(
                                            rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                            original_max_position_embeddings=64, mscale=1.0,
                                            mscale_all_dim=0.8, beta_fast=32, beta_slow=1))),
    # DeepSeek-V3: no q_lora, non-interleaved RoPE, no renormalisation, tied, one group.
    "deepseek_v3-plain": ("deepseek_v3", dict(intermediate_size=40, moe_intermediate_size=12,
                                              n_routed_experts=6, num_experts_per_tok=2,
                                              n_shared_experts=1, first_k_dense_replace=0,
                                              q_lora_rank=None, kv_lora_rank=8,
                                              qk_rope_head_dim=4, qk_nope_head_dim=4,
                                              v_head_dim=8, n_group=1, topk_group=1,
                                              norm_topk_prob=False, rope_interleave=False,
                                              num_key_value_heads=4, tie_word_embeddings=True)),
    # GLM-4.5-MoE: GQA with half rotary, q/k norm, q/k/v biases, V3's router, a dense layer.
    "glm4_moe": ("glm4_moe", dict(intermediate_size=40, moe_intermediate_size=12,
                                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=1, head_dim=16, n_group=2, topk_group=1,
                                  routed_scaling_factor=1.5, norm_topk_prob=True,
                                  use_qk_norm=True, attention_bias=True)),
}

_CLASSES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM),
}


def make_hf_model(name: str, *, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A random HF model of config `name` (a key of CONFIGS), float32, eval mode."""
    family, kwargs = CONFIGS[name]
    config_cls, model_cls = _CLASSES[family]
    config = config_cls(**{**_BASE, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF's init leaves norms at exactly 1 and biases at 0; perturb them so the parity tests
    # would notice a norm or bias applied in the wrong place.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        for bname, buf in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # the router's correction bias
                buf.add_(0.1 * torch.randn_like(buf))
    return model


def save_hf_model(name: str, out_dir: pathlib.Path, *, seed: int = 0,
                  max_shard_size: str | None = None, **overrides: Any
                  ) -> tuple[transformers.PreTrainedModel, pathlib.Path]:
    """Build `name` and save it as an HF checkpoint (one file, or sharded with max_shard_size)."""
    model = make_hf_model(name, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model, pathlib.Path(out_dir)


def save_fused_hf_model(model: transformers.PreTrainedModel, path: pathlib.Path,
                        keep_tied_head: bool = False) -> pathlib.Path:
    """The in-memory transformers 5 state dict (fused experts: `experts.gate_up_proj`
    [E, 2I, D], `experts.down_proj` [E, D, I]) as one safetensors file with its config.json."""
    path.mkdir()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and not keep_tied_head:
        del sd["lm_head.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(path / "config.json")
    return path


# ---- block-scaled FP8 checkpoints, as DeepSeek-V3 / Qwen3-FP8 releases store them ----------------
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# Linear weights that FP8 releases keep in bf16: embeddings, the head, routers (`mlp.gate`,
# Mixtral's `block_sparse_moe.gate`) and Qwen2-MoE's shared-expert gate; norms are 1-D anyway.
_KEEP_FLOAT = re.compile(r"(embed_tokens|lm_head|\.gate|shared_expert_gate|norm)\.weight$")


def load_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as NumPy (float8 and bfloat16 as ml_dtypes arrays,
    which `safetensors.numpy.load_file` cannot give), read through safetensors' torch loader."""
    from safetensors.torch import load_file as load_torch

    views = {torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
             torch.bfloat16: (torch.uint16, ml_dtypes.bfloat16)}
    out = {}
    for key, t in load_torch(str(path)).items():
        if t.dtype in views:
            raw, dt = views[t.dtype]
            out[key] = t.view(raw).numpy().view(dt)
        else:
            out[key] = t.numpy()
    return out


def fp8_quantize_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """w [..., out, in] -> (float8_e4m3fn [..., out, in], float32 scale_inv [..., ceil(out/B0),
    ceil(in/B1)]) with scale_inv = amax / 448 per block (a partial last block where B does not
    divide), as the releases do; written here from the format's definition, independently of
    the converter's quantizer."""
    *lead, out, inp = w.shape
    b0, b1 = block
    rows, cols = -(-out // b0), -(-inp // b1)
    scale = np.zeros((*lead, rows, cols), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = np.asarray(w[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1], np.float32)
            amax = np.abs(tile).max(axis=(-2, -1), keepdims=True)
            s = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
            q[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = np.clip(
                tile / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
            scale[..., i, j] = s[..., 0, 0]
    return q, scale


def fp8_dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]
                          ) -> np.ndarray:
    """float32(q) * scale_inv over each block: the weights an FP8 checkpoint means."""
    *_, out, inp = q.shape
    s = np.repeat(np.repeat(scale, block[0], axis=-2)[..., :out, :], block[1], axis=-1)
    return q.astype(np.float32) * s[..., :inp]


def is_fp8_linear(key: str, shape: tuple[int, ...]) -> bool:
    """Whether an FP8 release stores HF tensor `key` in fp8: every Linear weight of attention,
    dense MLPs, shared and routed experts (per expert `.weight`, or the fused 3-D
    `experts.gate_up_proj` / `experts.down_proj`), not embeddings, head, routers or norms."""
    if len(shape) == 3:
        return key.endswith(("experts.gate_up_proj", "experts.down_proj"))
    return len(shape) == 2 and key.endswith(".weight") and not _KEEP_FLOAT.search(key)


def fp8_checkpoint(src: pathlib.Path, out: pathlib.Path, block: tuple[int, int] = (128, 128),
                   *, dtype: str | None = None, quantization_config: dict[str, Any] | None = None
                   ) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """Turn the HF checkpoint in `src` (`save_hf_model`, single file or sharded, or
    `save_fused_hf_model`) into a block-scaled FP8 one in `out`, the way FP8 releases look:
    every `is_fp8_linear` tensor `X` becomes F8_E4M3 with a float32 companion (`X.weight` ->
    `X.weight_scale_inv`, a fused `X` -> `X_scale_inv`, transformers' names) in the same shard,
    and config.json gets `quantization_config` (quant_method fp8, fmt e4m3, dynamic
    activations, weight_block_size `block`; `quantization_config` replaces it whole) and
    `dtype` if given. Works for any family: it goes by tensor names.

    Returns (out, the weights it means: every tensor of `src` by name, fp8 ones dequantized in
    float32), for an HF model or a float checkpoint that holds exactly those weights."""
    out.mkdir(parents=True)
    index = src / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
              if index.exists() else ["model.safetensors"])
    weights: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors = load_file(str(src / shard))
        stored: dict[str, np.ndarray] = {}
        for key, w in tensors.items():
            if is_fp8_linear(key, w.shape):
                q, scale = fp8_quantize_blocks(w, block)
                stored[key], stored[key + "_scale_inv"] = q, scale
                weights[key] = fp8_dequantize_blocks(q, scale, block)
            else:
                stored[key] = w
                weights[key] = w
        save_file(stored, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(stored, shard))
    if index.exists():
        (out / index.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != index.name:
            shutil.copyfile(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config or {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)}
    if dtype is not None:
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, weights


def float_checkpoint(src: pathlib.Path, out: pathlib.Path, weights: dict[str, np.ndarray]
                     ) -> pathlib.Path:
    """An HF float32 checkpoint in `out` holding `weights` (by HF name, e.g. what
    `fp8_checkpoint` returns), with `src`'s config.json minus its quantization_config: what
    `transformers.AutoModelForCausalLM.from_pretrained` loads as the reference."""
    out.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
