"""The expected-use prefetch rule and the cost prior, without JAX.

- hot.py: P(routed) and expected tokens from the uniform prior, from measured popularity and from
  the correlation table's conditional rows; `prefetch_order` turns them into the hot set.
- simulate.PrefetchRule: the planner's view of the same rule (whole layer with many tokens in
  flight, hot-only with few).
- planner: it chooses a threshold, and prefers the whole layer when every expert will be used
  and loads are expensive.
- prior.py: a Profile from machine rates, with costs that grow the way the roofline says.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
from test_planner import flat_profile, tiny

from klotski_jax.planning.costs import CostModel
from klotski_jax.planning.hot import (
    PreviousLayerPopularity,
    prefetch_order,
    uniform_use,
    use_from_pick_probs,
)
from klotski_jax.planning.planner import PRIOR_TIE, TIE, Planner, PlanRequest, pick
from klotski_jax.planning.policy import Policy, PolicyError
from klotski_jax.planning.prefetcher import CorrelationPrefetcher
from klotski_jax.planning.prior import MachineRates, is_prior, prior_profile
from klotski_jax.planning.simulate import PrefetchRule, StepShape, StepSimulator

E, K = 8, 2


# ---- hot.py -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 2, 8, 64, 4096])
def test_uniform_prior_is_the_closed_form(tokens):
    p, expected = uniform_use(E, K, tokens)
    np.testing.assert_allclose(p, 1 - (1 - K / E) ** tokens)
    np.testing.assert_allclose(expected, tokens * K / E)
    assert p.shape == (E,) and (p <= 1).all()


def test_pick_probabilities_combine_over_tokens():
    """Two tokens: one surely picks expert 0, the other picks expert 1 half the time."""
    q = np.zeros((2, 3))
    q[0, 0] = 1.0
    q[1, 1] = 0.5
    q[1, 2] = 0.25
    p, expected = use_from_pick_probs(q)
    np.testing.assert_allclose(p, [1.0, 0.5, 0.25])
    np.testing.assert_allclose(expected, [1.0, 0.5, 0.25])
    q2 = np.full((2, 1), 0.5)  # two independent chances of 1/2
    np.testing.assert_allclose(use_from_pick_probs(q2)[0], [0.75])


def test_prefetch_order_threshold_and_order():
    p = np.array([0.9, 0.2, 1.0, 0.5, 0.0])
    expected = np.array([3.0, 0.2, 5.0, 0.6, 0.0])
    assert prefetch_order(p, expected, 0.5) == [2, 0, 3]  # most expected tokens first
    assert prefetch_order(p, expected, 0.0) == [2, 0, 3, 1]  # never an expert with P = 0
    assert prefetch_order(p, expected, 1.0) == [2]


def test_popularity_predictor_learns_each_layers_share():
    pred = PreviousLayerPopularity((0, 1), E, K)
    p0, _ = pred.expected_use(0, 4)
    np.testing.assert_allclose(p0, uniform_use(E, K, 4)[0])  # the prior before any routing
    picks = np.array([[0, 1]] * 30 + [[2, 3]] * 10)  # 40 tokens: experts 0, 1 take 3/4 each
    pred.observe(0, picks)
    p, expected = pred.expected_use(0, 2)
    np.testing.assert_allclose(expected[:4], [1.5, 1.5, 0.5, 0.5])
    np.testing.assert_allclose(p[:4], [1 - 0.25 ** 2] * 2 + [1 - 0.75 ** 2] * 2)
    assert (p[4:] == 0).all()
    assert prefetch_order(p, expected, 0.5) == [0, 1]  # 1 - 0.75^2 = 0.44 for experts 2, 3
    assert prefetch_order(p, expected, 0.4) == [0, 1, 2, 3]


def test_correlation_table_gives_each_token_its_row():
    """Layer 1 copies layer 0's first pick (top-1 model, 4 experts): tokens that picked 0 and 3
    at layer 0 surely route to 0 and 3 at layer 1, and to nothing else."""
    pf = CorrelationPrefetcher.fresh((0, 1), 4, top_k=1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        first = rng.integers(0, 4, (64, 1))
        pf.observe(0, first)
        pf.observe(1, first)
    pf.observe(0, np.array([[0], [3]]))  # this step's layer 0
    p, expected = pf.expected_use(1, 2)
    np.testing.assert_allclose(p, [1, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(expected, [1, 0, 0, 1], atol=1e-12)
    assert prefetch_order(p, expected, 0.5) == [0, 3]
    # A step whose previous layer is not known yet (the next step's first layer) uses popularity.
    p_first, _ = pf.expected_use(0, 2)
    assert (p_first > 0).all() and (p_first < 1).all()


# ---- policy -------------------------------------------------------------------------------------
def test_policy_threshold_rule_and_its_overrides():
    assert Policy().uses_threshold and Policy().threshold == 0.5
    assert Policy(prefetch_threshold=0.0).threshold == 0.0
    assert not Policy(hot_experts=2).uses_threshold  # an explicit K is the paper's rule
    assert not Policy(reorder=False).uses_threshold  # the ablation rungs keep the K rule
    assert not Policy(hot_only_prefetch=False).uses_threshold
    with pytest.raises(PolicyError, match="prefetch_threshold"):
        Policy(prefetch_threshold=1.5)


# ---- the simulator's rule -----------------------------------------------------------------------
def test_rule_grows_with_the_tokens_in_flight():
    probs = [0.3, 0.3, 0.2, 0.2, 0.4, 0.3, 0.2, 0.1]  # per-token picks, top-2 of 8
    rule = PrefetchRule(threshold=0.5)
    few, many = rule.hot(probs, 1), rule.hot(probs, 512)
    assert few == []  # one token: no expert is more likely used than not
    assert many == [4, 0, 1, 5, 2, 3, 6, 7]  # a prefill: the whole layer, most used first
    assert rule.hot(probs, 2) == [4, 0, 1, 5]  # 1 - 0.7^2 = 0.51; 1 - 0.8^2 = 0.36
    assert PrefetchRule(k=3).hot(probs, 1) == [4, 0, 1]
    assert PrefetchRule(threshold=0.0).hot(probs, 1) == [4, 0, 1, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError):
        PrefetchRule(k=2, threshold=0.5)


def test_planner_chooses_a_threshold_and_reports_it():
    cfg = tiny()
    plan = Planner(cfg, flat_profile()).plan(
        PlanRequest(prompt_len=8, gen_len=4, num_prompts=8, device_budget=None))
    assert plan.prefetch.threshold is not None and plan.hot_experts is None
    d = plan.to_dict()
    assert d["prefetch"] == f"threshold {plan.prefetch.threshold:g}"
    assert plan.policy(Policy()).prefetch_threshold == plan.prefetch.threshold
    fixed = Planner(cfg, flat_profile()).plan(
        PlanRequest(prompt_len=8, gen_len=4, num_prompts=8, hot_experts=1))
    assert fixed.hot_experts == 1 and fixed.policy(Policy()).hot_experts == 1


def test_expensive_loads_and_many_tokens_make_the_whole_layer_worth_it():
    """Loads of 10 ms against 0.5 ms experts, 64 tokens of top-2 of 4: every expert is routed,
    so loading them before the router (any threshold) beats waiting for it (K = 0), on the same
    placement; the planner's choice prefetches the whole layer."""
    cfg = tiny()
    planner = Planner(cfg, flat_profile(expert_host_s=10e-3))
    req = PlanRequest(prompt_len=8, gen_len=4, num_prompts=64, groups=1, batch_size=64,
                      device_budget=None, disk_tier="page_cache")
    floor = planner.placement(req, 1, 64, PrefetchRule(threshold=0.0)).min_device_bytes
    req = dataclasses.replace(req, device_budget=floor + 6 * cfg.expert_bytes)  # experts stream
    pl = planner.placement(req, 1, 64, PrefetchRule(threshold=0.0))
    layers = planner.layers(req, pl, first_read=False, batch=64)
    decode = [StepShape(1, 64, 1, req.cache_len)] * 2

    def step_s(rule: PrefetchRule) -> float:
        sim = StepSimulator(cfg, planner.costs, rule, planner.expert_slots(req, pl))
        return sim.run(layers, decode)[1][0]

    assert step_s(PrefetchRule(threshold=0.5)) < step_s(PrefetchRule(k=0))
    chosen = planner.plan(req).prefetch
    assert chosen.hot([0.5] * 4, 64) == [0, 1, 2, 3]


