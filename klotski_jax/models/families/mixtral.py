"""Mixtral (`MixtralForCausalLM`): GQA + RoPE, optional sliding window, softmax top-k router with
renormalised weights. On disk its MoE block is `block_sparse_moe` with experts w1 (gate), w3 (up)
and w2 (down); transformers 5 also writes the fused `mlp.experts.gate_up_proj` layout."""

MIXTRAL = dict(moe_prefixes=("block_sparse_moe", "mlp"),
               expert_names={"gate": "w1", "up": "w3", "down": "w2"})
