"""`Engine`: batch generation on top of the pipeline's schedules, under memory budgets.

    engine = klotski_jax.Engine("ckpt/", policy=klotski_jax.Policy(device_budget=2**30))
    result = engine.generate(["def main():", "The list type"], max_new_tokens=32)
    result.texts, result.stats.throughput_tokens_per_s

Prompts are split into rounds of n groups x batch_size sequences; each round is left-padded to
one prompt length and generated with the policy's schedule (prefill, then one decode step per new
token). Every buffer the run keeps is reserved in the device / host ledgers first.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from klotski_jax.checkpoints.loader import load_tokenizer
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.constants import BudgetError, cache_len
from klotski_jax.models.reference import KVCache, positions_from_mask
from klotski_jax.planning.costs import Profile
from klotski_jax.planning.hot import HotPredictor, PreviousLayerPopularity
from klotski_jax.planning.placement import Placement, Workload, device_global_bytes, place
from klotski_jax.planning.planner import Plan, Planner, PlanRequest
from klotski_jax.planning.policy import Policy, PolicyError, Schedule
from klotski_jax.planning.prefetcher import CorrelationPrefetcher, CorrelationTable, TableError
from klotski_jax.planning.prior import is_prior
from klotski_jax.runtime import steps
from klotski_jax.runtime.devices import (
    devices_memory_stats,
    live_bytes_by_device,
    resolve_devices,
    use_pinned_host,
    warn_preallocation,
)
from klotski_jax.runtime.host import HostTier, Verified
from klotski_jax.runtime.ledger import MemoryLedger, device_ledger
from klotski_jax.runtime.routing import GroupState
from klotski_jax.runtime.scheduler import Scheduler
from klotski_jax.runtime.trace import RunStats, Tracer
from klotski_jax.runtime.transfers import cache_memory

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
DEFAULT_GROUPS = 2  # n when the planner does not choose (flexgen, the no-multi-batch ablation)


@dataclasses.dataclass
class Sampling:
    """How a round picks its tokens: temperature with top-k / top-p / min-p (greedy at 0), the
    repetition penalty, the random generator, and the EOS ids that end a sequence (empty: never
    stop early)."""

    temperature: float
    top_p: float
    penalty: float
    rng: np.random.Generator
    eos: set[int]
    top_k: int = 0
    min_p: float = 0.0


@dataclasses.dataclass
class Generation:
    """The result of `Engine.generate`: new tokens (and text) per prompt, and the run's stats."""

    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]  # the new tokens of each prompt (cut after EOS if stop_at_eos)
    texts: list[str] | None  # decoded new tokens, when the checkpoint has a tokenizer
    stats: RunStats
    placement: dict[str, Any]
    plan: dict[str, Any] | None = None  # what the planner chose and predicted (None: not used)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a call runs its prompts: rounds of `groups` groups of `batch` prompts, under `policy`
    (the engine's policy with the planner's choices filled in), and the planner's `plan` when it
    made one."""

    groups: int
    batch: int
    policy: Policy
    plan: Plan | None = None


def prompt_bucket(n: int) -> int:
    """The padded prompt length of a round: the next of 8, 12, 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5 times them). Prompts are left-padded to it, so nearby prompt lengths
    share compiled shapes and a new length does not compile inside a timed run; at most a third
    of a prefill is padding (masked, so the results do not change)."""
    if n <= 8:
        return 8
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if p * 3 // 4 >= n else p


def penalize_repeats(logits: np.ndarray, history: Sequence[Sequence[int]],
                     penalty: float) -> np.ndarray:
    """HF-style repetition penalty: each row's already generated tokens get their logit divided
    by `penalty` when positive, multiplied when negative (1.0: unchanged). Returns a copy."""
    out = np.array(logits, np.float32)
    if penalty == 1.0:
        return out
    for r, seen in enumerate(history):
        idx = np.unique(np.asarray(seen, np.int64))
        if idx.size:
            row = out[r, idx]
            out[r, idx] = np.where(row > 0, row / penalty, row * penalty)
    return out


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
           top_k: int = 0, min_p: float = 0.0) -> np.ndarray:
    """Next token per row of float32 logits [b, v]: greedy at temperature 0, else sampled.

    HF's order and semantics: the logits are divided by the temperature; top_k > 0 keeps the
    tokens whose logit is at least the k-th largest (ties kept); top_p < 1 keeps the smallest
    set of the most likely of those whose probability mass reaches top_p; min_p > 0 keeps those
    at least min_p times as likely as the most likely one. The token is drawn from what is kept,
    renormalised; the most likely token is always kept."""
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int32)
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), np.int32)
    for r, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        keep = np.cumsum(row[order]) - row[order] < top_p  # smallest set with mass >= top_p
        if min_p > 0:
            keep &= row[order] >= min_p * row[order[0]]
        keep[0] = True
        probs = row[order[keep]] / row[order[keep]].sum()
        out[r] = order[keep][rng.choice(len(probs), p=probs)]
    return out


class Engine:
    """Generation with a schedule of the pipeline over a converted checkpoint."""

    def __init__(self, ckpt_dir: str | os.PathLike[str], policy: Policy | None = None,
                 *, predictor_factory: Callable[[Any], HotPredictor] | None = None,
                 profile: Profile | None = None,
                 memory_stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """`memory_stats`: where the device's own memory counts come from (default: the run's
        devices' `memory_stats()`, None on CPU; tests pass a fake)."""
        self.reader = CheckpointReader(ckpt_dir)
        warn_preallocation(policy)
        self.config = self.reader.config
        # Files that passed their checksum check: each is checked on its first read from disk
        # by any call of this engine (policy.verify_checksums), not on every call.
        self.verified = Verified()
        self.devices = resolve_devices(policy or Policy())
        # The policy names how many devices the run spans: the placement plans per device.
        self.policy = (policy or Policy()).replace(devices=len(self.devices))
        # bound to the device list, not to self: a cycle would keep an engine (and what it
        # loaded) alive until the garbage collector runs
        self.memory_stats = memory_stats or functools.partial(devices_memory_stats,
                                                              self.devices)
        self.tokenizer = load_tokenizer(self.reader.tokenizer_dir)
        # The checkpoint's prefetch table (klotski calibrate): each round predicts with its own
        # copy, updated online, never written back. Without one: previous-layer popularity.
        self.prefetch_table: CorrelationTable | None = None
        try:
            self.prefetch_table = CorrelationTable.load(self.reader.path)
            if self.prefetch_table is not None:
                self.prefetch_table.check(self.config.moe_layer_ids, self.config.num_experts)
        except TableError as e:  # a damaged table only costs prediction quality
            log.warning("ignoring the prefetch table: %s", e)
            self.prefetch_table = None
        self._predictor_factory = predictor_factory or self._default_predictor
        self._profile = profile
        self._plans: dict[tuple[int, int, int], Plan | None] = {}
        self._kv_memory: dict[bool, Any] = {}

    def kv_memory(self, policy: Policy) -> Any:
        """Where host-resident KV caches live: jax's pinned_host memory when the policy puts
        host data there (`use_pinned_host`) and the backend runs the host-side slot write
        (`steps.pinned_kv_works`, tried once), else None (NumPy arrays, with a log line when
        pinned memory was asked for but cannot hold them)."""
        pinned = use_pinned_host(policy)
        if pinned not in self._kv_memory:
            memory = None
            if pinned and len(self.devices) > 1:
                log.info("on %d devices host-resident KV caches stay in ordinary host memory "
                         "(their slot write runs on one device's host memory)", len(self.devices))
            elif pinned:
                memory = jax.sharding.SingleDeviceSharding(jax.local_devices()[0],
                                                           memory_kind="pinned_host")
                if not steps.pinned_kv_works(memory):
                    log.warning("this backend cannot update KV caches in pinned host memory: "
                                "host-resident KV caches stay in ordinary host memory")
                    memory = None
            self._kv_memory[pinned] = memory
        return self._kv_memory[pinned]

    def _default_predictor(self, cfg: Any) -> HotPredictor:
        if self.prefetch_table is not None:
            return CorrelationPrefetcher(self.prefetch_table.copy(), top_k=cfg.top_k)
        return PreviousLayerPopularity(cfg.moe_layer_ids, cfg.num_experts, cfg.top_k)

    # ---- inputs -------------------------------------------------------------------------------
    def check_context(self, prompt_tokens: int, max_new_tokens: int, where: str) -> None:
        """Refuse a prompt whose positions would pass the model's max_position_embeddings:
        RoPE computes them, but the model was never trained there."""
        limit, total = self.config.max_position_embeddings, prompt_tokens + max_new_tokens
        if total > limit:
            raise ValueError(
                f"{where}: {prompt_tokens} prompt tokens + {max_new_tokens} new tokens = {total} "
                f"positions, more than the model's max_position_embeddings {limit}; shorten the "
                "prompt or generate fewer tokens, or allow it explicitly (allow_long_context / "
                "--allow-long-context)")

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt (strings need the checkpoint's tokenizer)."""
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text but {self.reader.path} has no tokenizer; "
                                     "pass token ids instead")
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary "
                                 f"[0, {self.config.vocab_size}): {bad[:5]}")
            out.append(ids)
        return out

    def layout(self, n_prompts: int, prompt_len: int | None = None,
               max_new_tokens: int | None = None) -> Layout:
        """Groups, batch size per group and the run policy for n_prompts under the policy.

        With the multi-batch klotski schedule and the workload known (prompt length and new
        tokens), the planner chooses what the policy leaves open (groups, batch size, the
        prefetch threshold) from the costs of this model on this device: its measured profile
        (`klotski profile`) when one is cached, else the roofline prior of `planning/prior.py`
        over machine rates measured once in about a second. Otherwise DEFAULT_GROUPS groups
        with the prompts split evenly.
        """
        pol = self.policy
        if pol.single_group:
            groups, batch = 1, pol.batch_size or n_prompts
        else:
            open_ = pol.groups is None or pol.batch_size is None or (
                pol.uses_threshold and pol.prefetch_threshold is None)
            if open_ and prompt_len and max_new_tokens:
                plan = self._plan(n_prompts, prompt_len, max_new_tokens)
                if plan is not None:
                    return Layout(plan.groups, plan.batch_size, plan.policy(pol), plan)
            groups = min(pol.groups or DEFAULT_GROUPS, n_prompts)
            batch = pol.batch_size or math.ceil(n_prompts / groups)
        if pol.batch_size is None and prompt_len and max_new_tokens:
            batch = self._fitting_batch(groups, batch, prompt_len, max_new_tokens)
        return Layout(groups, batch, pol)

    def _fitting_batch(self, groups: int, batch: int, prompt_len: int, max_new: int) -> int:
        """The largest batch <= `batch` whose placement fits the budgets (more rounds instead of
        a BudgetError), or `batch` itself when none does (its error names the minimum)."""
        cache = cache_len(prompt_len + max_new)
        for b in range(batch, 0, -1):
            try:
                place(self.config, self.policy, Workload(groups, b, prompt_len,
                                                         cache - prompt_len), self.expert_load())
            except BudgetError:
                continue
            if b < batch:
                log.info("%s: batch %d does not fit the budgets; %d per group, more rounds",
                         self.policy.schedule.value, batch, b)
            return b
        return batch

    def expert_load(self) -> list[list[float]] | None:
        """Per MoE layer, each expert's routing probability from the prefetch table (None
        without one): what balances the experts over several devices."""
        if len(self.devices) == 1 or self.prefetch_table is None:
            return None
        return self.prefetch_table.routing_probs()

    def costs(self) -> Profile:
        """What the planner predicts with: the given or cached profile of this model on this
        device, else the roofline prior over this machine's rates (measured and cached on
        first use)."""
        from klotski_jax.planning.prior import prior_profile
        from klotski_jax.profiler import load_cached, machine_rates

        profile = self._profile or load_cached(self.config)
        if profile is None:
            rates, measured = machine_rates()
            if measured:
                log.info("measured this machine's rates for the planner's prior in %.1f s "
                         "(`klotski profile %s` measures the model itself)",
                         rates.meta.get("elapsed_s", 0.0), self.reader.path)
            profile = prior_profile(self.config, rates)
        return profile

    def _plan(self, n_prompts: int, prompt_len: int, max_new: int) -> Plan | None:
        """The planner's choice (memoised per workload); None when it cannot plan."""
        pol = self.policy
        if pol.schedule is not Schedule.KLOTSKI or not pol.multi_batch:
            return None
        key = (n_prompts, prompt_len, max_new)
        if key not in self._plans:
            profile = self.costs()
            routing = self.prefetch_table.routing_probs() if self.prefetch_table else None
            req = PlanRequest(prompt_len=prompt_len, gen_len=max_new, num_prompts=n_prompts,
                              batch_size=pol.batch_size, groups=pol.groups,
                              hot_experts=pol.hot_experts,
                              prefetch_threshold=pol.prefetch_threshold if pol.uses_threshold
                              else None, device_budget=pol.device_budget,
                              host_budget=pol.host_budget, disk_tier=disk_tier(pol),
                              reread_tier=reread_tier(pol))
            plan = Planner(self.config, profile, routing, base=pol).plan(req)
            plan = dataclasses.replace(plan, cost_source="prior" if is_prior(profile)
                                       else "profile")
            log.info("planner (%s costs): %d group(s) x %d, prefetch %s; predicted %.1f tok/s, "
                     "binding %s", plan.cost_source, plan.groups, plan.batch_size,
                     plan.prefetch.describe(), plan.predicted_throughput_tokens_per_s,
                     plan.binding_constraint)
            self._plans[key] = plan
        return self._plans[key]

    # ---- the run ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_at_eos: bool = True, trace: Tracer | None = None,
                 progress: Callable[[int], None] | None = None,
                 repetition_penalty: float = 1.0,
                 allow_long_context: bool = False, top_k: int = 0,
                 min_p: float = 0.0) -> Generation:
        """Generate up to max_new_tokens per prompt. Greedy at temperature 0 (the default).

        repetition_penalty > 1 discourages tokens this prompt has already generated (HF
        semantics, applied to the new tokens only); small models loop less with about 1.3.
        progress(n) is called after every decode step with the number of tokens generated.
        A prompt whose tokens plus max_new_tokens exceed the model's max_position_embeddings is
        refused (the model never saw such positions) unless allow_long_context. With
        temperature > 0, top_k (0: off), top_p (1: off) and min_p (0: off) filter the
        distribution as HF's warpers do (`sample`), drawing from a generator seeded by `seed`.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {min_p}")
        ids = self.encode(prompts)
        if not allow_long_context:
            for i, p in enumerate(ids):
                self.check_context(len(p), max_new_tokens, where=f"prompt {i}")
        lay = self.layout(len(ids), prompt_bucket(max(len(p) for p in ids)), max_new_tokens)
        per_round = lay.groups * lay.batch
        tracer = trace or Tracer(enabled=False)
        stats = RunStats(schedule=self.policy.schedule.value)
        rng = np.random.default_rng(seed)
        new_tokens: list[list[int]] = []
        placement = None
        eos = set(self.config.eos_token_ids)
        host = _HostState(self, lay.policy)  # one host cache for every round: the disk is read once
        for start in range(0, len(ids), per_round):
            chunk = ids[start: start + per_round]
            out, placement = self._run_round(chunk, lay, max_new_tokens,
                                             Sampling(temperature, top_p, repetition_penalty,
                                                      rng, eos if stop_at_eos else set(),
                                                      top_k, min_p),
                                             tracer, stats, progress, host)
            new_tokens.extend(out)
        if stop_at_eos and eos:
            new_tokens = [_cut_at(t, eos) for t in new_tokens]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
        return Generation(ids, new_tokens, texts, stats, placement.describe() if placement else {},
                          lay.plan.to_dict() if lay.plan is not None else None)

    def logits(self, token_ids: Any, attention_mask: Any | None = None) -> np.ndarray:
        """Float32 logits [B, S, V] of a left-padded batch computed through the schedule
        (one prefill step over policy.groups groups): checks the pipeline against the oracle."""
        ids = np.asarray(token_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        lay = self.layout(len(ids))
        batch = lay.batch
        parts = [(ids[g * batch:(g + 1) * batch], mask[g * batch:(g + 1) * batch])
                 for g in range(lay.groups) if g * batch < len(ids)]
        with _Session(self, lay.policy, len(parts), batch, ids.shape[1], 1, Tracer(False),
                      RunStats(), _HostState(self, lay.policy)) as s:
            states = [s.group(i, m) for i, m in parts]
            logits = s.step("prefill", states, all_positions=True, prefetch_next=False)
        return np.concatenate([np.asarray(x) for x in logits])

    def _run_round(self, chunk: list[list[int]], lay: Layout, max_new: int, how: Sampling,
                   tracer: Tracer, stats: RunStats, progress: Callable[[int], None] | None,
                   host: _HostState) -> tuple[list[list[int]], Placement]:
        """Generate for one round: prompts left-padded to their bucket, groups of `batch`.
        A group whose sequences have all produced EOS (when stopping at EOS) leaves the round:
        later steps neither compute nor load anything for it; the round ends when none is left."""
        s_len, batch = prompt_bucket(max(len(p) for p in chunk)), lay.batch
        pad = self.config.pad_token_id or 0
        ids = np.full((len(chunk), s_len), pad, np.int32)
        mask = np.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, s_len - len(p):] = p
            mask[r, s_len - len(p):] = 1
        n_groups = math.ceil(len(chunk) / batch)
        rows = [range(g * batch, min((g + 1) * batch, len(chunk))) for g in range(n_groups)]
        out: list[list[int]] = [[] for _ in chunk]
        done = np.zeros(len(chunk), bool)
        stats.record_round([len(r) for r in rows])
        with _Session(self, lay.policy, n_groups, batch, s_len, max_new, tracer, stats,
                      host) as s:
            states = [s.group(ids[r.start:r.stop], mask[r.start:r.stop]) for r in rows]
            stats.prompt_tokens += int(mask.sum())
            s.warm_up(states, decode=max_new > 1)
            active = list(range(n_groups))
            t0 = time.perf_counter()
            logits = s.step("prefill", states, prefetch_next=max_new > 1)
            for step in range(max_new):
                made = 0
                for g, x in zip(active, logits):
                    tokens = sample(penalize_repeats(np.asarray(x), [out[r] for r in rows[g]],
                                                     how.penalty),
                                    how.temperature, how.top_p, how.rng, how.top_k, how.min_p)
                    for r, tok in zip(rows[g], tokens):
                        out[r].append(int(tok))
                        done[r] |= int(tok) in how.eos
                    states[g].next_tokens = tokens
                    made += len(tokens)
                now = time.perf_counter()
                if step == 0:
                    stats.prefill_s += now - t0
                else:
                    stats.decode_s += now - t0
                t0 = now
                stats.generated_tokens += made
                if progress is not None:
                    progress(made)
                active = [g for g in active if not done[rows[g].start:rows[g].stop].all()]
                if step + 1 == max_new or not active:
                    break
                for g in active:
                    states[g].feed(states[g].next_tokens)
                logits = s.step(f"decode {step + 1}", [states[g] for g in active],
                                prefetch_next=step + 2 < max_new)
            placement = s.placement
        return out, placement


class _HostState:
    """The host tier of one `generate` call: its ledger and its expert cache, shared by the
    call's rounds, so experts read in the first round are served from RAM in the next ones
    (and the page cache is evicted once, before the first read). Made by the first round, with
    its placement's host cache set (later rounds have as many groups or fewer: as much room)."""

    def __init__(self, engine: Engine, policy: Policy) -> None:
        self.engine = engine
        self.ledger = MemoryLedger("host", policy.host_budget)
        self.tier: HostTier | None = None

    def get(self, pol: Policy, pl: Placement) -> HostTier:
        if self.tier is None:
            pinned = use_pinned_host(pol)
            if pinned:
                log.info("host expert cache and host dense layers in pinned host memory; the "
                         "staging buffers of disk reads stay in ordinary host memory (a file "
                         "read needs a writable buffer, which JAX does not give in pinned "
                         "memory)")
            self.tier = HostTier(self.engine.reader, self.ledger, pl.host_experts, pol.io_mode,
                                 host_memory=cache_memory(jax.local_devices()[0], pinned),
                                 verified=self.engine.verified if pol.verify_checksums else None)
            if pol.evict_page_cache:
                self.tier.evict_page_cache()
        return self.tier


