"""Placement: which tier holds each weight, and the smallest budgets a schedule can run in.

Plain Python over byte counts (no JAX), so the arithmetic is unit-testable and the planner can call
it. Device tier, in priority order:
  1. fixed: final norm, LM head, the KV caches of every group, activations (an untied embedding
     is looked up on the host);
  2. the streaming area the schedule needs (current + next layer's dense weights, expert slots);
  3. all layers' dense weights resident, if they fit;
  4. resident experts (layer-major), from what is left after a generous streaming area.
Host tier: all dense weights, staging buffers, then a read-through cache of experts (experts get
host memory before disk); whatever does not fit is read from the TensorStore files on disk.

On several devices (expert parallelism) every device holds the fixed part, the dense weights and
the KV caches (attention is replicated), and each MoE layer's routed experts are spread over the
devices (`expert_owners`): a device streams and keeps only the experts it owns, so the budget,
which applies to each device, needs slots for its share of a layer, not the whole layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from klotski_jax.config import ModelConfig
from klotski_jax.constants import BudgetError, round_up
from klotski_jax.models.specs import Kind, expert_leaves, weight_specs
from klotski_jax.planning.policy import Policy, Schedule


def staged_expert_bytes(cfg: ModelConfig) -> int:
    """Host bytes of one expert in an aligned staging buffer (each stored array padded to
    ALIGN: three for bf16 experts, six or nine for quantized ones)."""
    return sum(round_up(leaf.nbytes) for leaf in expert_leaves(cfg))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shape of a run: groups x batch sequences of up to max_len cache slots."""

    groups: int
    batch_size: int
    prompt_len: int
    max_new_tokens: int

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


def global_bytes(cfg: ModelConfig) -> int:
    """Embedding, final norm and LM head (all kept in host RAM)."""
    return sum(s.nbytes(cfg) for s in weight_specs(cfg) if s.layer is None)


def device_global_bytes(cfg: ModelConfig) -> int:
    """What of the globals stays on the device: the final norm and the LM head. An untied
    embedding stays on the host: looking up a few rows there and moving the hidden states is
    cheaper than keeping a vocabulary-sized table on the device (the head of a tied model is
    its embedding, so that one is on the device anyway)."""
    names = ("final_norm", "embed" if cfg.tie_word_embeddings else "lm_head")
    return sum(s.nbytes(cfg) for s in weight_specs(cfg) if s.name in names)


def dense_layer_bytes(cfg: ModelConfig) -> list[int]:
    """Per layer: bytes of everything but the routed experts (attention, norms, router, shared),
    each array in its stored dtype: DeepSeek's and GLM's routers are float32 in a bf16 model
    (counted at the model's itemsize, 10 MoE layers of deepseek-mini were 657 KB short, and an
    LRU cache sized to the budget's last byte waited forever for its last slot)."""
    out = [0] * cfg.num_layers
    for s in weight_specs(cfg):
        if s.layer is not None and s.kind is Kind.DENSE:
            out[s.layer] += s.nbytes(cfg)
    return out


def activation_bytes(cfg: ModelConfig, w: Workload) -> int:
    """A generous bound on the activations the largest step (the prefill) keeps on the device."""
    tokens = w.groups * w.batch_size * w.prompt_len
    f32 = 4
    hidden = tokens * cfg.hidden_size * (2 * cfg.itemsize + 3 * f32)  # h, x, combine accumulators
    scores = 3 * w.batch_size * cfg.num_heads * w.prompt_len * w.max_len * f32
    ffn = 3 * tokens * max(cfg.expert_intermediate_size, cfg.dense_intermediate_size,
                           cfg.shared_expert_intermediate_size) * f32
    logits = 2 * w.groups * w.batch_size * cfg.vocab_size * f32
    return hidden + scores + ffn + logits


