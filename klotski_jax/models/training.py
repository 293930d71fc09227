"""Training an MoE model with the inference math: a differentiable full-sequence forward.

The model trained is the NNX `MoEModel` of models/modules.py, the same modules the reference
model and the pipeline run, so a model trained here is exactly the model our engine serves.
What training adds:

- `forward_train(model, ids)`: causal attention over whole sequences (`DecoderLayer.attention`
  with an empty KV cache as long as the sequence), the MoE by `RoutedExperts.grouped` (only each
  token's top-k experts; the same sum as the reference's dense oracle at about k / e of its
  expert FLOPs), and the router logits of every MoE layer;
- `load_balancing_loss`: Mixtral's router auxiliary loss exactly as transformers'
  `load_balancing_loss_func` defines it (Switch Transformer eqs. 4-6, pooled over layers);
- `init_params` / `init_model`: HF-style random init of every array of `weight_specs(cfg)`;
- `make_optimizer` / `new_optimizer` / `train_step` / `eval_loss`: optax AdamW with linear
  warm-up, cosine decay and global-norm clipping in an `nnx.Optimizer`, one `nnx.jit` step over a
  batch of packed token sequences that updates the model and the optimizer in place;
- `fit`: the seeded training loop with its loss log, optionally saving orbax checkpoints
  (`TrainCheckpoints`) and resuming from the latest one on the same loss curve;
  `routing_skew`: how unevenly the trained router spreads a text over the experts.

Parameters are float32 `nnx.Param`s in HF (out, in) orientation; `flat_params(model)` names
them by their NNX paths joined with "." (the flat names of models/specs.py), so exporting an HF
checkpoint is a key rename (see checkpoints/default_model.py).

Shapes: b batch, t sequence, d hidden, v vocabulary, e experts, k top-k, n = b * t tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import pathlib
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from klotski_jax.config import ModelConfig
from klotski_jax.models import layers
from klotski_jax.models.modules import MoEModel
from klotski_jax.models.reference import state_from_flat
from klotski_jax.models.specs import weight_specs

log = logging.getLogger(__name__)

Params = dict[str, jax.Array]  # flat name -> array (models/specs.py), the export's form
F32 = jnp.float32


# ---- init and the flat form -------------------------------------------------------------------

def init_params(cfg: ModelConfig, seed: int, std: float = 0.02) -> Params:
    """HF-style init: every matrix ~ N(0, std), norms (and `*_norm` weights) 1, biases 0.

    Each array gets its own key folded from its index in `weight_specs(cfg)`, so the result
    depends only on (cfg, seed, std), not on the order in which modules build their parameters
    (the committed default model was trained from exactly this init).
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


def model_from_params(cfg: ModelConfig, params: Mapping[str, Any]) -> MoEModel:
    """The float32 `MoEModel` holding `params` (flat names; any float dtype, cast to float32).

    Training keeps float32 parameters whatever `cfg.dtype` says; nothing is randomly initialised
    on the way (the module is built abstractly, then filled)."""
    missing = [s.name for s in weight_specs(cfg) if s.name not in params]
    if missing:
        raise ValueError(f"params are missing {len(missing)} arrays, e.g. {missing[:3]}")
    abstract = nnx.eval_shape(lambda: MoEModel(cfg, rngs=nnx.Rngs(0), dtype=F32))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, state_from_flat(abstract, params), rest)


def init_model(cfg: ModelConfig, seed: int, std: float = 0.02) -> MoEModel:
    """The float32 `MoEModel` with `init_params(cfg, seed, std)`: deterministic per (cfg, seed)."""
    return model_from_params(cfg, init_params(cfg, seed, std))


def flat_params(model: MoEModel) -> Params:
    """The model's parameters by flat name: each `nnx.Param`'s path joined with "." (the names
    of models/specs.py, which `write_hf_checkpoint` exports)."""
    return {".".join(str(k) for k in path): var[...]
            for path, var in nnx.state(model, nnx.Param).flat_state()}


