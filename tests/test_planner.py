"""The planner's arithmetic on hand-made profiles: cost fits, the expected-value timeline, the
paper's overlap inequalities (4)-(7) with the paper's own Mixtral-8x7B figures, infeasible
budgets with the smallest working one, and placements that never exceed the budget.

Plain Python: no JAX, no checkpoint (except the constant cross-checks at the end).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from klotski_jax.config import Family, ModelConfig
from klotski_jax.constants import BudgetError, bucket
from klotski_jax.planning.costs import CostModel, Profile, expected_distinct
from klotski_jax.planning.placement import dense_layer_bytes
from klotski_jax.planning.planner import Planner, PlanRequest
from klotski_jax.planning.policy import PolicyError
from klotski_jax.planning.simulate import LayerPlan, StepShape, StepSimulator

MS = 1e-3


def tiny() -> ModelConfig:
    return ModelConfig(
        family=Family.MIXTRAL, vocab_size=96, hidden_size=32, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, expert_intermediate_size=48,
        moe_layers=(True,) * 3, sliding_windows=(None,) * 3)


def mixtral_8x7b() -> ModelConfig:
    return ModelConfig(
        family=Family.MIXTRAL, vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_intermediate_size=14336,
        moe_layers=(True,) * 32, sliding_windows=(None,) * 32, rope_theta=1e6, dtype="bfloat16")


def flat_profile(**kw) -> Profile:
    """Constant costs: attention 1 ms, router 0.1 ms, expert 0.5 ms, combine 0.2 ms per group;
    an expert load 2 ms from the host cache, 10 ms from disk; no dense-load cost."""
    base = dict(
        device={"platform": "test", "device_kind": "hand-made"}, model_key="x",
        attention_prefill=((1, 8, 32, 1 * MS), (4, 8, 32, 1 * MS)),
        attention_decode=((1, 1, 32, 1 * MS), (4, 1, 32, 1 * MS)),
        router=((1, 0.1 * MS), (64, 0.1 * MS)), routing=((2, 0.0), (64, 0.0)),
        expert=tuple((b, 0.5 * MS) for b in (2, 4, 8, 16, 32, 64)),
        combine=((1, 0.2 * MS), (64, 0.2 * MS)), head=((1, 0.0), (8, 0.0)),
        expert_host_s=2 * MS, expert_disk_cold_s=10 * MS, expert_disk_warm_s=10 * MS,
        expert_release_s=0.0, dense_load=((0, 0.0), (1000, 0.0)))
    return Profile(**{**base, **kw})


def paper_profile() -> Profile:
    """The paper's Mixtral-8x7B figures on an RTX 3090: attention 2.6 ms per batch of 16 (a
    fixed 0.3 ms plus a per-sequence share), 21 ms to move one expert from host memory; dense
    weights (84 MB) at the same 16.8 GB/s; expert compute well under 1 ms per token."""
    per_seq = (2.6 - 0.3) / 16
    return Profile(
        device={"platform": "gpu", "device_kind": "RTX 3090 (paper figures)"}, model_key="x",
        attention_prefill=tuple((b, 32, s, (0.3 + b * 32 * per_seq) * MS)
                                for b in (1, 16) for s in (64, 544)),
        attention_decode=tuple((b, 1, s, (0.3 + b * per_seq) * MS)
                               for b in (1, 16, 64) for s in (64, 544)),
        router=((1, 0.05 * MS), (1024, 0.1 * MS)), routing=((2, 0.05 * MS), (1024, 0.1 * MS)),
        expert=tuple((1 << i, (0.5 + 0.005 * (1 << i)) * MS) for i in range(1, 16)),
        combine=((1, 0.1 * MS), (1024, 0.2 * MS)), head=((1, 1 * MS), (64, 2 * MS)),
        expert_host_s=21 * MS, expert_disk_cold_s=21 * MS, expert_disk_warm_s=21 * MS,
        expert_release_s=0.05 * MS, dense_load=((0, 0.05 * MS), (84e6, 5 * MS)))


# ---- costs ------------------------------------------------------------------------------------
def test_fits_recover_linear_costs_and_buckets():
    prof = flat_profile(
        attention_decode=((1, 1, 64, 1e-3 + 1e-4 + 64e-6), (4, 1, 64, 1e-3 + 4e-4 + 256e-6),
                          (4, 1, 128, 1e-3 + 4e-4 + 512e-6)),
        router=((1, 2e-4), (9, 6e-4)), expert=((2, 1e-3), (4, 1.5e-3), (8, 3e-3)))
    c = CostModel(prof)
    assert c.attention(8, 1, 32) == pytest.approx(1e-3 + 8e-4 + 8 * 32e-6)
    assert c.router(5) == pytest.approx(4e-4)
    assert c.expert(1) == c.expert(2) == pytest.approx(1e-3)  # padded to bucket 2
    assert c.expert(3) == pytest.approx(1.5e-3) and c.expert(5) == pytest.approx(3e-3)
    assert c.expert(12) == pytest.approx(3e-3 + 1.5e-3 / 4 * 8)  # linear past the last bucket
    assert c.expert(0) == 0.0
    assert [bucket(n) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 16]


def test_binomial_expectation_matches_brute_force():
    c = CostModel(flat_profile(expert=((2, 1.0), (4, 2.0), (8, 4.0), (16, 8.0))))
    for n, p in ((5, 0.3), (12, 0.5), (7, 0.9)):
        routed, cost = c.expert_expectation(n, p)
        pmf = [math.comb(n, x) * p ** x * (1 - p) ** (n - x) for x in range(n + 1)]
        assert routed == pytest.approx(1 - pmf[0])
        assert cost == pytest.approx(sum(pmf[x] * c.expert(x) for x in range(1, n + 1)))
    assert expected_distinct(16, [2 / 8] * 8) == pytest.approx(8 * (1 - (1 - 2 / 8) ** 16))
    n, p = 65_536, 0.25  # mean on a bucket boundary: the normal approximation vs exact
    log_pmf = lambda x: (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
                         + x * math.log(p) + (n - x) * math.log1p(-p))
    exact = sum(math.exp(log_pmf(x)) * c.expert(x) for x in range(14_000, 19_000))
    assert c.expert_expectation(n, p)[1] == pytest.approx(exact, rel=1e-3)


def test_profile_json_round_trip():
    prof = paper_profile()
    assert Profile.from_json(prof.to_json()) == prof
    with pytest.raises(ValueError, match="profile"):
        Profile.from_dict({"format": "other"})


# ---- the timeline -----------------------------------------------------------------------------
def test_all_resident_step_is_the_sum_of_its_compute():
    """No loads: one decode step = per layer n attention + n routers + the expected experts +
    n combines, exactly."""
    cfg, prof = tiny(), flat_profile()
    c = CostModel(prof)
    n, b = 2, 1
    layers = [LayerPlan(0.0, (0.5,) * 4, (0.0,) * 4)] * 3
    (t, wait), = StepSimulator(cfg, c, 2, None).run(layers, [StepShape(n, b, 1, 32)])
    routed = 1 - 0.5 ** (n * b)  # each of the 4 experts, 2 tokens picking 2 of 4
    per_layer = n * 1e-3 + n * 0.1e-3 + 4 * routed * 0.5e-3 + n * 0.2e-3
    assert t == pytest.approx(3 * per_layer) and wait == 0


def test_streamed_layer_waits_for_its_loads():
    """One layer, every expert streamed (2 ms each), K=0, one token: the expected cold loads are
    issued after the router and the compute lane waits for each in turn."""
    cfg = tiny().replace(num_layers=1, moe_layers=(True,), sliding_windows=(None,))
    c = CostModel(flat_profile())
    layers = [LayerPlan(0.0, (0.5,) * 4, (2e-3,) * 4)]
    (t, wait), = StepSimulator(cfg, c, 0, None).run(layers, [StepShape(1, 1, 1, 32)])
    # attention 1 + router 0.1; then four loads of expected size 0.5 * 2 ms back to back, the
    # last one done at 1.1 + 4 ms; each expert computes 0.5 * 0.5 ms after its load.
    io_done = 1.1e-3 + 4 * 1e-3
    assert t == pytest.approx(io_done + 0.25e-3 + 0.2e-3)
    assert wait == pytest.approx(t - (1.1e-3 + 4 * 0.25e-3 + 0.2e-3))


def test_one_expert_slot_serialises_loads_behind_compute():
    cfg = tiny().replace(num_layers=1, moe_layers=(True,), sliding_windows=(None,))
    c = CostModel(flat_profile(expert=tuple((b, 5e-3) for b in (2, 4, 8))))
    layers = [LayerPlan(0.0, (1.0, 1.0, 0.0, 0.0), (2e-3,) * 4)]  # two experts, always routed
    free = StepSimulator(cfg, c, 0, None).run(layers, [StepShape(1, 1, 1, 32)])[0][0]
    one = StepSimulator(cfg, c, 0, 1).run(layers, [StepShape(1, 1, 1, 32)])[0][0]
    # unlimited: both loads back to back (done at 1.1 + 4 ms), computes follow: 1.1+2 -> +5 ->
    # 8.1, second +5 -> 13.1; one slot: the second load starts after the first compute (8.1).
    assert free == pytest.approx((1.1 + 2 + 5 + 5 + 0.2) * 1e-3)
    assert one == pytest.approx((1.1 + 2 + 5 + 2 + 5 + 0.2) * 1e-3)


def test_host_kv_loads_run_on_their_own_lane():
    """Host-resident KV caches load on the engine's KV thread, not in the weights' FIFO: in an
    I/O-bound step (10 ms expert loads, K = 2 hot) the 1 ms cache loads hide completely, instead
    of queueing behind the next layer's hot-expert prefetches."""
    cfg = tiny().replace(num_layers=2, moe_layers=(True,) * 2, sliding_windows=(None,) * 2)
    c = CostModel(flat_profile())
    shapes = [StepShape(2, 1, 1, 32)] * 2
    for slots in (None, 2):
        sim = StepSimulator(cfg, c, 2, slots)
        plans = [[LayerPlan(0.0, (1.0, 1.0, 0.0, 0.0), (10e-3,) * 4, kv_load_s=kv)] * 2
                 for kv in (0.0, 1e-3)]
        without, with_kv = (sim.run(p, shapes) for p in plans)
        assert [x for st in with_kv for x in st] == pytest.approx([x for st in without for x in st])
        assert without[0][1] > 0  # really I/O-bound