# ---- the prior ----------------------------------------------------------------------------------
def rates(**kw) -> MachineRates:
    base = dict(device={"platform": "test", "device_kind": "made-up"}, dispatch_s=20e-6,
                matmul_flops={"float32": 1e11, "bfloat16": 2e11}, memory_bps=10e9,
                load_s=50e-6, h2d_bps=20e9, disk_cold_bps=1e9, disk_warm_bps=5e9,
                routing_s=(50e-6, 1e-8), io_interference=0.5)
    return MachineRates(**{**base, **kw})


def test_rates_round_trip():
    r = rates()
    assert MachineRates.from_json(r.to_json()) == r
    with pytest.raises(ValueError):
        MachineRates.from_json('{"format": "something else"}')


def test_prior_profile_follows_the_roofline():
    cfg = dataclasses.replace(tiny(), hidden_size=1024, expert_intermediate_size=4096,
                              num_heads=16, num_kv_heads=4, head_dim=64)
    prof = prior_profile(cfg, rates())
    assert is_prior(prof) and not is_prior(flat_profile())
    costs = CostModel(prof)
    # A decode-sized expert streams its weights: 3 x 4096 x 1024 x 4 bytes at 10 GB/s.
    weights_s = cfg.expert_bytes / 10e9
    assert costs.expert(2) == pytest.approx(weights_s, rel=0.2)
    # 4096 rows are FLOP-bound: 2 x 3 x 4096 x 4096 x 1024 at 100 GFLOP/s.
    assert costs.expert(4096) == pytest.approx(2 * 3 * 4096 * 4096 * 1024 / 1e11, rel=0.2)
    assert costs.attention(8, 128, 160) > costs.attention(1, 128, 160) > costs.attention(1, 1, 160)
    # Transfers: a disk read of an expert costs its bytes at the cold bandwidth, plus the hand-off.
    assert costs.expert_load("disk") == pytest.approx(
        50e-6 + cfg.expert_bytes / 1e9 + cfg.expert_bytes / 20e9)
    assert costs.expert_load("host") < costs.expert_load("page_cache") < costs.expert_load("disk")
    assert prof.io_interference == 0.5 and math.isfinite(costs.head(8))
    assert prof.expert_prefetch_s == rates().load_s  # prefetching is not free: a hand-off
    plan = Planner(cfg, prof).plan(PlanRequest(prompt_len=64, gen_len=8, num_prompts=8,
                                               device_budget=None))
    assert plan.predicted_throughput_tokens_per_s > 0
    assert Planner(cfg, prof).prior and not Planner(cfg, flat_profile()).prior


def test_near_ties_go_to_fewer_rounds():
    """32 prompts: 15 groups of 2 in two rounds predicted 1% faster than 2 groups of 16 in one.
    Measured costs decide at 0.5%; under the rough prior the one-round plan wins the tie."""
    def plan(n, b, rounds, tput):
        return types.SimpleNamespace(groups=n, batch_size=b, rounds=rounds,
                                     predicted_throughput_tokens_per_s=tput)

    two_rounds, one_round = plan(15, 2, 2, 34.8), plan(2, 16, 1, 34.5)
    assert pick([two_rounds, one_round], TIE) is two_rounds
    assert pick([two_rounds, one_round], PRIOR_TIE) is one_round
    # Among equals, fewer sequences, then fewer groups.
    assert pick([plan(2, 16, 1, 50.0), plan(1, 16, 1, 50.0)], TIE).groups == 1
    assert pick([plan(4, 8, 1, 50.0), plan(2, 8, 1, 50.1)], TIE).groups == 2
