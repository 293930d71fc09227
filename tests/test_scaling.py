"""The planner on several devices (expert parallelism): per-device I/O lanes and expert slots,
expert compute split over the devices, replicated attention, the combine's all-reduce, and
`predicted_scaling`. One device predicts exactly what the single-device planner predicted.

Plain Python: no JAX, no checkpoint, no timing.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_planner import MS, flat_profile, mixtral_8x7b, paper_profile, tiny

from klotski_jax.models.specs import total_bytes
from klotski_jax.planning.costs import CostModel
from klotski_jax.planning.planner import Planner, PlanRequest
from klotski_jax.planning.policy import Policy
from klotski_jax.planning.scaling import predicted_scaling
from klotski_jax.planning.simulate import LayerPlan, StepShape, StepSimulator

# ---- one device: the numbers of the single-device planner ---------------------------------------
# (plan, prefill s, decode step s, bubble fraction, tok/s) as the planner gave them before it knew
# about devices (commit c36ef27): Mixtral-8x7B at 10% / 25% of its weights with the paper's
# figures, and the tiny model with its KV caches in host RAM.
GOLDEN = [
    (mixtral_8x7b, paper_profile, dict(prompt_len=32, gen_len=8, num_prompts=16, max_groups=4,
                                       disk_tier="page_cache"), 0.1,
     (1, 16, "threshold 0", 5.2847803045444905, 5.229000000000082, 0.8955418199934134,
      3.055783788717763)),
    (mixtral_8x7b, paper_profile, dict(prompt_len=32, gen_len=8, num_prompts=16, max_groups=4,
                                       disk_tier="page_cache"), 0.25,
     (1, 16, "threshold 0", 4.867472955112202, 4.42148272718536, 0.8782863559321741,
      3.5736369628676266)),
    (tiny, lambda: flat_profile(dense_load=((0, 0.0), (10000, 1e-3))),
     dict(prompt_len=8, gen_len=8, num_prompts=12, max_groups=4), 100_000,
     (2, 1, "threshold 0.8", 0.12931672370605468, 0.031591800000000024, 0.6313103122605949,
      59.04945355324735)),
]


@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_one_device_predicts_what_the_single_device_planner_did(case):
    make_cfg, make_profile, kw, budget, want = GOLDEN[case]
    cfg = make_cfg()
    budget = int(total_bytes(cfg) * budget) if budget < 1 else budget
    req = PlanRequest(device_budget=budget, **kw)
    for base in (None, Policy(devices=1)):
        p = Planner(cfg, make_profile(), base=base).plan(req)
        got = (p.groups, p.batch_size, p.prefetch.describe(), p.predicted_prefill_s,
               p.predicted_decode_step_s, p.predicted_bubble_fraction,
               p.predicted_throughput_tokens_per_s)
        assert got[:3] == want[:3]
        assert got[3:] == pytest.approx(want[3:], rel=1e-12)
        assert p.devices == 1 and p.to_dict()["devices"] == 1
    if case == 2:
        assert not p.placement.kv_on_device  # the KV lane is covered too


# ---- the timeline on two devices --------------------------------------------------------------
def test_two_devices_load_and_compute_their_experts_side_by_side():
    """One layer, four streamed experts (2 ms loads, each routed with probability 1/2 by the one
    token: expected 1 ms on the lane, 0.25 ms of compute), no prefetch. One device: the four
    loads back to back after the router (1.1 ms), then the last expert and the combine. Two
    devices, experts 0, 2 on device 0 and 1, 3 on device 1: two loads per lane (done at 3.1 ms),
    the last experts of both devices compute side by side, then the all-reduce (the combine
    fit's fixed 0.2 ms: the profile's links are free) and the combine."""
    cfg = tiny().replace(num_layers=1, moe_layers=(True,), sliding_windows=(None,))
    c = CostModel(flat_profile())
    one = [LayerPlan(0.0, (0.5,) * 4, (2e-3,) * 4)]
    two = [dataclasses.replace(one[0], owners=(0, 1, 0, 1))]
    shape = [StepShape(1, 1, 1, 32)]
    (t1, w1), = StepSimulator(cfg, c, 0, None).run(one, shape)
    (t2, w2), = StepSimulator(cfg, c, 0, None, devices=2).run(two, shape)
    assert t1 == pytest.approx((1.1 + 4 + 0.25 + 0.2) * MS)
    assert c.all_reduce(1 * cfg.hidden_size * 4, 2) == pytest.approx(0.2 * MS)
    assert t2 == pytest.approx((1.1 + 2 + 0.25 + 0.2 + 0.2) * MS)
    # the bubble: what the loads add to the expert phase (ideal: two experts per device, 0.5 ms)
    assert w2 == pytest.approx((3.1 + 0.25 - 1.6) * MS)
    assert w1 > w2 > 0


def test_each_device_has_its_own_expert_slots():
    """One slot per device: two experts always routed, one per device, both load at once (two
    lanes, two slots); on one device with one slot the second load waits for the first
    expert's compute (5 ms)."""
    cfg = tiny().replace(num_layers=1, moe_layers=(True,), sliding_windows=(None,))
    c = CostModel(flat_profile(expert=tuple((b, 5e-3) for b in (2, 4, 8))))
    layer = LayerPlan(0.0, (1.0, 1.0, 0.0, 0.0), (2e-3,) * 4)
    shape = [StepShape(1, 1, 1, 32)]
    one = StepSimulator(cfg, c, 0, 1).run([layer], shape)[0][0]
    two = StepSimulator(cfg, c, 0, 1, devices=2).run(
        [dataclasses.replace(layer, owners=(0, 1, 0, 1))], shape)[0][0]
    assert one == pytest.approx((1.1 + 2 + 5 + 2 + 5 + 0.2) * MS)
    assert two == pytest.approx((1.1 + 2 + 5 + 0.2 + 0.2) * MS)  # + the all-reduce