# ---- the paper's figures ----------------------------------------------------------------------
def _inequalities_by_hand(cfg: ModelConfig, prof: Profile, n: int, b: int, k: int,
                          s: int, dense_resident: bool = False) -> dict[str, tuple[float, float]]:
    """(4)-(7) for a layer whose experts all stream, from the notes' formulas and the profile."""
    c = CostModel(prof)
    t_a, t_g, t_e = c.attention(b, 1, s), c.router(b), prof.expert_host_s
    dense = max(dense_layer_bytes(cfg))
    big_t = 0.0 if dense_resident else c.dense_load(dense)
    big_t_g = big_t * cfg.num_experts * cfg.hidden_size * cfg.itemsize / dense
    p = cfg.top_k / cfg.num_experts
    routed, compute = c.expert_expectation(n * b, p)
    q = (cfg.num_experts - k) * routed
    base = n * (t_a + t_g)
    return {"(4)": (n * t_a, big_t_g), "(5)": (base, big_t_g + k * t_e),
            "(6)": (base + k * compute, big_t_g + (k + min(1, q)) * t_e),
            "(7)": (base + cfg.num_experts * compute, big_t_g + (k + q) * t_e + big_t - big_t_g)}


def test_paper_figures_give_an_n_that_satisfies_the_inequalities():
    """Mixtral-8x7B, batch 16, K = top-k = 2, experts streamed from host memory (a 48 GB device
    cannot hold the 93 GB of weights): the chosen n covers all four overlap points."""
    cfg, prof = mixtral_8x7b(), paper_profile()
    req = PlanRequest(prompt_len=16, gen_len=32, batch_size=16, hot_experts=2,
                      device_budget=48 * 10**9, max_groups=256, disk_tier="page_cache")
    plan = Planner(cfg, prof).plan(req)
    # (4)-(7) are necessary, not sufficient: cold loads cannot start before the routers, so the
    # timeline may still wait where the inequalities hold.
    assert plan.binding_constraint in ("compute", "cold_loads", "expert_slots"), plan.describe()
    assert all(q["holds"] for q in plan.inequalities.values())
    hand = _inequalities_by_hand(cfg, prof, plan.groups, 16, 2, req.cache_len,
                                 plan.placement.dense_resident)
    for name, (lhs, rhs) in hand.items():
        assert lhs >= rhs, (name, lhs, rhs)
        assert plan.inequalities[name]["lhs_s"] == pytest.approx(lhs, rel=1e-6)
        assert plan.inequalities[name]["rhs_s"] == pytest.approx(rhs, rel=1e-6)
    # The smallest n with (7) satisfied is what the paper's planner would take; ours, optimising
    # throughput, takes at least that many groups.
    smallest = next(n for n in range(1, 257)
                    if all(lhs >= rhs for lhs, rhs in
                           _inequalities_by_hand(cfg, prof, n, 16, 2, req.cache_len).values()))
    assert plan.groups >= smallest


