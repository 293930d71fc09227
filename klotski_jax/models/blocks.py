"""The jitted steps of a decoder layer, over streamed NNX states.

Each step takes the state of a layer's dense part as an ordinary argument and `nnx.merge`s it
into a `DecoderLayer` inside the trace. The runtime passes states in NNX's pure form: the nested
dicts of arrays that `nnx.State.to_pure_dict()` gives and `nnx.merge` accepts, keyed by the
module paths of models/modules.py. An `nnx.State` wrapper works too, but its pytree flattening
runs in Python: about 2-5 microseconds on every jitted call, some 5% of a small model's decode
step, where nested dicts flatten in C++. The graph definition is split once per (config, layer
kind) and cached, so merging costs nothing at run time, compiled shapes do not depend on which
layer's (or expert's) buffers are passed, and the pipeline streams plain pytrees of arrays.

A layer's dense part is its `DecoderLayer` without routed experts (`routed=False`); the
reference model passes whole layers (`routed=True`), whose experts are resident.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klotski_jax.config import ModelConfig, Quant
from klotski_jax.models import layers
from klotski_jax.models.modules import DecoderLayer, Expert

LayerState = Mapping[str, Any]  # a DecoderLayer's state: pure nested dicts (or an nnx.State)
F32 = jnp.float32


@functools.cache
def layer_graphdef(cfg: ModelConfig, moe: bool, routed: bool) -> nnx.GraphDef:
    """The graph definition of a MoE (or dense) decoder layer, with or without routed experts."""
    index = next(i for i, m in enumerate(cfg.moe_layers) if m == moe)
    abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, index, rngs=nnx.Rngs(0), routed=routed))
    return nnx.split(abstract)[0]


@functools.cache
def expert_graphdef(quant: Quant = Quant.NONE, block: int = 0) -> nnx.GraphDef:
    """The graph definition of one routed `Expert` (the same for every layer and model with
    the same kind of storage: plain, int8, int4, or fp8 with blocks of `block`)."""
    group = {Quant.NONE: 0, Quant.INT8: 0, Quant.INT4: 2, Quant.FP8: block}[quant]
    return nnx.split(nnx.eval_shape(lambda: Expert(
        2, 2, rngs=nnx.Rngs(0), dtype=F32, quant=quant, group_size=group)))[0]


def expert_quant(w: Mapping[str, Any]) -> Quant:
    """The storage of an expert state {gate, up, down}: plain arrays, or {q, scale[, zero]}
    (fp8: q is float8_e4m3fn)."""
    gate = w["gate"]
    if not isinstance(gate, Mapping):
        return Quant.NONE
    if "zero" in gate:
        return Quant.INT4
    return Quant.FP8 if jnp.dtype(gate["q"].dtype) == jnp.float8_e4m3fn else Quant.INT8


def expert_block(cfg: ModelConfig) -> int:
    """The static block side an expert step of `cfg` needs (fp8 experts; 0 for the others,
    whose group size their arrays' shapes give)."""
    return cfg.expert_group_size if cfg.expert_quant is Quant.FP8 else 0


def merge_layer(w: LayerState, cfg: ModelConfig) -> DecoderLayer:
    """The `DecoderLayer` of a layer state (call inside a jitted function)."""
    moe = "moe" in w
    routed = moe and "experts" in w["moe"]
    return nnx.merge(layer_graphdef(cfg, moe, routed), w)


def merge_expert(w: Mapping[str, Any], block: int = 0) -> Expert:
    """The `Expert` of one expert's state {gate, up, down} (call inside a jitted function);
    block: the fp8 block side (`expert_block`), which an fp8 state needs."""
    quant = expert_quant(w)
    if quant is Quant.FP8 and block <= 0:
        raise ValueError("an fp8 expert needs its block size (blocks.expert_block(cfg))")
    return nnx.merge(expert_graphdef(quant, block if quant is Quant.FP8 else 0), w)


@functools.partial(jax.jit, static_argnames=("cfg", "window"), donate_argnames=("kv",))
def attention_block(w: LayerState, h: jax.Array, positions: jax.Array,
                    kv: tuple[jax.Array, jax.Array], write_index: jax.Array, kv_valid: jax.Array,
                    *, cfg: ModelConfig, window: int | None
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """h + Attention(RMSNorm(h)) for new tokens h [b, t, d]; writes their K/V at write_index.

    kv: this layer's (K, V) caches [b, s, k, h], donated and updated in place; kv_valid [b, s]:
    slots that hold real tokens; window: the layer's sliding window (None: full causal).
    """
    return merge_layer(w, cfg).attention(h, positions, kv, write_index, kv_valid, window)


@functools.partial(jax.jit, static_argnames=("cfg",))
def router_block(w: LayerState, h: jax.Array, *, cfg: ModelConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The MoE input and its routing: h [n, d] -> (x = RMSNorm(h) [n, d], weights, experts)."""
    layer = merge_layer(w, cfg)
    x = layer.ffn_input(h)
    return (x, *layer.moe.router(x))


@functools.partial(jax.jit, static_argnames=("cfg",))
def moe_block_reference(w: LayerState, h: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """h + MoE(RMSNorm(h)) with every expert resident (w holds the routed experts); h [b, t, d]."""
    return merge_layer(w, cfg).feed_forward(h)


@functools.partial(jax.jit, static_argnames=("cfg",))
def dense_mlp_block(w: LayerState, h: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """h + SwiGLU(RMSNorm(h)) for the dense (non-MoE) layers of Qwen-MoE models."""
    return merge_layer(w, cfg).feed_forward(h)


def finish_moe_output(w: LayerState, routed_out: jax.Array, x: jax.Array, cfg: ModelConfig
                      ) -> jax.Array:
    """The MoE block's output from the routed experts' sum [n, d]: adds the shared expert of x
    (traced; the pipeline's combine step calls it)."""
    return merge_layer(w, cfg).moe.finish(routed_out, x)


# ---- ends of the model: the embedding table and the head are plain arrays -----------------

@jax.jit
def embed(w_embed: jax.Array, token_ids: jax.Array) -> jax.Array:
    """token_ids [b, t] -> hidden [b, t, d]."""
    return jnp.take(w_embed, token_ids, axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def lm_head(w_norm: jax.Array, w_head: jax.Array, h: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Final RMSNorm and vocabulary projection: h [b, t, d] -> float32 logits [b, t, v]."""
    return layers.linear(layers.rms_norm(h, w_norm, cfg.rms_norm_eps), w_head).astype(F32)
