"""Placement, budgets and Policy: plain arithmetic over byte counts, no JAX and no checkpoint.

The device total a placement commits to is recomputed here from first principles (weight specs,
KV cache formula, the streaming area each schedule needs) and checked against the budget over a
sweep of budgets, for a Mixtral-8x7B-shaped config and for tiny configs with the quirks of the
other families (dense layers, shared experts, tied embeddings).
"""

from __future__ import annotations

import re

import pytest

from klotski_jax.config import Family, ModelConfig, QKNorm
from klotski_jax.constants import ALIGN, BudgetError, round_up
from klotski_jax.models.specs import Kind, total_bytes, weight_specs
from klotski_jax.planning.placement import (
    Workload,
    activation_bytes,
    dense_layer_bytes,
    device_global_bytes,
    global_bytes,
    place,
    staged_expert_bytes,
    streaming_need,
)
from klotski_jax.planning.policy import IO_MODES, Policy, PolicyError, Schedule, parse_size

MB = 10**6


def mixtral_8x7b() -> ModelConfig:
    return ModelConfig(
        family=Family.MIXTRAL, vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_intermediate_size=14336,
        moe_layers=(True,) * 32, sliding_windows=(None,) * 32, rope_theta=1e6, dtype="bfloat16")


def tiny_mixtral() -> ModelConfig:
    return ModelConfig(
        family=Family.MIXTRAL, vocab_size=96, hidden_size=32, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, expert_intermediate_size=48,
        moe_layers=(True,) * 3, sliding_windows=(None,) * 3)


def tiny_qwen2() -> ModelConfig:
    """A dense (non-MoE) layer, a shared expert, biases, q/k norm, odd expert count."""
    return ModelConfig(
        family=Family.QWEN2_MOE, vocab_size=160, hidden_size=48, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=10, num_experts=5, top_k=2, expert_intermediate_size=72,
        moe_layers=(True, False, True), sliding_windows=(None, 7, None), dense_intermediate_size=88,
        shared_expert_intermediate_size=56, qkv_bias=True, qk_norm=QKNorm.HEAD, dtype="bfloat16")


def tiny_tied() -> ModelConfig:
    return tiny_mixtral().replace(tie_word_embeddings=True, num_experts=6, top_k=3,
                                  expert_intermediate_size=40)


CONFIGS = {"mixtral-8x7b": mixtral_8x7b, "tiny-mixtral": tiny_mixtral, "tiny-qwen2": tiny_qwen2,
           "tiny-tied": tiny_tied}
WORKLOADS = {"mixtral-8x7b": Workload(groups=2, batch_size=4, prompt_len=64, max_new_tokens=64),
             "tiny-mixtral": Workload(groups=2, batch_size=2, prompt_len=8, max_new_tokens=8),
             "tiny-qwen2": Workload(groups=3, batch_size=1, prompt_len=5, max_new_tokens=11),
             "tiny-tied": Workload(groups=2, batch_size=3, prompt_len=6, max_new_tokens=4)}

# Every schedule and ablation with its own streaming need.
VARIANTS = {
    "klotski": dict(schedule="klotski"),
    "klotski-whole-layer": dict(schedule="klotski", hot_only_prefetch=False),
    "klotski-no-reorder": dict(schedule="klotski", reorder=False),
    "klotski-no-reorder-k3": dict(schedule="klotski", reorder=False, hot_experts=3),
    "klotski-single-batch": dict(schedule="klotski", multi_batch=False),
    "flexgen": dict(schedule="flexgen"),
    "lru": dict(schedule="lru"),
    "sequential": dict(schedule="sequential"),
}


def _policy(variant: str, **kw) -> Policy:
    return Policy(**VARIANTS[variant], **kw)


def _workload(name: str, policy: Policy) -> Workload:
    w = WORKLOADS[name]
    if policy.single_group:  # lru / sequential run every prompt as one group
        return Workload(1, w.groups * w.batch_size, w.prompt_len, w.max_new_tokens)
    return w


# ---- independent byte counts ----------------------------------------------------------------