class _Session:
    """Device ledger, transfers and scheduler of one round; frees them on exit."""

    def __init__(self, engine: Engine, policy: Policy, groups: int, batch: int, prompt_len: int,
                 max_new: int, tracer: Tracer, stats: RunStats, host: _HostState) -> None:
        self.engine = engine
        self.cfg = cfg = engine.config
        self.policy = pol = policy
        self.cache_len = cache_len(prompt_len + max_new)
        self.placement = place(cfg, pol, Workload(groups, batch, prompt_len,
                                                  self.cache_len - prompt_len),
                               engine.expert_load())
        self.tracer, self.stats = tracer, stats
        self.batch, self.groups = batch, groups
        self.host_state = host

    def __enter__(self) -> _Session:
        from klotski_jax.runtime.transfers import Transfers

        cfg, pol, pl = self.cfg, self.policy, self.placement
        baseline = live_bytes_by_device() if pol.verify_memory else None
        devices = self.engine.devices
        # On a mesh one ledger per device, all charged for what is replicated (DeviceLedgers).
        self.device = device_ledger("device", pol.device_budget, len(devices))
        self.host = self.host_state.ledger
        host = self.host_state.get(pol, pl)
        # KV caches: on the device for the whole run, or in host RAM (loaded per layer, in the
        # device ledger as ("kv", layer, group) transfers) when the budget cannot hold them.
        (self.device if pl.kv_on_device else self.host).reserve("kv caches", pl.kv_bytes)
        self.device.reserve("activations", pl.activation_bytes)
        self.device.reserve("globals", device_global_bytes(cfg))
        on_device = ("final_norm", "embed" if cfg.tie_word_embeddings else "lm_head")
        embed_host = None if cfg.tie_word_embeddings else host.globals["embed"]
        kv_window = None
        if not pl.kv_on_device:
            self.device.reserve("kv window", pl.kv_device_bytes)
            kv_window = device_ledger("device kv window", pl.kv_device_bytes, len(devices))
        self.transfers = Transfers(host, self.device, io_threads=pol.io_threads,
                                   tracer=self.tracer, stats=self.stats, kv_ledger=kv_window,
                                   devices=devices, owner=pl.owner)
        globals_dev = self.transfers.replicate({k: host.globals[k] for k in on_device})
        self.scheduler = Scheduler(cfg, pol, pl, self.transfers,
                                   self.engine._predictor_factory(cfg), globals_dev, embed_host,
                                   self.tracer,
                                   self.stats, self.device, live_baseline=baseline)
        log.info("placement: %s", pl.describe())
        return self

    def group(self, ids: np.ndarray, mask: np.ndarray) -> GroupState:
        on_device = self.placement.kv_on_device
        cache = KVCache.create(self.cfg, len(ids), self.cache_len, host=not on_device,
                               memory=None if on_device else self.engine.kv_memory(self.policy))
        if on_device and self.transfers.mesh is not None:  # attention runs on every device
            cache.kv = [self.transfers.replicate(tuple(np.asarray(a) for a in kv))
                        for kv in cache.kv]
        cache.valid[:, : ids.shape[1]] = mask > 0
        return GroupState(cache, ids, positions_from_mask(mask),
                          index=self.transfers.add_kv_cache(cache))

    def warm_up(self, states: list[GroupState], decode: bool) -> None:
        """Compile the round's shapes before its timed steps (Scheduler.warm_up)."""
        self.scheduler.warm_up(states, decode)

    def step(self, name: str, states: list[GroupState], **kw: Any) -> list[jax.Array]:
        if self.policy.multi_batch:
            return self.scheduler.run_step(name, states, **kw)
        return [x for g in states for x in self.scheduler.run_step(name, [g], **kw)]

    def __exit__(self, *exc: Any) -> None:
        self.transfers.close()
        if not self.placement.kv_on_device:
            self.host.release("kv caches")
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.device.peak)
        # a multi-host run: each process reports its own devices (others': 0)
        peaks = [part.peak if here else 0
                 for part, here in zip(self.device.parts, self.transfers.local)]
        before = self.stats.peak_device_bytes_per_device or [0] * len(peaks)
        self.stats.peak_device_bytes_per_device = [max(a, b) for a, b in zip(before, peaks)]
        measured = self.engine.memory_stats() or {}
        if "peak_bytes_in_use" in measured:
            self.stats.device_peak_bytes_in_use = max(self.stats.device_peak_bytes_in_use or 0,
                                                      int(measured["peak_bytes_in_use"]))
        if "bytes_limit" in measured:
            self.stats.device_bytes_limit = int(measured["bytes_limit"])
        self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.host.peak)
        self.stats.device_budget_bytes = self.policy.device_budget
        self.stats.host_budget_bytes = self.policy.host_budget


def disk_tier(policy: Policy) -> str:
    """What a round's first read of an expert costs, for the planner: "disk" when the run
    evicts the page cache or reads with O_DIRECT, else "page_cache" (the files were read before
    and stay in RAM while it has room; the profile measures both)."""
    return "disk" if policy.evict_page_cache or policy.io_mode == "direct" else "page_cache"


def reread_tier(policy: Policy) -> str:
    """What a later read of an expert outside the host cache costs, for the planner: "disk"
    with O_DIRECT, else "page_cache" (the round's first read left the file in the page cache)."""
    return "disk" if policy.io_mode == "direct" else "page_cache"


def _cut_at(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


__all__ = ["Engine", "Generation", "Policy", "PolicyError", "penalize_repeats", "sample"]
