"""Weight transfers to the device on background I/O threads, under the device ledger.

Keys name what moves: ("dense", layer) is a layer's attention/norm/router/shared weights,
("expert", layer, e) one routed expert, ("kv", layer, group) a host-resident KV cache.
`request` issues a load and takes its place in the
device ledger's FIFO at once, so loads get memory in the order the schedule issued them; an I/O
thread then reads the weights (host cache or disk), `jax.device_put`s them and waits until they
are on the device. `get` blocks the compute thread until a load is done and books the wait as a
bubble. `release` waits until the last computation that read the weights has finished (its
fence), then frees their reservation and staging buffer: a staging buffer that a device array
may alias is never refilled while a computation reads it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Hashable
from typing import Any

import jax

from klotski_jax.pipeline.host import HostTier, StagingBuffer
from klotski_jax.pipeline.ledger import MemoryLedger
from klotski_jax.pipeline.trace import RunStats, Tracer


@dataclasses.dataclass
class OnDevice:
    """Weights that are on the device: a pytree of jax arrays and what they hold."""

    key: Hashable
    arrays: Any
    nbytes: int
    staging: StagingBuffer | None = None


class Transfers:
    """Loads weights to the device, tracks what is there, and accounts every byte of it."""

    def __init__(self, host: HostTier, ledger: MemoryLedger, *, io_threads: int, tracer: Tracer,
                 stats: RunStats, device: jax.Device | None = None) -> None:
        self.host = host
        self.ledger = ledger
        self.tracer = tracer
        self.stats = stats
        self.device = device or jax.devices()[0]
        self._to_device = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, "klotski-io")
        # Host-resident KV caches move on their own thread and within their own window of the
        # device budget: a KV load must never queue behind (or wait for the memory of) expert
        # prefetches that compute can only consume after the attention that needs the KV.
        self._kv_pool = concurrent.futures.ThreadPoolExecutor(1, "klotski-kv")
        self.kv_ledger: MemoryLedger | None = None
        self._loads: dict[Hashable, concurrent.futures.Future[OnDevice]] = {}
        self._pinned: set[Hashable] = set()
        # Host-resident KV caches by group index: ("kv", layer, group) keys load from here.
        self.kv_caches: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._ctx = threading.local()  # the (step, layer) the compute thread is in, for traces

    # ---- sizes --------------------------------------------------------------------------------
    def nbytes(self, key: Hashable) -> int:
        if key[0] == "dense":
            return self.host.dense_layer_bytes(key[1])
        if key[0] == "kv":
            return sum(a.nbytes for a in self.kv_caches[key[2]].kv[key[1]])
        return self.host.cfg.expert_bytes

    # ---- issuing and waiting ------------------------------------------------------------------
    def issued(self, key: Hashable) -> bool:
        """Whether key is loaded, loading or queued."""
        return key in self._loads

    def _lanes(self, key: Hashable) -> tuple[MemoryLedger, concurrent.futures.Executor]:
        if key[0] == "kv":
            if self.kv_ledger is None:
                raise RuntimeError("KV cache transfers need Transfers.kv_ledger (a KV window)")
            return self.kv_ledger, self._kv_pool
        return self.ledger, self._pool

    def request(self, key: Hashable, **trace_args: Any) -> concurrent.futures.Future[OnDevice]:
        """Issue a load of key (no-op if already issued); its ledger place is taken now."""
        with self._lock:
            fut = self._loads.get(key)
            if fut is None:
                ledger, pool = self._lanes(key)
                place = ledger.enqueue(key, self.nbytes(key))
                fut = pool.submit(self._load, key, place, trace_args)
                self._loads[key] = fut
            return fut

    def get(self, key: Hashable, **trace_args: Any) -> OnDevice:
        """The loaded weights of key, issuing the load if needed; waiting counts as a bubble."""
        fut = self.request(key, **trace_args)
        if not fut.done():
            start = time.perf_counter()
            concurrent.futures.wait([fut])
            end = time.perf_counter()
            self.stats.io_wait_s += end - start
            self.tracer.add("compute", "wait", start, end, key=str(key), **trace_args)
        return fut.result()

    def pin(self, key: Hashable) -> OnDevice:
        """Load key and keep it for the whole run (resident placement)."""
        self._pinned.add(key)
        # Setup before the timed steps, not a bubble: waiting here is not booked as io_wait_s.
        return self.request(key, resident=True).result()

    def release(self, key: Hashable, fence: Any = None) -> None:
        """Drop key from the device once `fence` (the last output that read it) is computed."""
        if key in self._pinned:
            return
        with self._lock:
            fut = self._loads.pop(key)
        loaded = fut.result()
        if fence is not None:
            jax.block_until_ready(fence)
        if loaded.staging is not None:
            self.host.give_staging(loaded.staging)
        loaded.arrays = None
        self._lanes(key)[0].release(key)

    def discard(self, key: Hashable) -> None:
        """Release key without waiting for it: freed by the I/O thread once its load is done."""
        if key in self._pinned:
            return
        with self._lock:
            fut = self._loads.pop(key)

        def free(done: concurrent.futures.Future[OnDevice]) -> None:
            if done.exception() is None:
                loaded = done.result()
                if loaded.staging is not None:
                    self.host.give_staging(loaded.staging)
                loaded.arrays = None
                self._lanes(key)[0].release(key)

        fut.add_done_callback(free)

    def close(self) -> None:
        """Stop queued loads, wait for running ones and free everything, pinned weights included.

        Loads still waiting for memory are woken with an error (after a failed step nothing
        would ever free their memory), so tearing down never hangs.
        """
        self._pinned.clear()
        for fut in self._loads.values():
            fut.cancel()
        self.ledger.abort()
        if self.kv_ledger is not None:
            self.kv_ledger.abort()
        self._pool.shutdown(wait=True)
        self._kv_pool.shutdown(wait=True)
        for key, fut in list(self._loads.items()):
            if fut.cancelled() or fut.exception() is not None:
                self._loads.pop(key)
                continue
            self.release(key)

    # ---- the I/O thread's work ----------------------------------------------------------------
    def _load(self, key: Hashable, place: Any, trace_args: dict[str, Any]) -> OnDevice:
        # "klotski-io_0" -> lane "io-0"; the KV thread "klotski-kv_0" -> lane "kv-0"
        lane = threading.current_thread().name.removeprefix("klotski-").replace("_", "-")
        start = time.perf_counter()
        self._lanes(key)[0].wait(place)  # FIFO: memory in issue order
        got_memory = time.perf_counter()
        staging, disk, hit = None, 0, False
        if key[0] == "dense":
            host_arrays = self.host.layers[key[1]]
        elif key[0] == "kv":  # a host-resident (layer, group) KV cache
            host_arrays = self.kv_caches[key[2]].kv[key[1]]
        else:
            host_arrays, staging, disk, hit = self.host.read_expert(
                key[1], key[2], self.host.take_staging)
        arrays = jax.block_until_ready(jax.device_put(host_arrays, self._to_device))
        end = time.perf_counter()
        nbytes = self.nbytes(key)
        with self._lock:
            self.stats.bytes_read_disk += disk
            self.stats.bytes_to_device += nbytes
            self.stats.io_busy_s += end - got_memory
            if key[0] == "expert":
                self.stats.expert_loads += 1
                self.stats.bytes_read_host += 0 if disk else nbytes
        self.tracer.add(lane, f"load {key[0]}", start, end, key=str(key), bytes=nbytes,
                        disk_bytes=disk, host_cache_hit=hit,
                        waited_for_memory_ms=(got_memory - start) * 1e3, **trace_args)
        return OnDevice(key, arrays, nbytes, staging)