def _globals(cfg: ModelConfig) -> int:
    heads = 1 if cfg.tie_word_embeddings else 2
    return (heads * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * cfg.itemsize


def _kv(cfg: ModelConfig, w: Workload) -> int:
    return w.groups * 2 * cfg.num_layers * w.batch_size * w.max_len * cfg.kv_size * cfg.itemsize


def _experts(cfg: ModelConfig) -> list[tuple[int, int]]:
    return [(i, e) for i in range(cfg.num_layers) if cfg.moe_layers[i]
            for e in range(cfg.num_experts)]


def _stream_dense(cfg: ModelConfig, pol: Policy) -> int:
    """Dense bytes streamed at once: one layer (sequential) or the current and the next."""
    return (1 if pol.schedule is Schedule.SEQUENTIAL else 2) * max(dense_layer_bytes(cfg))


def _min_slots(cfg: ModelConfig, pol: Policy) -> int:
    """Expert slots the schedule needs to make progress."""
    e, k = cfg.num_experts, pol.hot_experts if pol.hot_experts is not None else cfg.top_k
    if pol.schedule is Schedule.SEQUENTIAL:
        return e  # one whole layer
    if pol.schedule is Schedule.FLEXGEN:
        return 2 * e  # this layer and the prefetched next one
    if pol.schedule is Schedule.KLOTSKI and not pol.hot_only_prefetch:
        return e + 1  # the next whole layer streams through while one expert computes
    if pol.schedule is Schedule.KLOTSKI and not pol.reorder:
        return k + 1  # the hot set may hold its slots while compute waits for a cold expert
    return 1


def _device_globals(cfg: ModelConfig) -> int:
    """On the device: the LM head (the embedding when tied) and the final norm; an untied
    embedding is looked up on the host."""
    return (cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * cfg.itemsize


def _kv_window(cfg: ModelConfig, w: Workload) -> int:
    """Host-resident KV caches in flight on the device: two (layer, group) caches."""
    return 2 * 2 * w.batch_size * w.max_len * cfg.kv_size * cfg.itemsize


def _fixed(cfg: ModelConfig, w: Workload, kv_on_device: bool = False) -> int:
    kv = _kv(cfg, w) if kv_on_device else min(_kv(cfg, w), _kv_window(cfg, w))
    return _device_globals(cfg) + kv + activation_bytes(cfg, w)


def _min_device(cfg: ModelConfig, pol: Policy, w: Workload) -> int:
    return _fixed(cfg, w) + _stream_dense(cfg, pol) + _min_slots(cfg, pol) * cfg.expert_bytes


def device_total(cfg: ModelConfig, pl, pol: Policy) -> int:
    """Everything the placement commits to keep on the device at its fullest moment."""
    dense = sum(dense_layer_bytes(cfg)) if pl.dense_resident else _stream_dense(cfg, pol)
    return (pl.fixed_device_bytes + dense
            + (pl.expert_slots + len(pl.device_experts)) * cfg.expert_bytes)


def resident_bytes(cfg: ModelConfig, pl) -> int:
    dense = sum(dense_layer_bytes(cfg)) if pl.dense_resident else 0
    return dense + len(pl.device_experts) * cfg.expert_bytes


def _budgets(lo: int, hi: int, n: int) -> list[int]:
    """n + 1 budgets from lo to hi, and lo + 1."""
    return sorted({lo + (hi - lo) * j // n for j in range(n + 1)} | {lo, lo + 1, hi})


def _everything(cfg: ModelConfig, w: Workload) -> int:
    return _fixed(cfg, w, True) + total_bytes(cfg) + 3 * cfg.num_experts * cfg.expert_bytes


# ---- sizes ----------------------------------------------------------------------------------

def test_mixtral_expert_bytes_match_the_paper():
    cfg = mixtral_8x7b()
    assert cfg.expert_bytes == 3 * 4096 * 14336 * 2 == 352_321_536  # ~352 MB per expert
    assert round(cfg.expert_bytes / MB) == 352
    # Each projection is a whole number of pages: staging adds no padding.
    assert staged_expert_bytes(cfg) == cfg.expert_bytes
    # All 256 experts are ~90 GB, ~97% of the ~93 GB model.
    assert total_bytes(cfg, Kind.EXPERT) == 256 * cfg.expert_bytes
    assert 46e9 < total_bytes(cfg) / 2 < 47e9  # ~46.7 B parameters


@pytest.mark.parametrize("name", CONFIGS)
def test_byte_helpers_agree_with_the_weight_specs(name):
    cfg = CONFIGS[name]()
    specs = weight_specs(cfg)
    assert global_bytes(cfg) == _globals(cfg)
    assert device_global_bytes(cfg) == _device_globals(cfg)
    assert sum(s.size for s in specs if s.layer is None) * cfg.itemsize == global_bytes(cfg)
    assert global_bytes(cfg) + sum(dense_layer_bytes(cfg)) == total_bytes(cfg, Kind.DENSE)
    assert len(_experts(cfg)) * cfg.expert_bytes == total_bytes(cfg, Kind.EXPERT)
    assert cfg.kv_cache_bytes(3, 17) == 2 * cfg.num_layers * 3 * 17 * cfg.kv_size * cfg.itemsize


@pytest.mark.parametrize("name", CONFIGS)
def test_staged_expert_bytes_pads_each_part_to_a_page(name):
    cfg = CONFIGS[name]()
    part = cfg.hidden_size * cfg.expert_intermediate_size * cfg.itemsize
    assert staged_expert_bytes(cfg) == 3 * round_up(part)
    assert staged_expert_bytes(cfg) % ALIGN == 0
    assert staged_expert_bytes(cfg) >= cfg.expert_bytes


def test_round_up():
    assert [round_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]
    assert round_up(10, 8) == 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_need(variant):
    cfg = tiny_qwen2()
    pol = _policy(variant)
    assert streaming_need(cfg, pol, False) == (_stream_dense(cfg, pol),
                                               _min_slots(cfg, pol))
    assert streaming_need(cfg, pol, True) == (0, _min_slots(cfg, pol))


# ---- device budget --------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_minimum_device_budget(name, variant):
    cfg = CONFIGS[name]()
    pol = _policy(variant)
    w = _workload(name, pol)
    minimum = _min_device(cfg, pol, w)
    assert place(cfg, pol, w).min_device_bytes == minimum

    for below in (minimum - 1, minimum // 2, 1):
        with pytest.raises(BudgetError) as err:
            place(cfg, pol.replace(device_budget=below), w)
        msg = str(err.value)
        assert str(minimum) in msg and str(below) in msg and pol.schedule.value in msg
        assert re.search(rf"minimum {minimum} bytes", msg)

    pl = place(cfg, pol.replace(device_budget=minimum), w)  # exactly the minimum runs
    assert pl.min_device_bytes == minimum
    assert pl.expert_slots == _min_slots(cfg, pol)
    assert not pl.device_experts
    assert device_total(cfg, pl, pol) <= minimum


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_placement_never_exceeds_the_device_budget(name, variant):
    cfg = CONFIGS[name]()
    pol = _policy(variant)
    w = _workload(name, pol)
    minimum = _min_device(cfg, pol, w)
    experts = set(_experts(cfg))
    for budget in _budgets(minimum, _everything(cfg, w), n=100):
        pl = place(cfg, pol.replace(device_budget=budget), w)
        total = device_total(cfg, pl, pol)
        assert total <= budget, (budget, total, pl.describe())
        assert pl.fixed_device_bytes == (_fixed(cfg, w, True) if pl.kv_on_device
                                         else _device_globals(cfg) + _kv_window(cfg, w)
                                         + activation_bytes(cfg, w))
        assert pl.kv_bytes == _kv(cfg, w)
        assert pl.activation_bytes == activation_bytes(cfg, w)
        assert pl.expert_slots >= _min_slots(cfg, pol)
        assert pl.device_experts <= experts
        assert pl.host_experts is None  # no host budget: every expert may be cached in RAM
        if pol.schedule is Schedule.LRU:
            assert not pl.device_experts  # the LRU cache is all slots, nothing pinned
        else:
            # Resident experts fill the layers in order: a layer-major prefix.
            assert sorted(pl.device_experts) == _experts(cfg)[:len(pl.device_experts)]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_more_device_budget_never_holds_less(name, variant):
    """Monotonic in the budget: resident weight bytes never drop; dense residency, once reached,
    stays; and while dense residency does not change, neither resident experts nor expert slots
    ever drop.

    Resident experts alone are not monotonic across the switch to dense residency: there the
    placement trades the experts it pinned (all at most D - S bytes, D = all layers' dense bytes,
    S = the streamed dense area) for the D bytes of dense weights, which every token of every
    step reads, and resident bytes still grow.
    """
    cfg = CONFIGS[name]()
    pol = _policy(variant)
    w = _workload(name, pol)
    minimum = _min_device(cfg, pol, w)
    # The switch to dense residency, where resident experts are traded for dense weights.
    switch = _fixed(cfg, w, True) + sum(dense_layer_bytes(cfg)) + _min_slots(cfg, pol) * (
        cfg.expert_bytes)
    prev = None
    for budget in sorted(set(_budgets(minimum, _everything(cfg, w), n=150))
                         | {switch - 1, switch, switch + 1}):
        pl = place(cfg, pol.replace(device_budget=budget), w)
        if prev is not None:
            # KV caches moving onto the device may displace resident experts: count them too.
            assert resident_bytes(cfg, pl) + pl.kv_on_device * pl.kv_bytes >= resident_bytes(
                cfg, prev) + prev.kv_on_device * prev.kv_bytes, budget
            assert pl.dense_resident >= prev.dense_resident, budget
            assert pl.kv_on_device >= prev.kv_on_device, budget
            if (pl.dense_resident, pl.kv_on_device) == (prev.dense_resident, prev.kv_on_device):
                assert len(pl.device_experts) >= len(prev.device_experts), budget
                assert pl.device_experts >= prev.device_experts, budget
                assert pl.expert_slots >= prev.expert_slots, budget
        prev = pl
    assert prev.dense_resident
    if pol.schedule is not Schedule.LRU:
        assert len(prev.device_experts) == len(_experts(cfg)), "a huge budget pins every expert"


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_unlimited_device_budget_keeps_everything_resident(name, variant):
    cfg = CONFIGS[name]()
    pol = _policy(variant)
    pl = place(cfg, pol, _workload(name, pol))
    assert pl.dense_resident
    assert pl.host_experts is None
    if pol.schedule is Schedule.LRU:
        assert not pl.device_experts and pl.expert_slots == len(_experts(cfg))
    else:
        assert pl.device_experts == frozenset(_experts(cfg))


def test_describe_is_plain_data():
    cfg = tiny_mixtral()
    pl = place(cfg, Policy(device_budget=10**6, host_budget=10**6), WORKLOADS["tiny-mixtral"])
    d = pl.describe()
    assert d["schedule"] == "klotski" and d["kv_bytes"] == pl.kv_bytes
    assert d["device_resident_experts"] == len(pl.device_experts)
    assert d["host_cached_experts"] == len(pl.host_experts)
    assert place(cfg, Policy(), WORKLOADS["tiny-mixtral"]).describe()["host_cached_experts"] == "all"


def test_mixtral_at_a_quarter_of_its_weights():
    """The 'done when' budget: 25% of the weight bytes places a klotski run of Mixtral."""
    cfg = mixtral_8x7b()
    w = WORKLOADS["mixtral-8x7b"]
    budget = total_bytes(cfg) // 4
    for variant in VARIANTS:
        pol = _policy(variant, device_budget=budget)
        pl = place(cfg, pol, _workload("mixtral-8x7b", pol))
        assert device_total(cfg, pl, pol) <= budget
        assert pl.dense_resident  # ~3 GB of dense weights fit easily in ~23 GB
    pl = place(cfg, Policy(device_budget=budget), w)
    assert pl.expert_slots == cfg.num_experts + cfg.top_k  # a generous streaming area...
    assert 40 <= len(pl.device_experts) < 256  # ...and dozens of pinned experts


# ---- host budget ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", ["min", "mid", "all"])
def test_host_budget(name, variant, device):
    cfg = CONFIGS[name]()
    pol = _policy(variant)
    w = _workload(name, pol)
    dmin = _min_device(cfg, pol, w)
    device_budget = {"min": dmin, "mid": (dmin + _everything(cfg, w)) // 2, "all": None}[device]
    pol = pol.replace(device_budget=device_budget)
    base = place(cfg, pol, w)
    staged = staged_expert_bytes(cfg)
    experts = _experts(cfg)
    host_min = base.min_host_bytes

    # The host tier keeps every dense array (globals too) and one staging buffer per expert it
    # may have on the device at once: every pinned one and at least the streaming slots.
    assert host_min >= global_bytes(cfg) + sum(dense_layer_bytes(cfg)) + staged * (
        len(base.device_experts) + min(base.expert_slots, len(experts) - len(base.device_experts)))
    host_kv = 0 if base.kv_on_device else base.kv_bytes  # offloaded KV caches live on the host
    assert host_min <= total_bytes(cfg, Kind.DENSE) + staged * len(experts) + host_kv
    assert host_min == (global_bytes(cfg) + sum(dense_layer_bytes(cfg)) + base.staging_bytes
                        + host_kv)

    for below in (host_min - 1, host_min // 3):
        with pytest.raises(BudgetError) as err:
            place(cfg, pol.replace(host_budget=below), w)
        assert str(host_min) in str(err.value) and str(below) in str(err.value)

    non_resident = [x for x in experts if x not in base.device_experts]
    for host_budget in _budgets(host_min, host_min + staged * (len(experts) + 2), n=30):
        pl = place(cfg, pol.replace(host_budget=host_budget), w)
        # The host budget changes nothing on the device.
        assert (pl.device_experts, pl.expert_slots, pl.dense_resident) == (
            base.device_experts, base.expert_slots, base.dense_resident)
        assert pl.min_host_bytes == host_min
        cached = pl.host_experts
        assert cached is not None
        assert host_min + len(cached) * staged <= host_budget  # the cache fits the budget
        assert not cached & pl.device_experts  # device-resident experts are not cached twice
        # Experts get host memory before disk: as many as fit, in layer-major order.
        assert sorted(cached) == non_resident[:len(cached)]
        if len(cached) < len(non_resident):
            assert host_min + (len(cached) + 1) * staged > host_budget
    assert place(cfg, pol.replace(host_budget=host_min), w).host_experts == frozenset()


def test_host_minimum_counts_the_globals():
    """HostTier keeps embedding and LM head in RAM too: the minimum must include them."""
    cfg = tiny_mixtral()
    pl = place(cfg, Policy(device_budget=None), WORKLOADS["tiny-mixtral"])
    assert pl.min_host_bytes >= total_bytes(cfg, Kind.DENSE) > sum(dense_layer_bytes(cfg))


# ---- parse_size -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,total,expected", [
    ("512MB", None, 512 * 10**6),
    ("2GiB", None, 2 * 2**30),
    ("1.5g", None, int(1.5 * 2**30)),
    ("30%", 1000, 300),
    ("30%", 3 * 10**9, 9 * 10**8),
    ("12.5%", 800, 100),
    ("100%", 12345, 12345),
    ("123456", None, 123456),
    ("7b", None, 7),
    ("64kib", None, 65536),
    ("64KB", None, 64000),
    ("3m", None, 3 * 2**20),
    ("1TiB", None, 2**40),
    (" 2 GiB ", None, 2 * 2**30),
    (".5GB", None, 5 * 10**8),
    (4096, None, 4096),
])
def test_parse_size(text, total, expected):
    assert parse_size(text, total=total) == expected


@pytest.mark.parametrize("text,total", [
    ("", None), ("abc", None), ("12XB", None), ("-5MB", None), ("0", None), ("0MB", None),
    ("0.1b", None), ("1..5MB", None), ("5 MB B", None), ("MB", None), ("1e9", None),
    ("30%", None), ("0%", 1000), ("-5%", 1000), ("1001%", 1000), ("x%", 1000), ("%", 1000),
])
def test_parse_size_rejects(text, total):
    with pytest.raises(PolicyError):
        parse_size(text, total=total)


def test_parse_size_percentage_error_names_the_problem():
    with pytest.raises(PolicyError, match="percentage"):
        parse_size("25%")


# ---- Policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=0), "groups"),
    (dict(batch_size=0), "batch_size"),
    (dict(io_mode="mmap"), "io_mode"),
    (dict(io_threads=0), "io_threads"),
    (dict(hot_experts=-1), "hot_experts"),
    (dict(device_budget=0), "device_budget"),
    (dict(device_budget=-5), "device_budget"),
    (dict(host_budget=0), "host_budget"),
    (dict(schedule="bogus"), "schedule"),
])
def test_policy_validation(kwargs, match):
    with pytest.raises(PolicyError, match=match):
        Policy(**kwargs)


def test_policy_defaults_and_coercion():
    pol = Policy()
    assert pol.schedule is Schedule.KLOTSKI and pol.device_budget is None
    assert pol.io_mode in IO_MODES and pol.groups is None  # None: the planner chooses n
    assert Policy(schedule="lru").schedule is Schedule.LRU
    assert Policy(schedule="lru").single_group and Policy(schedule="sequential").single_group
    assert not Policy(schedule="flexgen").single_group and not pol.single_group
    for mode in IO_MODES:
        assert Policy(io_mode=mode).io_mode == mode
    assert Policy(hot_experts=0).hot_experts == 0


def test_policy_is_frozen_and_replace_validates():
    pol = Policy(device_budget=100)
    with pytest.raises(AttributeError):
        pol.groups = 3  # type: ignore[misc]
    assert pol.replace(groups=3).groups == 3 and pol.groups is None
    assert pol.replace(schedule="flexgen").schedule is Schedule.FLEXGEN
    with pytest.raises(PolicyError):
        pol.replace(groups=0)
    assert hash(pol) == hash(Policy(device_budget=100))
