"""Every weight array of a model, declared once.

`weight_specs(cfg)` lists each array with its flat name, shape (HF (out, in) orientation) and kind.
Conversion checks, the on-disk store schema, random init for tests and the shape tests all derive
from this list, so a new quirk is added in exactly one place. A flat name is the array's NNX
module path joined with "." (models/modules.py; a test checks the two agree). Plain Python:
the planning side imports it without JAX.

Flat names (i = layer index):
  embed [V, D]; final_norm [D]; lm_head [V, D] (untied only)
  layers.i.attn_norm [D]; layers.i.mlp_norm [D]
  layers.i.attn.{q [Hq*hd, D], k [Hkv*hd, D], v [Hkv*hd, D], o [D, Hq*hd]}
  layers.i.attn.{q_bias, k_bias, v_bias, o_bias}          (when the family has them)
  layers.i.attn.{q_norm, k_norm} [hd] or [Hq*hd]/[Hkv*hd] (Qwen3 per head / OLMoE full)
  multi-head latent attention instead (DeepSeek; hd = nope + rope, L = kv_lora_rank):
  layers.i.attn.{q [H*hd, D] | q_a [Q, D], q_a_norm [Q], q_b [H*hd, Q]}  (Q = q_lora_rank)
  layers.i.attn.{kv_a [L + rope, D], kv_a_norm [L], kv_b [H*(nope + v), L], o [D, H*v]}
  layers.i.attn.{q_a_bias, kv_a_bias, o_bias}             (HF attention_bias)
  layers.i.moe.router.weight [E, D]                        (MoE layers; float32 for DeepSeek/GLM)
  layers.i.moe.router.bias [E]                             (e_score_correction_bias, float32)
  layers.i.moe.shared.{gate, up [Is, D], down [D, Is]}     (shared experts; Qwen2-MoE adds
                                                             its sigmoid gate_logit [1, D])
  layers.i.moe.experts.{gate, up [E, I, D], down [E, D, I]} (kind "expert": one chunk per expert)
    quantized experts (cfg.expert_quant) store each part as arrays `<part>.q`, `<part>.scale`
    and (int4) `<part>.zero` instead: `expert_leaves` below, models/quant.py
  layers.i.mlp.{gate, up [Id, D], down [D, Id]}            (dense layers)
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from klotski_jax.config import Attn, ModelConfig, QKNorm, dtype_itemsize, quant_leaves


class Kind(enum.StrEnum):
    DENSE = "dense"  # small, loaded whole (attention, norms, router, embeddings, dense MLPs)
    EXPERT = "expert"  # [E, out, in], read one expert at a time


EXPERT_PARTS: tuple[str, ...] = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int | None = None
    dtype: str | None = None  # None: the config's dtype (every array but quantized experts')

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def stored_dtype(self, cfg: ModelConfig) -> str:
        return self.dtype or cfg.dtype

    def nbytes(self, cfg: ModelConfig) -> int:
        return self.size * dtype_itemsize(self.stored_dtype(cfg))


def expert_part_shape(cfg: ModelConfig, part: str) -> tuple[int, int]:
    """(out, in) of one expert's projection `part` in HF orientation."""
    d, i = cfg.hidden_size, cfg.expert_intermediate_size
    return (d, i) if part == "down" else (i, d)


@dataclasses.dataclass(frozen=True)
class ExpertLeaf:
    """One stored array of one expert: `name` is "gate" (unquantized) or "gate.q",
    "gate.scale", "gate.zero" (quantized); its path in the expert's NNX state."""

    name: str
    part: str
    shape: tuple[int, int]
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * dtype_itemsize(self.dtype)


def expert_leaves(cfg: ModelConfig) -> tuple[ExpertLeaf, ...]:
    """Every array one routed expert is stored and streamed as, in a fixed order (the order of
    its chunk reads and of its staging buffer)."""
    out = []
    for part in EXPERT_PARTS:
        for suffix, shape, dtype in quant_leaves(cfg.expert_quant, cfg.expert_group_size,
                                                 *expert_part_shape(cfg, part), cfg.dtype):
            out.append(ExpertLeaf(f"{part}.{suffix}" if suffix else part, part, shape, dtype))
    return tuple(out)


