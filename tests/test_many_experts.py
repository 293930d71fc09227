"""DeepSeek scale: 64-256 routed experts a layer and top-6/8 routing.

The correlation prefetcher at E = 256, top-8 (table sizes, valid predictions, the vectorised
counting and expected use against a plain per-token loop), and one tiny DeepSeek-V3-style model
with 64 experts and top-6 through every schedule at its minimum budget against the reference,
under the exactness contract (tests/contract.py).
"""

from __future__ import annotations

import contract
import numpy as np
import pytest

from klotski_jax.planning.hot import prefetch_order, use_from_pick_probs
from klotski_jax.planning.prefetcher import (
    MAX_CELLS,
    CorrelationPrefetcher,
    CorrelationTable,
    TableError,
)

E, K = 256, 8
LAYERS = (1, 2, 3, 5)


def _routing(rng: np.random.Generator, tokens: int, e: int = E, k: int = K) -> np.ndarray:
    return np.argsort(rng.random((tokens, e)), axis=1)[:, :k].astype(np.int32)


def test_table_at_256_experts_is_e_by_e_per_layer() -> None:
    t = CorrelationTable.empty(LAYERS, E, path_length=1)
    assert [c.shape for c in t.counts] == [(1, E)] + [(E, E)] * 3
    assert t.counts[1].nbytes == E * E * 8  # 512 KiB of float64 counts per MoE layer
    assert E ** 3 > MAX_CELLS
    with pytest.raises(TableError, match="counts per layer"):
        CorrelationTable.empty(LAYERS, E, path_length=2)  # 128 MiB per layer


def test_prefetcher_at_256_experts_top8_predicts_valid_experts() -> None:
    rng = np.random.default_rng(0)
    pf = CorrelationPrefetcher.fresh(LAYERS, E, top_k=K)
    for tokens in (4096, 8, 8):  # a prefill, then two decode steps
        for layer in LAYERS:
            hot = pf.predict(layer, K)
            assert len(hot) == len(set(hot)) <= K and all(0 <= e < E for e in hot)
            p, expected = pf.expected_use(layer, tokens)
            assert p.shape == expected.shape == (E,)
            assert ((0 <= p) & (p <= 1)).all()
            assert expected.sum() == pytest.approx(K * tokens, rel=1e-6)
            order = prefetch_order(p, expected, 0.5)
            assert all(0 <= e < E for e in order)
            pf.observe(layer, _routing(rng, tokens))
    assert pf.table.tokens.tolist() == [4096 + 16] * len(LAYERS)
    # every token adds k x k pairs at each layer after the first
    assert [c.sum() for c in pf.table.counts[1:]] == [(4096 + 16) * K * K] * 3
    assert len(pf.predict(LAYERS[1], K)) == K


@pytest.mark.parametrize("path_length", [1, 2])
def test_vectorised_counts_and_use_match_a_loop_over_tokens(path_length: int) -> None:
    """observe / predict / expected_use against the definitions in prefetcher.py, token by
    token, on a table small enough for loops (E = 16, top-3)."""
    e, k, layers = 16, 3, (0, 1, 2)
    rng = np.random.default_rng(path_length)
    pf = CorrelationPrefetcher.fresh(layers, e, path_length, top_k=k)
    want = [np.zeros_like(c) for c in pf.table.counts]
    for step in range(4):
        picks = [_routing(rng, 7 if step else 40, e, k) for _ in layers]
        for p, layer in enumerate(layers):
            length = min(path_length, p)
            paths = [[0] for _ in picks[p]]
            for q in range(p - length, p):  # row index of every path of every token
                paths = [[r * e + a for r in rows for a in picks[q][t]]
                         for t, rows in enumerate(paths)]
            if length and step:
                t_ = pf.table
                pop = t_.popularity[p] / t_.tokens[p]
                kk = round(t_.popularity[p].sum() / t_.tokens[p])
                q_tok = []
                for rows in paths:
                    per = [kk * t_.counts[p][r] / t_.counts[p][r].sum()
                           if t_.counts[p][r].sum() else pop for r in rows]
                    q_tok.append(np.mean(per, axis=0))
                want_p, want_x = use_from_pick_probs(np.array(q_tok))
                got_p, got_x = pf.expected_use(layer, len(paths))
                np.testing.assert_allclose(got_p, want_p, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(got_x, want_x, rtol=1e-12)
                scores = sum(t_.counts[p][r] for rows in paths for r in rows)
                if scores.any():
                    top = pf.predict(layer, k)
                    assert sorted(scores[top]) == sorted(scores)[-len(top):]
            pf.observe(layer, picks[p])
            if length:
                for t, rows in enumerate(paths):
                    for r in rows:
                        for b in picks[p][t]:
                            want[p][r, b] += 1
    for got, w in zip(pf.table.counts, want):
        np.testing.assert_array_equal(got, w)


# ---- a tiny DeepSeek-V3-style model with 64 experts, top-6, through every schedule ------------

NEW = 4
LENGTHS = (6, 9, 4)
SCHEDULES = ["klotski", "flexgen", "lru", "sequential"]


@pytest.fixture(scope="module")
def e64(tmp_path_factory: pytest.TempPathFactory):
    """deepseek_v3 of tests/hf_models.py with 64 routed experts, top-6 over 8 groups (4 of
    them compete), two MoE layers (no dense one: less to compile): converted, with reference
    outputs."""
    from hf_models import save_hf_model

    import klotski_jax

    root = tmp_path_factory.mktemp("e64")
    _, hf_dir = save_hf_model("deepseek_v3", root / "hf", n_routed_experts=64,
                              num_experts_per_tok=6, n_group=8, topk_group=4,
                              num_hidden_layers=2, first_k_dense_replace=0)
    ckpt = klotski_jax.convert(hf_dir, root / "ckpt", progress=False)
    model = klotski_jax.load(ckpt)
    cfg = model.config
    assert (cfg.num_experts, cfg.top_k, len(cfg.moe_layer_ids)) == (64, 6, 2)
    tol = contract.tolerance(cfg.dtype)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in LENGTHS]
    s = max(LENGTHS)
    ids = np.zeros((len(prompts), s), np.int32)
    for r, p in enumerate(prompts):
        ids[r, s - len(p):] = p
    mask = (np.arange(s)[None, :] >= s - np.array(LENGTHS)[:, None]).astype(np.int32)
    want = contract.reference_greedy(model, ids, mask, NEW, tol)
    return ckpt, cfg, prompts, want, tol


