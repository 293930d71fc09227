"""Per-family adapters: how each HF family names its tensors on disk.

The math is shared (models/layers.py); a family only declares its HF naming quirks here, as data.
`hf_sources(cfg)` maps every flat name of `specs.weight_specs(cfg)` to where it lives in an HF
checkpoint, so conversion is a declarative key map (house style, habit 4).
"""

from __future__ import annotations

import dataclasses

from klotski_jax.config import Family, ModelConfig
from klotski_jax.models.families.deepseek import DEEPSEEK
from klotski_jax.models.families.mixtral import MIXTRAL
from klotski_jax.models.families.olmoe import OLMOE
from klotski_jax.models.families.qwen_moe import QWEN2_MOE, QWEN3_MOE
from klotski_jax.models.specs import Kind, weight_specs


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """HF naming of one family. Templates use {i} for the layer and {e} for the expert."""

    moe_prefixes: tuple[str, ...]  # where the MoE block lives; the first is what HF writes
    expert_names: dict[str, str]  # our part ("gate"/"up"/"down") -> HF per-expert module name
    shared_name: str = "shared_expert"  # the shared expert(s) module under the MoE block


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A dense tensor stored under one HF key; `alternatives` are other keys it may be found
    under (e.g. Mixtral's router is `block_sparse_moe.gate` on disk, `mlp.gate` when written from
    a transformers 5 state dict), tried in order after `key`."""

    key: str
    alternatives: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.alternatives)


@dataclasses.dataclass(frozen=True)
class ExpertSource:
    """An expert array [E, out, in], stored either per expert or fused (transformers 5 layout).

    per_expert: one key template per expert ({e}), each tensor [out, in].
    fused: one tensor [E, rows, in]; `fused_half` 0/1 takes the first/second half of the rows
    (gate/up of `gate_up_proj`), None takes it whole (`down_proj`).
    """

    per_expert: tuple[str, ...]  # alternatives, tried in order
    fused: tuple[str, ...]
    fused_half: int | None


ADAPTERS: dict[Family, FamilyAdapter] = {
    f: FamilyAdapter(**a) for f, a in ((Family.MIXTRAL, MIXTRAL), (Family.QWEN2_MOE, QWEN2_MOE),
                                       (Family.QWEN3_MOE, QWEN3_MOE), (Family.OLMOE, OLMOE),
                                       (Family.DEEPSEEK_V2, DEEPSEEK),
                                       (Family.DEEPSEEK_V3, DEEPSEEK), (Family.GLM4_MOE, DEEPSEEK))
}

_ATTN = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
         "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias",
         "o_bias": "o_proj.bias", "q_norm": "q_norm.weight", "k_norm": "k_norm.weight",
         # multi-head latent attention (DeepSeek)
         "q_a": "q_a_proj.weight", "q_a_bias": "q_a_proj.bias", "q_a_norm": "q_a_layernorm.weight",
         "q_b": "q_b_proj.weight", "kv_a": "kv_a_proj_with_mqa.weight",
         "kv_a_bias": "kv_a_proj_with_mqa.bias", "kv_a_norm": "kv_a_layernorm.weight",
         "kv_b": "kv_b_proj.weight"}
_MLP = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}


def _dense_key(adapter: FamilyAdapter, name: str, moe: str) -> str:
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "final_norm":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, i, rest = name.split(".", 2)
    base = f"model.layers.{i}."
    group, _, leaf = rest.partition(".")
    if rest == "attn_norm":
        return base + "input_layernorm.weight"
    if rest == "mlp_norm":
        return base + "post_attention_layernorm.weight"
    if group == "attn":
        return base + "self_attn." + _ATTN[leaf]
    if rest == "moe.router.weight":
        return base + moe + ".gate.weight"
    if rest == "moe.router.bias":
        return base + moe + ".gate.e_score_correction_bias"
    if rest.startswith("moe.shared."):
        leaf = rest.rsplit(".", 1)[1]
        return base + moe + (".shared_expert_gate.weight" if leaf == "gate_logit"
                             else f".{adapter.shared_name}." + _MLP[leaf])
    if group == "mlp":
        return base + "mlp." + _MLP[leaf]
    raise KeyError(name)


def mtp_layer(cfg: ModelConfig, key: str) -> int | None:
    """The layer index of a multi-token-prediction tensor (`model.layers.{i}.*` with i at or
    past num_layers, as DeepSeek-V3 and GLM-4.5 checkpoints carry them), else None. Those layers
    only serve speculative decoding, which klotski-jax does not run."""
    if cfg.family not in (Family.DEEPSEEK_V3, Family.GLM4_MOE):
        return None
    parts = key.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        i = int(parts[2])
        return i if i >= cfg.num_layers else None
    return None


def hf_sources(cfg: ModelConfig) -> dict[str, TensorSource | ExpertSource]:
    """Where every array of `weight_specs(cfg)` is found in an HF checkpoint of cfg's family."""
    adapter = ADAPTERS[cfg.family]
    out: dict[str, TensorSource | ExpertSource] = {}
    for spec in weight_specs(cfg):
        if spec.kind is Kind.DENSE:
            keys = dict.fromkeys(_dense_key(adapter, spec.name, m) for m in adapter.moe_prefixes)
            first, *rest = keys
            out[spec.name] = TensorSource(first, tuple(rest))
            continue
        i, part = spec.layer, spec.name.rsplit(".", 1)[1]
        prefixes = [f"model.layers.{i}.{p}.experts." for p in adapter.moe_prefixes]
        fused_leaf = "down_proj" if part == "down" else "gate_up_proj"
        out[spec.name] = ExpertSource(
            per_expert=tuple(p + "{e}." + adapter.expert_names[part] + ".weight"
                             for p in prefixes),
            fused=tuple(p + fused_leaf for p in prefixes),
            fused_half=None if part == "down" else (0 if part == "gate" else 1))
    return out