def _attention_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    d = cfg.hidden_size
    if cfg.attention is Attn.MLA:
        h, ql, kvl = cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        specs: list[tuple[str, tuple[int, ...]]] = (
            [("attn.q_a", (ql, d)), ("attn.q_a_norm", (ql,)), ("attn.q_b", (cfg.q_size, ql))]
            if ql else [("attn.q", (cfg.q_size, d))])
        specs += [("attn.kv_a", (kvl + cfg.qk_rope_head_dim, d)), ("attn.kv_a_norm", (kvl,)),
                  ("attn.kv_b", (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), kvl)),
                  ("attn.o", (d, cfg.o_size))]
        if cfg.mla_bias:
            specs += ([("attn.q_a_bias", (ql,))] if ql else []) + [
                ("attn.kv_a_bias", (kvl + cfg.qk_rope_head_dim,)), ("attn.o_bias", (d,))]
        return specs
    specs = [("attn.q", (cfg.q_size, d)), ("attn.k", (cfg.kv_size, d)),
             ("attn.v", (cfg.kv_size, d)), ("attn.o", (d, cfg.o_size))]
    if cfg.qkv_bias:
        specs += [("attn.q_bias", (cfg.q_size,)), ("attn.k_bias", (cfg.kv_size,)),
                  ("attn.v_bias", (cfg.kv_size,))]
    if cfg.o_bias:
        specs.append(("attn.o_bias", (d,)))
    if cfg.qk_norm is QKNorm.HEAD:
        specs += [("attn.q_norm", (cfg.head_dim,)), ("attn.k_norm", (cfg.head_dim,))]
    elif cfg.qk_norm is QKNorm.FULL:
        specs += [("attn.q_norm", (cfg.q_size,)), ("attn.k_norm", (cfg.kv_size,))]
    return specs


def layer_specs(cfg: ModelConfig, i: int) -> list[ArraySpec]:
    """The arrays of decoder layer `i`."""
    d, p = cfg.hidden_size, f"layers.{i}."
    specs = [("attn_norm", (d,)), ("mlp_norm", (d,)), *_attention_specs(cfg)]
    out = [ArraySpec(p + n, s, Kind.DENSE, i) for n, s in specs]
    if cfg.moe_layers[i]:
        router_dtype = "float32" if cfg.router_fp32 and cfg.dtype != "float32" else None
        out.append(ArraySpec(p + "moe.router.weight", (cfg.num_experts, d), Kind.DENSE, i,
                             router_dtype))
        if cfg.router_bias:
            out.append(ArraySpec(p + "moe.router.bias", (cfg.num_experts,), Kind.DENSE, i,
                                 router_dtype))
        if cfg.shared_expert_intermediate_size:
            s = cfg.shared_expert_intermediate_size
            out += [ArraySpec(p + "moe.shared.gate", (s, d), Kind.DENSE, i),
                    ArraySpec(p + "moe.shared.up", (s, d), Kind.DENSE, i),
                    ArraySpec(p + "moe.shared.down", (d, s), Kind.DENSE, i)]
            if cfg.shared_expert_gate:
                out.append(ArraySpec(p + "moe.shared.gate_logit", (1, d), Kind.DENSE, i))
        out += [ArraySpec(p + f"moe.experts.{leaf.name}", (cfg.num_experts, *leaf.shape),
                          Kind.EXPERT, i, None if leaf.dtype == cfg.dtype else leaf.dtype)
                for leaf in expert_leaves(cfg)]
    else:
        m = cfg.dense_intermediate_size
        out += [ArraySpec(p + "mlp.gate", (m, d), Kind.DENSE, i),
                ArraySpec(p + "mlp.up", (m, d), Kind.DENSE, i),
                ArraySpec(p + "mlp.down", (d, m), Kind.DENSE, i)]
    return out


def weight_specs(cfg: ModelConfig) -> list[ArraySpec]:
    """All arrays of the model, in a stable order (embedding, layers, head)."""
    specs = [ArraySpec("embed", (cfg.vocab_size, cfg.hidden_size), Kind.DENSE)]
    for i in range(cfg.num_layers):
        specs += layer_specs(cfg, i)
    specs.append(ArraySpec("final_norm", (cfg.hidden_size,), Kind.DENSE))
    if not cfg.tie_word_embeddings:
        specs.append(ArraySpec("lm_head", (cfg.vocab_size, cfg.hidden_size), Kind.DENSE))
    return specs


def total_bytes(cfg: ModelConfig, kind: Kind | None = None) -> int:
    """Bytes of all weights (or of one kind) as stored (quantized experts at their size)."""
    return sum(s.nbytes(cfg) for s in weight_specs(cfg) if kind is None or s.kind is kind)


def expert_name(layer: int, part: str) -> str:
    """The flat name of layer `layer`'s stacked routed-expert array `part` (an `ExpertLeaf`
    name: gate/up/down, or e.g. gate.q in a quantized store)."""
    return f"layers.{layer}.moe.experts.{part}"


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"layers.0.attn.q": x} -> {"layers": {"0": {"attn": {"q": x}}}} (keys split on ".")."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name!r}: {p!r} is both an array and a group")
        if leaf in node:
            raise ValueError(f"{name!r}: duplicate or both an array and a group")
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nest`: nested dicts -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
