"""An expected-value timeline of the klotski schedule: one compute lane and serial I/O lanes.

Plain Python (no JAX): the planner's performance model. It replays what `Scheduler` does per
layer with expected quantities instead of a real routing:

  dense weights of layer i (streamed unless resident) and its K hot experts were issued during
  layer i-1; attention of the n groups; router of group g, then the loads of the cold experts
  first seen in group g; routing bookkeeping; the prefetch of layer i+1 (dense + hot); experts
  (resident, hot, cold in issue order), each waiting for its load and releasing its memory when
  done; combine.

Each expert is one item whose load takes P(routed) x its tier's load time and whose compute is
E[cost of its bucket; routed] (see CostModel.expert_expectation); hot experts always load. The
hot set follows the schedule's `PrefetchRule`: the K most probable experts, or every expert the
step's tokens route to with probability >= a threshold (1 - (1 - p)^tokens for a per-token pick
probability p), most expected tokens first. The
I/O lane serves loads in issue order (the ledger's FIFO) and a load of expert weight w may only
start when the expert slots held by earlier loads leave room for w (the device budget).
Host-resident KV caches load on a lane of their own, as the engine's KV thread does with its
own window ledger, so a KV load never queues behind expert prefetches. The compute lane's
waits on loads are the bubbles.

On D devices (expert parallelism, `StepSimulator(devices=D)`), each device has its own link and
its own expert slots: an expert loads on its owner's I/O lane (`LayerPlan.owners`), in that
lane's FIFO and within that device's slots, so a layer's expert transfers take about the most
any one device receives. Dense weights go to every device, each copy on its device's lane (the
same time as on one device). Attention, routers, routing and combine are replicated: the same
time as on one device. The expert phase has a clock per device plus the host's: the host (one
Python thread) waits for each load in turn and pays the per-expert bookkeeping; each device
computes its own experts in order, so experts of different devices overlap. A combine of the
devices' float32 accumulators (an all-reduce, `CostModel.all_reduce`) ends every MoE layer.
With D = 1 every step follows the single-device code path unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from klotski_jax.config import ModelConfig
from klotski_jax.planning.costs import CostModel


class Stuck(RuntimeError):
    """The schedule cannot progress: a load waits (FIFO) for memory that only frees later."""


@dataclasses.dataclass
class Load:
    """One transfer on the I/O lane. `release` is set when the compute lane is done with it."""

    issue: float
    duration: float
    weight: float  # slots of its pool it occupies (expected, for experts)
    pool: str = "expert"  # "expert" (device budget), "dense" or "kv" (two in flight)
    # "kv" for KV-cache loads (the engine's KV thread), else "io" (weights, FIFO); on several
    # devices "io<d>" and the pools "expert<d>" / "dense<d>": device d's own link and memory
    lane: str = "io"
    start: float | None = None
    done: float | None = None
    release: float | None = None


class Timeline:
    """Times of the compute lane (`t`) and the I/O lanes, with memory slots for experts.

    `lanes`: devices, each with its own weights lane and pools (expert slots each, two dense
    layers each); one KV lane serves them all (a KV cache goes to every device at once)."""

    def __init__(self, expert_slots: float | None, interference: float = 0.0,
                 lanes: int = 1) -> None:
        self.interference = interference
        self.lanes = lanes
        self.t = 0.0
        self.wait = 0.0
        if lanes == 1:
            self.slots: dict[str, float | None] = {"expert": expert_slots, "dense": 2, "kv": 2}
        else:
            self.slots = {"kv": 2, **{f"expert{d}": expert_slots for d in range(lanes)},
                          **{f"dense{d}": 2 for d in range(lanes)}}
        names = ["kv", *(["io"] if lanes == 1 else [f"io{d}" for d in range(lanes)])]
        self._queue: dict[str, list[Load]] = {lane: [] for lane in names}
        self._next = dict.fromkeys(names, 0)  # per lane: index of the first load not started
        self._io_free = dict.fromkeys(names, 0.0)
        self._held: dict[str, list[Load]] = {pool: [] for pool in self.slots}  # started loads

    def issue(self, duration: float, weight: float = 1.0, pool: str = "expert",
              device: int = 0) -> Load:
        """Queue a load (an expert or dense load onto `device`'s lane and pool); the compute
        lane pays its share of the load's CPU time."""
        if pool == "kv":
            lane = "kv"
        elif self.lanes == 1:
            lane = "io"
        else:
            lane, pool = f"io{device}", f"{pool}{device}"
        load = Load(self.t, duration, weight, pool, lane)
        self._queue[load.lane].append(load)
        self.t += self.interference * duration
        return load

    def ready(self, load: Load) -> float:
        """When `load` is done (starting its lane's loads up to it); the compute lane does not
        move."""
        while load.done is None:
            self._start_next(load.lane)
        return load.done

    def need(self, load: Load) -> None:
        """The compute lane waits for `load` (its wait is a bubble)."""
        while load.done is None:
            self._start_next(load.lane)
        if load.done > self.t:
            self.wait += load.done - self.t
            self.t = load.done

    def _start_next(self, lane: str) -> None:
        load = self._queue[lane][self._next[lane]]
        self._next[lane] += 1
        start = max(self._io_free[lane], load.issue)
        start = self._room(load, start)
        load.start, load.done = start, start + load.duration
        self._io_free[lane] = load.done
        self._held[load.pool].append(load)

    def _room(self, load: Load, start: float) -> float:
        """The earliest time >= start at which the earlier loads leave room for `load`."""
        cap = self.slots[load.pool]
        if cap is None:
            return start
        pending = [x for x in self._held[load.pool] if x.release is None or x.release > start]
        held = sum(x.weight for x in pending)
        if held + load.weight > cap + 1e-9:
            # Only a full pool needs the loads in release order (stable: issue order on ties).
            # Sorting on every load made a layer of E experts cost O(E^2 log E): minutes of
            # planning at DeepSeek-V3's 256 experts.
            inf = float("inf")
            pending.sort(key=lambda x: inf if x.release is None else x.release)
            for x in pending:
                if held + load.weight <= cap + 1e-9:
                    break
                held -= x.weight
                start = max(start, inf if x.release is None else x.release)
            if start == inf:
                raise Stuck(f"no memory for a {load.pool} load: every slot is held by loads "
                            "that are released only after it")
        # One device: every pool's, as one list was before. Several: only this load's pool,
        # whose loads all start on this lane, in time order (the lanes' clocks differ).
        for pool in self._held if self.lanes == 1 else (load.pool,):
            self._held[pool] = [x for x in self._held[pool]
                                if x.release is None or x.release > start]
        return start


@dataclasses.dataclass(frozen=True)
class PrefetchRule:
    """Which experts of a layer load before its router: the K most probable (`k`), or every
    expert routed with probability >= `threshold` by the step's tokens (planning/hot.py)."""

    k: int | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.threshold is None):
            raise ValueError("a prefetch rule has exactly one of k and threshold")

    def hot(self, probs: Sequence[float], tokens: int) -> list[int]:
        """The hot experts of a layer whose tokens pick expert e with probability probs[e]."""
        by_use = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
        if self.k is not None:
            return by_use[: self.k]
        routed = [-math.expm1(tokens * math.log1p(-min(p, 1 - 1e-12))) if p > 0 else 0.0
                  for p in probs]
        return [e for e in by_use if routed[e] > 0 and routed[e] >= self.threshold - 1e-12]

    def describe(self) -> str:
        return f"K = {self.k}" if self.k is not None else f"threshold {self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one layer streams: its dense weights' load time (0: resident) and, for MoE layers,
    per expert its routing probability per token, its load time (0: resident) and, on several
    devices, the device that owns it."""

    dense_load_s: float
    probs: tuple[float, ...] = ()
    load_s: tuple[float, ...] = ()  # per expert; 0.0 for device-resident experts
    kv_load_s: float = 0.0  # one group's KV cache of this layer from host RAM (0: on device)
    owners: tuple[int, ...] = ()  # per expert, its device (): all on device 0

    @property
    def moe(self) -> bool:
        return bool(self.probs)

    def owner(self, e: int) -> int:
        """The device that loads and computes expert e."""
        return self.owners[e] if self.owners else 0


@dataclasses.dataclass(frozen=True)
class StepShape:
    """n groups of b sequences feeding t new tokens each over s cache slots."""

    groups: int
    batch: int
    tokens: int
    slots: int


Pending = tuple[tuple[Load, ...], dict[int, Load], Load | None]  # dense copies, hot, first KV


class StepSimulator:
    """Expected time of klotski steps for one model, placement and prefetch rule, on `devices`
    devices of `expert_slots` each (expert parallelism; see the module's docstring)."""

    def __init__(self, cfg: ModelConfig, costs: CostModel, rule: PrefetchRule | int,
                 expert_slots: float | None, devices: int = 1) -> None:
        self.cfg = cfg
        self.costs = costs
        self.rule = rule if isinstance(rule, PrefetchRule) else PrefetchRule(k=rule)
        self.expert_slots = expert_slots
        self.devices = devices

    def run(self, layers: Sequence[LayerPlan], shapes: Sequence[StepShape]
            ) -> list[tuple[float, float]]:
        """(seconds, bubble seconds) of each step, run back to back (the next step's first
        layer is prefetched during the last layer of the previous one)."""
        tl = Timeline(self.expert_slots, interference=self.costs.profile.io_interference,
                      lanes=self.devices)
        dense_prev: tuple[Load, ...] = ()
        pending = self._prefetch(tl, layers[0], shapes[0])
        out = []
        for si, shape in enumerate(shapes):
            t0, w0 = tl.t, tl.wait
            for i, layer in enumerate(layers):
                nxt = (layers[i + 1], shape) if i + 1 < len(layers) else (
                    (layers[0], shapes[si + 1]) if si + 1 < len(shapes) else None)
                dense_prev, pending = self._layer(tl, layer, shape, pending, nxt, dense_prev)
            tl.t += shape.groups * self.costs.head(shape.batch)
            out.append((tl.t - t0, tl.wait - w0))
        return out

    def _prefetch(self, tl: Timeline, layer: LayerPlan, shape: StepShape) -> Pending:
        """Issue a layer's dense weights (a copy per device), its hot experts (those not
        resident, each onto its owner) and the first group's KV cache when the caches live in
        host RAM."""
        dense = tuple(tl.issue(layer.dense_load_s, 1.0, "dense", d)
                      for d in range(self.devices)) if layer.dense_load_s else ()
        kv = tl.issue(layer.kv_load_s, 1.0, "kv") if layer.kv_load_s else None
        hot: dict[int, Load] = {}
        tokens = shape.groups * shape.batch * shape.tokens
        for e in self.rule.hot(layer.probs, tokens):
            if layer.load_s[e] > 0:
                hot[e] = tl.issue(layer.load_s[e], 1.0, "expert", layer.owner(e))
        return dense, hot, kv

    def _layer(self, tl: Timeline, layer: LayerPlan, shape: StepShape, pending: Pending,
               nxt: tuple[LayerPlan, StepShape] | None, dense_prev: tuple[Load, ...]
               ) -> tuple[tuple[Load, ...], Pending]:
        c, n, m = self.costs, shape.groups, shape.batch * shape.tokens
        dense, hot, kv = pending
        tl.t += c.profile.overhead_layer_s
        for copy in dense:
            tl.need(copy)
        for copy in dense_prev:
            copy.release = tl.t  # the ledger frees layer i-1's dense weights by now
        self._attention(tl, layer, shape, kv)
        if not layer.moe:
            tl.t += n * c.dense_mlp(m)
            issued = self._prefetch(tl, *nxt) if nxt else ((), {}, None)
            return dense, issued
        cold = self._route(tl, layer, shape, hot)
        issued = self._prefetch(tl, *nxt) if nxt else ((), {}, None)
        if self.devices == 1:
            self._experts(tl, layer, n * m, hot, cold)
        else:
            self._experts_on_devices(tl, layer, n * m, hot, cold)
            tl.t += c.all_reduce(n * m * self.cfg.hidden_size * 4, self.devices)  # float32
        tl.t += n * c.combine(m)
        return dense, issued

    def _attention(self, tl: Timeline, layer: LayerPlan, shape: StepShape,
                   kv: Load | None) -> None:
        """n groups' attention; host-resident KV caches load one group ahead."""
        step = self.costs.attention(shape.batch, shape.tokens, shape.slots)
        if not layer.kv_load_s:
            tl.t += shape.groups * step
            return
        kv = kv or tl.issue(layer.kv_load_s, 1.0, "kv")
        for g in range(shape.groups):
            nxt = tl.issue(layer.kv_load_s, 1.0, "kv") if g + 1 < shape.groups else None
            tl.need(kv)
            tl.t += step
            kv.release = tl.t
            kv = nxt

    def _route(self, tl: Timeline, layer: LayerPlan, shape: StepShape, hot: dict[int, Load]
               ) -> list[tuple[int, Load]]:
        """Routers of the n groups; after group g, the loads of the cold experts first seen in
        g (the median group of an expert's first use, given that it is used)."""
        c, n, m = self.costs, shape.groups, shape.batch * shape.tokens
        groups: dict[int, list[int]] = {}
        for e in sorted(range(len(layer.probs)), key=lambda e: (-layer.probs[e], e)):
            if e not in hot and layer.load_s[e] > 0:
                groups.setdefault(first_group(layer.probs[e], m, n), []).append(e)
        cold: list[tuple[int, Load]] = []
        router, done = c.router(m), 0
        for g in sorted(groups):
            tl.t += (g + 1 - done) * router
            done = g + 1
            for e in groups[g]:
                routed, _ = c.expert_expectation(n * m, layer.probs[e])
                cold.append((e, tl.issue(routed * layer.load_s[e], routed, "expert",
                                         layer.owner(e))))
        tl.t += (n - done) * router + c.routing(n * m)
        return cold

    def _experts(self, tl: Timeline, layer: LayerPlan, tokens: int, hot: dict[int, Load],
                 cold: list[tuple[int, Load]]) -> None:
        c = self.costs
        release, extra = c.profile.expert_release_s, c.profile.overhead_expert_s
        prefetched = release + c.profile.expert_prefetch_s
        for e, load_s in enumerate(layer.load_s):
            if load_s == 0:  # resident: no load, computed first
                routed, compute = c.expert_expectation(tokens, layer.probs[e])
                tl.t += compute + extra * routed
        for e, load in [*hot.items(), *cold]:
            routed, compute = c.expert_expectation(tokens, layer.probs[e])
            tl.need(load)
            tl.t += compute + extra * routed + (prefetched if e in hot else release * routed)
            load.release = tl.t

    def _experts_on_devices(self, tl: Timeline, layer: LayerPlan, tokens: int,
                            hot: dict[int, Load], cold: list[tuple[int, Load]]) -> None:
        """The expert phase on several devices: the host dispatches the experts in the same
        order (resident, hot, cold), waiting for each load and paying the bookkeeping; each
        expert computes on its owner once dispatched and once its device is free, and its slot
        frees when it is computed. The bubble is what the loads add to the phase (the same
        phase with every load already done)."""
        items = [(e, None) for e, load_s in enumerate(layer.load_s) if load_s == 0]
        items += [*hot.items(), *cold]
        t0 = tl.t
        ideal = self._device_phase(t0, layer, tokens, items, hot, lambda load: t0, set_release=False)
        end = self._device_phase(t0, layer, tokens, items, hot, tl.ready, set_release=True)
        tl.wait += max(0.0, end - ideal)
        tl.t = end

    def _device_phase(self, t0: float, layer: LayerPlan, tokens: int,
                      items: Sequence[tuple[int, Load | None]], hot: dict[int, Load],
                      done: Callable[[Load], float], set_release: bool) -> float:
        """When the expert phase that starts at t0 ends: the host's clock and one per device."""
        c = self.costs
        release, extra = c.profile.expert_release_s, c.profile.overhead_expert_s
        prefetched = release + c.profile.expert_prefetch_s
        host, clock = t0, [t0] * self.devices
        for e, load in items:
            routed, compute = c.expert_expectation(tokens, layer.probs[e])
            d = layer.owner(e)
            if load is not None:
                host = max(host, done(load))
            clock[d] = max(clock[d], host) + compute
            host += extra * routed + (0.0 if load is None else
                                      prefetched if e in hot else release * routed)
            if load is not None and set_release:
                load.release = clock[d]
        return max(host, *clock)


def first_group(p: float, m: int, n: int) -> int:
    """The median group (0-based) in which an expert each of m tokens per group picks with
    probability p is first used, given that one of the n groups uses it."""
    if p <= 0 or p >= 1 or n == 1:
        return 0
    log_q = math.log1p(-p)
    routed = -math.expm1(n * m * log_q)
    # smallest g with 1 - q^((g + 1) m) >= routed / 2
    g = math.ceil(math.log1p(-routed / 2) / (m * log_q) - 1e-9) - 1
    return min(max(g, 0), n - 1)
