"""The planner's predicted scaling over device counts (expert parallelism).

Plain Python (no JAX). For each device count D, the planner plans the same workload as if the
run spanned D devices, each with the base policy's device budget, its own host-to-device link
and its own expert compute (planning/simulate.py): routed experts are spread over the devices,
so each receives and computes about 1/D of a layer's experts, while attention, routers and dense
weights are replicated (as fast as on one device) and every MoE layer ends with an all-reduce
of the devices' float32 accumulators. The prediction is the best plan's throughput at that D.

What the model leaves out: a disk read of an expert is priced per device like a host-cache read
(the devices' lanes do not share the disk); the host's CPU time per load is the profile's
`io_interference` per lane; and it assumes devices that do not share compute. Simulated CPU
devices (`--xla_force_host_platform_device_count`) share this machine's cores, so what they
measure does not scale like this; the prediction is for devices with their own links.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from klotski_jax.config import ModelConfig
from klotski_jax.constants import BudgetError
from klotski_jax.planning.costs import Profile
from klotski_jax.planning.planner import Planner, PlanRequest
from klotski_jax.planning.policy import Policy


def predicted_scaling(cfg: ModelConfig, profile: Profile,
                      routing: Sequence[Sequence[float]] | None, base_policy: Policy | None,
                      request: PlanRequest, device_counts: Sequence[int]) -> list[dict[str, Any]]:
    """Per device count: the planner's choice and predicted throughput for `request` on that
    many devices (`base_policy` with `devices` replaced; its budgets apply per device).

    Each entry: devices, predicted_throughput_tokens_per_s, speedup (over the first count of
    the list), predicted_prefill_s, predicted_decode_step_s, predicted_bubble_fraction, groups,
    batch_size, prefetch, binding_constraint, expert_slots and device_resident_experts (per
    device); `error` (and None predictions) where no plan fits the budgets.
    """
    base = base_policy or Policy()
    out: list[dict[str, Any]] = []
    for d in device_counts:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"device counts must be positive integers, got {d!r}")
        try:
            plan = Planner(cfg, profile, routing, base=base.replace(devices=d)).plan(request)
        except BudgetError as e:
            out.append({"devices": d, "predicted_throughput_tokens_per_s": None, "error": str(e)})
            continue
        pl = plan.placement
        resident = max(sum(pl.owner(i, e) == k for i, e in pl.device_experts) for k in range(d))
        out.append({
            "devices": d, "predicted_throughput_tokens_per_s":
                plan.predicted_throughput_tokens_per_s,
            "predicted_prefill_s": plan.predicted_prefill_s,
            "predicted_decode_step_s": plan.predicted_decode_step_s,
            "predicted_bubble_fraction": plan.predicted_bubble_fraction,
            "groups": plan.groups, "batch_size": plan.batch_size,
            "prefetch": plan.prefetch.describe(), "binding_constraint": plan.binding_constraint,
            "expert_slots": pl.expert_slots, "device_resident_experts": resident, "error": None})
    ref = out[0]["predicted_throughput_tokens_per_s"] if out else None
    for entry in out:
        tput = entry["predicted_throughput_tokens_per_s"]
        entry["speedup"] = tput / ref if tput is not None and ref else None
    return out
