"""How the engine runs a workload: prompt buckets and warm-up, the expected-use prefetch,
early stop at EOS, the layout it reports, batches that fit the budget, and where the compute
thread waits.

One tiny converted Mixtral (float32) serves every test; correctness against the reference is
test_pipeline.py's job, these tests check what a run does.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import traceback

import jax
import numpy as np
import pytest
from hf_models import save_hf_model

import klotski_jax
from klotski_jax.engine import Engine, prompt_bucket
from klotski_jax.planning.placement import Workload, place
from klotski_jax.planning.policy import Policy
from klotski_jax.runtime import scheduler as scheduler_mod
from klotski_jax.runtime.trace import Tracer

NEW = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-run")
    _, hf_dir = save_hf_model("mixtral", root / "hf")
    return klotski_jax.convert(hf_dir, root / "ckpt", progress=False)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, length).tolist() for _ in range(n)]


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 8, 9, 12, 13, 16, 17, 24, 25, 64, 65, 100, 129)] == [
        8, 8, 12, 12, 16, 16, 24, 24, 32, 64, 96, 128, 192]
    for n in range(1, 2000):
        b = prompt_bucket(n)
        assert b >= n and (n <= 8 or b <= 1.5 * n)  # at most a third of a prefill is padding


def test_warm_up_compiles_every_shape_of_the_run(ckpt, monkeypatch):
    """After a round's warm-up nothing compiles: not the prefill at a new prompt length (padded
    to its bucket), not the decode steps, not any expert bucket. The second length shares the
    first's bucket, so its run compiles nothing at all."""
    compiled: list[tuple[str, bool]] = []
    timed = [False]

    def on_event(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            compiled.append((str(kw.get("fun_name", "?")), timed[0]))

    warm_up = scheduler_mod.Scheduler.warm_up

    def marked(self, *a, **kw):
        warm_up(self, *a, **kw)
        timed[0] = True  # what follows is the timed region

    monkeypatch.setattr(scheduler_mod.Scheduler, "warm_up", marked)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    engine = Engine(ckpt, Policy(groups=2, batch_size=3, prefetch_threshold=0.5))
    engine.generate(prompts(5, 21), max_new_tokens=NEW, stop_at_eos=False)
    assert [name for name, t in compiled if t] == [], "compiled inside the timed region"
    timed[0], compiled[:] = False, []
    engine.generate(prompts(5, 19, seed=1), max_new_tokens=NEW, stop_at_eos=False)
    assert prompt_bucket(19) == prompt_bucket(21) and compiled == []


def test_prefetch_grows_with_the_tokens_in_flight(ckpt):
    """Top-2 of 4 experts: the 2 x 3 x 24-token prefill routes to every expert with near
    certainty, so the whole next layer is prefetched; a decode step of 5 tokens at threshold
    0.99 prefetches fewer (1 - 0.5^5 = 0.97 under the prior)."""
    cfg = klotski_jax.load(ckpt).config
    policy = Policy(groups=2, batch_size=3, prefetch_threshold=0.99)
    lo = place(cfg, policy, Workload(2, 3, 24, 8)).min_device_bytes
    trace = Tracer()
    Engine(ckpt, policy.replace(device_budget=lo + cfg.num_experts * cfg.expert_bytes)).generate(
        prompts(5, 24), max_new_tokens=NEW, stop_at_eos=False, trace=trace)
    hot = collections.Counter()
    for e in trace.events():
        if e["name"] == "load expert" and e["args"].get("hot"):
            hot[(e["args"]["step"], e["args"]["layer"])] += 1
    assert hot[("prefill", 1)] == cfg.num_experts  # issued during layer 0 of the prefill
    decode = [hot[(f"decode {s}", layer)] for s in range(1, NEW) for layer in range(1, 3)]
    assert max(decode) < cfg.num_experts


def test_a_round_stops_when_all_its_sequences_ended(ckpt, monkeypatch):
    """Make the token that the first group's sequences produce first EOS: that group leaves the
    round after the prefill (no more compute or loads for it), the other group decodes on."""
    engine = Engine(ckpt, Policy(groups=2, batch_size=2, prefetch_threshold=0.5))
    ps = prompts(4, 10)
    full = engine.generate(ps, max_new_tokens=NEW, stop_at_eos=False)
    first = {t[0] for t in full.token_ids[:2]}
    if first & {t[0] for t in full.token_ids[2:]} or any(
            set(t[1:]) & first for t in full.token_ids[2:]):
        pytest.skip("the tiny model's first tokens do not separate the groups")
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config,
                                                              eos_token_ids=tuple(first)))
    trace = Tracer()
    out = engine.generate(ps, max_new_tokens=NEW, trace=trace)
    assert [len(t) for t in out.token_ids] == [1, 1, NEW, NEW]
    assert out.token_ids[2:] == full.token_ids[2:]
    assert out.stats.generated_tokens == 2 + 2 * NEW
    groups = {e["args"]["group"] for e in trace.events()
              if e["name"] == "attention" and e["args"]["step"].startswith("decode")}
    assert groups == {0}  # the second group of the decode steps is the first that still runs


