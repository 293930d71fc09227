"""The devices a run spans and what they say about their memory: which local devices (a 1-D
mesh of them, or every process's devices in a multi-host job), their own memory counts, pinned
host memory, and the live-array cross-check of the ledgers."""

from __future__ import annotations

import collections
import logging
import math
import os
from typing import Any

import jax

from klotski_jax.planning.policy import Policy, PolicyError

log = logging.getLogger(__name__)


def warn_preallocation(policy: Policy | None) -> None:
    """A device budget on a GPU whose XLA client preallocates (its default: 75% of the
    memory) is not the memory the process takes: say how to turn it off. The CLI turns it off
    itself, before JAX starts (cli/main.py)."""
    if policy is None or policy.device_budget is None or jax.default_backend() != "gpu":
        return
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("false", "0"):
        log.warning("XLA preallocates most of the GPU's memory, so the device budget is not what "
                    "this process holds: set XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX "
                    "starts (the klotski command does)")


def resolve_devices(policy: Policy) -> list[jax.Device]:
    """The local devices a run spans (`Policy.devices`): the first N, all of them ("all"), or
    by default all when they are accelerators and the first one on a CPU (a CPU's simulated
    devices share its cores: nothing to gain by default)."""
    local = jax.local_devices()
    want = policy.devices
    if jax.process_count() > 1:  # a multi-host job: one mesh over every process's devices
        every = jax.devices()
        if want not in (None, "all", len(every)):
            raise PolicyError(f"devices={want}: a multi-host run spans all {len(every)} devices "
                              f"of its {jax.process_count()} processes (leave --devices unset)")
        return every
    if want is None:
        want = len(local) if local[0].platform != "cpu" else 1
    elif want == "all":
        want = len(local)
    if want > len(local):
        hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
                "starts simulates N devices)" if local[0].platform == "cpu" else "")
        raise PolicyError(f"devices={want} but this process has {len(local)} local "
                          f"{local[0].platform} device(s){hint}")
    return local[:want]


def devices_memory_stats(devices: list[jax.Device]) -> dict[str, Any] | None:
    """The devices' own memory counts (None where the backend has none, e.g. CPU): the
    highest peak in use and the smallest limit over the devices."""
    stats = [d.memory_stats() for d in devices if d.process_index == jax.process_index()]
    if any(s is None for s in stats):
        return None
    out: dict[str, Any] = {}
    if all("peak_bytes_in_use" in s for s in stats):
        out["peak_bytes_in_use"] = max(int(s["peak_bytes_in_use"]) for s in stats)
    if all("bytes_limit" in s for s in stats):
        out["bytes_limit"] = min(int(s["bytes_limit"]) for s in stats)
    return out


def use_pinned_host(policy: Policy, device: Any = None) -> bool:
    """Whether the host expert cache and the host's dense layers live in pinned host memory
    (jax's `pinned_host` kind). Asked for (`pinned_host=True`) on a backend without that memory
    kind, they fall back to ordinary host memory, with a log line saying so."""
    device = device or jax.local_devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if policy.pinned_host is None:
        return device.platform != "cpu" and "pinned_host" in kinds
    if policy.pinned_host and "pinned_host" not in kinds:
        log.warning("%s device %s has no pinned_host memory (memory kinds: %s): the host cache "
                    "stays in ordinary host memory", device.platform, device, sorted(kinds))
        return False
    return policy.pinned_host


def live_bytes_by_device(exclude: set[int] = frozenset(), arrays: list[jax.Array] | None = None
                         ) -> dict[jax.Device, int]:
    """Bytes of all live jax arrays (or of `arrays`, a snapshot of them) in device memory (not
    pinned/unpinned host memory) on each device (a replicated array counts on each), but those
    whose id is in `exclude` (the host cache's arrays, host memory on a CPU backend). Read from
    the shardings alone: asking an array for its `addressable_shards` would make (and cache)
    a live array per shard, counted again by the next check."""
    total: dict[jax.Device, int] = collections.defaultdict(int)
    for a in jax.live_arrays() if arrays is None else arrays:
        if id(a) in exclude:
            continue
        try:
            sharding = a.sharding
            if sharding.memory_kind not in (None, "device"):
                continue
            if isinstance(sharding, jax.sharding.SingleDeviceSharding):  # the common case
                total[next(iter(sharding.device_set))] += a.nbytes
                continue
            devices = sharding.addressable_devices
            shard = math.prod(sharding.shard_shape(a.shape))
            whole = math.prod(a.shape)
            nbytes = a.nbytes if len(devices) == 1 or not whole else a.nbytes * shard // whole
        except Exception:  # noqa: BLE001  (deleted or exotic arrays)
            continue
        for device in devices:
            total[device] += nbytes
    return dict(total)