def test_paper_figures_on_a_24gb_card_are_io_bound_and_memory_limited():
    cfg, prof = mixtral_8x7b(), paper_profile()
    req = PlanRequest(prompt_len=512, gen_len=32, batch_size=16, hot_experts=2,
                      device_budget=24 * 10**9, max_groups=64, disk_tier="page_cache")
    plan = Planner(cfg, prof).plan(req)
    assert plan.limited_by == "device_budget"
    assert plan.binding_constraint in ("(5)", "(6)", "(7)")
    assert not plan.inequalities["(7)"]["holds"]


# ---- search and budgets -----------------------------------------------------------------------
def test_infeasible_budget_states_the_smallest_one_that_works():
    cfg, prof = tiny(), flat_profile()
    planner = Planner(cfg, prof)
    req = PlanRequest(prompt_len=8, gen_len=8, device_budget=1000)
    with pytest.raises(BudgetError, match="device budget 1000 bytes is below the minimum") as err:
        planner.plan(req)
    smallest = planner.smallest_budget(req, "device")
    assert str(smallest) in str(err.value)
    assert planner.plan(dataclasses.replace(req, device_budget=smallest)).groups == 1
    with pytest.raises(BudgetError):
        planner.plan(dataclasses.replace(req, device_budget=smallest - 1))
    fixed = dataclasses.replace(req, batch_size=4, groups=3)
    bigger = planner.smallest_budget(fixed, "device")
    assert bigger > smallest
    assert planner.plan(dataclasses.replace(fixed, device_budget=bigger)).groups == 3