def kv_window_bytes(cfg: ModelConfig, w: Workload) -> int:
    """Device bytes of host-resident KV caches in flight: two (layer, group) caches (the group
    whose attention runs and the next one, loading meanwhile)."""
    return 2 * cfg.kv_cache_bytes(w.batch_size, w.max_len) // cfg.num_layers


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every weight lives during a run, and the byte counts behind the choice."""

    schedule: Schedule
    dense_resident: bool  # all layers' dense weights stay on the device
    device_experts: frozenset[tuple[int, int]]  # (layer, expert) resident on the device
    host_experts: frozenset[tuple[int, int]] | None  # cached in host RAM (None: all of them)
    expert_slots: int  # device slots for streamed experts (LRU: cache capacity)
    fixed_device_bytes: int
    kv_bytes: int
    activation_bytes: int
    min_device_bytes: int
    min_host_bytes: int
    staging_bytes: int
    kv_on_device: bool = True  # else each (layer, group) KV cache is loaded around its attention
    kv_device_bytes: int = 0  # device bytes for KV: all caches, or the in-flight window
    devices: int = 1  # devices of the mesh; the budgets and byte counts above are per device
    owners: tuple[tuple[int, ...], ...] = ()  # per layer, each routed expert's device ((): 0)

    def owner(self, layer: int, expert: int) -> int:
        """The device (index into the mesh) that holds and computes routed expert (layer, e)."""
        return self.owners[layer][expert] if self.owners else 0

    def describe(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.value, "devices": self.devices,
            "dense_resident": self.dense_resident,
            "device_resident_experts": len(self.device_experts),
            "host_cached_experts": "all" if self.host_experts is None else len(self.host_experts),
            "expert_slots": self.expert_slots,
            "kv_cache_tier": "device" if self.kv_on_device else "host",
            "kv_bytes": self.kv_bytes, "activation_bytes": self.activation_bytes,
            "min_device_bytes": self.min_device_bytes, "min_host_bytes": self.min_host_bytes,
        }


def expert_owners(cfg: ModelConfig, devices: int, load: Sequence[Sequence[float]] | None = None
                  ) -> tuple[tuple[int, ...], ...]:
    """Per layer (empty for dense layers), the device of each routed expert: every device owns
    ceil(E / devices) or floor of them (the memory a layer needs is the same on each), and within
    that the expected load is balanced: experts by decreasing load (`load`: per MoE layer, each
    expert's routing probability, e.g. the prefetch table's; None: uniform, which is round
    robin), each to the least loaded device that has room."""
    e_count = cfg.num_experts
    cap = -(-e_count // devices)
    moe_index = {layer: m for m, layer in enumerate(cfg.moe_layer_ids)}
    out: list[tuple[int, ...]] = []
    for layer in range(cfg.num_layers):
        if layer not in moe_index:
            out.append(())
            continue
        probs = [1.0] * e_count if load is None else [float(p) for p in load[moe_index[layer]]]
        owner = [0] * e_count
        total, count = [0.0] * devices, [0] * devices
        for e in sorted(range(e_count), key=lambda x: -probs[x]):  # stable: ties by id
            d = min((k for k in range(devices) if count[k] < cap),
                    key=lambda k: (total[k], count[k], k))
            owner[e], total[d], count[d] = d, total[d] + probs[e], count[d] + 1
        out.append(tuple(owner))
    return tuple(out)


def streaming_need(cfg: ModelConfig, policy: Policy, dense_resident: bool) -> tuple[int, int]:
    """(bytes of streamed dense weights, minimum expert slots per device) the schedule needs to
    progress. On several devices a "whole layer" is a device's share of it."""
    dense = 0 if dense_resident else max(dense_layer_bytes(cfg))
    e = -(-cfg.num_experts // policy.device_count)
    if policy.schedule is Schedule.SEQUENTIAL:
        return dense, e  # one whole layer at a time
    if policy.schedule is Schedule.FLEXGEN:
        return 2 * dense, 2 * e  # the current layer and the prefetched next one
    if policy.schedule is Schedule.KLOTSKI and not policy.hot_only_prefetch:
        return 2 * dense, e + 1  # the next whole MoE layer streams through the slots
    if policy.schedule is Schedule.KLOTSKI and not policy.reorder:
        # Experts run in id order, so the prefetched hot set may still hold its slots while
        # compute waits for a lower-numbered cold expert: room for both is needed.
        k = policy.hot_experts if policy.hot_experts is not None else cfg.top_k
        return 2 * dense, min(k, e) + 1
    return 2 * dense, 1  # klotski, lru: one expert at a time is enough to make progress


def _target_slots(cfg: ModelConfig, policy: Policy, minimum: int) -> int:
    """How many expert slots the schedule can use well before pinning experts pays more."""
    k = policy.hot_experts if policy.hot_experts is not None else cfg.top_k
    d = policy.device_count
    if policy.schedule is Schedule.KLOTSKI:  # one layer in flight + next layer's hot set
        return max(minimum, -(-cfg.num_experts // d) + -(-k // d))
    return minimum


def place(cfg: ModelConfig, policy: Policy, workload: Workload,
          load: Sequence[Sequence[float]] | None = None) -> Placement:
    """Choose the placement for this run, or raise BudgetError stating the minimum budgets.

    `load`: per MoE layer, each expert's routing probability (balances the experts over
    several devices; None: uniform)."""
    kv = workload.groups * cfg.kv_cache_bytes(workload.batch_size, workload.max_len)
    kv_window = kv_window_bytes(cfg, workload)
    act = activation_bytes(cfg, workload)
    all_dense = sum(dense_layer_bytes(cfg))
    eb = cfg.expert_bytes
    budget = policy.device_budget

    stream_dense, min_slots = streaming_need(cfg, policy, dense_resident=False)
    base = device_global_bytes(cfg) + act
    # KV caches stay on the device when they fit beside the resident dense weights and the
    # schedule's full streaming area; otherwise they live in host memory and each (layer, group)
    # cache visits the device around its attention (FlexGen and Klotski both move KV caches).
    dense_min_slots = streaming_need(cfg, policy, True)[1]
    want_slots = max(_target_slots(cfg, policy, dense_min_slots), dense_min_slots)
    devices = policy.device_count
    if policy.schedule is Schedule.LRU:  # a cache that holds one layer's experts (its share)
        want_slots = max(want_slots, -(-cfg.num_experts // devices))
    kv_on_device = budget is None or budget >= base + kv + all_dense + want_slots * eb
    kv_device = kv if kv_on_device else kv_window
    fixed = base + kv_device
    min_device = base + min(kv, kv_window) + stream_dense + min_slots * eb
    if budget is not None and budget < min_device:
        raise BudgetError(
            f"device budget {budget} bytes" + (" (per device)" if devices > 1 else "")
            + f" is below the minimum {min_device} bytes for the "
            f"{policy.schedule.value} schedule with {workload.groups} group(s) of "
            f"{workload.batch_size} x {workload.max_len} tokens (globals "
            f"{device_global_bytes(cfg)}, activations {act}, KV caches {min(kv, kv_window)} "
            f"in flight of {kv}; streamed dense {stream_dense}; {min_slots} expert slot(s) "
            f"of {eb})")
    room = None if budget is None else budget - fixed
    # Dense weights become resident only when the schedule's full streaming area still fits
    # beside them: trading expert slots for resident dense weights would starve the pipeline.
    dense_resident = room is None or room >= all_dense + want_slots * eb
    if dense_resident:
        min_slots = streaming_need(cfg, policy, True)[1]
        room = None if room is None else room - all_dense
    else:
        room -= stream_dense

    experts = [(i, e) for i in cfg.moe_layer_ids for e in range(cfg.num_experts)]
    if policy.schedule is Schedule.LRU:
        slots = len(experts) if room is None else max(min_slots, room // eb)
        resident: list[tuple[int, int]] = []
    else:
        target = _target_slots(cfg, policy, min_slots)
        slots = target if room is None else max(min_slots, min(target, room // eb))
        spare = len(experts) if room is None else max(0, room // eb - slots)
        resident = experts[:spare] if devices == 1 else []
    owners = expert_owners(cfg, devices, load) if devices > 1 else ()
    if devices > 1 and policy.schedule is not Schedule.LRU:  # each device: its own experts
        for d in range(devices):
            resident += [x for x in experts if owners[x[0]][x[1]] == d][:spare]
        resident.sort()
    # Staging buffers the transfers can hold at once: one per streamed expert the device budget
    # admits, plus one per device-resident expert (its device array may alias the buffer, so the
    # buffer stays with it for the whole run).
    staged = staged_expert_bytes(cfg)
    streamed = len(experts) - len(resident)
    if budget is not None:
        on_one = (len(resident) if devices == 1 else  # the most resident experts on a device
                  max(sum(owners[x[0]][x[1]] == d for x in resident) for d in range(devices)))
        device_room = budget - fixed - (all_dense if dense_resident else 0) - on_one * eb
        streamed = min(streamed, devices * (device_room // eb))
    staging = (streamed + len(resident)) * staged
    host_min = global_bytes(cfg) + all_dense + staging  # HostTier keeps every dense array
    if not kv_on_device:
        host_min += kv
    host_experts = None
    if policy.host_budget is not None:
        if policy.host_budget < host_min:
            raise BudgetError(
                f"host budget {policy.host_budget} bytes is below the minimum {host_min} bytes "
                f"(globals {global_bytes(cfg)} + dense layers {all_dense} + staging buffers "
                f"{staging} for {streamed} streamed and {len(resident)} device-resident "
                f"experts of {staged}" + ("" if kv_on_device else f" + KV caches {kv}") + ")")
        n_host = (policy.host_budget - host_min) // staged
        pinned = set(resident)  # once: rebuilt per expert it was quadratic (15k x 15k at V3)
        host_experts = frozenset([x for x in experts if x not in pinned][:n_host])
    return Placement(
        schedule=policy.schedule, dense_resident=dense_resident,
        device_experts=frozenset(resident), host_experts=host_experts, expert_slots=slots,
        fixed_device_bytes=fixed, kv_bytes=kv, activation_bytes=act, min_device_bytes=min_device,
        min_host_bytes=host_min, staging_bytes=staging, kv_on_device=kv_on_device,
        kv_device_bytes=kv_device, devices=devices, owners=owners)