def test_stats_report_the_layout_that_ran(ckpt):
    """Asked for 4 groups of 8 with 8 prompts, one group of 8 runs: that is what stats say."""
    out = Engine(ckpt, Policy(groups=4, batch_size=8, prefetch_threshold=0.5)).generate(
        prompts(8, 6), max_new_tokens=2, stop_at_eos=False)
    st = out.stats
    assert (st.groups, st.batch_size, st.rounds, st.group_sizes) == (1, 8, 1, [[8]])
    out = Engine(ckpt, Policy(groups=2, batch_size=2, prefetch_threshold=0.5)).generate(
        prompts(5, 6), max_new_tokens=2, stop_at_eos=False)
    assert out.stats.rounds == 2 and out.stats.group_sizes == [[2, 2], [1]]
    assert out.stats.to_dict()["rounds"] == 2


def test_single_group_baselines_fit_their_batch_to_the_budget(ckpt):
    """sequential with 6 prompts whose single batch does not fit the device budget runs them in
    smaller batches (more rounds) instead of failing."""
    cfg = klotski_jax.load(ckpt).config
    pol = Policy(schedule="sequential")
    s = prompt_bucket(40)
    cache = -(-(s + NEW) // 32) * 32
    lo = {b: place(cfg, pol, Workload(1, b, s, cache - s)).min_device_bytes for b in (2, 6)}
    assert lo[2] < lo[6]
    out = Engine(ckpt, pol.replace(device_budget=lo[2])).generate(
        prompts(6, 40), max_new_tokens=NEW, stop_at_eos=False)
    assert out.stats.rounds >= 3 and out.stats.batch_size <= 2
    assert out.stats.peak_device_bytes <= lo[2]


def test_the_compute_thread_waits_only_where_it_must(ckpt, monkeypatch):
    """Without a trace a step blocks on device results about once (its logits) besides the
    routing; with a trace every piece is timed to its end. (Setting up the host tier, once per
    call and not per step, may wait for its copies: not counted.)"""
    calls = collections.Counter()
    real = jax.block_until_ready

    def counting(x):
        frames = traceback.extract_stack(limit=6)
        setup = any(f.filename.endswith(os.path.join("runtime", "host.py")) for f in frames)
        if threading.current_thread() is threading.main_thread() and not setup:  # not I/O
            calls["n"] += 1
        return real(x)

    monkeypatch.setattr(jax, "block_until_ready", counting)
    engine = Engine(ckpt, Policy(groups=2, batch_size=3, prefetch_threshold=0.5))
    ps = prompts(5, 12)
    engine.generate(ps, max_new_tokens=NEW, stop_at_eos=False)  # compiles, warms up
    calls.clear()
    monkeypatch.setattr(scheduler_mod.Scheduler, "warm_up", lambda *a, **k: None)
    engine.generate(ps, max_new_tokens=NEW, stop_at_eos=False)
    plain = calls["n"]
    calls.clear()
    engine.generate(ps, max_new_tokens=NEW, stop_at_eos=False, trace=Tracer())
    traced = calls["n"]
    assert plain <= NEW  # one per step (the step's end), none per piece
    assert traced > 10 * NEW


def test_rounds_share_the_host_cache(ckpt):
    """Three rounds read each expert from the checkpoint's files at most once: the host cache
    lives for the whole generate call (the page cache is evicted once, before the first read)."""
    cfg = klotski_jax.load(ckpt).config
    pol = Policy(groups=1, batch_size=2, prefetch_threshold=0.5, evict_page_cache=True)
    lo = place(cfg, pol, Workload(1, 2, 8, 24)).min_device_bytes
    out = Engine(ckpt, pol.replace(device_budget=lo)).generate(
        prompts(6, 8), max_new_tokens=NEW, stop_at_eos=False)
    every_expert = len(cfg.moe_layer_ids) * cfg.num_experts * cfg.expert_bytes
    assert out.stats.rounds == 3 and out.stats.expert_loads > cfg.num_experts
    assert 0 < out.stats.bytes_read_disk <= every_expert


def test_device_memory_stats_are_reported_beside_the_ledger(ckpt) -> None:
    """Where the backend counts device memory (GPU/TPU `memory_stats()`), the run reports XLA's
    own peak beside the ledger's; on CPU (None) the fields stay None. A fake provider stands in
    for the GPU here; the bench table shows both."""
    from klotski_jax.bench.report import _peak

    calls = []

    def fake() -> dict:
        calls.append(1)
        return {"peak_bytes_in_use": 1000 * len(calls), "bytes_limit": 1 << 30,
                "bytes_in_use": 10}

    out = Engine(ckpt, memory_stats=fake).generate([[3, 4, 5]], max_new_tokens=2)
    s = out.stats.to_dict()
    assert calls and s["device_peak_bytes_in_use"] == 1000 * len(calls)
    assert s["device_bytes_limit"] == 1 << 30 and s["peak_device_bytes"] > 0
    cpu = Engine(ckpt, memory_stats=lambda: None).generate([[3, 4, 5]], max_new_tokens=2)
    assert cpu.stats.device_peak_bytes_in_use is None and cpu.stats.device_bytes_limit is None
    assert _peak({"peak_device_bytes": 2_000_000, "device_peak_bytes_in_use": 3_000_000}) == \
        "2.0 (XLA 3.0)"
    assert _peak({"peak_device_bytes": 2_000_000}) == "2.0"


def test_the_cli_turns_xla_preallocation_off(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`klotski` sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless the user set it: a device
    budget is then what the process holds on a GPU."""
    from klotski_jax import cli

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    capsys.readouterr()


def test_pinned_host_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """`pinned_host=True` on a device without pinned_host memory keeps the host cache in
    ordinary host memory and says so; auto never asks for it on a CPU."""
    import logging

    from klotski_jax.engine import use_pinned_host

    class Memory:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    class NoPinned:
        platform = "gpu"

        def addressable_memories(self) -> list[Memory]:
            return [Memory("device"), Memory("unpinned_host")]

        def __str__(self) -> str:
            return "cuda:0"

    with caplog.at_level(logging.WARNING, logger="klotski_jax.engine"):
        assert use_pinned_host(Policy(pinned_host=True), NoPinned()) is False
    assert "has no pinned_host memory" in caplog.text and "ordinary host memory" in caplog.text
    assert use_pinned_host(Policy(pinned_host=None), NoPinned()) is False
    assert use_pinned_host(Policy(pinned_host=None), jax.devices("cpu")[0]) is False
    assert use_pinned_host(Policy(pinned_host=False), NoPinned()) is False