# ---- forward ----------------------------------------------------------------------------------

def forward_train(model: MoEModel, ids: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Full-sequence causal forward: ids [b, t] -> (float32 logits [b, t, v], router logits).

    The router logits are one [b * t, e] float32 array per MoE layer (HF's `router_logits`).
    Positions are 0..t-1 in every row (packed sequences, no padding). Differentiable in the
    model's `nnx.Param`s; call it under `nnx.jit` / `nnx.grad`.
    """
    cfg = model.cfg
    b, t = ids.shape
    h = jnp.take(model.embed[...], ids, axis=0)  # [b, t, d]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    zero = jnp.zeros((), jnp.int32)
    router_logits: list[jax.Array] = []
    for i, layer in enumerate(model.layers):
        with jax.named_scope(f"layer{i}"):
            # An empty cache as long as the sequence: the inference attention becomes plain
            # causal self-attention (its K/V outputs are dropped).
            empty = tuple(jnp.zeros((b, t, *shape), h.dtype) for shape in cfg.kv_cache_shapes)
            h, _ = layer.attention(h, positions, empty, zero, valid, cfg.sliding_windows[i])
            if layer.moe is None:
                h = layer.feed_forward(h)
                continue
            d = h.shape[-1]
            x = layer.ffn_input(h.reshape(b * t, d))
            logits = layer.moe.router.logits(x)  # [n, e] float32, what HF's gate returns
            weights, idx = layer.moe.router.route(logits)
            out = layer.moe.finish(layer.moe.experts.grouped(x, weights, idx), x)
            h = h + out.reshape(b, t, d)
            router_logits.append(logits)
    normed = layers.rms_norm(h, model.final_norm[...], cfg.rms_norm_eps)
    return layers.linear(normed, model.head_weight()).astype(F32), router_logits


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


def loss_fn(model: MoEModel, tokens: jax.Array, aux_coef: float
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on tokens [b, t + 1] plus aux_coef * load-balancing loss."""
    cfg = model.cfg
    logits, router_logits = forward_train(model, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.top_k)
    return ce + aux_coef * aux, {"ce": ce, "aux": aux}


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not on norms or biases): a bool per parameter leaf."""
    return jax.tree.map(lambda v: v.ndim >= 2, params)


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from peak_lr / warmup_steps (not 0: the first step is not wasted) to
    peak_lr at step warmup_steps, then cosine decay to peak_lr * final_lr_fraction at the last
    step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=tc.peak_lr / max(tc.warmup_steps, 1), peak_value=tc.peak_lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.peak_lr * tc.final_lr_fraction)


@functools.cache
def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices) on `lr_schedule`.

    One object per TrainConfig: the transformation is a static attribute of the `nnx.Optimizer`,
    so a new one per run would make `train_step` trace and compile again."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=_decay_mask))


def new_optimizer(model: MoEModel, tc: TrainConfig) -> nnx.Optimizer:
    """A fresh `nnx.Optimizer` of `make_optimizer(tc)` over the model's `nnx.Param`s (its state:
    the AdamW moments and the schedule's step count)."""
    return nnx.Optimizer(model, make_optimizer(tc), wrt=nnx.Param)


@nnx.jit(static_argnames=("tc",), donate_argnames=("model", "optimizer"))
def train_step(model: MoEModel, optimizer: nnx.Optimizer, tokens: jax.Array, tc: TrainConfig
               ) -> dict[str, jax.Array]:
    """One AdamW step on a batch tokens [b, t + 1], updating `model` and `optimizer` in place;
    returns its metrics (loss = ce + coef * aux, ce, aux, grad_norm before clipping)."""
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, tokens, tc.router_aux_loss_coef)
    optimizer.update(model, grads)
    return {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}


