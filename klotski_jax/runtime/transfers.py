"""Weight transfers to the device on background I/O threads, under the device ledger.

Keys name what moves: ("dense", layer) is a layer's attention/norm/router/shared weights,
("expert", layer, e) one routed expert, ("kv", layer, group) a host-resident KV cache.
`request` issues a load and takes its place in the
device ledger's FIFO at once, so loads get memory in the order the schedule issued them; an I/O
thread then reads the weights (host cache or disk), `jax.device_put`s them and waits until they
are on the device. `get` blocks the compute thread until a load is done and books the wait as a
bubble. `release` frees the weights' reservation and staging buffer once the last computation
that read them has finished (its fence): a staging buffer that a device array may alias is never
refilled while a computation reads it, and the ledger never shows memory free that XLA still
holds. The compute thread does not wait for the fence when it releases: the release is kept
pending, in order, and done by the compute thread itself as soon as its fence is computed (it
looks at every request and get), or when it would otherwise block in `get`: before waiting for a
load it completes the pending releases (that load may be waiting for their memory). So jitted
steps stay asynchronously dispatched (XLA's async dispatch keeps working on GPU/TPU, and on CPU
the compute thread runs ahead of the computations), with no thread hand-off per release.

Each load reserves its bytes under its own ledger key (the weight's key and a load number), so a
key can be loaded again (the next step's use of an expert) while the release of its previous
load still waits for its fence.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

from klotski_jax.constants import MESH_AXIS
from klotski_jax.runtime.host import HostTier, StagingBuffer
from klotski_jax.runtime.ledger import DeviceLedgers, MemoryLedger
from klotski_jax.runtime.trace import RunStats, Tracer


@dataclasses.dataclass
class OnDevice:
    """Weights that are on the device: a pytree of jax arrays and what they hold."""

    key: Hashable
    arrays: Any
    nbytes: int
    staging: StagingBuffer | None = None
    ledger_key: Hashable = None  # (key, load number): this load's reservation


class Transfers:
    """Loads weights to the device, tracks what is there, and accounts every byte of it."""

    def __init__(self, host: HostTier, ledger: MemoryLedger | DeviceLedgers, *, io_threads: int,
                 tracer: Tracer, stats: RunStats, device: jax.Device | None = None,
                 kv_ledger: MemoryLedger | DeviceLedgers | None = None,
                 devices: Sequence[jax.Device] | None = None,
                 owner: Callable[[int, int], int] | None = None) -> None:
        """`kv_ledger`: the device window host-resident KV caches load into (None: the KV caches
        stay on the device and are never transferred).

        `devices` (several: a 1-D mesh, with `ledger` a `DeviceLedgers`): routed expert
        (layer, e) loads onto device `owner(layer, e)` only, under that device's ledger, on that
        device's own I/O threads (lanes "io-d<k>-<n>"), so the host-to-device copies of the
        devices run side by side; dense weights and KV caches load replicated onto all."""
        self.host = host
        self.ledger = ledger
        self.tracer = tracer
        self.stats = stats
        self.devices = list(devices) if devices else [device or jax.devices()[0]]
        self.device = self.devices[0]
        self.owner = owner or (lambda layer, e: 0)
        self._single = [jax.sharding.SingleDeviceSharding(d, memory_kind="device")
                        for d in self.devices]
        self._to_device = self._single[0]
        self.mesh: jax.sharding.Mesh | None = None
        self.replicated: jax.sharding.Sharding = self._to_device
        # Devices of this process (a multi-host mesh spans processes: each one loads and
        # computes the experts of its own devices only).
        self.local = [d.process_index == jax.process_index() for d in self.devices]
        if len(self.devices) > 1:
            self.mesh = jax.sharding.Mesh(np.array(self.devices), (MESH_AXIS,))
            self.replicated = jax.sharding.NamedSharding(self.mesh,
                                                         jax.sharding.PartitionSpec())
        names = (["klotski-io"] if len(self.devices) == 1
                 else [f"klotski-io-d{k}" for k in range(len(self.devices))])
        self._pools = [concurrent.futures.ThreadPoolExecutor(io_threads, n) for n in names]
        # Host-resident KV caches move on their own thread and within their own window of the
        # device budget: a KV load must never queue behind (or wait for the memory of) expert
        # prefetches that compute can only consume after the attention that needs the KV.
        self._kv_pool = concurrent.futures.ThreadPoolExecutor(1, "klotski-kv")
        # Releases whose fence was not computed yet, in release order: (fence, loads).
        self._pending: collections.deque[tuple[Any, list[OnDevice]]] = collections.deque()
        self._serial = itertools.count()
        self.kv_ledger = kv_ledger
        self._loads: dict[Hashable, concurrent.futures.Future[OnDevice]] = {}
        self._pinned: set[Hashable] = set()
        # Host-resident KV caches by group index: ("kv", layer, group) keys load from here.
        self.kv_caches: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._ctx = threading.local()  # the (step, layer) the compute thread is in, for traces

    def add_kv_cache(self, cache: Any) -> int:
        """Register a group's KV cache (a `KVCache`); returns the group index that names its
        ("kv", layer, group) transfers when the cache is host-resident."""
        index = len(self.kv_caches)
        self.kv_caches[index] = cache
        return index

    @staticmethod
    def _on_device(parts: Any, sharding: jax.sharding.Sharding) -> bool:
        """Whether host-tier arrays are already arrays where a load puts them (on a CPU
        backend the tier aliases its buffers in the first device): handed out as they are."""
        return all(isinstance(a, jax.Array) and a.sharding == sharding
                   for a in jax.tree_util.tree_leaves(parts))

    def put(self, tree: Any) -> Any:
        """Host arrays to the device (every device of a mesh), as a dense load puts them (the
        compiled steps' input layout)."""
        return jax.block_until_ready(self.to_devices(tree, self.replicated))

    def replicate(self, tree: Any) -> Any:
        """Host arrays on every device of the run, as the jitted steps' replicated inputs (on
        one device uncommitted, as a plain `jax.device_put` leaves them)."""
        if self.mesh is None:
            return jax.device_put(tree)
        return self.to_devices(tree, self.replicated)

    def mine(self, layer: int, expert: int) -> bool:
        """Whether routed expert (layer, expert) is this process's to load and compute (always,
        but on a multi-host mesh)."""
        return self.mesh is None or self.local[self.owner(layer, expert)]

    def to_devices(self, tree: Any, sharding: jax.sharding.Sharding) -> Any:
        """`jax.device_put(tree, sharding)`; on a mesh that spans processes a replicated tree is
        put on each local device and assembled into global arrays (each process holds the same
        host data), which also works from arrays in one device's (pinned) host memory."""
        if self.mesh is None or all(self.local) or sharding is not self.replicated:
            return jax.device_put(tree, sharding)
        mine = [d for d, here in zip(self.devices, self.local) if here]

        def assemble(leaf: Any) -> jax.Array:
            shards = [jax.device_put(leaf, d) for d in mine]
            return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)

        return jax.tree_util.tree_map(assemble, tree)

    # ---- sizes --------------------------------------------------------------------------------
    def nbytes(self, key: Hashable) -> int:
        if key[0] == "dense":
            return self.host.dense_layer_bytes(key[1])
        if key[0] == "kv":
            return sum(a.nbytes for a in self.kv_caches[key[2]].kv[key[1]])
        return self.host.cfg.expert_bytes

    def _moved(self, key: Hashable, nbytes: int) -> None:
        """Count a load's bytes: once per device it lands on (an expert: its owner; dense
        weights and KV caches: every device of a mesh)."""
        st = self.stats
        if not st.bytes_to_device_per_device:
            st.bytes_to_device_per_device = [0] * len(self.devices)
        targets = ([self.owner(key[1], key[2])] if key[0] == "expert" and self.mesh is not None
                   else [d for d in range(len(self.devices)) if self.local[d]])
        for d in targets:
            st.bytes_to_device_per_device[d] += nbytes
            st.bytes_to_device += nbytes

    # ---- issuing and waiting ------------------------------------------------------------------
    def issued(self, key: Hashable) -> bool:
        """Whether key is loaded, loading or queued."""
        return key in self._loads

    def _lanes(self, key: Hashable) -> tuple[Any, concurrent.futures.Executor,
                                             jax.sharding.Sharding]:
        """Where key's load goes: (its ledger, its I/O threads, its device sharding)."""
        if key[0] == "kv":
            if self.kv_ledger is None:
                raise RuntimeError("KV cache transfers need Transfers.kv_ledger (a KV window)")
            return self.kv_ledger, self._kv_pool, self.replicated
        if key[0] == "expert":
            d = self.owner(key[1], key[2])  # 0 on one device
            return self.ledger.parts[d], self._pools[d], self._single[d]
        return self.ledger, self._pools[0], self.replicated

    def request(self, key: Hashable, **trace_args: Any) -> concurrent.futures.Future[OnDevice]:
        """Issue a load of key (no-op if already issued); its ledger place is taken now."""
        self._poll()
        with self._lock:
            fut = self._loads.get(key)
            if fut is None:
                ledger, pool, _ = self._lanes(key)
                lkey, nbytes = (key, next(self._serial)), self.nbytes(key)
                fut = self._put_cached(key, lkey, nbytes, trace_args)
                if fut is None:
                    fut = pool.submit(self._load, key, lkey, ledger.enqueue(lkey, nbytes),
                                      trace_args)
                self._loads[key] = fut
            return fut

    def _put_cached(self, key: Hashable, lkey: Hashable, nbytes: int,
                    trace_args: dict[str, Any]) -> concurrent.futures.Future[OnDevice] | None:
        """A host-cached expert (or a layer's dense weights) whose memory is free now, with no
        load queued before it, is put on the device right here: `jax.device_put` only starts
        the copy (an alias of the host buffer on CPU, an asynchronous DMA from pinned memory on
        GPU/TPU), so handing it to an I/O thread would only add a thread hop, which on a small
        CPU box costs the compute thread more than the copy. Traced on the lane "io-host".
        None: load it the usual way."""
        if key[0] == "expert":
            parts = self.host.cached(key[1], key[2])
        elif key[0] == "dense":
            parts = self.host.layers[key[1]]
        else:
            return None
        if parts is None or (self.device.platform != "cpu" and any(
                isinstance(a, np.ndarray) for a in jax.tree_util.tree_leaves(parts))):
            return None  # a GPU/TPU copy from pageable NumPy memory blocks: a thread's job
        ledger, _, sharding = self._lanes(key)
        if not ledger.try_reserve(lkey, nbytes):
            return None
        start = time.perf_counter()
        arrays = parts if self._on_device(parts, sharding) else self.to_devices(parts, sharding)
        end = time.perf_counter()
        self._moved(key, nbytes)
        if key[0] == "expert":
            self.stats.expert_loads += 1
            self.stats.bytes_read_host += nbytes
        lane = "io-host" if self.mesh is None or key[0] != "expert" else (
            f"io-host-d{self.owner(key[1], key[2])}")
        self.tracer.add(lane, f"load {key[0]}", start, end, key=str(key), bytes=nbytes,
                        disk_bytes=0, host_cache_hit=True, waited_for_memory_ms=0.0,
                        **trace_args)
        fut: concurrent.futures.Future[OnDevice] = concurrent.futures.Future()
        fut.set_result(OnDevice(key, arrays, nbytes, None, ledger_key=lkey))
        return fut

    def ready(self, key: Hashable) -> bool:
        """Whether key's load was issued and has arrived (`get` would not wait)."""
        fut = self._loads.get(key)
        return fut is not None and fut.done()

    def get(self, key: Hashable, busy: Any = None, **trace_args: Any) -> OnDevice:
        """The loaded weights of key, issuing the load if needed; waiting counts as a bubble.

        `busy`: the latest computation the caller dispatched. With asynchronous dispatch the
        device may still be working while the caller waits for a load: it waits for `busy`
        first, so that only the time the device had nothing to do counts as a bubble."""
        fut = self.request(key, **trace_args)
        if not fut.done() and busy is not None:
            jax.block_until_ready(busy)
        while not fut.done() and self._pending:  # the load may wait for this memory
            self._complete_one()
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
        """Drop key from the device once `fence` (an output of the last computation that read
        it) is computed. Returns at once: the release stays pending until the fence is done."""
        self.release_all([key], fence)

    def release_all(self, keys: list[Hashable], fence: Any = None) -> None:
        """`release` of several keys behind one fence (one pending release)."""
        loaded = []
        for key in keys:
            if key in self._pinned:
                continue
            with self._lock:
                fut = self._loads.pop(key)
            loaded.append(fut.result())
        if not loaded:
            return
        if fence is None or _ready(fence):
            for x in loaded:
                self._free(x)
            return
        self._pending.append((fence, loaded))

    def _free(self, loaded: OnDevice) -> None:
        if loaded.staging is not None:
            self.host.give_staging(loaded.staging)
        loaded.arrays = None
        self._lanes(loaded.key)[0].release(loaded.ledger_key)

    def _poll(self) -> None:
        """Complete the pending releases whose fence is computed (in order)."""
        while self._pending and _ready(self._pending[0][0]):
            self._complete_one()

    def _complete_one(self) -> None:
        fence, loaded = self._pending.popleft()
        jax.block_until_ready(fence)
        for x in loaded:
            self._free(x)

    def settle(self) -> None:
        """Complete every pending release (the ledgers then show what is held)."""
        while self._pending:
            self._complete_one()

    def discard(self, key: Hashable) -> None:
        """Release key without waiting for it: freed by the I/O thread once its load is done."""
        if key in self._pinned:
            return
        with self._lock:
            fut = self._loads.pop(key)

        def free(done: concurrent.futures.Future[OnDevice]) -> None:
            if done.exception() is None:
                self._free(done.result())

        fut.add_done_callback(free)

    def close(self) -> None:
        """Stop queued loads, wait for running ones and free everything, pinned weights included.

        Loads still waiting for memory are woken with an error (after a failed step nothing
        would ever free their memory), so tearing down never hangs.
        """
        self._pinned.clear()
        for fut in self._loads.values():
            fut.cancel()
        self.settle()  # fences of finished or failed steps: all computed
        self.ledger.abort()
        if self.kv_ledger is not None:
            self.kv_ledger.abort()
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._kv_pool.shutdown(wait=True)
        for key, fut in list(self._loads.items()):
            if fut.cancelled() or fut.exception() is not None:
                self._loads.pop(key)
                continue
            self.release(key)

    # ---- the I/O thread's work ----------------------------------------------------------------
    def _load(self, key: Hashable, lkey: Hashable, place: Any, trace_args: dict[str, Any]
              ) -> OnDevice:
        # "klotski-io_0" -> lane "io-0" (device 1 of a mesh: "io-d1-0"); the KV thread
        # "klotski-kv_0" -> lane "kv-0"
        lane = threading.current_thread().name.removeprefix("klotski-").replace("_", "-")
        start = time.perf_counter()
        ledger, _, sharding = self._lanes(key)
        ledger.wait(place)  # FIFO: memory in issue order
        got_memory = time.perf_counter()
        staging, disk, hit = None, 0, False
        if key[0] == "dense":
            host_arrays = self.host.layers[key[1]]
        elif key[0] == "kv":  # a host-resident (layer, group) KV cache
            host_arrays = self.kv_caches[key[2]].kv[key[1]]
        else:
            host_arrays, staging, disk, hit = self.host.read_expert(
                key[1], key[2], self.host.take_staging)
        arrays = jax.block_until_ready(self.to_devices(host_arrays, sharding))
        end = time.perf_counter()
        nbytes = self.nbytes(key)
        with self._lock:
            self.stats.bytes_read_disk += disk
            self._moved(key, nbytes)
            self.stats.io_busy_s += end - got_memory
            if key[0] == "expert":
                self.stats.expert_loads += 1
                self.stats.bytes_read_host += 0 if disk else nbytes
        self.tracer.add(lane, f"load {key[0]}", start, end, key=str(key), bytes=nbytes,
                        disk_bytes=disk, host_cache_hit=hit,
                        waited_for_memory_ms=(got_memory - start) * 1e3, **trace_args)
        return OnDevice(key, arrays, nbytes, staging, ledger_key=lkey)


def cache_memory(device: jax.Device, pinned: bool
                 ) -> Callable[[dict[str, np.ndarray]], Any] | None:
    """What the host tier keeps its cached experts and dense layers as (HostTier's
    `host_memory`): arrays in pinned host
    memory when `pinned` (GPU/TPU: device transfers are DMA-fast from there); on a CPU backend
    otherwise device arrays that alias the cache's aligned NumPy buffers (the CPU device's
    memory is host RAM: a load then hands them out without a copy or a put); None: NumPy."""
    if pinned:
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    elif device.platform == "cpu":
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    else:
        return None
    return lambda parts: jax.block_until_ready(jax.device_put(parts, sharding))


def _ready(fence: Any) -> bool:
    """Whether every array of `fence` is computed (a pytree of jax arrays)."""
    return all(x.is_ready() for x in jax.tree_util.tree_leaves(fence) if hasattr(x, "is_ready"))