def _min_budget(ckpt, cfg, policy, prompts: int) -> int:
    """The smallest device budget `policy` accepts for the e64 workload."""
    from klotski_jax.engine import Engine, prompt_bucket
    from klotski_jax.planning.placement import Workload, place

    lay = Engine(ckpt, policy).layout(prompts)
    s = prompt_bucket(max(LENGTHS))
    cache = -(-(s + NEW) // 32) * 32
    return place(cfg, policy, Workload(lay.groups, lay.batch, s, cache - s)).min_device_bytes


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_64_experts_top6_every_schedule_at_minimum_budget(e64, schedule: str) -> None:
    from klotski_jax.engine import Engine
    from klotski_jax.planning.policy import Policy

    ckpt, cfg, prompts, want, tol = e64
    policy = Policy(schedule=schedule, groups=2)
    budget = _min_budget(ckpt, cfg, policy, len(prompts))
    out = Engine(ckpt, policy.replace(device_budget=budget)).generate(
        prompts, max_new_tokens=NEW, stop_at_eos=False)
    contract.assert_greedy_matches(out.token_ids, want.tokens, want.logits, tol, what=schedule)
    assert 0 < out.stats.peak_device_bytes <= budget


def test_placement_counts_float32_routers_at_their_size() -> None:
    """A bf16 DeepSeek layer's dense bytes include its float32 router and correction bias at 4
    bytes each (at 2, an LRU cache sized to the budget's last byte waited forever)."""
    from klotski_jax.config import Attn, Family, ModelConfig, ScoreFunc, TopkMethod
    from klotski_jax.models.specs import Kind, layer_specs, total_bytes
    from klotski_jax.planning.placement import dense_layer_bytes, global_bytes

    cfg = ModelConfig(
        family=Family.DEEPSEEK_V3, vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=16, num_experts=64, top_k=6, expert_intermediate_size=8,
        moe_layers=(False, True), sliding_windows=(None, None), dense_intermediate_size=16,
        dtype="bfloat16", attention=Attn.MLA, kv_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8,
        score_func=ScoreFunc.SIGMOID, topk_method=TopkMethod.NOAUX_TC, n_group=8, topk_group=4,
        router_bias=True, router_fp32=True)
    dense = dense_layer_bytes(cfg)
    specs = [s for s in layer_specs(cfg, 1) if s.kind is Kind.DENSE]
    router = sum(s.size for s in specs if ".router." in s.name)
    assert router == 64 * 32 + 64
    assert dense[1] == sum(s.size for s in specs) * 2 + router * 2  # router at 4 bytes
    assert sum(dense) + global_bytes(cfg) + 64 * cfg.expert_bytes == total_bytes(cfg)


# ---- batched expert calls ---------------------------------------------------------------------

def test_batched_call_adds_what_single_calls_add() -> None:
    """experts_apply over 3 experts (a token routed to two of them, padding rows of weight 0)
    gives the accumulator that three single calls give."""
    import jax.numpy as jnp

    from klotski_jax.runtime import steps

    rng = np.random.default_rng(0)
    n, d, f = 10, 16, 8
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    experts = tuple({"gate": jnp.asarray(rng.standard_normal((f, d)) / 4, jnp.float32),
                     "up": jnp.asarray(rng.standard_normal((f, d)) / 4, jnp.float32),
                     "down": jnp.asarray(rng.standard_normal((d, f)) / 4, jnp.float32)}
                    for _ in range(3))
    picks = [(np.array([0, 3]), np.array([0.5, 0.25])), (np.array([3]), np.array([0.75])),
             (np.array([1, 7, 9]), np.array([0.1, 0.2, 0.3]))]
    padded = [steps.pad_rows(r, w) for r, w in picks]
    assert {len(r) for r, _ in padded} == {2, 4}  # pad to one bucket for a batched call
    padded = [(np.pad(r, (0, 4 - len(r))), np.pad(w, (0, 4 - len(w)))) for r, w in padded]
    want = steps.zero_accumulator((n, d))
    for (r, w), e in zip(padded, experts):
        want, _ = steps.expert_apply(want, x, r, w, e)
    got, _ = steps.experts_apply(steps.zero_accumulator((n, d)), x,
                                 np.stack([r for r, _ in padded]),
                                 np.stack([w for _, w in padded]), experts)
    # float32, summed in another order (and maybe other kernels): a tolerance, not bit-identity
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[[2, 4, 5, 6, 8]].any()  # rows no expert was routed to


def test_gatherer_batches_per_device_and_bucket() -> None:
    from klotski_jax.runtime.routing import ExpertBatches, Ready
    from klotski_jax.runtime.steps import batch_sizes, split_batch

    def ready(e: int, device: int, bucket: int) -> Ready:
        return Ready(e, device, None, np.zeros(bucket, np.int32), np.zeros(bucket, np.float32),
                     np.zeros(1, np.int32), {})

    b = ExpertBatches(4)
    assert b.add(ready(0, 0, 2)) is None and b.add(ready(1, 0, 4)) is None
    assert b.add(ready(2, 1, 2)) is None and b.add(ready(3, 0, 2)) is None
    assert b.add(ready(4, 0, 2)) is None
    full = b.add(ready(5, 0, 2))
    assert full is not None and [r.e for r in full] == [0, 3, 4, 5]
    assert [[r.e for r in batch] for batch in b.drain()] == [[1], [2]]
    assert b.drain() == []
    assert [split_batch(n) for n in (1, 2, 3, 4, 7)] == [[1], [2], [2, 1], [4], [4, 2, 1]]
    assert batch_sizes(1) == [1] and batch_sizes(4) == [1, 2, 4]


def test_expert_batch_must_be_a_power_of_two() -> None:
    from klotski_jax.planning.policy import Policy, PolicyError

    for bad in (0, 3, 6):
        with pytest.raises(PolicyError, match="expert_batch must be a power of two"):
            Policy(expert_batch=bad)


@pytest.mark.parametrize("schedule", ["klotski", "lru"])
def test_batched_expert_calls_at_minimum_budget(e64, schedule: str) -> None:
    """At the smallest budget (klotski releases experts while loads wait for memory; lru evicts
    from a full cache): batched calls keep the reference tokens, every device array within the
    ledger (verify_memory), each routed expert computed once per layer and step (klotski), fewer
    calls than experts (klotski); `expert_batch=1` makes one call per expert."""
    import collections

    from klotski_jax.engine import Engine
    from klotski_jax.planning.policy import Policy
    from klotski_jax.runtime.trace import Tracer

    ckpt, cfg, prompts, want, tol = e64
    policy = Policy(schedule=schedule, groups=2, verify_memory=True)
    budget = _min_budget(ckpt, cfg, policy, len(prompts))
    runs = {}
    for batch in (4, 1):
        trace = Tracer()
        out = Engine(ckpt, policy.replace(device_budget=budget, expert_batch=batch)).generate(
            prompts, max_new_tokens=NEW, stop_at_eos=False, trace=trace)
        contract.assert_greedy_matches(out.token_ids, want.tokens, want.logits, tol,
                                       what=f"{schedule}, expert_batch={batch}")
        assert 0 < out.stats.peak_device_bytes <= budget
        computed = collections.Counter()
        for ev in trace.events():
            a = ev.get("args", {})
            if ev.get("name") == "expert":
                computed[a["step"], a["layer"], a["expert"]] += 1
            elif ev.get("name") == "experts":
                assert len(a["experts"]) in (2, 4) and max(a["tokens"]) <= 8
                for e in a["experts"]:
                    computed[a["step"], a["layer"], e] += 1
        if schedule == "klotski":  # lru runs one group: an expert once per group it serves
            assert set(computed.values()) == {1}
        assert sum(computed.values()) == out.stats.expert_computes
        runs[batch] = out.stats
    # lru loads on demand: at this budget an expert arrives alone, so only hits could batch
    assert runs[4].expert_calls < runs[4].expert_computes or schedule == "lru"
    assert runs[1].expert_calls == runs[1].expert_computes