def eval_loss(model: MoEModel, chunks: np.ndarray, batch_size: int) -> float:
    """Mean next-token cross-entropy over chunks [m, t + 1] (whole batches; the last one is
    padded with repeats of the first chunk and those rows are not counted)."""
    graphdef, state = nnx.split(model)  # once: an nnx.jit call walks the graph every time
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        part = chunks[start:start + batch_size]
        real = len(part)
        if real < batch_size:  # one compiled shape: pad with whole chunks, then drop their rows
            part = np.concatenate([part, np.repeat(chunks[:1], batch_size - real, axis=0)])
        per_row = _eval_rows(graphdef, state, jnp.asarray(part))
        total += float(np.asarray(per_row)[:real].sum())
        count += real * (chunks.shape[1] - 1)
    return total / count


@functools.partial(jax.jit, static_argnums=0)
def _eval_rows(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Per-row summed next-token cross-entropy of tokens [b, t + 1] -> [b]."""
    logits, _ = forward_train(nnx.merge(graphdef, state), tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum(axis=-1)


def routing_counts(model: MoEModel, ids: jax.Array) -> jax.Array:
    """Top-k assignments per (sequence, MoE layer, expert) for ids [b, t] -> int32 [b, layers, e].

    Each token adds top_k assignments in each MoE layer (the experts it is routed to).
    """
    return _routing_counts(*nnx.split(model), ids)


@functools.partial(jax.jit, static_argnums=0)
def _routing_counts(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, t = ids.shape
    _, router_logits = forward_train(model, ids)
    counts = []
    for logits in router_logits:
        _, selected = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.top_k)  # [n, k]
        one_hot = jax.nn.one_hot(selected.reshape(b, t * cfg.top_k), cfg.num_experts,
                                 dtype=jnp.int32)  # [b, t * k, e]
        counts.append(one_hot.sum(axis=1))
    return jnp.stack(counts, axis=1)


# ---- checkpoints ------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A run cannot resume (no checkpoint, or one of another run) or would clobber one."""


CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes


class TrainCheckpoints:
    """Orbax checkpoints of a training run in `directory` (an `ocp.CheckpointManager`).

    Step s's checkpoint (`directory/s/`) holds everything the run needs to continue exactly
    where it was: `state` (an orbax PyTree: the model's float32 `nnx.Param`s and the
    `nnx.Optimizer` state, i.e. AdamW's moments, the schedule's step count and the optimizer's
    step) and `meta` (JSON: the step, which is also the data position, since batch s + 1 is row s
    of the seeded `batch_order`; the run's fingerprint; the loss log so far; the training wall
    time so far and the steps it was resumed at). Orbax writes each step to a temporary
    directory and renames it when complete, and keeps the `keep` latest steps.

    `every`: save after every `every`-th step (0: only after the last step of a `fit`).
    """

    def __init__(self, directory: pathlib.Path, *, every: int, keep: int = 3):
        if every < 0 or keep < 1:
            raise ValueError(f"every must be >= 0 and keep >= 1, got {every}, {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.every, self.keep = every, keep
        self._manager: Any = None

    def _mgr(self) -> Any:
        import orbax.checkpoint as ocp

        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                   enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """The saved steps, oldest first (none when the directory does not exist)."""
        if not self.directory.is_dir():
            return []
        return sorted(self._mgr().all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def clear(self) -> None:
        """Delete every checkpoint (a fresh run in the same directory)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    @staticmethod
    def _tree(model: MoEModel, optimizer: nnx.Optimizer) -> dict[str, nnx.State]:
        return {"model": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}

    def save(self, step: int, model: MoEModel, optimizer: nnx.Optimizer, meta: dict[str, Any]
             ) -> None:
        """Checkpoint the run after `step` steps (meta: JSON-serialisable, see the class)."""
        import orbax.checkpoint as ocp

        meta = {"format": CHECKPOINT_FORMAT, "step": step, **meta}
        self._mgr().save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._tree(model, optimizer)),
            meta=ocp.args.JsonSave(meta)))
        self._mgr().wait_until_finished()

    def latest_meta(self, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        """The meta of the latest checkpoint, checked against this run's fingerprint (nothing
        else is read); CheckpointError when there is none or it is another run's (its
        fingerprint differs: model, optimisation, batch size, seed or data)."""
        import orbax.checkpoint as ocp

        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        where = self.directory / str(step)
        meta = self._mgr().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where} has checkpoint format {meta.get('format')}, this "
                                  f"code reads {CHECKPOINT_FORMAT}")
        want = json.loads(json.dumps(fingerprint))  # as JSON would return it (tuples -> lists)
        have = meta.get("fingerprint", {})
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diff:
            details = "; ".join(f"{k}: checkpoint {have.get(k)!r}, this run {want.get(k)!r}"
                                for k in diff)
            raise CheckpointError(f"{where} is from a different run configuration ({details})")
        return meta

    def load(self, step: int, model: MoEModel, optimizer: nnx.Optimizer) -> None:
        """Load step's params and optimizer state into `model` and `optimizer`, in place."""
        import orbax.checkpoint as ocp

        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._tree(model, optimizer))
        state = self._mgr().restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        nnx.update(model, state["model"])
        nnx.update(optimizer, state["optimizer"])