def test_infeasible_host_budget_states_the_smallest_host_budget():
    planner = Planner(tiny(), flat_profile())
    req = PlanRequest(prompt_len=8, gen_len=8, device_budget=None, host_budget=100)
    with pytest.raises(BudgetError, match="host budget 100 bytes is below the minimum"):
        planner.plan(req)
    host = planner.smallest_budget(req, "host")
    assert planner.plan(dataclasses.replace(req, host_budget=host)) is not None


def test_rereads_of_experts_outside_the_host_cache_cost_their_own_tier():
    """With the page cache evicted (first reads from the disk, 10 ms) and a host cache that holds
    only some experts, buffered re-reads come from the page cache (3 ms) and O_DIRECT ones from
    the disk again: the decode step differs, the prefill (first reads) does not. None keeps the
    first-read tier."""
    planner = Planner(tiny(), flat_profile(expert_disk_warm_s=3 * MS))
    base = PlanRequest(prompt_len=8, gen_len=8, groups=1, batch_size=2, hot_experts=0,
                       disk_tier="disk")
    base = dataclasses.replace(base, device_budget=planner.smallest_budget(base, "device"))
    host = planner.smallest_budget(base, "host") + 3 * tiny().expert_bytes
    req = dataclasses.replace(base, host_budget=host)
    pl = planner.placement(req, 1, 2, 0)
    assert pl is not None and pl.host_experts is not None
    assert 0 < len(pl.host_experts) < tiny().num_layers * tiny().num_experts
    direct, buffered, default = (planner.evaluate(dataclasses.replace(req, reread_tier=t), 1, 2, 0)
                                 for t in ("disk", "page_cache", None))
    assert buffered.predicted_prefill_s == pytest.approx(direct.predicted_prefill_s)
    assert buffered.predicted_decode_step_s < direct.predicted_decode_step_s
    assert default.predicted_decode_step_s == pytest.approx(direct.predicted_decode_step_s)
    with pytest.raises(PolicyError, match="reread_tier"):
        PlanRequest(reread_tier="ssd")


