"""Training an MoE model with the inference math: a differentiable full-sequence forward.

The forward reuses the pure per-layer functions of models/layers.py (the same attention block,
router and dense all-experts combine that the reference model runs), so a model trained here is
exactly the model our engine serves. What training adds:

- `forward_train(params, ids, cfg)`: causal attention over whole sequences (the attention block
  with an empty KV cache as long as the sequence), the MoE by `combine_grouped` (only each
  token's top-k experts; the same sum as the reference's dense oracle at about k / e of its
  expert FLOPs), and the router logits of every MoE layer;
- `load_balancing_loss`: Mixtral's router auxiliary loss exactly as transformers'
  `load_balancing_loss_func` defines it (Switch Transformer eqs. 4-6, pooled over layers);
- `init_params`: HF-style random init of every array of `weight_specs(cfg)`;
- `make_optimizer` / `train_step` / `eval_loss`: optax AdamW with linear warm-up, cosine decay and
  global-norm clipping, one jitted step over a batch of packed token sequences;
- `fit`: the seeded training loop with its loss log; `routing_skew`: how unevenly the trained
  router spreads a text over the experts.

Params are a flat dict keyed by the flat names of models/specs.py, in float32, HF (out, in)
orientation, so exporting an HF checkpoint is a key rename (see checkpoints/default_model.py).

Shapes: b batch, t sequence, d hidden, v vocabulary, e experts, k top-k, n = b * t tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from klotski_jax.config import ModelConfig
from klotski_jax.models import layers
from klotski_jax.models.specs import layer_tree, weight_specs

log = logging.getLogger(__name__)

Params = dict[str, jax.Array]
F32 = jnp.float32


# ---- init -------------------------------------------------------------------------------------

def init_params(cfg: ModelConfig, seed: int, std: float = 0.02) -> Params:
    """HF-style init: every matrix ~ N(0, std), norms (and `*_norm` weights) 1, biases 0.

    Each array gets its own key folded from its index in `weight_specs(cfg)`, so the result
    depends only on (cfg, seed, std).
    """
    key = jax.random.PRNGKey(seed)
    params: Params = {}
    for i, spec in enumerate(weight_specs(cfg)):
        leaf = spec.name.rsplit(".", 1)[-1]
        if leaf.endswith("norm"):
            params[spec.name] = jnp.ones(spec.shape, F32)
        elif leaf.endswith("bias"):
            params[spec.name] = jnp.zeros(spec.shape, F32)
        else:
            params[spec.name] = std * jax.random.normal(jax.random.fold_in(key, i), spec.shape, F32)
    return params


# ---- forward ----------------------------------------------------------------------------------

def _moe(w: dict[str, Any], h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """h + MoE(RMSNorm(h)) with every expert resident, and the router logits [n, e] (float32)."""
    b, t, d = h.shape
    x, weights, idx = layers.router_block(w, h.reshape(b * t, d), cfg=cfg)
    router_logits = layers.linear(x, w["router"]).astype(F32)  # what HF's gate returns
    out = layers.combine_grouped(w["experts"], x, weights, idx)
    if "shared" in w:
        out = out + layers.shared_expert(w["shared"], x)
    return h + out.reshape(b, t, d), router_logits


def forward_train(params: Params, ids: jax.Array, cfg: ModelConfig
                  ) -> tuple[jax.Array, list[jax.Array]]:
    """Full-sequence causal forward: ids [b, t] -> (float32 logits [b, t, v], router logits).

    The router logits are one [b * t, e] float32 array per MoE layer (HF's `router_logits`).
    Positions are 0..t-1 in every row (packed sequences, no padding).
    """
    b, t = ids.shape
    h = layers.embed(params["embed"], ids)  # [b, t, d]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    zero = jnp.zeros((), jnp.int32)
    router_logits: list[jax.Array] = []
    for i in range(cfg.num_layers):
        w = layer_tree(params, i)
        with jax.named_scope(f"layer{i}"):
            # An empty cache as long as the sequence: the inference attention block becomes
            # plain causal self-attention (its K/V outputs are dropped). Two arrays, not one
            # twice: the block donates its cache when called outside jit.
            kv_shape = (b, t, cfg.num_kv_heads, cfg.head_dim)
            empty = (jnp.zeros(kv_shape, h.dtype), jnp.zeros(kv_shape, h.dtype))
            h, _ = layers.attention_block(w, h, positions, empty, zero, valid, cfg=cfg,
                                          window=cfg.sliding_windows[i])
            if cfg.moe_layers[i]:
                h, logits_i = _moe(w, h, cfg)
                router_logits.append(logits_i)
            else:
                h = layers.dense_mlp_block(w, h, cfg=cfg)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return layers.lm_head(params["final_norm"], head, h, cfg=cfg), router_logits


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        mask: jax.Array | None = None) -> jax.Array:
    """Mixtral's auxiliary loss, as transformers' `load_balancing_loss_func`.

    router_logits: one [n, e] array per MoE layer; mask: optional [n] (1 = real token). The
    top-k assignment counts and the softmax probabilities are pooled over all layers and tokens
    first: loss = e * sum_e(f_e * P_e) with f_e = assignments to e per token (sums to top_k) and
    P_e = mean router probability of e. Perfect balance gives top_k; top-k selection has no
    gradient, so the loss pushes the probabilities of over-used experts down.
    """
    if not router_logits:
        return jnp.zeros((), F32)
    counts = jnp.zeros((num_experts,), F32)
    prob_sum = jnp.zeros((num_experts,), F32)
    rows = jnp.zeros((), F32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.astype(F32), axis=-1)  # [n, e]
        _, selected = jax.lax.top_k(probs, top_k)  # [n, k]
        m = jnp.ones((probs.shape[0],), F32) if mask is None else mask.reshape(-1).astype(F32)
        one_hot = jax.nn.one_hot(selected, num_experts, dtype=F32)  # [n, k, e]
        counts = counts + jnp.einsum("nke,n->e", one_hot, m)
        prob_sum = prob_sum + jnp.einsum("ne,n->e", probs, m)
        rows = rows + m.sum()
    tokens_per_expert = jax.lax.stop_gradient(counts / rows)
    return num_experts * jnp.sum(tokens_per_expert * (prob_sum / rows))


# ---- loss, optimizer, steps -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters (hashable: a static argument of the jitted step)."""

    steps: int
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1  # cosine decays to peak_lr * this
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    router_aux_loss_coef: float = 0.001  # HF Mixtral's default


def loss_fn(params: Params, tokens: jax.Array, cfg: ModelConfig, aux_coef: float
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on tokens [b, t + 1] plus aux_coef * load-balancing loss."""
    logits, router_logits = forward_train(params, tokens[:, :-1], cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.top_k)
    return ce + aux_coef * aux, {"ce": ce, "aux": aux}


def _decay_mask(params: Params) -> dict[str, bool]:
    """Weight decay on matrices only (not on norms or biases)."""
    return {k: v.ndim >= 2 for k, v in params.items()}


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from peak_lr / warmup_steps (not 0: the first step is not wasted) to
    peak_lr at step warmup_steps, then cosine decay to peak_lr * final_lr_fraction at the last
    step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=tc.peak_lr / max(tc.warmup_steps, 1), peak_value=tc.peak_lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.peak_lr * tc.final_lr_fraction)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices) on `lr_schedule`."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=_decay_mask))


@functools.partial(jax.jit, static_argnames=("cfg", "tc"), donate_argnames=("params", "opt_state"))
def train_step(params: Params, opt_state: optax.OptState, tokens: jax.Array, *, cfg: ModelConfig,
               tc: TrainConfig) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """One AdamW step on a batch tokens [b, t + 1]; returns the new state and its metrics
    (loss = ce + coef * aux, ce, aux, grad_norm before clipping)."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, tokens, cfg, tc.router_aux_loss_coef)
    updates, opt_state = make_optimizer(tc).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}


def eval_loss(params: Params, chunks: np.ndarray, cfg: ModelConfig, batch_size: int) -> float:
    """Mean next-token cross-entropy over chunks [m, t + 1] (whole batches; the last one is
    padded with repeats of the first chunk and those rows are not counted)."""
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        part = chunks[start:start + batch_size]
        real = len(part)
        if real < batch_size:  # one compiled shape: pad with whole chunks, then drop their rows
            part = np.concatenate([part, np.repeat(chunks[:1], batch_size - real, axis=0)])
        per_row = _eval_rows(params, jnp.asarray(part), cfg=cfg)
        total += float(np.asarray(per_row)[:real].sum())
        count += real * (chunks.shape[1] - 1)
    return total / count


@functools.partial(jax.jit, static_argnames=("cfg",))
def _eval_rows(params: Params, tokens: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Per-row summed next-token cross-entropy of tokens [b, t + 1] -> [b]."""
    logits, _ = forward_train(params, tokens[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def routing_counts(params: Params, ids: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Top-k assignments per (sequence, MoE layer, expert) for ids [b, t] -> int32 [b, layers, e].

    Each token adds top_k assignments in each MoE layer (the experts it is routed to).
    """
    b, t = ids.shape
    _, router_logits = forward_train(params, ids, cfg)
    counts = []
    for logits in router_logits:
        _, selected = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.top_k)  # [n, k]
        one_hot = jax.nn.one_hot(selected.reshape(b, t * cfg.top_k), cfg.num_experts,
                                 dtype=jnp.int32)  # [b, t * k, e]
        counts.append(one_hot.sum(axis=1))
    return jnp.stack(counts, axis=1)


# ---- the loop ---------------------------------------------------------------------------------

def batch_order(num_windows: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Window indices [steps, batch]: each epoch a seeded permutation, cut into whole batches."""
    per_epoch = num_windows // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_windows} windows cannot fill one batch of {batch_size}")
    rows: list[np.ndarray] = []
    epoch = 0
    while len(rows) < steps:
        perm = np.random.default_rng([seed, epoch]).permutation(num_windows)
        rows += list(perm[: per_epoch * batch_size].reshape(per_epoch, batch_size))
        epoch += 1
    return np.stack(rows[:steps])


def fit(cfg: ModelConfig, tc: TrainConfig, train_windows: np.ndarray, val_windows: np.ndarray, *,
        batch_size: int, seed: int, steps_to_run: int | None = None, eval_every: int = 0
        ) -> tuple[Params, dict[str, Any]]:
    """Train from the seeded init for `steps_to_run` (default all) steps of tc's schedule.

    train_windows / val_windows: int32 token windows [m, t + 1]. Validation runs at step 0,
    every `eval_every` steps and after the last step (never when eval_every is 0 or there are
    no validation windows). Returns (params, log): log["steps"] has loss, ce, aux, grad_norm, lr,
    tokens and elapsed_s per step; log["evals"] has val_loss and val_ppl.
    """
    steps_to_run = tc.steps if steps_to_run is None else steps_to_run
    schedule = lr_schedule(tc)
    params = init_params(cfg, seed)
    opt_state = make_optimizer(tc).init(params)
    order = batch_order(len(train_windows), batch_size, tc.steps, seed)
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    evaluate = eval_every > 0 and len(val_windows) > 0

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        loss = eval_loss(params, val_windows, cfg, batch_size)
        evals.append({"step": step, "val_loss": loss, "val_ppl": math.exp(loss)})
        log.info("step %d: validation loss %.4f (ppl %.1f) [%.1f s]", step, loss, math.exp(loss),
                 time.perf_counter() - t0)

    if evaluate:
        run_eval(0)
    tokens_per_step = batch_size * (train_windows.shape[1] - 1)
    t_start = time.perf_counter()
    for step in range(steps_to_run):
        batch = jnp.asarray(train_windows[order[step]])
        params, opt_state, m = train_step(params, opt_state, batch, cfg=cfg, tc=tc)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        elapsed = time.perf_counter() - t_start
        steps.append({"step": step + 1, **m, "lr": float(schedule(step)),
                      "tokens": (step + 1) * tokens_per_step, "elapsed_s": round(elapsed, 2)})
        if step == 0 or (step + 1) % 10 == 0:
            log.info("step %d/%d: loss %.4f ce %.4f aux %.3f |g| %.2f lr %.2e  %.0f tok/s",
                     step + 1, tc.steps, m["loss"], m["ce"], m["aux"], m["grad_norm"],
                     schedule(step), (step + 1) * tokens_per_step / elapsed)
        if evaluate and ((step + 1) % eval_every == 0 or step + 1 == steps_to_run):
            run_eval(step + 1)
    train_s = time.perf_counter() - t_start
    return params, {"steps": steps, "evals": evals, "train_wall_s": round(train_s, 1),
                    "tokens_per_s": round(steps_to_run * tokens_per_step / train_s, 1)}


def routing_skew(params: Params, windows: np.ndarray, cfg: ModelConfig, batch_size: int
                 ) -> dict[str, Any]:
    """How unevenly the router spreads the text windows [m, t + 1] (inputs: all but the last).

    Per MoE layer: `top2_share`, the share of all top-k assignments taken by the layer's two
    most-used experts (uniform routing: 2 / e), and which experts they are;
    `top2_share_per_window`, the same share within each window, averaged (what one batch sees);
    `expert_shares`, every expert's share.
    """
    per_window = []
    for start in range(0, len(windows), batch_size):
        part = windows[start:start + batch_size, :-1]
        real = len(part)
        if real < batch_size:  # one compiled shape
            part = np.concatenate([part, np.repeat(part[:1], batch_size - real, axis=0)])
        per_window.append(np.asarray(routing_counts(params, jnp.asarray(part), cfg=cfg))[:real])
    counts = np.concatenate(per_window).astype(np.int64)  # [m, layers, e]
    total = counts.sum(axis=0)  # [layers, e]
    shares = total / total.sum(axis=1, keepdims=True)
    win_shares = counts / counts.sum(axis=2, keepdims=True)
    return {
        "windows": int(counts.shape[0]), "tokens": int(counts[:, 0].sum() // cfg.top_k),
        "top2_share": [round(float(x), 4) for x in np.sort(shares, axis=1)[:, -2:].sum(axis=1)],
        "top2_experts": [[int(e) for e in np.argsort(-s, kind="stable")[:2]] for s in shares],
        "top2_share_per_window": [round(float(x), 4) for x in
                                  np.sort(win_shares, axis=2)[:, :, -2:].sum(axis=2).mean(axis=0)],
        "expert_shares": [[round(float(x), 4) for x in s] for s in shares]}
