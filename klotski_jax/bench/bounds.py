"""The lower bound of a `klotski bench` run on this machine (the efficiency figure's numerator)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BoundInputs:
    """What the lower bound of one configuration needs (bytes, bytes/s, seconds)."""

    steps: int  # decoder steps: rounds x gen_len (a prefill and gen_len - 1 decode steps)
    dense_bytes: int  # all layers' dense weights (attention, norms, routers, shared experts)
    expert_bytes: int  # all routed experts
    activated_fraction: float  # share of (layer, expert) pairs a step uses, measured
    device_room: int | None  # device bytes left for weights beside the fixed part
    host_room: int | None  # host bytes left for experts beside the globals and dense weights
    cold_disk: bool
    direct_io: bool  # every read hits the disk (O_DIRECT), not the page cache
    disk_cold_bps: float
    disk_warm_bps: float
    h2d_bps: float
    compute_prefill_s: float  # the same workload with every weight resident: its prefills
    compute_decode_s: float  # ... and its decode steps
    rounds: int = 1  # prefill steps (each round starts with an empty host cache)


def lower_bound(b: BoundInputs) -> dict[str, float]:
    """A lower bound on the time of one run on this machine, and its parts.

    Each step uses its dense weights and the activated experts (A bytes); at most `device_room`
    of them can stay on the device between steps, so each step moves at least A - room to it.
    Each round's host cache starts empty, so the activated experts not on the device are read
    from the chunk files at least once per round, by its prefill (at the cold-disk bandwidth
    with --cold-disk, else at the page-cache one); those beyond device and host room again at
    every decode step. Disk reads and device transfers can overlap each other and compute, but
    not across the phases: a round's prefill needs its first reads, and decoding starts after
    it. So the bound is max(prefill I/O, prefill compute) + max(decode I/O, decode compute),
    with the compute times of the all-resident run.
    """
    inf = float("inf")
    room = inf if b.device_room is None else max(b.device_room, 0)
    host = inf if b.host_room is None else max(b.host_room, 0)
    experts = b.activated_fraction * b.expert_bytes
    per_step = max(0.0, b.dense_bytes + experts - room)
    decode_steps = max(0, b.steps - b.rounds)
    first = b.rounds * max(0.0, experts - room)
    again = decode_steps * max(0.0, experts - room - host)
    first_bps = b.disk_cold_bps if b.cold_disk or b.direct_io else b.disk_warm_bps
    again_bps = b.disk_cold_bps if b.direct_io else b.disk_warm_bps
    prefill_io = max(first / first_bps, b.rounds * per_step / b.h2d_bps)
    decode_io = max(again / again_bps, decode_steps * per_step / b.h2d_bps)
    prefill = max(prefill_io, b.compute_prefill_s)
    decode = max(decode_io, b.compute_decode_s)
    return {"lower_bound_s": prefill + decode, "lower_bound_io_s": prefill_io + decode_io,
            "lower_bound_prefill_s": prefill, "lower_bound_decode_s": decode,
            "lower_bound_disk_s": first / first_bps + again / again_bps,
            "lower_bound_h2d_s": b.steps * per_step / b.h2d_bps,
            "lower_bound_compute_s": b.compute_prefill_s + b.compute_decode_s,
            "min_bytes_to_device": int(b.steps * per_step),
            "min_bytes_read_disk": int(first + again)}
