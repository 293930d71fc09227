"""The math of the model's blocks, as pure functions over explicit arrays.

The NNX modules (models/modules.py) call these with their parameters; the jitted steps
(models/blocks.py) merge a streamed `nnx.State` into those modules, so weights are arguments,
never closures, and the pipeline can call the same compiled step with any layer's (or any
expert's) buffers without recompiling. All projections keep HF's (out, in) orientation and
contract with `einsum("...d,fd->...f")`: `x @ w.T` makes XLA materialise a transposed copy of
the whole weight when there is one token row (tests/test_no_weight_transpose.py guards this).

Einsum letters: b batch, t new tokens (queries), s cache slots (keys), d hidden, k KV heads,
g query heads per KV head, h head_dim, f FFN width, e experts, n flattened tokens, v vocab.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from klotski_jax.config import ModelConfig

Weights = dict[str, Any]

F32 = jnp.float32


# ---- primitives ---------------------------------------------------------------------------

def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, cast back before the weight multiply (HF semantics)."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., d] with an HF-layout weight w [f, d] (+ bias [f]) -> [..., f], no transpose.

    Accumulated in float32 (`preferred_element_type`) and rounded back to the inputs' type, as
    torch does for bf16: on XLA CPU a plain bf16 einsum takes a slow path (an 11 MB expert over
    2-8 token rows took 6-7 ms, against 1-2 ms this way). A single row is computed as two (a
    duplicate), because a one-row bf16 matmul also takes a slow XLA CPU path. Only this
    batch-free contraction takes the float32 path: XLA's batched dot cannot run every
    bf16 x bf16 -> f32 shape ("Unsupported element type for DotThunk").

    Results are not bit-identical across row counts, kernels or devices: XLA (and cuBLAS on
    GPUs) picks the matmul kernel, hence the summation order, by shape and instruction set
    (Intel AVX-512/AMX, AMD, GPU tensor cores), and in bf16 a different order can move a
    rounded output by one ulp. So the engine's groups and buckets agree with the oracle within
    the exactness contract's tolerances (docs/exactness.md; tests/contract.py),
    not bit for bit, and a row's result agrees within bf16 rounding whatever the number of rows
    that share the call (tests/test_models.py).
    """
    lead, d = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    rows = x.reshape(m, d)
    if m == 1:
        rows = jnp.concatenate([rows, rows])
    y = jnp.einsum("nd,fd->nf", rows, w, preferred_element_type=F32)[:m]
    y = y.astype(jnp.promote_types(x.dtype, w.dtype)).reshape(*lead, w.shape[0])
    return y if b is None else y + b


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU FFN: down(silu(gate(x)) * up(x)); x [..., d] -> [..., d]."""
    return linear(jax.nn.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (HF `rotate_half` convention). x [b, t, heads, h], positions [b, t]."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=F32) / h))  # [h/2]
    freqs = positions.astype(F32)[..., None] * inv_freq  # [b, t, h/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, t, 1, h]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ---- attention ----------------------------------------------------------------------------

def attention_mask(write_index: jax.Array, t: int, kv_valid: jax.Array,
                   window: int | None) -> jax.Array:
    """[b, t, s] bool: query t (cache slot write_index + t) may see slot s.

    A slot is visible if it holds a real token (kv_valid, i.e. not left padding), is not in the
    future, and lies inside the sliding window (HF: q_slot - s < window).
    """
    s = kv_valid.shape[1]
    q_slot = write_index + jnp.arange(t)[:, None]  # [t, 1]
    k_slot = jnp.arange(s)[None, :]  # [1, s]
    ok = k_slot <= q_slot
    if window is not None:
        ok &= q_slot - k_slot < window
    return ok[None] & kv_valid[:, None, :]


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
           cfg: ModelConfig) -> jax.Array:
    """Grouped-query attention of q [b, t, H, h] over the cache [b, s, k, h] -> [b, t, H*h]."""
    b, t = q.shape[:2]
    qg = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache) * (cfg.head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(F32), jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_cache)
    return out.reshape(b, t, cfg.q_size)


# ---- MoE pieces ---------------------------------------------------------------------------

def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax-then-top-k routing of router logits [n, E] -> (weights [n, top_k] float32,
    experts [n, top_k] int32); weights renormalised to sum 1 if norm_topk_prob."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def combine_dense(experts: Weights, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
    """All experts resident: sum_k weights[n, k] * Expert_{idx[n, k]}(x[n]) -> [n, d].

    Every expert runs on every token (exact, simple; the oracle, not the fast path).
    """
    n, e = x.shape[0], experts["gate"].shape[0]
    combine = jnp.zeros((n, e), F32).at[jnp.arange(n)[:, None], idx].add(weights)  # [n, e]
    # One `swiglu` per expert (unrolled): the engine's per-expert kernel, which keeps the
    # oracle's rounding close to the engine's (a batched einsum would sum in another order and
    # cannot take `linear`'s float32 path on XLA CPU).
    y = jnp.stack([swiglu(x, experts["gate"][j], experts["up"][j], experts["down"][j])
                   for j in range(e)])  # [e, n, d]
    return jnp.einsum("end,ne->nd", y.astype(F32), combine).astype(x.dtype)


def combine_grouped(experts: Weights, x: jax.Array, weights: jax.Array, idx: jax.Array,
                    block: int = 64) -> jax.Array:
    """The same sum as `combine_dense`, computing only the top-k experts of each token.

    The n * k (token, expert) assignments are sorted by expert, each expert's run is padded to
    whole blocks of `block` rows, and every block is one small matmul with its expert's
    weights: about k / e of the dense FLOPs plus at most e * (block - 1) padding rows. Shapes
    are static (n * k // block + e blocks), so it jits and differentiates; padding rows point at
    a zero token and carry weight 0. Used for training, where the dense oracle's e / k times
    the work dominates the step.
    """
    n, d = x.shape
    e, k = experts["gate"].shape[0], idx.shape[1]
    num_blocks = (n * k) // block + e
    flat = idx.reshape(-1)  # [n * k], assignment a = token a // k
    order = jnp.argsort(flat, stable=True)  # assignments sorted by expert
    sizes = jnp.bincount(flat, length=e)
    padded = (sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    sorted_expert = flat[order]
    rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[sorted_expert]  # within its expert
    slot = (padded_end - padded)[sorted_expert] + rank  # its row in the padded layout
    rows = jnp.full((num_blocks * block,), n, jnp.int32).at[slot].set((order // k).astype(jnp.int32))
    row_w = jnp.zeros((num_blocks * block,), F32).at[slot].set(weights.reshape(-1).astype(F32)[order])
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"),
                               e - 1)
    xb = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[rows].reshape(num_blocks, block, d)
    hid = jax.nn.silu(jnp.einsum("bsd,bfd->bsf", xb, experts["gate"][block_expert]))
    hid = hid * jnp.einsum("bsd,bfd->bsf", xb, experts["up"][block_expert])
    y = jnp.einsum("bsf,bdf->bsd", hid, experts["down"][block_expert]).reshape(-1, d)
    out = jnp.zeros((n + 1, d), F32).at[rows].add(y.astype(F32) * row_w[:, None])
    return out[:n].astype(x.dtype)
