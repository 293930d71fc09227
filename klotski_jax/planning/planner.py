"""The constraint-sensitive planner: n batch groups, batch size, prefetch rule and placement.

Plain Python (no JAX). The prefetch rule is klotski's: every expert the step's tokens route to
with probability >= a threshold is loaded before the router (simulate.PrefetchRule); the planner
tries the thresholds of PREFETCH_THRESHOLDS (0: the whole layer; 1: only experts certain to be
used), or the fixed K of the request. For every candidate (n, b, rule) it asks
`placement.place` whether the
budgets admit it (a BudgetError means infeasible), predicts the prefill and decode step times
with the expected-value timeline of the klotski schedule (`simulate.StepSimulator`) over the
measured costs of a `Profile`, and keeps the plan with the best predicted throughput
(generated tokens / (prefill + decode time)); of the plans within 0.5% of the best, the one with
the fewest sequences, then the fewest groups.

For the chosen plan it also evaluates the overlap inequalities of the Klotski paper (ASPLOS 2025) on the
decode step of the MoE layer that streams the most, with T_G / T_A the router / other dense
share of the layer's dense load time, T_E the mean load time of its streamed experts, K the hot
experts that are not resident and |Q| the expected cold loads:
  (4) n*t_A >= T_G                         (5) n*(t_A + t_G) >= T_G + K*T_E
  (6) n*(t_A + t_G) + t_hot >= T_G + (K + min(1, |Q|))*T_E
  (7) n*(t_A + t_G) + t_hot + sum_Q t_E >= T_G + (K + |Q|)*T_E + T_A
`binding_constraint` is the violated inequality with the largest deficit. The inequalities are
necessary, not sufficient (cold loads cannot start before the routers): when all hold but the
timeline still waits more than 5% of a decode step, it is "expert_slots" (the device budget
leaves too few slots to load ahead) or "cold_loads"; else "compute". `limited_by` says what
stopped n from growing.

On several devices (the base policy's `devices`: expert parallelism) the placement is per
device (each its own budget, resident experts and expert slots), and the timeline gives each
device its own link and expert compute (simulate.py): `scaling.predicted_scaling` asks it for a
list of device counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from klotski_jax.config import ModelConfig
from klotski_jax.constants import BudgetError, PolicyError, cache_len
from klotski_jax.planning.costs import CostModel, Profile, expected_distinct
from klotski_jax.planning.placement import Placement, Workload, dense_layer_bytes, place
from klotski_jax.planning.policy import Policy
from klotski_jax.planning.prior import is_prior
from klotski_jax.planning.simulate import LayerPlan, PrefetchRule, StepShape, StepSimulator, Stuck

PREFETCH_THRESHOLDS = (0.0, 0.2, 0.5, 0.8, 0.95, 1.0)
TIE = 0.005  # plans within 0.5% of the best throughput count as ties
# ... within 3% under the roofline prior, whose predictions are rough: among plans it cannot tell
# apart, the one with fewer rounds and fewer groups (fewer jitted calls, which it prices least
# well) is the safer choice.
PRIOR_TIE = 0.03
WAIT_BUBBLES = 0.05  # decode bubbles above this with (4)-(7) holding: the timeline binds


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """The workload and the fixed choices. None lets the planner choose.

    num_prompts: prompts to generate for (None: any number, up to max_sequences per round).
    disk_tier: what a first read of an expert costs: "disk" (page cache evicted, the true disk
    tier) or "page_cache" (the checkpoint's files are in RAM already).
    reread_tier: what a later read of an expert the host cache does not hold costs: "disk" with
    O_DIRECT reads (every read goes to the disk), "page_cache" with buffered reads (the first
    read left the file in the OS page cache); None: as disk_tier.
    """

    prompt_len: int = 128
    gen_len: int = 32
    num_prompts: int | None = None
    batch_size: int | None = None
    groups: int | None = None
    hot_experts: int | None = None  # a fixed K instead of the threshold rule
    prefetch_threshold: float | None = None  # a fixed threshold (None: the planner's choice)
    device_budget: int | None = None
    host_budget: int | None = None
    max_groups: int = 16
    max_sequences: int = 256
    disk_tier: str = "disk"
    reread_tier: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "max_groups", "max_sequences"):
            if getattr(self, name) < 1:
                raise PolicyError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_prompts", "batch_size", "groups"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PolicyError(f"{name} must be >= 1, got {v}")
        if self.disk_tier not in ("disk", "page_cache"):
            raise PolicyError(f"disk_tier must be 'disk' or 'page_cache', got {self.disk_tier!r}")
        if self.reread_tier not in (None, "disk", "page_cache"):
            raise PolicyError(f"reread_tier must be None, 'disk' or 'page_cache', got "
                              f"{self.reread_tier!r}")

    @property
    def cache_len(self) -> int:
        return cache_len(self.prompt_len + self.gen_len)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's choice and its predictions (seconds, tokens/s)."""

    groups: int
    batch_size: int
    prefetch: PrefetchRule
    placement: Placement
    predicted_prefill_s: float
    predicted_decode_step_s: float
    predicted_total_s: float
    predicted_throughput_tokens_per_s: float
    predicted_bubble_fraction: float
    predicted_decode_bubble_fraction: float
    rounds: int
    generated_tokens: int
    expected_experts: dict[str, float]  # expected distinct routed experts per layer
    inequalities: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    binding_constraint: str = ""
    binding_detail: str = ""
    limited_by: str = ""
    cost_source: str = "profile"  # "profile" (measured) or "prior" (roofline over machine rates)
    devices: int = 1  # devices of the mesh the plan is for (expert parallelism)

    @property
    def hot_experts(self) -> int | None:
        """The fixed K, when the plan uses the K rule."""
        return self.prefetch.k

    @property
    def prefetch_threshold(self) -> float | None:
        return self.prefetch.threshold

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["placement"] = self.placement.describe()
        d["prefetch"] = self.prefetch.describe()
        d["hot_experts"] = self.hot_experts
        d["prefetch_threshold"] = self.prefetch_threshold
        return d

    def policy(self, base: Policy) -> Policy:
        """`base` with this plan's groups, batch size and prefetch rule."""
        return base.replace(groups=self.groups, batch_size=self.batch_size,
                            hot_experts=self.prefetch.k,
                            prefetch_threshold=self.prefetch.threshold)

    def describe(self) -> str:
        ms = lambda s: f"{s * 1e3:.2f} ms"
        on = f" on {self.devices} devices" if self.devices > 1 else ""
        lines = [
            f"plan: n = {self.groups} group(s) x batch {self.batch_size}, prefetch "
            f"{self.prefetch.describe()}, {self.rounds} round(s){on}",
            f"placement: {self.placement.describe()}",
            f"predicted: prefill {ms(self.predicted_prefill_s)}, decode step "
            f"{ms(self.predicted_decode_step_s)}, {self.predicted_throughput_tokens_per_s:.1f} "
            f"tok/s, bubbles {self.predicted_bubble_fraction:.1%}",
            f"binding constraint: {self.binding_constraint} ({self.binding_detail}); "
            f"n limited by: {self.limited_by}",
        ]
        for name, q in self.inequalities.items():
            lines.append(f"  {name} {'holds' if q['holds'] else 'FAILS'}: {ms(q['lhs_s'])} "
                         f"compute vs {ms(q['rhs_s'])} I/O")
        return "\n".join(lines)


class Planner:
    """Plans for one model and one profile; `routing` is per MoE layer the probability that a
    token picks each expert (None: uniform top-k, k/E). `base` is the run's policy: its
    `device_count` is the mesh the plans are for (each device its own budget, link and expert
    slots; see simulate.py), its other fields what the plans keep."""

    def __init__(self, cfg: ModelConfig, profile: Profile,
                 routing: Sequence[Sequence[float]] | None = None,
                 base: Policy | None = None) -> None:
        self.cfg = cfg
        self.costs = CostModel(profile)
        self.prior = is_prior(profile)
        e, k = cfg.num_experts, cfg.top_k
        n_moe = len(cfg.moe_layer_ids)
        if routing is None:
            routing = [[k / e] * e for _ in range(n_moe)]
        if len(routing) != n_moe or any(len(r) != e for r in routing):
            raise ValueError(f"routing needs {n_moe} MoE layers x {e} experts")
        self.routing = [tuple(float(p) for p in r) for r in routing]
        self.base = (base or Policy()).replace(schedule="klotski", multi_batch=True)
        self.dense_bytes = dense_layer_bytes(cfg)
        self.devices = self.base.device_count
        self._sims: dict[tuple[Any, ...], list[tuple[float, float]]] = {}

    # ---- the search ---------------------------------------------------------------------------
    def plan(self, req: PlanRequest) -> Plan:
        """The best feasible plan; BudgetError (with the smallest working budget) if none."""
        plans = [p for n, b, k in self.candidates(req)
                 if (p := self.evaluate(req, n, b, k)) is not None]
        if not plans:
            raise BudgetError(self._infeasible_message(req))
        return self._explain(req, pick(plans, PRIOR_TIE if self.prior else TIE))

    def candidates(self, req: PlanRequest) -> list[tuple[int, int, PrefetchRule]]:
        """(n, b, prefetch rule) the search visits."""
        p = req.num_prompts
        cap = p if p is not None else req.max_sequences
        ns = [req.groups] if req.groups else list(range(1, req.max_groups + 1))
        if req.batch_size:
            bs = [req.batch_size]
        else:
            bs = {1 << i for i in range(cap.bit_length()) if 1 << i <= cap}
            if p is not None:
                bs |= {math.ceil(p / n) for n in ns}
                if req.groups:  # the groups asked for all run: b <= ceil(p / n)
                    bs = {b for b in bs if b <= math.ceil(p / req.groups)}
            bs = sorted(bs)
        if req.hot_experts is not None:
            ks = [PrefetchRule(k=req.hot_experts)]
        elif req.prefetch_threshold is not None:
            ks = [PrefetchRule(threshold=req.prefetch_threshold)]
        else:
            ks = [PrefetchRule(threshold=t) for t in PREFETCH_THRESHOLDS]
        out = []
        for n in ns:
            for b in bs:
                if p is not None and not req.groups and n > math.ceil(p / b):
                    continue  # more groups than there are prompts for
                if p is None and not (req.groups or req.batch_size) and n * b > cap:
                    continue
                out += [(n, b, k) for k in ks]
        return out

    def placement(self, req: PlanRequest, n: int, b: int, k: PrefetchRule | int
                  ) -> Placement | None:
        """The placement of (n, b, rule), or None when the budgets do not admit it."""
        rule = _rule(k)
        policy = self.base.replace(groups=n, batch_size=b, hot_experts=rule.k,
                                   prefetch_threshold=rule.threshold,
                                   device_budget=req.device_budget, host_budget=req.host_budget)
        try:
            # On a mesh the routing balances the experts over the devices, as the engine's
            # prefetch table does (uniform routing: round robin, as with none).
            return place(self.cfg, policy,
                         Workload(n, b, req.prompt_len, req.cache_len - req.prompt_len),
                         self.routing if self.devices > 1 else None)
        except BudgetError:
            return None

    # ---- one candidate ------------------------------------------------------------------------
    def evaluate(self, req: PlanRequest, n: int, b: int, k: PrefetchRule | int) -> Plan | None:
        """Predictions for n groups of b sequences with a prefetch rule (an int: K hot
        experts). None: infeasible."""
        k = _rule(k)
        pl = self.placement(req, n, b, k)
        if pl is None:
            return None
        full, rest = (1, 0) if req.num_prompts is None else divmod(req.num_prompts, n * b)
        try:
            # The host cache lives for the whole call: only the first round reads every expert
            # from the files, later ones find the cached ones in RAM.
            later = self._steps(req, pl, n, b, k, first_round=False) if full > 1 else None
            steps = [self._steps(req, pl, n, b, k)] + [later] * (full - 1) if full else []
            if rest:
                steps.append(self._steps(req, pl, math.ceil(rest / b), b, k,
                                         first_round=not steps))
        except Stuck:  # the FIFO ledger would deadlock: loads queued behind unplaceable ones
            return None
        prefill = sum(s[0][0] for s in steps)
        decode = sum(s[2][0] * (req.gen_len - 1) for s in steps)
        waits = sum(s[0][1] + s[2][1] * (req.gen_len - 1) for s in steps)
        total = prefill + decode
        tokens = (req.num_prompts or n * b) * req.gen_len
        return Plan(
            groups=n, batch_size=b, prefetch=k, placement=pl,
            predicted_prefill_s=steps[0][0][0], predicted_decode_step_s=steps[0][2][0],
            predicted_total_s=total, predicted_throughput_tokens_per_s=tokens / total,
            predicted_bubble_fraction=waits / total,
            predicted_decode_bubble_fraction=steps[0][2][1] / steps[0][2][0],
            rounds=len(steps), generated_tokens=tokens, devices=pl.devices,
            expected_experts={
                "prefill": expected_distinct(n * b * req.prompt_len, self.routing[0]),
                "decode": expected_distinct(n * b, self.routing[0])})

    def _steps(self, req: PlanRequest, pl: Placement, n: int, b: int, k: PrefetchRule,
               first_round: bool = True) -> list[tuple[float, float]]:
        """(seconds, bubbles) of the prefill and of two decode steps (the second is steady) of
        a round; the first round's prefill reads every expert it uses from the files."""
        # Everything of req the simulation reads; the rule only through the hot sets it picks,
        # so thresholds that pick the same experts share one simulation (under uniform routing
        # most do: at E = 256 the search otherwise simulates millions of expert loads).
        hot = tuple(tuple(k.hot(r, t)) for t in (n * b * req.prompt_len, n * b)
                    for r in dict.fromkeys(self.routing))
        key = (n, b, hot, pl, req.prompt_len, req.cache_len, req.device_budget, req.disk_tier,
               req.reread_tier, first_round)
        if key not in self._sims:
            sim = StepSimulator(self.cfg, self.costs, k, self.expert_slots(req, pl),
                                devices=pl.devices)
            s = req.cache_len
            prefill = sim.run(self.layers(req, pl, first_read=first_round, batch=b),
                              [StepShape(n, b, req.prompt_len, s)])
            decode = sim.run(self.layers(req, pl, first_read=False, batch=b),
                             [StepShape(n, b, 1, s)] * 2)
            self._sims[key] = [prefill[0], *decode]
        return self._sims[key]

    def expert_slots(self, req: PlanRequest, pl: Placement) -> float | None:
        """Experts the device budget can hold in flight beside everything else (per device:
        beside the most resident experts any device holds)."""
        if req.device_budget is None:
            return None
        dense = self.dense_bytes
        resident = len(pl.device_experts) if pl.devices == 1 else max(
            sum(pl.owner(i, e) == d for i, e in pl.device_experts) for d in range(pl.devices))
        held = (pl.fixed_device_bytes + (sum(dense) if pl.dense_resident else 2 * max(dense))
                + resident * self.cfg.expert_bytes)
        return max(1, (req.device_budget - held) // self.cfg.expert_bytes)

    def layers(self, req: PlanRequest, pl: Placement, first_read: bool, batch: int
               ) -> list[LayerPlan]:
        """Per layer: dense load time, per expert load time under the placement (a round's first
        read of an expert costs `disk_tier`, later ones the host cache if it holds the expert,
        else `reread_tier`) and, when the KV caches live in host RAM, one group's KV load."""
        cfg, c = self.cfg, self.costs
        first = c.expert_load(req.disk_tier)
        reread = c.expert_load(req.reread_tier or req.disk_tier)
        dense = self.dense_bytes
        kv_s = 0.0
        if not getattr(pl, "kv_on_device", True):  # (layer, group) caches visit the device
            kv_s = c.dense_load(cfg.kv_cache_bytes(batch, req.cache_len) // cfg.num_layers)
        out, moe_pos = [], 0
        for i in range(cfg.num_layers):
            dense_s = 0.0 if pl.dense_resident else c.dense_load(dense[i])
            if not cfg.moe_layers[i]:
                out.append(LayerPlan(dense_s, kv_load_s=kv_s))
                continue
            loads = []
            for e in range(cfg.num_experts):
                if (i, e) in pl.device_experts:
                    loads.append(0.0)
                elif first_read:
                    loads.append(first)
                elif pl.host_experts is not None and (i, e) not in pl.host_experts:
                    loads.append(reread)
                else:
                    loads.append(c.expert_load("host"))
            owners = pl.owners[i] if pl.devices > 1 else ()
            out.append(LayerPlan(dense_s, self.routing[moe_pos], tuple(loads), kv_s, owners))
            moe_pos += 1
        return out

    # ---- explanations -------------------------------------------------------------------------
    def _explain(self, req: PlanRequest, p: Plan) -> Plan:
        ineq = self.inequalities(req, p)
        failing = [(q["rhs_s"] - q["lhs_s"], name) for name, q in ineq.items() if not q["holds"]]
        if failing:
            deficit, name = max(failing)
            binding = name
            detail = (f"I/O exceeds compute by {deficit * 1e3:.2f} ms per layer at this "
                      "overlap point of the decode step")
        elif p.predicted_decode_bubble_fraction > WAIT_BUBBLES:
            share = f"{p.predicted_decode_bubble_fraction:.0%} of a decode step waits"
            if self._decode_bubbles(req, p, slots=None) < p.predicted_decode_bubble_fraction / 2:
                binding = "expert_slots"
                detail = f"(4)-(7) hold, but the device budget leaves too few expert slots: {share}"
            else:
                binding = "cold_loads"
                detail = (f"(4)-(7) hold, but cold experts cannot load before the routers and "
                          f"their loads outlast the expert phase: {share}")
        else:
            binding, detail = "compute", "every load of the decode step hides behind compute"
        return dataclasses.replace(p, inequalities=ineq, binding_constraint=binding,
                                   binding_detail=detail, limited_by=self._limit(req, p))

    def _decode_bubbles(self, req: PlanRequest, p: Plan, slots: float | None) -> float:
        sim = StepSimulator(self.cfg, self.costs, p.prefetch, slots, devices=p.devices)
        shape = StepShape(p.groups, p.batch_size, 1, req.cache_len)
        layers = self.layers(req, p.placement, first_read=False, batch=p.batch_size)
        t, wait = sim.run(layers, [shape] * 2)[1]
        return wait / t

    def _limit(self, req: PlanRequest, p: Plan) -> str:
        """Why the planner did not take one more group."""
        if req.groups:
            return "fixed"
        n = p.groups + 1
        if n > req.max_groups:
            return "max_groups"
        if req.num_prompts is not None and n > math.ceil(req.num_prompts / p.batch_size):
            return "prompts"
        if req.num_prompts is None and not req.batch_size and n * p.batch_size > req.max_sequences:
            return "max_sequences"
        if self.placement(req, n, p.batch_size, p.prefetch) is None:
            dev = dataclasses.replace(req, host_budget=None)
            return "host_budget" if self.placement(dev, n, p.batch_size, p.prefetch) \
                else "device_budget"
        return "throughput"

    def inequalities(self, req: PlanRequest, p: Plan) -> dict[str, dict[str, Any]]:
        """(4)-(7) on the decode step of the MoE layer that streams the most; on several
        devices, over the experts of the device whose side of (7) falls shortest (each device
        loads and computes only its own experts, while attention and routers are replicated)."""
        cfg, c, n, b = self.cfg, self.costs, p.groups, p.batch_size
        layers = self.layers(req, p.placement, first_read=False, batch=b)
        moe = [x for x in layers if x.moe]
        layer = max(moe, key=lambda x: (sum(x.load_s), x.dense_load_s))
        t_a, t_g = c.attention(b, 1, req.cache_len), c.router(b)
        router_bytes = 4 if cfg.router_fp32 else cfg.itemsize
        router_share = cfg.num_experts * cfg.hidden_size * router_bytes / max(self.dense_bytes)
        big_t_g = layer.dense_load_s * router_share
        big_t_a = layer.dense_load_s - big_t_g
        exp = {e: c.expert_expectation(n * b, layer.probs[e]) for e in range(cfg.num_experts)}
        base = n * (t_a + t_g)
        worst: dict[str, tuple[float, float]] = {}
        for d in range(p.devices):
            mine = [e for e in range(cfg.num_experts) if layer.owner(e) == d]
            hot = [e for e in p.prefetch.hot(layer.probs, n * b) if layer.owner(e) == d]
            streamed = [e for e in mine if layer.load_s[e] > 0]
            k = sum(1 for e in hot if layer.load_s[e] > 0)
            t_e = sum(layer.load_s[e] for e in streamed) / len(streamed) if streamed else 0.0
            t_hot = sum(exp[e][1] for e in hot)
            cold = [e for e in streamed if e not in hot]
            q = sum(exp[e][0] for e in cold)
            t_cold = sum(exp[e][1] for e in cold)
            sides = {"(4)": (n * t_a, big_t_g), "(5)": (base, big_t_g + k * t_e),
                     "(6)": (base + t_hot, big_t_g + (k + min(1.0, q)) * t_e),
                     "(7)": (base + t_hot + t_cold, big_t_g + (k + q) * t_e + big_t_a)}
            if not worst or sides["(7)"][1] - sides["(7)"][0] > worst["(7)"][1] - worst["(7)"][0]:
                worst = sides
        return {name: {"lhs_s": lhs, "rhs_s": rhs, "holds": lhs >= rhs - 1e-12}
                for name, (lhs, rhs) in worst.items()}

    def _infeasible_message(self, req: PlanRequest) -> str:
        what = (f"{req.num_prompts or 'any number of'} prompt(s) of {req.prompt_len} tokens + "
                f"{req.gen_len} new")
        fixed = [f"{name} {getattr(req, name)}" for name in ("groups", "batch_size", "hot_experts",
                                                             "prefetch_threshold")
                 if getattr(req, name) is not None]
        what += f" ({', '.join(fixed)})" if fixed else ""
        dev = self.smallest_budget(req, "device")
        if dev is not None and req.device_budget is not None and dev > req.device_budget:
            return (f"device budget {req.device_budget} bytes is below the minimum {dev} bytes "
                    f"({dev / 1e6:.2f} MB) of every layout the planner tried for {what}")
        host = self.smallest_budget(req, "host")
        if host is not None and req.host_budget is not None and host > req.host_budget:
            return (f"host budget {req.host_budget} bytes is below the minimum {host} bytes "
                    f"({host / 1e6:.2f} MB) of every layout the planner tried for {what} with "
                    f"this device budget")
        return (f"no plan fits device budget {req.device_budget} / host budget "
                f"{req.host_budget} bytes for {what}: no budget works")

    def smallest_budget(self, req: PlanRequest, tier: str) -> int | None:
        """The smallest device (or host) budget with a feasible candidate: a search over every
        candidate's minimum (placement states it; it does not depend on that budget itself).
        Device: with the host budget unlimited; host: at the requested device budget."""
        best = None
        for n, b, k in self.candidates(req):
            if tier == "device":
                pl = self.placement(dataclasses.replace(req, device_budget=None,
                                                        host_budget=None), n, b, k)
                value = None if pl is None else pl.min_device_bytes
            else:
                pl = self.placement(dataclasses.replace(req, host_budget=None), n, b, k)
                value = None if pl is None else pl.min_host_bytes
            if value is not None and (best is None or value < best):
                best = value
        return best


def pick(plans: Sequence[Plan], tie: float) -> Plan:
    """The plan to run: of those within `tie` (a fraction) of the best predicted throughput,
    the one with the fewest rounds (a short last round repeats every per-step cost for a few
    prompts), then the fewest sequences, then the fewest groups, then the fastest."""
    top = max(p.predicted_throughput_tokens_per_s for p in plans)
    near = [p for p in plans if p.predicted_throughput_tokens_per_s >= top * (1 - tie)]
    return min(near, key=lambda p: (p.rounds, p.groups * p.batch_size, p.groups,
                                    -p.predicted_throughput_tokens_per_s))


def _rule(k: PrefetchRule | int) -> PrefetchRule:
    return k if isinstance(k, PrefetchRule) else PrefetchRule(k=k)
