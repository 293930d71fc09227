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

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klotski_jax.config import ModelConfig, ScoreFunc, TopkMethod

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


@functools.cache
def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotary inverse frequencies [rot_dim / 2] (float32, host side; constants of the
    jitted steps), as HF computes them: theta^(-2j/r), or yarn's blend of those and
    factor-interpolated ones, ramped between the dims that complete beta_fast and beta_slow
    rotations over the original context (arXiv 2309.00071)."""
    r, theta = cfg.rot_dim, cfg.rope_theta
    pos_freqs = theta ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r))
    if cfg.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return (r * math.log(cfg.rope_original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (fast-rotating dims)
    inv = (1.0 / (cfg.rope_factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    return inv.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding of the rotated dims of x [b, t, heads, h], positions [b, t].

    GQA rotates each head's first `cfg.rot_dim` dims (all but GLM's partial rotary) and keeps
    the rest; MLA passes just the rope part. HF's `rotate_half` convention pairs dim j with
    j + r/2; with `rope_interleave` (DeepSeek) dims 2j and 2j + 1 form a pair, and the output
    lists the pairs' first then second elements: a fixed permutation of HF's layout, applied
    alike to queries and keys, so every score is the same. Yarn's attention factor scales cos
    and sin."""
    r = cfg.rot_dim
    x_rot, x_pass = x[..., :r], x[..., r:]
    freqs = positions.astype(F32)[..., None] * jnp.asarray(rope_frequencies(cfg))  # [b, t, r/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    if cfg.rope_attention_factor != 1.0:
        cos, sin = cos * cfg.rope_attention_factor, sin * cfg.rope_attention_factor
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if cfg.rope_interleave:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out if x_pass.shape[-1] == 0 else jnp.concatenate([out, x_pass], axis=-1)


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
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache) * cfg.softmax_scale
    scores = jnp.where(mask[:, None, None], scores.astype(F32), jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_cache)
    return out.reshape(b, t, cfg.q_size)


def mla_attend(q_nope: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array,
               w_kv_b: jax.Array, mask: jax.Array, cfg: ModelConfig,
               absorb: bool | None = None) -> jax.Array:
    """Multi-head latent attention over the compressed cache -> [b, t, H * v].

    q_nope [b, t, H, n] and q_rope [b, t, H, r] (rotated); latent [b, s, 1, L] (normed) and
    k_rope [b, s, 1, r] (rotated, shared by all heads): the cache. w_kv_b [H * (n + v), L]
    expands a latent into each head's key part (n) and value (v).

    Expanded form (HF's): build keys and values for every slot, then attend. Absorbed form:
    fold kv_b's key half into the queries (q_nope @ W_k: a query in latent space) and its value
    half into the output, attending over the latents themselves; the same sums in another
    order (exact in real arithmetic). `absorb` None picks the cheaper (`cfg.mla_absorbs`)."""
    b, t, h, n = q_nope.shape
    lat, kr = latent[:, :, 0], k_rope[:, :, 0]  # [b, s, L], [b, s, r]
    v = cfg.v_head_dim
    if absorb is None:
        absorb = cfg.mla_absorbs(t, lat.shape[1])
    w = w_kv_b.reshape(h, n + v, lat.shape[-1])
    rope_scores = jnp.einsum("bthr,bsr->bhts", q_rope, kr).astype(F32)
    if absorb:
        q_lat = jnp.einsum("bthn,hnl->bthl", q_nope, w[:, :n])
        scores = jnp.einsum("bthl,bsl->bhts", q_lat, lat).astype(F32) + rope_scores
    else:
        kv = linear(lat, w_kv_b).reshape(*lat.shape[:2], h, n + v)
        scores = jnp.einsum("bthn,bshn->bhts", q_nope, kv[..., :n]).astype(F32) + rope_scores
    scores = jnp.where(mask[:, None], scores * cfg.softmax_scale, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_nope.dtype)
    if absorb:
        ctx = jnp.einsum("bhts,bsl->bthl", probs, lat)
        out = jnp.einsum("bthl,hvl->bthv", ctx, w[:, n:])
    else:
        out = jnp.einsum("bhts,bshv->bthv", probs, kv[..., n:])
    return out.reshape(b, t, h * v)


# ---- MoE pieces ---------------------------------------------------------------------------

def route(logits: jax.Array, cfg: ModelConfig, bias: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Router logits [n, E] -> (weights [n, top_k] float32, experts [n, top_k] int32), as HF's
    routers compute them (config.TopkMethod): scores by softmax or sigmoid; with groups, only
    the topk_group best groups' experts compete (others masked to 0 for group_limited_greedy,
    to -inf for noaux_tc); experts chosen on scores + `bias` (the correction bias), weighted by
    their scores, renormalised if norm_topk_prob, times routed_scaling_factor."""
    logits = logits.astype(F32)
    sigmoid = cfg.score_func is ScoreFunc.SIGMOID
    scores = jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias.astype(F32)
    if cfg.topk_method is not TopkMethod.GREEDY:
        n, e, g = logits.shape[0], cfg.num_experts, cfg.n_group
        grouped = choice.reshape(n, g, e // g)
        if cfg.topk_method is TopkMethod.GROUP_LIMITED:
            group_scores = jnp.max(grouped, axis=-1)
        else:
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, best = jax.lax.top_k(group_scores, cfg.topk_group)  # [n, topk_group]
        keep = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], best].set(True)
        fill = 0.0 if cfg.topk_method is TopkMethod.GROUP_LIMITED else -jnp.inf
        choice = jnp.where(jnp.repeat(keep, e // g, axis=-1), choice, fill)
    _, experts = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + (1e-20 if sigmoid else 0))
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
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
