"""The model's building blocks as Flax NNX modules.

Every family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5-MoE) is built from the
same blocks; a family differs from another by its `ModelConfig` (biases, q/k norms, clip_qkv,
sliding windows, latent attention, RoPE variants, router variants, shared experts, dense layers),
never by a copy of a block.

Each `nnx.Param` is named so that its NNX path, joined with ".", is the array's flat name in
`models/specs.py` (`layers.3.attn.q`, `layers.3.moe.router.weight`, `layers.3.moe.experts.up`):
one name per array, in the checkpoint, the orbax dense tree, the expert store and the modules.
Parameters keep HF's (out, in) orientation; the math is the pure functions of models/layers.py.

The hot path stays functional: the pipeline does not call these modules with their parameters
attached. It streams their states (a layer's dense part, one expert; in NNX's pure nested-dict
form) as arguments of jitted steps, which `nnx.merge` them into the modules below at trace time
(models/blocks.py).
The dense part of a layer is a `DecoderLayer` built with `routed=False`: its MoE block has a
router and shared expert but no routed experts, which live in the expert store one by one.

Module tree (i = layer; `mlp` on dense layers, `moe` on MoE layers):
  MoEModel: embed [V, D], layers[i]: DecoderLayer, final_norm [D], lm_head [V, D] (untied)
  DecoderLayer: attn_norm [D], attn: Attention | LatentAttention (MLA), mlp_norm [D],
                mlp: DenseMLP | moe: MoEBlock
  MoEBlock: router: Router, experts: RoutedExperts (routed=True), shared: SharedExpert | None
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klotski_jax.config import Attn, ModelConfig, QKNorm, Quant, quant_leaves
from klotski_jax.models import layers, quant
from klotski_jax.models.specs import nest

F32 = jnp.float32
INIT_STD = 0.02  # HF's initializer_range for every family's random init
MLA_NORM_EPS = 1e-6  # HF builds MLA's q_a and kv_a RMSNorms with their default eps


def _matrix(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param((INIT_STD * jax.random.normal(rngs.params(), shape, F32)).astype(dtype))


def _ones(shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


def _zeros(shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def _value(p: nnx.Param | None) -> jax.Array | None:
    return None if p is None else p[...]


class Attention(nnx.Module):
    """Grouped-query RoPE attention with the families' variants, over a KV cache.

    Params q [Hq*hd, D], k/v [Hkv*hd, D], o [D, Hq*hd]; q/k/v biases (Qwen2-MoE), an o bias;
    q/k RMSNorm per head [hd] (Qwen3-MoE) or over the projection (OLMoE); clip_qkv (OLMoE).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.cfg = cfg
        d, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
        self.q, self.k = _matrix(rngs, (q, d), dtype), _matrix(rngs, (kv, d), dtype)
        self.v, self.o = _matrix(rngs, (kv, d), dtype), _matrix(rngs, (d, cfg.o_size), dtype)
        self.q_bias = _zeros((q,), dtype) if cfg.qkv_bias else None
        self.k_bias = _zeros((kv,), dtype) if cfg.qkv_bias else None
        self.v_bias = _zeros((kv,), dtype) if cfg.qkv_bias else None
        self.o_bias = _zeros((d,), dtype) if cfg.o_bias else None
        norm = {QKNorm.HEAD: (cfg.head_dim, cfg.head_dim), QKNorm.FULL: (q, kv)}.get(cfg.qk_norm)
        self.q_norm = None if norm is None else _ones((norm[0],), dtype)
        self.k_norm = None if norm is None else _ones((norm[1],), dtype)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [b, t, D] (normed) -> q [b, t, Hq, hd], k and v [b, t, Hkv, hd], RoPE applied."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, _ = x.shape
        q = layers.linear(x, self.q[...], _value(self.q_bias))
        k = layers.linear(x, self.k[...], _value(self.k_bias))
        v = layers.linear(x, self.v[...], _value(self.v_bias))
        if cfg.qk_norm is QKNorm.FULL:
            q, k = layers.rms_norm(q, self.q_norm[...], eps), layers.rms_norm(k, self.k_norm[...], eps)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm is QKNorm.HEAD:
            q, k = layers.rms_norm(q, self.q_norm[...], eps), layers.rms_norm(k, self.k_norm[...], eps)
        return layers.rope(q, positions, cfg), layers.rope(k, positions, cfg), v

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array],
                 write_index: jax.Array, kv_valid: jax.Array, window: int | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of new tokens x [b, t, D] (normed), writing their K/V at write_index.

        kv: this layer's (K, V) caches [b, s, Hkv, hd]; kv_valid [b, s]: slots with real tokens.
        Returns the projected output [b, t, D] and the updated caches.
        """
        q, k, v = self.qkv(x, positions)
        k_cache = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, write_index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, write_index, 0, 0))
        mask = layers.attention_mask(write_index, x.shape[1], kv_valid, window)
        out = layers.attend(q, k_cache, v_cache, mask, self.cfg)
        return layers.linear(out, self.o[...], _value(self.o_bias)), (k_cache, v_cache)


class LatentAttention(nnx.Module):
    """DeepSeek's multi-head latent attention (MLA) over a compressed KV cache.

    Queries: q [H*hd, D], or the low-rank q_a [Q, D] -> RMSNorm q_a_norm -> q_b [H*hd, Q]; each
    head is a position-free part (nope) and a rotary part (rope). Keys and values: kv_a
    [L + rope, D] gives a latent [L] (RMSNorm kv_a_norm) and one rope key shared by all heads;
    kv_b [H*(nope + v), L] expands a latent into each head's key part and value. The cache holds
    the normed latent and the rotated rope key per token (`cfg.kv_cache_shapes`), L + rope
    values instead of 2 x H x hd; attention expands or absorbs kv_b (layers.mla_attend)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.cfg = cfg
        d, ql, kvl, r = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        bias = cfg.mla_bias
        self.q = None if ql else _matrix(rngs, (cfg.q_size, d), dtype)
        self.q_a = _matrix(rngs, (ql, d), dtype) if ql else None
        self.q_a_norm = _ones((ql,), dtype) if ql else None
        self.q_b = _matrix(rngs, (cfg.q_size, ql), dtype) if ql else None
        self.q_a_bias = _zeros((ql,), dtype) if ql and bias else None
        self.kv_a = _matrix(rngs, (kvl + r, d), dtype)
        self.kv_a_bias = _zeros((kvl + r,), dtype) if bias else None
        self.kv_a_norm = _ones((kvl,), dtype)
        self.kv_b = _matrix(rngs, (cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), kvl),
                            dtype)
        self.o = _matrix(rngs, (d, cfg.o_size), dtype)
        self.o_bias = _zeros((d,), dtype) if bias else None

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array],
                 write_index: jax.Array, kv_valid: jax.Array, window: int | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of new tokens x [b, t, D] (normed), caching their latent and rope key at
        write_index. kv: (latents [b, s, 1, L], rope keys [b, s, 1, r]); see `Attention`."""
        cfg = self.cfg
        b, t, _ = x.shape
        if self.q is not None:
            q = layers.linear(x, self.q[...])
        else:
            qa = layers.linear(x, self.q_a[...], _value(self.q_a_bias))
            q = layers.linear(layers.rms_norm(qa, self.q_a_norm[...], MLA_NORM_EPS), self.q_b[...])
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        n = cfg.qk_nope_head_dim
        q_nope, q_rope = q[..., :n], layers.rope(q[..., n:], positions, cfg)
        c = layers.linear(x, self.kv_a[...], _value(self.kv_a_bias))
        latent = layers.rms_norm(c[..., : cfg.kv_lora_rank], self.kv_a_norm[...], MLA_NORM_EPS)
        k_rope = layers.rope(c[..., cfg.kv_lora_rank:][:, :, None, :], positions, cfg)
        at = (0, write_index, 0, 0)
        lat_cache = jax.lax.dynamic_update_slice(kv[0], latent[:, :, None].astype(kv[0].dtype), at)
        rope_cache = jax.lax.dynamic_update_slice(kv[1], k_rope.astype(kv[1].dtype), at)
        mask = layers.attention_mask(write_index, t, kv_valid, window)
        out = layers.mla_attend(q_nope, q_rope, lat_cache, rope_cache, self.kv_b[...], mask, cfg)
        return layers.linear(out, self.o[...], _value(self.o_bias)), (lat_cache, rope_cache)


class Router(nnx.Module):
    """Top-k router: weight [E, D] (HF's `gate`), and the score correction bias [E] of
    DeepSeek-V3 / GLM-4.5 (`e_score_correction_bias`); both float32 where HF keeps them so
    (`cfg.router_fp32`), which also computes the logits in float32 as HF does."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.cfg = cfg
        dtype = F32 if cfg.router_fp32 else dtype
        self.weight = _matrix(rngs, (cfg.num_experts, cfg.hidden_size), dtype)
        self.bias = _zeros((cfg.num_experts,), dtype) if cfg.router_bias else None

    def logits(self, x: jax.Array) -> jax.Array:
        """x [n, D] -> float32 router logits [n, E] (what HF's gate returns)."""
        if self.cfg.router_fp32:
            return layers.linear(x.astype(F32), self.weight[...].astype(F32))
        return layers.linear(x, self.weight[...]).astype(F32)

    def route(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Router logits [n, E] -> (weights [n, top_k] float32, experts [n, top_k] int32)."""
        return layers.route(logits, self.cfg, _value(self.bias))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [n, D] -> (routing weights [n, top_k] float32, experts [n, top_k] int32)."""
        return self.route(self.logits(x))


class QuantizedMatrix(nnx.Module):
    """A stored-quantized projection (models/quant.py): q, scale and (int4) zero as parameters,
    leading dims allowed (a stack of experts); `weight` dequantizes it inside the trace. An fp8
    matrix keeps its block side as a static attribute (part of the graph definition): its
    ceil-sized scale grid does not determine it."""

    def __init__(self, quant: Quant, group_size: int, lead: tuple[int, ...], out_dim: int,
                 in_dim: int, *, dtype: Any):
        leaves = {suffix: (shape, dt) for suffix, shape, dt in
                  quant_leaves(quant, group_size, out_dim, in_dim, str(jnp.dtype(dtype)))}
        self.q = nnx.Param(jnp.zeros((*lead, *leaves["q"][0]), leaves["q"][1]))
        self.scale = nnx.Param(jnp.zeros((*lead, *leaves["scale"][0]), leaves["scale"][1]))
        self.zero = (nnx.Param(jnp.zeros((*lead, *leaves["zero"][0]), leaves["zero"][1]))
                     if "zero" in leaves else None)
        self.block = group_size if quant is Quant.FP8 else 0

    def weight(self, dtype: Any) -> jax.Array:
        """The dequantized weights [..., out, in] in `dtype`."""
        return quant.dequantize(self.q[...], self.scale[...], _value(self.zero), dtype,
                                block=self.block)


def _projection(rngs: nnx.Rngs, lead: tuple[int, ...], shape: tuple[int, int], dtype: Any,
                quant: Quant, group_size: int) -> nnx.Param | QuantizedMatrix:
    if quant is Quant.NONE:
        return _matrix(rngs, (*lead, *shape), dtype)
    return QuantizedMatrix(quant, group_size, lead, *shape, dtype=dtype)


def _weight(p: nnx.Param | QuantizedMatrix, dtype: Any) -> jax.Array:
    """A projection's weights: the parameter, or its dequantized values in `dtype`."""
    return p.weight(dtype) if isinstance(p, QuantizedMatrix) else p[...]


class Expert(nnx.Module):
    """One routed expert (SwiGLU): gate, up [I, D], down [D, I].

    The unit the pipeline streams: its state {gate, up, down} is what one expert's load moves.
    With quantized experts each projection is a `QuantizedMatrix` (state {gate: {q, scale,
    zero}, ...}), dequantized to the activations' dtype inside the jitted step. Built from its
    two sizes only, so one graph definition serves every layer and model."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype: Any,
                 quant: Quant = Quant.NONE, group_size: int = 0):
        d, f = hidden, intermediate
        self.gate = _projection(rngs, (), (f, d), dtype, quant, group_size)
        self.up = _projection(rngs, (), (f, d), dtype, quant, group_size)
        self.down = _projection(rngs, (), (d, f), dtype, quant, group_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [n, D] -> [n, D]."""
        dt = x.dtype
        return layers.swiglu(x, _weight(self.gate, dt), _weight(self.up, dt),
                             _weight(self.down, dt))


class RoutedExperts(nnx.Module):
    """All routed experts of a layer, stacked: gate, up [E, I, D], down [E, D, I].

    Used where every expert is resident (the reference model, training); the expert store keeps
    the same arrays with one chunk per expert (row j of each is expert j's `Expert` state).
    Quantized experts are stacked `QuantizedMatrix`es, dequantized (all of them, with the
    function the engine's expert step uses) to the config's dtype on every call."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        q, g = cfg.expert_quant, cfg.expert_group_size
        self.gate = _projection(rngs, (e,), (f, d), dtype, q, g)
        self.up = _projection(rngs, (e,), (f, d), dtype, q, g)
        self.down = _projection(rngs, (e,), (d, f), dtype, q, g)

    def _weights(self, dtype: Any) -> dict[str, jax.Array]:
        return {"gate": _weight(self.gate, dtype), "up": _weight(self.up, dtype),
                "down": _weight(self.down, dtype)}

    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """sum_k weights[n, k] * Expert_{idx[n, k]}(x[n]) with every expert on every token."""
        return layers.combine_dense(self._weights(x.dtype), x, weights, idx)

    def grouped(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """The same sum computing only each token's top-k experts (training's fast path)."""
        return layers.combine_grouped(self._weights(x.dtype), x, weights, idx)


class SharedExpert(nnx.Module):
    """The shared expert(s), run on every token: SwiGLU(x), gated by sigmoid(gate_logit(x)) in
    Qwen2-MoE; DeepSeek and GLM fuse their n_shared_experts into one wider SwiGLU, ungated.

    gate, up [Is, D], down [D, Is], gate_logit [1, D] (when gated)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        d, s = cfg.hidden_size, cfg.shared_expert_intermediate_size
        self.gate, self.up = _matrix(rngs, (s, d), dtype), _matrix(rngs, (s, d), dtype)
        self.down = _matrix(rngs, (d, s), dtype)
        self.gate_logit = _matrix(rngs, (1, d), dtype) if cfg.shared_expert_gate else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [n, D] -> [n, D]."""
        out = layers.swiglu(x, self.gate[...], self.up[...], self.down[...])
        if self.gate_logit is None:
            return out
        return jax.nn.sigmoid(layers.linear(x, self.gate_logit[...])) * out  # gate [n, 1]


class DenseMLP(nnx.Module):
    """The SwiGLU MLP of a dense (non-MoE) layer: gate, up [Id, D], down [D, Id]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any):
        d, m = cfg.hidden_size, cfg.dense_intermediate_size
        self.gate, self.up = _matrix(rngs, (m, d), dtype), _matrix(rngs, (m, d), dtype)
        self.down = _matrix(rngs, (d, m), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.swiglu(x, self.gate[...], self.up[...], self.down[...])


class MoEBlock(nnx.Module):
    """Router, routed experts (absent in a layer's dense part) and the optional shared expert."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, routed: bool = True):
        self.router = Router(cfg, rngs=rngs, dtype=dtype)
        self.experts = RoutedExperts(cfg, rngs=rngs, dtype=dtype) if routed else None
        self.shared = (SharedExpert(cfg, rngs=rngs, dtype=dtype)
                       if cfg.shared_expert_intermediate_size else None)

    def finish(self, routed_out: jax.Array, x: jax.Array) -> jax.Array:
        """The block's output: the routed experts' sum [n, D] plus the shared expert of x."""
        return routed_out if self.shared is None else routed_out + self.shared(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [n, D] (normed) -> MoE(x) [n, D] with every routed expert resident."""
        weights, idx = self.router(x)
        return self.finish(self.experts(x, weights, idx), x)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: h + Attention(RMSNorm(h)), then h + FFN(RMSNorm(h)), where the
    FFN is a `MoEBlock` (`moe`) on MoE layers and a `DenseMLP` (`mlp`) on the others."""

    def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs, dtype: Any = None,
                 routed: bool = True):
        # `index` only picks MoE or dense: layers of one kind share a graph definition (and so
        # the compiled steps); a layer's sliding window is an argument of `attention`.
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        self.cfg = cfg
        self.attn_norm = _ones((cfg.hidden_size,), dtype)
        self.attn = (LatentAttention(cfg, rngs=rngs, dtype=dtype) if cfg.attention is Attn.MLA
                     else Attention(cfg, rngs=rngs, dtype=dtype))
        self.mlp_norm = _ones((cfg.hidden_size,), dtype)
        moe = cfg.moe_layers[index]
        self.moe = MoEBlock(cfg, rngs=rngs, dtype=dtype, routed=routed) if moe else None
        self.mlp = None if moe else DenseMLP(cfg, rngs=rngs, dtype=dtype)

    def attention(self, h: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array],
                  write_index: jax.Array, kv_valid: jax.Array, window: int | None
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """h + Attention(RMSNorm(h)) for new tokens h [b, t, D], and the updated (K, V)."""
        out, kv = self.attn(layers.rms_norm(h, self.attn_norm[...], self.cfg.rms_norm_eps),
                            positions, kv, write_index, kv_valid, window)
        return h + out, kv

    def ffn_input(self, h: jax.Array) -> jax.Array:
        """RMSNorm(h): the input of the MoE block or MLP."""
        return layers.rms_norm(h, self.mlp_norm[...], self.cfg.rms_norm_eps)

    def feed_forward(self, h: jax.Array) -> jax.Array:
        """h + FFN(RMSNorm(h)) with every weight resident; h [b, t, D]."""
        b, t, d = h.shape
        x = self.ffn_input(h.reshape(b * t, d))
        out = self.mlp(x) if self.moe is None else self.moe(x)
        return h + out.reshape(b, t, d)


class MoEModel(nnx.Module):
    """The whole decoder: embedding, layers, final norm and the LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        self.cfg = cfg
        self.embed = _matrix(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, dtype=dtype)
                                for i in range(cfg.num_layers)])
        self.final_norm = _ones((cfg.hidden_size,), dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _matrix(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))

    def head_weight(self) -> jax.Array:
        """The vocabulary projection [V, D]: the embedding when tied."""
        return self.embed[...] if self.lm_head is None else self.lm_head[...]


def layer_state(flat: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Layer i's pure NNX state from flat names ("layers.i.attn.q" -> state["attn"]["q"]): the
    state of a `DecoderLayer` (of its dense part when `flat` holds no routed experts) as nested
    dicts, the form `nnx.State.to_pure_dict()` gives and the jitted steps take."""
    prefix = f"layers.{i}."
    return nest({n[len(prefix):]: v for n, v in flat.items() if n.startswith(prefix)})
