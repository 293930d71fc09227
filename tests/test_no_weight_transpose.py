"""The jitted steps must never transpose or copy a whole HF-layout weight.

`x @ w.T` on an (out, in) weight makes XLA materialise the transposed weight when there is a single
token row: 10x slower for a Mixtral-sized expert when we measured it on XLA:CPU. We compile each
step on weights of distinct, non-square shapes and scan the optimised HLO for transpose/copy instructions
whose result has the dimensions of a weight (in any order).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klotski_jax.config import Family, ModelConfig, QKNorm
from klotski_jax.models import blocks
from klotski_jax.models.modules import layer_state
from klotski_jax.models.reference import KVCache
from klotski_jax.models.specs import weight_specs
from klotski_jax.runtime import steps

_OP = re.compile(r"= [a-z0-9]+\[([0-9,]*)\]\{[^}]*\} (transpose|copy)\(")


def _dims(shape) -> tuple[int, ...]:
    return tuple(sorted(int(d) for d in shape if int(d) > 1))


def weight_sized_copies(hlo: str, weight_shapes: set[tuple[int, ...]]) -> list[str]:
    """Transpose/copy instructions in optimised HLO whose result has a weight's dimensions."""
    wanted = {_dims(s) for s in weight_shapes}
    return [m.group(0) for m in _OP.finditer(hlo)
            if _dims(d for d in m.group(1).split(",") if d) in wanted]


def _config(dtype: str) -> ModelConfig:
    return ModelConfig(
        family=Family.QWEN2_MOE, vocab_size=160, hidden_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=10, num_experts=5, top_k=2, expert_intermediate_size=72,
        moe_layers=(True, False), sliding_windows=(None, 7), dense_intermediate_size=88,
        shared_expert_intermediate_size=56, qkv_bias=True, qk_norm=QKNorm.HEAD, dtype=dtype)


def test_detector_catches_the_transpose_trap():
    w = jnp.zeros((72, 48), jnp.float32)
    hlo = jax.jit(lambda x, w: x @ w.T).lower(jnp.zeros((1, 48)), w).compile().as_text()
    assert weight_sized_copies(hlo, {w.shape}), "the detector must flag x @ w.T"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_steps_do_not_copy_weights(dtype, tokens):
    cfg = _config(dtype)
    rng = np.random.default_rng(0)
    flat = {s.name: jnp.asarray(rng.standard_normal(s.shape), dtype) for s in weight_specs(cfg)}
    shapes = {s.shape for s in weight_specs(cfg) if len(s.shape) >= 2}
    shapes |= {s.shape[1:] for s in weight_specs(cfg) if len(s.shape) == 3}  # one expert
    b = 2
    h = jnp.zeros((b, tokens, cfg.hidden_size), dtype)
    pos = jnp.zeros((b, tokens), jnp.int32)
    cache = KVCache.create(cfg, b, 32)
    w0, w1 = layer_state(flat, 0), layer_state(flat, 1)
    e = w0["moe"]["experts"]
    expert = {p: e[p][0] for p in ("gate", "up", "down")}
    x = jnp.zeros((tokens, cfg.hidden_size), dtype)
    rows = jnp.zeros((max(tokens, 2),), jnp.int32)
    lowered = {
        "attention": blocks.attention_block.lower(
            w1, h, pos, cache.kv[1], jnp.int32(0), jnp.ones((b, 32), bool), cfg=cfg, window=7),
        "expert": steps.experts_apply.lower(jnp.zeros((tokens, cfg.hidden_size), jnp.float32), x,
                                            rows[None], jnp.zeros((1, *rows.shape), jnp.float32),
                                            (expert,)),
        "experts": steps.experts_apply.lower(jnp.zeros((tokens, cfg.hidden_size), jnp.float32),
                                             x, jnp.stack([rows] * 4),
                                             jnp.zeros((4, *rows.shape), jnp.float32),
                                             (expert,) * 4),
        "moe_reference": blocks.moe_block_reference.lower(w0, h, cfg=cfg),
        "dense_mlp": blocks.dense_mlp_block.lower(w1, h, cfg=cfg),
        "router": blocks.router_block.lower(w0, x, cfg=cfg),
        "lm_head": blocks.lm_head.lower(flat["final_norm"], flat["lm_head"], h, cfg=cfg),
    }
    for step, low in lowered.items():
        hits = weight_sized_copies(low.compile().as_text(), shapes)
        assert not hits, f"{step} ({dtype}, {tokens} tokens) copies a weight: {hits}"
