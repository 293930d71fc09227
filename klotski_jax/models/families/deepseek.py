"""DeepSeek-V2, DeepSeek-V3 (and Kimi-K2, which uses its architecture) and GLM-4.5-MoE.

All three keep the MoE block under `mlp` with experts named gate_proj/up_proj/down_proj, the
router as `mlp.gate` (weight, and `e_score_correction_bias` for V3 and GLM) and the fused shared
experts as `mlp.shared_experts`. DeepSeek's latent attention is named q_proj or
q_a_proj/q_a_layernorm/q_b_proj, kv_a_proj_with_mqa/kv_a_layernorm/kv_b_proj and o_proj; GLM's
attention is plain q/k/v/o_proj with optional q_norm/k_norm. V3 and GLM checkpoints may carry
multi-token-prediction layers after the last decoder layer; conversion skips them
(`mtp_layers`)."""

_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
DEEPSEEK = dict(moe_prefixes=("mlp",), expert_names=_NAMES, shared_name="shared_experts")
