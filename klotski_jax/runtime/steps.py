"""Jitted compute pieces the schedules add on top of models/blocks.py.

The expert phase works on all tokens of all groups at once: X [N, d] is the concatenated MoE input,
and each expert gathers its rows of X, runs its FFN, and scatter-adds its weighted output into a
float32 accumulator [N, d]. Row counts are padded to buckets (powers of two, and 1.5 times them
above 64 rows: `costs.bucket`) so that a run compiles a handful of shapes during warm-up and
never again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from klotski_jax.config import ModelConfig
from klotski_jax.constants import MESH_AXIS, bucket, buckets_upto
from klotski_jax.models import blocks
from klotski_jax.models.specs import expert_leaves, nest


def pad_rows(rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad token rows and their routing weights to the bucket size (padding: row 0, weight 0)."""
    size = bucket(len(rows))
    r = np.zeros(size, np.int32)
    w = np.zeros(size, np.float32)
    r[: len(rows)] = rows
    w[: len(rows)] = weights
    return r, w


@functools.partial(jax.jit, static_argnums=(0,))
def zero_accumulator(shape: tuple[int, ...]) -> jax.Array:
    """A float32 zero accumulator [N, d] for expert_apply (jitted: a plain jnp.zeros dispatches
    two primitives op by op, about half a millisecond per layer on CPU)."""
    return jnp.zeros(shape, jnp.float32)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("block",))
def experts_apply(acc: jax.Array, x: jax.Array, rows: jax.Array, weights: jax.Array,
                  experts: tuple[Mapping[str, jax.Array], ...], *, block: int = 0
                  ) -> tuple[jax.Array, jax.Array]:
    """acc[rows[j]] += weights[j] * Expert_j(x[rows[j]]) for the k experts of one call; acc
    [N, d] float32 (donated), rows and weights [k, bucket]; experts: k experts' states {gate,
    up, down} (pure form), each merged into `modules.Expert` here (a quantized expert's arrays
    are dequantized here, on the device, next to the matmuls); block: `blocks.expert_block`,
    the block side of fp8 experts (0 for the others).

    Several experts in one call (`BATCH_ROWS`) pay one dispatch instead of k: with small
    experts and few rows each (a decode step of a model with 64+ experts runs hundreds) the
    per-call cost is a large part of an expert's time. Their outputs are added with one
    scatter (a token routed to two of them gets both).

    Also returns a scalar computed by the same execution: the fence that says the experts'
    weights are no longer read (acc cannot be one: the next call donates it)."""
    ys = [blocks.merge_expert(w, block)(x[r]) for w, r in zip(experts, rows, strict=True)]
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys)  # [k * bucket, d]
    flat_rows, flat_weights = rows.reshape(-1), weights.reshape(-1)
    return acc.at[flat_rows].add(y.astype(jnp.float32) * flat_weights[:, None]), y[0, 0]


