"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, no top-k renormalisation
unless `norm_topk_prob`. Experts named gate_proj/up_proj/down_proj under `mlp`."""

OLMOE = dict(moe_prefixes=("mlp",), expert_names={"gate": "gate_proj", "up": "up_proj",
                                                  "down": "down_proj"})