def test_all_reduce_is_free_on_one_device_and_grows_with_bytes():
    c = CostModel(flat_profile(bandwidth={"host_to_device_Bps": 1e9}))
    assert c.all_reduce(10**6, 1) == 0.0
    two, four = c.all_reduce(10**6, 2), c.all_reduce(10**6, 4)
    assert two == pytest.approx(0.2 * MS + 1e6 / 1e9)  # ring: 2 (D - 1) / D of the bytes
    assert four == pytest.approx(0.2 * MS + 1.5e6 / 1e9)
    fast = CostModel(flat_profile(bandwidth={"host_to_device_Bps": 1e9,
                                             "device_to_device_Bps": 1e11}))
    assert fast.all_reduce(10**6, 2) < two


# ---- the planner on several devices ------------------------------------------------------------
def _streaming_request(cfg, planner: Planner) -> PlanRequest:
    """Mixtral-8x7B, 16 sequences in one group, a device budget of the smallest one plus two
    expert slots: no expert is resident on any device at D = 1, 2, 4, so nothing but the
    devices' own links and compute differs."""
    req = PlanRequest(prompt_len=32, gen_len=8, num_prompts=16, groups=1, batch_size=16,
                      disk_tier="page_cache")
    floor = planner.smallest_budget(req, "device")
    return dataclasses.replace(req, device_budget=floor + 2 * cfg.expert_bytes)


def test_streaming_bound_plans_scale_with_devices_and_at_most_linearly():
    cfg, prof = mixtral_8x7b(), paper_profile()
    req = _streaming_request(cfg, Planner(cfg, prof))
    out = predicted_scaling(cfg, prof, None, Policy(), req, [1, 2, 4])
    assert [e["devices"] for e in out] == [1, 2, 4]
    assert all(e["error"] is None and e["device_resident_experts"] == 0 for e in out), out
    assert out[0]["binding_constraint"] != "compute"  # really streaming-bound
    one = out[0]["predicted_throughput_tokens_per_s"]
    assert one == pytest.approx(Planner(cfg, prof).plan(req).predicted_throughput_tokens_per_s)
    for e in out[1:]:
        d, tput = e["devices"], e["predicted_throughput_tokens_per_s"]
        assert one < tput <= d * one, (d, tput / one)
        assert e["speedup"] == pytest.approx(tput / one)
    assert out[2]["predicted_throughput_tokens_per_s"] > out[1]["predicted_throughput_tokens_per_s"]


def test_replicated_attention_does_not_scale():
    """Every weight resident (no budget), experts that cost nothing: a step is attention,
    routers, combine and head, all replicated, so more devices only add the all-reduce of
    every MoE layer."""
    cfg = tiny()
    prof = flat_profile(expert=tuple((b, 0.0) for b in (2, 4, 8, 16, 32, 64)))
    req = PlanRequest(prompt_len=8, gen_len=4, num_prompts=4, groups=2, batch_size=2)
    plans = {d: Planner(cfg, prof, base=Policy(devices=d)).plan(req) for d in (1, 2, 4)}
    c = CostModel(prof)
    for d in (2, 4):
        extra = len(cfg.moe_layer_ids) * c.all_reduce(4 * cfg.hidden_size * 4, d)
        assert plans[d].predicted_decode_step_s == pytest.approx(
            plans[1].predicted_decode_step_s + extra)
        assert plans[d].predicted_throughput_tokens_per_s < \
            plans[1].predicted_throughput_tokens_per_s
        assert plans[d].devices == d and plans[d].to_dict()["devices"] == d
        assert f"on {d} devices" in plans[d].describe()


def test_resident_experts_split_their_compute_but_not_attention():
    """The paper's figures with every weight resident: expert compute splits over the devices,
    attention does not, so the decode step shrinks but never below its replicated part."""
    cfg, prof = mixtral_8x7b(), paper_profile()
    req = PlanRequest(prompt_len=32, gen_len=8, num_prompts=16, groups=1, batch_size=16)
    out = {d: Planner(cfg, prof, base=Policy(devices=d)).plan(req) for d in (1, 2, 4)}
    c = CostModel(prof)
    replicated = cfg.num_layers * (c.attention(16, 1, req.cache_len) + c.router(16)
                                   + c.routing(16) + c.combine(16)) + c.head(16)
    for d in (2, 4):
        step = out[d].predicted_decode_step_s
        assert replicated < step < out[1].predicted_decode_step_s
        assert out[d].predicted_throughput_tokens_per_s < d * out[1].predicted_throughput_tokens_per_s


def test_scaling_reports_budgets_that_fit_no_plan_and_rejects_bad_counts():
    cfg = tiny()
    req = PlanRequest(prompt_len=8, gen_len=8, num_prompts=4, device_budget=1000)
    out = predicted_scaling(cfg, flat_profile(), None, None, req, [1, 2])
    assert [e["predicted_throughput_tokens_per_s"] for e in out] == [None, None]
    assert all("below the minimum" in e["error"] and e["speedup"] is None for e in out)
    with pytest.raises(ValueError, match="positive integers"):
        predicted_scaling(cfg, flat_profile(), None, None, req, [0])