def _array_digest(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}


def run_fingerprint(cfg: ModelConfig, tc: TrainConfig, train_windows: np.ndarray,
                    val_windows: np.ndarray, batch_size: int, seed: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run on the same loss curve: the model
    config, the optimisation, the batch size, the seed and the exact token windows."""
    return {"model_config": repr(cfg), "train_config": dataclasses.asdict(tc),
            "batch_size": batch_size, "seed": seed, "train_windows": _array_digest(train_windows),
            "val_windows": _array_digest(val_windows)}


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
        batch_size: int, seed: int, steps_to_run: int | None = None, eval_every: int = 0,
        checkpoints: TrainCheckpoints | None = None, resume: bool = False
        ) -> tuple[MoEModel, dict[str, Any]]:
    """Train from the seeded init for `steps_to_run` (default all) steps of tc's schedule.

    train_windows / val_windows: int32 token windows [m, t + 1]. Validation runs at step 0,
    every `eval_every` steps and after the last step (never when eval_every is 0 or there are
    no validation windows). With `checkpoints`, the run is saved after every
    `checkpoints.every`-th step and after its last; with `resume`, it continues from the latest
    checkpoint (its model, optimizer state, step and log) instead of step 0, on the loss curve
    of an uninterrupted run. A fresh run refuses to start over existing checkpoints.

    Returns (model, log): log["steps"] has loss, ce, aux, grad_norm, lr, tokens and elapsed_s
    per step; log["evals"] has val_loss and val_ppl; log["resumed_at"] the steps it resumed at.
    """
    steps_to_run = tc.steps if steps_to_run is None else steps_to_run
    schedule = lr_schedule(tc)
    order = batch_order(len(train_windows), batch_size, tc.steps, seed)
    fingerprint = run_fingerprint(cfg, tc, train_windows, val_windows, batch_size, seed)
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    resumed_at: list[int] = []
    start, prior_wall = 0, 0.0
    if resume:  # check the checkpoint before building anything
        if checkpoints is None:
            raise ValueError("resume needs checkpoints")
        meta = checkpoints.latest_meta(fingerprint)
        start, steps, evals = meta["step"], meta["steps"], meta["evals"]
        prior_wall, resumed_at = meta["train_wall_s"], [*meta["resumed_at"], meta["step"]]
        if start > steps_to_run:
            raise CheckpointError(f"the latest checkpoint in {checkpoints.directory} is at step "
                                  f"{start}, past the {steps_to_run} steps this run trains")
    elif checkpoints is not None and (latest := checkpoints.latest_step()) is not None:
        raise CheckpointError(f"{checkpoints.directory} holds checkpoints of a run (up to step "
                              f"{latest}): resume it or delete them")
    model = init_model(cfg, seed)  # the same init either way: a resumed run then loads into it
    optimizer = new_optimizer(model, tc)
    if resume and checkpoints is not None:
        checkpoints.load(start, model, optimizer)
        log.info("resumed from %s at step %d", checkpoints.directory, start)
    evaluate = eval_every > 0 and len(val_windows) > 0

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()
        loss = eval_loss(model, val_windows, batch_size)
        evals.append({"step": step, "val_loss": loss, "val_ppl": math.exp(loss)})
        log.info("step %d: validation loss %.4f (ppl %.1f) [%.1f s]", step, loss, math.exp(loss),
                 time.perf_counter() - t0)

    if evaluate and start == 0:
        run_eval(0)
    tokens_per_step = batch_size * (train_windows.shape[1] - 1)
    t_start = time.perf_counter()
    for step in range(start, steps_to_run):
        batch = jnp.asarray(train_windows[order[step]])
        m = train_step(model, optimizer, batch, tc=tc)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        elapsed = prior_wall + time.perf_counter() - t_start
        steps.append({"step": step + 1, **m, "lr": float(schedule(step)),
                      "tokens": (step + 1) * tokens_per_step, "elapsed_s": round(elapsed, 2)})
        if step == 0 or (step + 1) % 10 == 0:
            log.info("step %d/%d: loss %.4f ce %.4f aux %.3f |g| %.2f lr %.2e  %.0f tok/s",
                     step + 1, tc.steps, m["loss"], m["ce"], m["aux"], m["grad_norm"],
                     schedule(step), (step + 1 - start) * tokens_per_step / (elapsed - prior_wall))
        if evaluate and ((step + 1) % eval_every == 0 or step + 1 == steps_to_run):
            run_eval(step + 1)
        if checkpoints is not None and (
                step + 1 == steps_to_run or (checkpoints.every and (step + 1) % checkpoints.every == 0)):
            checkpoints.save(step + 1, model, optimizer, {
                "fingerprint": fingerprint, "steps": steps, "evals": evals,
                "train_wall_s": prior_wall + time.perf_counter() - t_start, "resumed_at": resumed_at})
    train_s = prior_wall + time.perf_counter() - t_start
    return model, {"steps": steps, "evals": evals, "train_wall_s": round(train_s, 1),
                   "tokens_per_s": round(steps_to_run * tokens_per_step / max(train_s, 1e-9), 1),
                   "resumed_at": resumed_at}


def routing_skew(model: MoEModel, windows: np.ndarray, batch_size: int) -> dict[str, Any]:
    """How unevenly the router spreads the text windows [m, t + 1] (inputs: all but the last).

    Per MoE layer: `top2_share`, the share of all top-k assignments taken by the layer's two
    most-used experts (uniform routing: 2 / e), and which experts they are;
    `top2_share_per_window`, the same share within each window, averaged (what one batch sees);
    `expert_shares`, every expert's share.
    """
    graphdef, state = nnx.split(model)
    per_window = []
    for start in range(0, len(windows), batch_size):
        part = windows[start:start + batch_size, :-1]
        real = len(part)
        if real < batch_size:  # one compiled shape
            part = np.concatenate([part, np.repeat(part[:1], batch_size - real, axis=0)])
        counts = _routing_counts(graphdef, state, jnp.asarray(part))
        per_window.append(np.asarray(counts)[:real])
    counts = np.concatenate(per_window).astype(np.int64)  # [m, layers, e]
    total = counts.sum(axis=0)  # [layers, e]
    shares = total / total.sum(axis=1, keepdims=True)
    win_shares = counts / counts.sum(axis=2, keepdims=True)
    return {
        "windows": int(counts.shape[0]), "tokens": int(counts[:, 0].sum() // model.cfg.top_k),
        "top2_share": [round(float(x), 4) for x in np.sort(shares, axis=1)[:, -2:].sum(axis=1)],
        "top2_experts": [[int(e) for e in np.argsort(-s, kind="stable")[:2]] for s in shares],
        "top2_share_per_window": [round(float(x), 4) for x in
                                  np.sort(win_shares, axis=2)[:, :, -2:].sum(axis=2).mean(axis=0)],
        "expert_shares": [[round(float(x), 4) for x in s] for s in shares]}