def expert_apply(acc: jax.Array, x: jax.Array, rows: np.ndarray, weights: np.ndarray,
                 expert: Mapping[str, jax.Array], *, block: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
    """One expert: `experts_apply` with k = 1 (rows, weights [bucket], NumPy)."""
    return experts_apply(acc, x, rows[None], weights[None], (expert,), block=block)


def batch_sizes(batch: int) -> list[int]:
    """The call sizes a gatherer of `batch` (a power of two) experts makes: powers of two up
    to it (a partial batch of 3 runs as 2 + 1), each one compiled program per bucket."""
    return [1 << j for j in range(batch.bit_length())]


def split_batch(n: int) -> list[int]:
    """n experts as calls of powers of two, largest first (binary digits of n)."""
    return [1 << j for j in reversed(range(n.bit_length())) if n >> j & 1]


# In decode steps, experts whose padded row count is at most BATCH_ROWS go through
# `experts_apply` together when they are ready together (`Policy.expert_batch` of them per call,
# default 4: two compiled programs more per such bucket, for 2 and 4 experts; 8 per call
# measured little better than 4). Above it an expert's matmuls outweigh a dispatch.
BATCH_ROWS = 8


@functools.cache
def device_sum(mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
    """The combine of expert parallelism: each device's float32 accumulator [N, d] (the rows of
    a [devices * N, d] array sharded over the mesh) summed over the devices (one psum, an
    all-reduce of N x d floats), replicated on every device as the combine step expects."""
    spec = jax.sharding.PartitionSpec(MESH_AXIS)
    total = jax.shard_map(lambda acc: jax.lax.psum(acc, MESH_AXIS), mesh=mesh, in_specs=spec,
                          out_specs=jax.sharding.PartitionSpec())
    return jax.jit(total)


def warm_up_experts(cfg: ModelConfig, n_rows: int, device: jax.Device | None = None,
                    batch: int = 1) -> None:
    """Compile the expert calls for every bucket a step of n_rows tokens can produce (and the
    batched call of `batch` experts for buckets up to BATCH_ROWS), so routing that sends a new
    number of tokens to an expert mid-run never triggers a compile. `device`: one device of a
    mesh (its inputs committed there, as a run's are; a step compiles per device)."""
    d, dt = cfg.hidden_size, jnp.dtype(cfg.dtype)

    def zeros(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        z = jnp.zeros(shape, dtype)
        return z if device is None else jax.device_put(z, device)

    x = zeros((n_rows, d), dt)
    expert = nest({leaf.name: zeros(leaf.shape, jnp.dtype(leaf.dtype))
                   for leaf in expert_leaves(cfg)})
    for size in buckets_upto(n_rows):
        for k in batch_sizes(batch) if size <= BATCH_ROWS else (1,):
            acc = zeros((n_rows, d), jnp.float32)
            jax.block_until_ready(experts_apply(
                acc, x, np.zeros((k, size), np.int32), np.zeros((k, size), np.float32),
                (expert,) * k, block=blocks.expert_block(cfg)))


@functools.partial(jax.jit, static_argnames=("t",))
def cache_slots(cache: jax.Array, start: jax.Array, *, t: int) -> jax.Array:
    """Positions start..start+t of a KV cache [b, s, heads, h], sliced on the device.

    Writing a host-resident cache back copies only these slots off the device, not the whole
    cache (start is traced: one compile per t, not per step).
    """
    return jax.lax.dynamic_slice_in_dim(cache, start, t, axis=1)


@functools.cache
def host_slot_writer(memory: jax.sharding.Sharding) -> Callable[..., jax.Array]:
    """The jitted write of new cache slots into a KV cache held in host memory `memory` (jax's
    pinned_host kind): (cache [b, s, heads, h], slots [b, t, heads, h], start) -> the cache with
    the slots at start. It runs in host memory (`compute_on("device_host")`), donating the old
    cache, so a step moves only its new slots off the device, as the NumPy cache's write does."""

    def write(cache: jax.Array, slots: jax.Array, start: jax.Array) -> jax.Array:
        with compute_on("device_host"):
            return jax.lax.dynamic_update_slice_in_dim(cache, slots.astype(cache.dtype), start,
                                                       axis=1)

    put = jax.jit(write, donate_argnums=(0,), out_shardings=memory)
    return lambda cache, slots, start: put(cache, jax.device_put(slots, memory), start)


def pinned_kv_works(memory: jax.sharding.Sharding) -> bool:
    """Whether this backend runs `host_slot_writer` in `memory` (tried once on a tiny cache):
    if not, host-resident KV caches stay NumPy arrays."""
    try:
        cache = jax.device_put(np.zeros((1, 4, 1, 2), np.float32), memory)
        out = host_slot_writer(memory)(cache, jnp.ones((1, 1, 1, 2), jnp.float32), np.int32(2))
        return bool(np.asarray(out)[0, 2, 0, 0] == 1 and np.asarray(out)[0, 1, 0, 0] == 0)
    except Exception:  # noqa: BLE001 (any backend error means: not supported here)
        return False


@functools.partial(jax.jit, static_argnames=("cfg",))
def finish_moe(w: blocks.LayerState, h: jax.Array, x: jax.Array, acc: jax.Array,
               offset: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """h + routed output (this group's rows of acc) + shared expert; h [b, t, d], x [b*t, d];
    w: the layer's dense-part state."""
    b, t, d = h.shape
    out = jax.lax.dynamic_slice_in_dim(acc, offset, b * t).astype(h.dtype)
    return h + blocks.finish_moe_output(w, out, x, cfg).reshape(b, t, d)


@functools.partial(jax.jit, static_argnames=("cfg",))
def route_group(w: blocks.LayerState, h: jax.Array, *, cfg: ModelConfig
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One group's MoE input and routing: h [b, t, d] -> (x [b*t, d], weights, experts)."""
    return blocks.router_block(w, h.reshape(-1, h.shape[-1]), cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def last_token_logits(w_norm: jax.Array, w_head: jax.Array, h: jax.Array, *, cfg: ModelConfig
                      ) -> jax.Array:
    """Float32 logits of the last position only: h [b, t, d] -> [b, v]."""
    return blocks.lm_head(w_norm, w_head, h[:, -1:], cfg=cfg)[:, 0]


class Accumulators:
    """The float32 accumulators [N, d] of one MoE layer's expert phase: one per device that
    computes experts (each made on first use, on that device), over the MoE input x [N, d]
    (each device reads its own replica)."""

    def __init__(self, x: jax.Array, devices: list[jax.Device],
                 mesh: jax.sharding.Mesh | None, local: list[bool]) -> None:
        self.devices, self.mesh, self.shape, self.local = devices, mesh, x.shape, local
        if mesh is None:
            self.x = [x]
        else:  # this process's devices only (a multi-host mesh's others are not addressable)
            by_device = {shard.device: shard.data for shard in x.addressable_shards}
            self.x = [by_device.get(d) for d in devices]
        self.sums: list[jax.Array | None] = [None] * len(devices)

    def on(self, d: int) -> jax.Array:
        """Device d's accumulator (zeros on that device until an expert adds to it)."""
        if self.sums[d] is None and self.mesh is None:
            self.sums[d] = zero_accumulator(self.shape)
        elif self.sums[d] is None:
            with jax.default_device(self.devices[d]):
                self.sums[d] = zero_accumulator(self.shape)
        return self.sums[d]

    def total(self) -> jax.Array:
        """The routed experts' output summed over devices (replicated on a mesh)."""
        if self.mesh is None:
            return self.on(0)
        parts = [self.on(d) for d in range(len(self.devices)) if self.local[d]]
        n, d = self.shape
        stacked = jax.make_array_from_single_device_arrays(
            (len(self.devices) * n, d), jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec(MESH_AXIS)), parts)
        return device_sum(self.mesh)(stacked)