@pytest.mark.parametrize("budget_mb", [0.05, 0.08, 0.12, 0.2, 0.5, None])
def test_plans_never_exceed_the_device_budget(budget_mb):
    cfg = tiny()
    budget = None if budget_mb is None else int(budget_mb * 1e6)
    req = PlanRequest(prompt_len=8, gen_len=8, num_prompts=12, device_budget=budget)
    try:
        plan = Planner(cfg, flat_profile()).plan(req)
    except BudgetError:
        assert budget is not None and budget < Planner(cfg, flat_profile()).smallest_budget(
            req, "device")
        return
    pl = plan.placement
    dense = dense_layer_bytes(cfg)
    held = (pl.fixed_device_bytes + (sum(dense) if pl.dense_resident else 2 * max(dense))
            + (len(pl.device_experts) + 1) * cfg.expert_bytes)  # + at least one streaming slot
    assert pl.min_device_bytes <= held
    if budget is not None:
        assert held <= budget
    assert plan.groups * plan.batch_size <= 12 * 2 and plan.rounds >= 1
    assert plan.generated_tokens == 12 * 8


def test_io_bound_plans_take_more_groups_and_compute_bound_ones_stop():
    cfg = tiny()
    req = PlanRequest(prompt_len=8, gen_len=8, batch_size=1, device_budget=120_000,
                      max_groups=8)
    io_bound = Planner(cfg, flat_profile(expert_host_s=50 * MS, expert_disk_warm_s=50 * MS,
                                         expert_disk_cold_s=50 * MS)).plan(req)
    assert io_bound.binding_constraint in ("(5)", "(6)", "(7)")
    cheap = Planner(cfg, flat_profile(expert_host_s=1e-6, expert_disk_cold_s=1e-6)).plan(req)
    assert cheap.binding_constraint == "compute"
    assert io_bound.groups >= cheap.groups


def test_rounds_cover_every_prompt():
    planner = Planner(tiny(), flat_profile())
    req = PlanRequest(prompt_len=8, gen_len=4, num_prompts=10, batch_size=4, groups=2)
    plan = planner.plan(req)
    assert (plan.groups, plan.batch_size, plan.rounds) == (2, 4, 2)  # 8 + a last round of 2
    assert plan.generated_tokens == 40
    assert plan.policy(klotski_policy()).groups == 2


def klotski_policy():
    from klotski_jax.planning.policy import Policy

    return Policy()


def test_routing_statistics_change_the_expected_experts():
    cfg = tiny()
    skewed = [[0.9, 0.9, 0.1, 0.1]] * 3
    req = PlanRequest(prompt_len=8, gen_len=4, groups=1, batch_size=2, hot_experts=2)
    uniform = Planner(cfg, flat_profile()).plan(req)
    skew = Planner(cfg, flat_profile(), routing=skewed).plan(req)
    assert skew.expected_experts["decode"] < uniform.expected_experts["decode"]
    with pytest.raises(ValueError, match="routing"):
        Planner(cfg, flat_profile(), routing=[[0.5] * 4])


# ---- plain Python --------------------------------------------------------------------------
def test_planner_imports_no_jax():
    code = ("import sys; import klotski_jax.planning.planner, klotski_jax.planning.prefetcher; "
            "sys.exit('jax' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
