"""The schedules: one decoder step (prefill or decode) of n batch groups, layer by layer.

Each schedule reads like its description, in a few verbs: `_dense` (the layer's dense weights),
`_attention`, `_route`, `_expert` (one expert over its tokens of every group), `_finish` (combine
with the residual and the shared expert), `_prefetch` (issue the next layer's loads) and the
transfer calls `request` / `get` / `release`.

klotski (per layer): attention for groups 1..n while this layer's hot experts load; router for
groups 1..n, each immediately issuing loads of its new cold experts (first-seen order); then the
next layer's dense weights and hot experts are issued; experts run by expert over all groups' tokens,
hot first, then cold in load order, each released as soon as it is done when a load waits for
memory (else together at the end of the layer, behind one fence). The hot experts are
those the coming step will route to with probability >= the policy's threshold given the tokens
in flight (hot.py), or the K predicted hottest with an explicit K.

The compute thread waits for a result only where the schedule needs a value on the host: the
routing of each group, the step's logits and, with a trace, the end of each timed piece.
Releases stay pending until their fence is computed (Transfers), so jitted steps dispatch
asynchronously.
flexgen: the whole layer (dense + all experts) is on the device before compute; the whole next
layer is prefetched meanwhile; groups run one after another.
sequential: like flexgen with one group and no prefetch. lru: one group, experts loaded on demand
into an LRU cache on the device.

On several devices (a 1-D mesh: expert parallelism) every schedule keeps its order. The dense
part, attention and the routers run replicated on every device; each routed expert is loaded
onto and computed on the device that owns it (`Placement.owner`), into that device's own
accumulator, and `steps.Accumulators.total` sums them over the devices (`steps.device_sum`,
a psum) before the combine step. Computations run in dispatch order per device only, so a
release's fence is the latest expert computation of every device.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Hashable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klotski_jax.config import ModelConfig
from klotski_jax.constants import BudgetError
from klotski_jax.models import blocks
from klotski_jax.planning.hot import HotPredictor, prefetch_order, score_hot_set
from klotski_jax.planning.placement import Placement
from klotski_jax.planning.policy import Policy, Schedule
from klotski_jax.runtime import steps
from klotski_jax.runtime.devices import live_bytes_by_device
from klotski_jax.runtime.ledger import MemoryLedger
from klotski_jax.runtime.routing import ExpertBatches, GroupState, Ready, Routing, Step
from klotski_jax.runtime.trace import RunStats, Tracer
from klotski_jax.runtime.transfers import Transfers


class _Piece:
    """What `Scheduler._compute` waits for when it times a piece: its output."""

    out: Any = None


class Scheduler:
    """Runs decoder steps of a policy's schedule over weights moved by `Transfers`."""

    def __init__(self, cfg: ModelConfig, policy: Policy, placement: Placement,
                 transfers: Transfers, predictor: HotPredictor, globals_dev: dict[str, jax.Array],
                 embed_host: np.ndarray | None,
                 tracer: Tracer, stats: RunStats, device_ledger: MemoryLedger,
                 live_baseline: dict[jax.Device, int] | None = None) -> None:
        self.cfg = cfg
        self._block = blocks.expert_block(cfg)  # fp8 experts' block side (static)
        self.policy = policy
        self.placement = placement
        self.transfers = transfers
        self.predictor = predictor
        self.tracer = tracer
        self.stats = stats
        self.ledger = device_ledger
        self.embed_host = embed_host  # untied embedding: rows looked up on the host
        self.norm_w = globals_dev["final_norm"]
        self.head_w = globals_dev["embed" if cfg.tie_word_embeddings else "lm_head"]
        self.k = policy.hot_experts if policy.hot_experts is not None else cfg.top_k
        self._hot: dict[int, list[int]] = {}
        self.devices = transfers.devices
        # per device, an output of its latest expert computation (the fences of releases)
        self._fences: list[Any] = [None] * len(self.devices)
        self._busy: Any = None  # the latest dispatched computation's output (Transfers.get)
        self._predicted: dict[int, list[int]] = {}  # the predictor's full hot set per layer
        # LRU device caches of streamed experts, one per device (each with expert_slots)
        self._lru: list[collections.OrderedDict[Hashable, None]] = [
            collections.OrderedDict() for _ in self.devices]
        self._resident_dense: list[Any] = []
        if placement.dense_resident:
            self._resident_dense = [transfers.pin(("dense", i)).arrays
                                    for i in range(cfg.num_layers)]
        for layer, e in sorted(placement.device_experts):
            if transfers.mine(layer, e):
                transfers.pin(("expert", layer, e))
        self._live_baseline = live_baseline

    # ---- the step -----------------------------------------------------------------------------
    def run_step(self, step: str, groups: list[GroupState], *, prefetch_next: bool = True,
                 all_positions: bool = False) -> list[jax.Array]:
        """Feed every group its tokens through all layers; returns float32 logits per group:
        [b, v] of the last position, or [b, t, v] of every position with all_positions."""
        cfg = self.cfg
        start, waited = time.perf_counter(), self.stats.io_wait_s
        s = Step(step, groups, tokens=sum(g.tokens.size for g in groups),
                 next_tokens=sum(len(g.tokens) for g in groups))  # the next step decodes 1 each
        if self.policy.schedule is Schedule.KLOTSKI:
            self._prefetch(s, 0, s.tokens)  # no-op when the previous step already issued it
        h = [self._embed(g.tokens) for g in groups]
        for i in range(cfg.num_layers):
            h = self._layer(s, i, h, prefetch_next or i + 1 < cfg.num_layers)
            if self.policy.verify_memory:
                jax.block_until_ready(h)
                self.transfers.settle()
                self.verify_memory(h)
        for g in groups:
            g.cache.length += g.tokens.shape[1]
        if all_positions:
            out = [blocks.lm_head(self.norm_w, self.head_w, x, cfg=cfg) for x in h]
        else:
            out = [steps.last_token_logits(self.norm_w, self.head_w, x, cfg=cfg) for x in h]
        if not self.tracer.enabled:  # no per-piece timing: the step's time minus its waits
            jax.block_until_ready(out)
            self.stats.compute_s += (time.perf_counter() - start
                                     - (self.stats.io_wait_s - waited))
        return out

    def _layer(self, s: Step, i: int, h: list[jax.Array], prefetch: bool) -> list[jax.Array]:
        schedule, nxt = self.policy.schedule, (i + 1) % self.cfg.num_layers
        if schedule is Schedule.SEQUENTIAL or schedule is Schedule.FLEXGEN:
            self._request_whole_layer(s, i)  # flexgen: already issued while the last layer ran
        if schedule is Schedule.SEQUENTIAL:
            for key in self._layer_keys(i):
                self.transfers.get(key, busy=self._busy, step=s.name, layer=i)
        w = self._dense(s, i)
        if prefetch and schedule is Schedule.FLEXGEN:
            self._request_whole_layer(s, nxt)
        h = [self._attention(s, i, g, w, x, gi) for gi, (g, x) in enumerate(zip(s.groups, h))]
        if not self.cfg.moe_layers[i]:
            with self._compute(s, "dense mlp", layer=i) as c:
                h = c.out = [blocks.dense_mlp_block(w, x, cfg=self.cfg) for x in h]
            if prefetch and schedule is Schedule.KLOTSKI:
                self._prefetch(s, nxt, s.tokens_at(nxt))
        elif schedule is Schedule.KLOTSKI:
            h = self._moe_klotski(s, i, w, h, prefetch)
        else:
            h = self._moe_by_group(s, i, w, h)
        self._release_layer(i, fence=h)
        return h

    @property
    def _fence(self) -> Any:
        """What a release of computed experts waits for: the latest expert computation of every
        device (one device's results say nothing of another's)."""
        return [f for f in self._fences if f is not None] or None

    # ---- verbs --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _compute(self, s: Step, name: str, **args: Any) -> Iterator[_Piece]:
        """One piece of compute on the compute lane. With a trace it is timed to the moment its
        result (`piece.out`, set by the block) is ready; without one nothing waits for it."""
        piece = _Piece()
        start = time.perf_counter()
        yield piece
        self._busy = piece.out
        if not self.tracer.enabled:
            return
        jax.block_until_ready(piece.out)
        end = time.perf_counter()
        self.stats.compute_s += end - start
        self.tracer.add("compute", name, start, end, step=s.name, **args)

    def _embed(self, tokens: np.ndarray) -> jax.Array:
        if self.embed_host is None:
            return blocks.embed(self.head_w, tokens)  # tied: the head is the table
        return self.transfers.replicate(np.take(self.embed_host, tokens, axis=0))

    def _dense(self, s: Step, i: int) -> Any:
        """Layer i's dense-part state on the device (resident, or loaded)."""
        if self._resident_dense:
            return self._resident_dense[i]
        return self.transfers.get(("dense", i), busy=self._busy, step=s.name, layer=i).arrays

    def _attention(self, s: Step, i: int, g: GroupState, w: Any, h: jax.Array, group: int
                   ) -> jax.Array:
        kv, key = g.cache.kv[i], None
        if not self.placement.kv_on_device:  # host-resident caches: load this group's, then
            key = ("kv", i, g.index)          # the next group's
            self.transfers.request(key, step=s.name, layer=i, group=group)
            if group + 1 < len(s.groups):
                self.transfers.request(("kv", i, s.groups[group + 1].index), layer=i)
            kv = self.transfers.get(key, busy=self._busy, step=s.name, layer=i,
                                    group=group).arrays
        with self._compute(s, "attention", layer=i, group=group) as c:
            # NumPy arguments go straight to the jitted functions (their C++ fast path): a
            # jnp.asarray per argument costs a primitive dispatch each, which on a small model
            # was a fifth of a decode step.
            h, new_kv = blocks.attention_block(
                w, h, g.positions, kv, np.int32(g.cache.length), g.cache.valid,
                cfg=self.cfg, window=self.cfg.sliding_windows[i])
            c.out = h
        if key is None:
            g.cache.kv[i] = new_kv
            return h
        self._store_kv(g, i, new_kv)
        self.transfers.release(key)
        return h

    def _store_kv(self, g: GroupState, i: int, new_kv: tuple[jax.Array, ...]) -> None:
        """Write back to a host-resident cache only the slots this step just wrote: into its
        NumPy arrays, or (pinned host memory) with the host-side jitted write."""
        start, t = g.cache.length, g.tokens.shape[1]
        at = np.int32(start)
        stored = []
        for host, dev in zip(g.cache.kv[i], new_kv):
            slots = steps.cache_slots(dev, at, t=t)
            if isinstance(host, np.ndarray):
                host[:, start:start + t] = np.asarray(slots)
                stored.append(host)
            else:
                stored.append(steps.host_slot_writer(host.sharding)(host, slots, at))
        g.cache.kv[i] = tuple(stored)

    def _route(self, s: Step, i: int, w: Any, h: list[jax.Array], on_group=None
               ) -> tuple[list[jax.Array], Routing]:
        """Router of each group; `on_group(g, experts)` runs right after group g's routing.
        The routing becomes the step's (`s.routing`) until the next MoE layer routes."""
        xs, experts, weights = [], [], []
        for gi, x in enumerate(h):
            with self._compute(s, "router", layer=i, group=gi) as c:
                xg, wg, eg = steps.route_group(w, x, cfg=self.cfg)
                xs.append(xg)
                experts.append(np.asarray(eg))  # the host needs the routing: a sync
                weights.append(np.asarray(wg))
                c.out = xg
            if on_group is not None:
                on_group(gi, experts[-1])
        routing = s.routing = Routing(experts, weights)
        self.predictor.observe(i, routing.all_experts)
        return xs, routing

    def _expert(self, s: Step, i: int, e: int, acc: steps.Accumulators, rows: np.ndarray,
                wts: np.ndarray, batches: ExpertBatches, **trace: Any) -> None:
        """acc += expert e's weighted output over its rows, on the device that owns e: at once,
        or in a batched call with other ready experts of few rows (`batches`). Before waiting
        for e's load, every expert gathered so far is computed (nothing computable waits behind
        a load, and what they hold can be released for it)."""
        key = ("expert", i, e)
        if not self.transfers.ready(key):
            self._flush(s, i, acc, batches)
        w = self.transfers.get(key, busy=self._busy, step=s.name, layer=i, expert=e).arrays
        r, ww = steps.pad_rows(rows, wts)
        item = Ready(e, self.placement.owner(i, e), w, r, ww, rows, trace)  # owner: 0 on one device
        if len(r) > steps.BATCH_ROWS or batches.size <= 1:
            self._call(s, i, acc, [item], batches)
        elif full := batches.add(item):
            self._call(s, i, acc, full, batches)

    def _flush(self, s: Step, i: int, acc: steps.Accumulators, batches: ExpertBatches) -> None:
        """Compute every expert `batches` still gathers."""
        for batch in batches.drain():
            start = 0
            for n in steps.split_batch(len(batch)):  # compiled call sizes only
                self._call(s, i, acc, batch[start:start + n], batches)
                start += n

    def _call(self, s: Step, i: int, acc: steps.Accumulators, batch: list[Ready],
              batches: ExpertBatches) -> None:
        """One jitted call over the experts of `batch` (one device, one bucket); that device's
        fence becomes an output of this computation (its accumulator is donated to the next
        one, so it cannot be a fence). Traced as "expert" (one) or "experts" (several)."""
        d = batch[0].device
        # the schedule's own args (e.g. group): one value when the experts share it, else a list
        args: dict[str, Any] = {k: v if all(b.trace.get(k) == v for b in batch)
                                else [b.trace.get(k) for b in batch]
                                for k, v in batch[0].trace.items()}
        if len(self.devices) > 1:
            args["device"] = d
        if len(batch) == 1:
            one = batch[0]
            args |= {"expert": one.e, "tokens": len(one.rows)}
            if self.tracer.enabled:
                offsets = s.routing.offsets
                args["tokens_per_group"] = (np.diff(np.searchsorted(one.rows, offsets)).tolist()
                                            + [int((one.rows >= offsets[-1]).sum())])
        else:
            args |= {"experts": [b.e for b in batch], "tokens": [len(b.rows) for b in batch]}
        if len(batch) == 1:  # the common call: views, no copies
            rows, weights = batch[0].padded_rows[None], batch[0].padded_weights[None]
        else:
            rows = np.stack([b.padded_rows for b in batch])
            weights = np.stack([b.padded_weights for b in batch])
        with self._compute(s, "expert" if len(batch) == 1 else "experts", layer=i, **args) as c:
            acc.sums[d], self._fences[d] = steps.experts_apply(
                acc.on(d), acc.x[d], rows, weights, tuple(b.weights for b in batch),
                block=self._block)
            c.out = self._fences[d]
        self.stats.expert_computes += len(batch)
        self.stats.expert_calls += 1
        if batches.on_computed is not None:
            batches.on_computed([b.e for b in batch])

    def _finish(self, s: Step, i: int, w: Any, h: list[jax.Array], xs: list[jax.Array],
                acc: steps.Accumulators) -> list[jax.Array]:
        with self._compute(s, "combine", layer=i) as c:
            total = acc.total()
            out = c.out = [steps.finish_moe(w, x, xg, total, np.int32(s.routing.offsets[gi]),
                                            cfg=self.cfg) for gi, (x, xg) in enumerate(zip(h, xs))]
            return out

    def _prefetch(self, s: Step, i: int, tokens: int) -> None:
        """klotski: issue layer i's dense weights and its hot experts: those `tokens` tokens in
        flight will route to with probability >= the threshold, most expected tokens first (or
        the K predicted hottest; the whole layer without hot-only prefetch). Idempotent until
        layer i runs."""
        if not self._resident_dense:
            self.transfers.request(("dense", i), step=s.name, layer=i, prefetch=True)
        self._prefetch_kv(s, i)
        if not self.cfg.moe_layers[i] or i in self._hot:
            return
        pol = self.policy
        if not pol.hot_only_prefetch:
            hot = list(range(self.cfg.num_experts))
        elif pol.uses_threshold:
            p_routed, expected = self.predictor.expected_use(i, tokens)
            hot = prefetch_order(p_routed, expected, pol.threshold)
            self._predicted[i] = list(hot)
        else:
            hot = self.predictor.predict(i, self.k)
            self._predicted[i] = list(hot)
        self._hot[i] = [e for e in hot if (i, e) not in self.placement.device_experts
                        and self.transfers.mine(i, e)]
        for e in self._hot[i]:
            self.transfers.request(("expert", i, e), step=s.name, layer=i, expert=e, hot=True)

    def _prefetch_kv(self, s: Step, i: int) -> None:
        """Issue the first group's host-resident KV cache of layer i (only within a step: the
        next step may start with another group)."""
        if i > 0 and not self.placement.kv_on_device:
            self.transfers.request(("kv", i, s.groups[0].index), step=s.name, layer=i,
                                   prefetch=True)

    def _layer_keys(self, i: int) -> list[Hashable]:
        """The weights of layer i that are not resident on the device."""
        keys: list[Hashable] = [] if self._resident_dense else [("dense", i)]
        if self.cfg.moe_layers[i]:
            keys += [("expert", i, e) for e in range(self.cfg.num_experts)
                     if (i, e) not in self.placement.device_experts
                     and self.transfers.mine(i, e)]
        return keys

    def _request_whole_layer(self, s: Step, i: int) -> None:
        for key in self._layer_keys(i):
            self.transfers.request(key, step=s.name, layer=i)

    def _release_layer(self, i: int, fence: Any) -> None:
        """Free layer i's streamed weights once `fence` (the layer's outputs) is computed."""
        keys: list[Hashable] = [] if self._resident_dense else [("dense", i)]
        if self.policy.schedule is not Schedule.LRU:
            keys += [("expert", i, e) for e in range(self.cfg.num_experts)
                     if self.transfers.issued(("expert", i, e))]
        self.transfers.release_all(keys, fence=fence)

    # ---- MoE phases ---------------------------------------------------------------------------
    def _moe_klotski(self, s: Step, i: int, w: Any, h: list[jax.Array], prefetch: bool
                     ) -> list[jax.Array]:
        hot = self._hot.pop(i, [])
        mine = self.transfers.mine
        resident = {e for e in range(self.cfg.num_experts)
                    if (i, e) in self.placement.device_experts and mine(i, e)}
        cold: list[int] = []

        def issue(experts: list[int]) -> None:
            for e in experts:
                if e not in resident and e not in cold and mine(i, e) and not self.transfers.issued(
                        ("expert", i, e)):
                    self.transfers.request(("expert", i, e), step=s.name, layer=i, expert=e)
                    cold.append(e)

        reorder = self.policy.reorder
        xs, routing = self._route(
            s, i, w, h, on_group=(lambda gi, ex: issue(list(dict.fromkeys(ex.reshape(-1).tolist()))))
            if reorder else None)
        routed = {e for e in routing.routed() if mine(i, e)}  # other processes run theirs
        if not reorder:
            issue(sorted(routed))
        for e in hot:  # predicted but not routed: wasted prefetch, freed once it has arrived
            if e not in routed:
                self.transfers.discard(("expert", i, e))
        self._score_prediction(i, routing, hot)
        if prefetch:
            nxt = (i + 1) % self.cfg.num_layers
            self._prefetch(s, nxt, s.tokens_at(nxt))
        if reorder:
            # Resident experts (most tokens first), then streamed ones in the order their loads
            # were issued (hot, then cold): compute never waits on a load queued behind another
            # load that holds the memory it needs.
            first = sorted((e for e in routed if e in resident), key=lambda e: -routing.counts[e])
            order = first + [e for e in hot if e in routed] + cold
        else:
            order = sorted(routed)
        acc = self._accumulators(xs)
        done: list[Hashable] = []  # computed streamed experts not yet released

        def computed(experts: list[int]) -> None:
            done.extend(("expert", i, e) for e in experts if e not in resident)
            if done and self.ledger.waiting:  # a load needs memory: free what is done now
                self.transfers.release_all(done, fence=self._fence)
                done.clear()

        batches = ExpertBatches(self._batch(s), on_computed=computed)
        for e in order:
            rows, wts = routing.rows(e)
            self._expert(s, i, e, acc, rows, wts, batches)
        self._flush(s, i, acc, batches)
        # Nothing waits for memory: the rest goes at once, behind one fence.
        self.transfers.release_all(done, fence=self._fence)
        return self._finish(s, i, w, h, xs, acc)

    def _score_prediction(self, i: int, routing: Routing, hot: list[int]) -> None:
        """Prefetcher statistics of layer i: hot loads used / wasted (and their bytes), the
        precision of the predicted set and whether it was a true top-K by routed tokens (ties
        allowed: no unpredicted expert got more tokens than a predicted one)."""
        st, eb = self.stats, self.cfg.expert_bytes
        routed = routing.routed()
        used = sum(int(e in routed) for e in hot)
        st.hot_hits += used
        st.hot_misses += len(hot) - used
        st.hot_bytes_used += used * eb
        st.hot_bytes_wasted += (len(hot) - used) * eb
        predicted = self._predicted.pop(i, None)
        k = self.k if not self.policy.uses_threshold else len(predicted or ())
        if predicted is None or k <= 0:
            return
        counts = np.bincount(routing.all_experts.reshape(-1), minlength=self.cfg.num_experts)
        hits, exact = score_hot_set(predicted, counts, k)
        st.hot_predicted += len(predicted)
        st.hot_predicted_routed += hits
        st.hot_sets += 1
        st.hot_sets_exact += int(exact)

    def _moe_by_group(self, s: Step, i: int, w: Any, h: list[jax.Array]) -> list[jax.Array]:
        """flexgen / sequential / lru: each group's experts in ascending id, group after group."""
        xs, routing = self._route(s, i, w, h)
        acc = self._accumulators(xs)
        batches = ExpertBatches(self._batch(s))
        for gi in range(len(h)):
            for e in sorted({int(v) for v in routing.experts[gi].reshape(-1)}):
                if not self.transfers.mine(i, e):  # another process's device computes it
                    continue
                if self.policy.schedule is Schedule.LRU and self._lru_admit(i, e):
                    self._flush(s, i, acc, batches)  # compute what gathered before evicting
                    self._lru_insert(i, e)
                rows, wts = routing.rows(e, gi)
                self._expert(s, i, e, acc, rows, wts, batches, group=gi)
        self._flush(s, i, acc, batches)
        return self._finish(s, i, w, h, xs, acc)

    def _batch(self, s: Step) -> int:
        """Experts per batched call in step s: the policy's in decode steps, where experts get
        a few rows each and a dispatch is a large part of an expert's time; 1 in a prefill
        (its experts' matmuls outweigh a dispatch, and the warm-up compiles less)."""
        return self.policy.expert_batch if s.one_token else 1

    def _accumulators(self, xs: list[jax.Array]) -> steps.Accumulators:
        """The expert phase's accumulators over the concatenated MoE input of all groups."""
        x_all = jnp.concatenate(xs) if len(xs) > 1 else xs[0]
        return steps.Accumulators(x_all, self.devices, self.transfers.mesh, self.transfers.local)

    def _lru_admit(self, i: int, e: int) -> bool:
        """Whether (i, e) must be inserted into the LRU device cache (`_lru_insert`); counts a
        hit if it is already there."""
        key = ("expert", i, e)
        if (i, e) in self.placement.device_experts:
            return False
        lru = self._lru[self.placement.owner(i, e)]  # the cache of the device that owns e
        if key in lru:
            lru.move_to_end(key)
            self.stats.lru_hits += 1
            return False
        return True

    def _lru_insert(self, i: int, e: int) -> None:
        """Insert (i, e) into its device's LRU cache, evicting the least recently used experts
        to make room (those gathered for a batched call are computed by now: `_moe_by_group`
        flushes first)."""
        d = self.placement.owner(i, e)
        lru = self._lru[d]
        while len(lru) >= self.placement.expert_slots:
            old, _ = lru.popitem(last=False)
            # Computations run in dispatch order on a device: once its latest one is done, so
            # is every computation that read the evicted expert.
            self.transfers.release(old, fence=self._fences[d])
        lru[("expert", i, e)] = None

    # ---- warm-up ------------------------------------------------------------------------------
    def warm_up(self, groups: list[GroupState], decode: bool) -> None:
        """Compile every shape the round's steps will run (prefill, and decode if `decode`)
        before the timed region: per distinct kind of layer (MoE or dense, sliding window) its
        attention, router, combine or MLP for each group, the logits, and the expert FFN for
        every row bucket the step's tokens can produce. Runs on zeros, with one layer's dense
        weights at a time in the streaming area (reserved as "warm-up"), and on the groups' own
        device KV caches (the prefill rewrites every slot it writes) or, for host-resident
        caches, zeros in the KV window."""
        cfg = self.cfg
        kinds: dict[tuple[bool, int | None], int] = {}
        for i in range(cfg.num_layers):
            kinds.setdefault((cfg.moe_layers[i], cfg.sliding_windows[i]), i)
        lengths = [groups[0].tokens.shape[1]] + ([1] if decode else [])
        for i in kinds.values():
            if self._resident_dense:
                w = self._resident_dense[i]
            else:
                self.ledger.reserve("warm-up", self.transfers.nbytes(("dense", i)))
                w = self.transfers.put(self.transfers.host.layers[i])
            try:
                for t in lengths:
                    self._warm_layer(i, w, groups, t)
            finally:
                del w
                if not self._resident_dense:
                    self.ledger.release("warm-up")
        sizes = [len(g.tokens) for g in groups]
        rows: dict[int, int] = {}  # the MoE input's rows of a step -> experts per batched call
        for t in lengths:
            for n in ({sum(sizes) * t} if self.policy.multi_batch else {b * t for b in sizes}):
                rows[n] = max(rows.get(n, 1), self.policy.expert_batch if t == 1 else 1)
        self.ledger.reserve("warm-up", cfg.expert_bytes)
        try:
            for device in ([d for d, here in zip(self.devices, self.transfers.local) if here]
                           if len(self.devices) > 1 else [None]):
                for n, batch in rows.items():  # a jitted step compiles once per device it runs on
                    steps.warm_up_experts(cfg, n, device, batch=batch)
        finally:
            self.ledger.release("warm-up")

    def _like_run(self, x: jax.Array) -> jax.Array:
        """A warm-up input placed as the run's is: replicated over a mesh (a jitted step
        compiles per input sharding)."""
        return x if self.transfers.mesh is None else self.transfers.replicate(np.asarray(x))

    def _warm_layer(self, i: int, w: Any, groups: list[GroupState], t: int) -> None:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        pairs = []  # (h, x) of each group at the MoE block
        warmed: set[tuple[Any, ...]] = set()  # pinned KV writes compiled in this call
        for g in groups:
            b, slots = len(g.tokens), g.cache.valid.shape[1]
            tokens = np.zeros((b, t), np.int32)
            h = blocks.embed(self.head_w, tokens) if self.embed_host is None else self._like_run(
                jnp.zeros((b, t, cfg.hidden_size), dt))
            host_kv = not self.placement.kv_on_device
            kv = (tuple(self._like_run(jnp.zeros((b, slots, *shape), dt))
                        for shape in cfg.kv_cache_shapes) if host_kv else g.cache.kv[i])
            h, new_kv = blocks.attention_block(
                w, h, tokens, kv, np.int32(0), np.ones((b, slots), bool), cfg=cfg,
                window=cfg.sliding_windows[i])
            if host_kv:
                for host, dev in zip(g.cache.kv[i], new_kv):  # K and V (MLA: two shapes)
                    written = steps.cache_slots(dev, np.int32(0), t=t)
                    if isinstance(host, np.ndarray):
                        np.asarray(written)
                    elif (host.shape, host.dtype, t) not in warmed:
                        # compile the pinned cache's write once per shape, on a copy (the write
                        # donates its cache)
                        warmed.add((host.shape, host.dtype, t))
                        copy = jax.device_put(np.zeros(host.shape, host.dtype), host.sharding)
                        jax.block_until_ready(
                            steps.host_slot_writer(host.sharding)(copy, written, np.int32(0)))
            else:
                g.cache.kv[i] = new_kv  # donated: the cache lives on in the returned arrays
            if cfg.moe_layers[i]:
                pairs.append((h, steps.route_group(w, h, cfg=cfg)[0]))
            else:
                h = blocks.dense_mlp_block(w, h, cfg=cfg)
            jax.block_until_ready(steps.last_token_logits(self.norm_w, self.head_w, h, cfg=cfg))
        for part in [pairs] if self.policy.multi_batch else [[p] for p in pairs]:
            if not part:
                continue
            xs = [x for _, x in part]
            acc = self._accumulators(xs).total()  # zeros: every device's, summed
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in xs])])[:-1]
            jax.block_until_ready([steps.finish_moe(w, h, x, acc, np.int32(o), cfg=cfg)
                                   for (h, x), o in zip(part, offsets)])

    # ---- memory check -------------------------------------------------------------------------
    def verify_memory(self, live_refs: Any = None) -> None:
        """Fail loudly if live device arrays exceed the budget on any device (accounting
        bypassed)."""
        budget = self.policy.device_budget
        # The live arrays first, then the host tier's: an expert an I/O thread caches meanwhile
        # (on a CPU backend, "device" arrays aliasing host memory) is then either excluded by
        # id or still being made, and its bytes are allowed for.
        arrays = jax.live_arrays()
        host_ids, making = self.transfers.host.host_arrays()
        live = live_bytes_by_device(exclude=host_ids, arrays=arrays)
        if self._live_baseline is None:
            raise BudgetError("verify_memory needs the live device bytes from before the run")
        for k, device in enumerate(self.devices):
            used = live.get(device, 0) - self._live_baseline.get(device, 0)
            if budget is not None and used > budget + making:
                raise BudgetError(
                    f"device arrays of this run hold {used} bytes on device {k} ({device}), over "
                    f"the device budget of {budget} bytes (ledger: "
                    f"{self.ledger.parts[k].used} bytes reserved): something bypassed the "
                    "ledger")
