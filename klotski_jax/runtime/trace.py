"""Run statistics and the timeline trace (Chrome trace-event JSON, opens in Perfetto).

One lane for the compute thread and one per I/O thread; one complete ("X") event per
(step, layer, group, expert) piece of work, with the bytes moved in its args. Waiting of the
compute thread on I/O is recorded as its own event ("wait"), so bubbles are visible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from klotski_jax.util import write_atomic


@dataclasses.dataclass
class RunStats:
    """What one generation run did. Seconds are wall time; bytes are actual bytes moved."""

    schedule: str = ""
    groups: int = 0  # the most groups a round ran
    batch_size: int = 0  # the most sequences a group of a round held
    rounds: int = 0
    group_sizes: list[list[int]] = dataclasses.field(default_factory=list)  # per round
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    bytes_read_disk: int = 0
    bytes_read_host: int = 0  # expert bytes served from the host cache
    bytes_to_device: int = 0  # summed over devices (a replicated load counts on each)
    bytes_to_device_per_device: list[int] = dataclasses.field(default_factory=list)
    expert_loads: int = 0
    expert_computes: int = 0  # experts computed (one per expert, layer and step)
    expert_calls: int = 0  # jitted expert calls: fewer when ready experts run batched
    hot_hits: int = 0  # hot experts loaded (not resident) that were routed to
    hot_misses: int = 0  # hot experts loaded that were not routed to (wasted prefetch)
    hot_predicted: int = 0  # experts predicted hot (resident ones included), over all layers
    hot_predicted_routed: int = 0  # of those, experts that were then routed to
    hot_sets: int = 0  # MoE layers with a hot-set prediction (K > 0, hot-only prefetch)
    hot_sets_exact: int = 0  # of those, predictions that were a true top-K by routed tokens
    hot_bytes_used: int = 0  # bytes of hot loads that were used: the prediction saved them
    hot_bytes_wasted: int = 0  # bytes of hot loads never used
    lru_hits: int = 0
    compute_s: float = 0.0  # compute thread busy in model steps (dispatch to result ready)
    io_wait_s: float = 0.0  # compute thread blocked on a load: the bubbles
    io_busy_s: float = 0.0  # summed over I/O threads
    peak_device_bytes: int = 0  # the device ledger's peak: what the pipeline reserved
    # On several devices: each device's ledger peak (peak_device_bytes is the largest of them,
    # the figure the per-device budget bounds).
    peak_device_bytes_per_device: list[int] = dataclasses.field(default_factory=list)
    # The device's own count where the backend reports one (`jax.Device.memory_stats()`, GPU and
    # TPU; None on CPU): XLA's peak bytes in use in this process so far (it cannot be reset, so
    # it includes earlier runs and compiled programs' scratch), and its allocator's limit.
    device_peak_bytes_in_use: int | None = None
    device_bytes_limit: int | None = None
    device_budget_bytes: int | None = None
    peak_host_bytes: int = 0
    host_budget_bytes: int | None = None

    def record_round(self, sizes: list[int]) -> None:
        """A round of groups with these sequence counts is about to run."""
        self.rounds += 1
        self.group_sizes.append(list(sizes))
        self.groups = max(self.groups, len(sizes))
        self.batch_size = max(self.batch_size, *sizes)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tokens_per_s(self) -> float:
        """The paper's metric: generated tokens / (prefill + decode time)."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_s"] = self.total_s
        d["throughput_tokens_per_s"] = self.throughput_tokens_per_s
        d["io_wait_fraction"] = self.io_wait_s / self.total_s if self.total_s > 0 else 0.0
        d["hot_precision"] = self.hot_precision
        d["hot_set_accuracy"] = self.hot_set_accuracy
        return d

    @property
    def hot_precision(self) -> float | None:
        """Share of the predicted hot experts that were routed to (None: no prediction)."""
        return self.hot_predicted_routed / self.hot_predicted if self.hot_predicted else None

    @property
    def hot_set_accuracy(self) -> float | None:
        """Share of the layers whose predicted hot set was a true top-K by routed tokens."""
        return self.hot_sets_exact / self.hot_sets if self.hot_sets else None


class Tracer:
    """Collects trace events from the compute thread and the I/O threads (thread-safe)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._events: list[dict[str, Any]] = []
        self._lanes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def _lane(self, name: str) -> int:
        with self._lock:
            return self._lanes.setdefault(name, len(self._lanes))

    def add(self, lane: str, name: str, start: float, end: float, **args: Any) -> None:
        """A complete event on `lane` from perf_counter() start to end."""
        if not self.enabled:
            return
        tid = self._lane(lane)
        event = {"name": name, "ph": "X", "pid": 0, "tid": tid,
                 "ts": (start - self._t0) * 1e6, "dur": max(end - start, 0.0) * 1e6,
                 "args": args}
        with self._lock:
            self._events.append(event)

    @contextlib.contextmanager
    def span(self, lane: str, name: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Time a block as one event; the yielded dict can add args inside the block."""
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            yield extra
        finally:
            self.add(lane, name, start, time.perf_counter(), **args, **extra)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def to_json(self) -> dict[str, Any]:
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": lane}}
                for lane, tid in self._lanes.items()]
        meta.append({"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "klotski-jax"}})
        return {"traceEvents": meta + self.events(), "displayTimeUnit": "ms"}

    def write(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write the trace atomically (temp file + rename)."""
        return write_atomic(path, json.dumps(self.to_json()))
