"""Qwen2-MoE and Qwen3-MoE: MoE block under `mlp`, experts named gate_proj/up_proj/down_proj.
Qwen2-MoE adds q/k/v biases and a sigmoid-gated shared expert; Qwen3-MoE adds per-head q/k RMSNorm.
Both may mix dense MLP layers in (`decoder_sparse_step`, `mlp_only_layers`); see config.py."""

_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
QWEN2_MOE = dict(moe_prefixes=("mlp",), expert_names=_NAMES)
QWEN3_MOE = dict(moe_prefixes=("mlp",), expert_names=_NAMES)
