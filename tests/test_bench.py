"""`klotski bench`: the runner's logic without timing assertions.

Pure parts (metrics and lower-bound arithmetic, repeat aggregation, run order, configurations,
prompts, accelerate's max_memory, the table, the plot) are tested directly; one end-to-end run
per path goes through the CLI on a tiny converted Mixtral (3 layers, 4 experts, float32): the
JSON schema, the files, the skip of hf-accelerate without torch, budgets below a minimum.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import pytest
from cli_helpers import run_cli

from klotski_jax.bench import bounds, metrics, options, report
from klotski_jax.bench import hf as bench_hf
from klotski_jax.bench.runner import machine_info
from klotski_jax.planning.policy import PolicyError
from klotski_jax.runtime.trace import Tracer

TINY_ARGS = ["--prompt-len", "8", "--gen-len", "3", "--num-prompts", "2", "--repeats", "1",
             "--device-budget", "90%", "-q"]
ROW_KEYS = (*options.FIELDS, "total_s", "prefill_s", "decode_s", "generated_tokens", "groups",
            "batch_size", "prompt_len", "gen_len", "num_prompts", "device_budget_bytes",
            "host_budget_bytes", "cold_disk", "io_mode", "repeats", "preset", "machine", "date",
            "command", "lower_bound", "bandwidths", "skipped", "same_tokens_as_resident")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from hf_models import save_hf_model

    import klotski_jax

    root = tmp_path_factory.mktemp("tiny")
    save_hf_model("mixtral", root / "hf")
    return klotski_jax.convert(root / "hf", root / "ckpt", progress=False)




def read_rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bench_guaranteed_agreement(ckpt: pathlib.Path, row: dict) -> float:
    """The share of new tokens on which two schedules of a bench row's configuration must agree
    by the exactness contract (tests/contract.py): the reference's greedy tokens before each
    prompt's first near-tie. The row's synthetic prompts are rebuilt from its seed."""
    import contract
    import numpy as np

    import klotski_jax

    model = klotski_jax.load(ckpt)
    cfg = model.config
    special = {cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_ids} - {None}
    ids = np.asarray(options.synthetic_prompts(row["num_prompts"], row["prompt_len"],
                                             cfg.vocab_size, sorted(special), row["seed"]), np.int32)
    tol = contract.tolerance(cfg.dtype)
    ref = contract.reference_greedy(model, ids, np.ones_like(ids), row["gen_len"], tol)
    return contract.guaranteed_agreement(ref.logits, tol)


# ---- metrics ----------------------------------------------------------------------------------
def test_run_metrics_arithmetic() -> None:
    stats = {"prefill_s": 0.5, "decode_s": 1.5, "generated_tokens": 40, "prompt_tokens": 64,
             "io_wait_s": 0.5}
    m = metrics.run_metrics(stats, sequences=4)
    assert m["total_s"] == 2.0
    assert m["throughput_tokens_per_s"] == 20.0  # generated / (prefill + decode)
    assert m["prefill_tokens_per_s"] == 128.0  # prompt tokens / prefill
    assert m["decode_tokens_per_s"] == 24.0  # (40 - 4 first tokens) / decode
    assert m["io_wait_fraction"] == 0.25
    zero = metrics.run_metrics({**stats, "prefill_s": 0.0, "decode_s": 0.0}, 4)
    assert zero["throughput_tokens_per_s"] == 0.0 and zero["io_wait_fraction"] == 0.0


def bound_inputs(**kw: object) -> bounds.BoundInputs:
    base = dict(steps=4, dense_bytes=100, expert_bytes=1000, activated_fraction=0.5,
                device_room=None, host_room=None, cold_disk=False, direct_io=False,
                disk_cold_bps=100.0, disk_warm_bps=1000.0, h2d_bps=50.0, compute_prefill_s=0.25,
                compute_decode_s=0.75)
    return bounds.BoundInputs(**{**base, **kw})


def test_lower_bound_phases_do_not_overlap() -> None:
    """A disk-bound prefill and a compute-bound decode add up: the decode's compute cannot hide
    the first reads its prefill waited for."""
    b = bounds.lower_bound(bound_inputs(device_room=0, host_room=None, cold_disk=True,
                                       h2d_bps=1e9, compute_prefill_s=1.0, compute_decode_s=3.0))
    assert b["lower_bound_prefill_s"] == pytest.approx(500 / 100)  # the first read of 500 bytes
    assert b["lower_bound_decode_s"] == pytest.approx(3.0)
    assert b["lower_bound_s"] == pytest.approx(8.0)  # not max(5, 4)


def test_lower_bound_unlimited_is_compute() -> None:
    b = bounds.lower_bound(bound_inputs())
    assert b["lower_bound_io_s"] == 0.0 and b["min_bytes_to_device"] == 0
    assert b["lower_bound_s"] == b["lower_bound_compute_s"] == 1.0


def test_lower_bound_device_and_disk_terms() -> None:
    # Activated per step: 100 dense + 500 experts; 200 stay on the device -> 400 move per step.
    # Experts beyond device and host room (500 - 200 - 100 = 200) are read again at every step
    # after the first; the first read of the 300 not on the device is cold with --cold-disk.
    # Prefill: max(disk 3 s, device 8 s); decode: 3 steps of max(disk 0.2 s, device 8 s).
    b = bounds.lower_bound(bound_inputs(device_room=200, host_room=100, cold_disk=True))
    assert b["min_bytes_to_device"] == 4 * 400
    assert b["lower_bound_h2d_s"] == pytest.approx(1600 / 50)
    assert b["min_bytes_read_disk"] == 300 + 3 * 200
    assert b["lower_bound_disk_s"] == pytest.approx(300 / 100 + 600 / 1000)
    assert b["lower_bound_io_s"] == pytest.approx(32.0)
    assert b["lower_bound_s"] == pytest.approx(32.0)  # I/O-bound: above the compute time
    assert (b["lower_bound_prefill_s"], b["lower_bound_decode_s"]) == pytest.approx((8.0, 24.0))
    warm = bounds.lower_bound(bound_inputs(device_room=200, host_room=100))
    assert warm["lower_bound_disk_s"] == pytest.approx(900 / 1000)  # page cache throughout
    direct = bounds.lower_bound(bound_inputs(device_room=200, host_room=100, direct_io=True))
    assert direct["lower_bound_disk_s"] == pytest.approx(900 / 100)  # O_DIRECT: every read cold


def test_aggregate_medians_and_spread() -> None:
    runs = [{"throughput_tokens_per_s": t, "bytes_read_disk": b, "schedule": "x", "ok": True}
            for t, b in ((10.0, 100), (30.0, 300), (20.0, 201))]
    row = metrics.aggregate(runs)
    assert row["throughput_tokens_per_s"] == 20.0
    assert row["bytes_read_disk"] == 201 and isinstance(row["bytes_read_disk"], int)
    assert row["throughput_per_repeat"] == [10.0, 30.0, 20.0]
    assert (row["throughput_min"], row["throughput_max"]) == (10.0, 30.0)
    assert "schedule" not in row and "ok" not in row  # only numbers are aggregated


# ---- plan -------------------------------------------------------------------------------------
def test_run_order_alternates_and_rotates() -> None:
    order = options.run_order(2, ["a", "b", "c"], repeats=3)
    assert order[:3] == [(0, "a", -1), (0, "b", -1), (0, "c", -1)]  # warm-ups first
    timed = [label for c, label, r in order if c == 0 and r >= 0]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [x for x in order if x[0] == 1][:3] == [(1, "a", -1), (1, "b", -1), (1, "c", -1)]
    assert len(order) == 2 * 3 * (1 + 3)


def test_variants_ablation_ladder() -> None:
    labels = [v.label for v in options.variants(["flexgen"], ablation=True)]
    assert labels == ["flexgen", "klotski simple", "klotski +multi-batch", "klotski +hot-only",
                      "klotski", "resident"]
    simple = options.variants(["klotski"], ablation=True)[1]
    assert dict(simple.overrides) == {"multi_batch": False, "hot_only_prefetch": False,
                                      "reorder": False}
    assert [v.label for v in options.variants(["klotski"], ablation=True)].count("klotski") == 1


def test_configurations_sweep_and_policy() -> None:
    opts = options.BenchOptions(ckpt="x", sweep_groups=(1, 2, 4), batch_size=3)
    configs = options.configurations(opts, options.PRESETS["cpu"], 1000, None)
    assert [(c.groups, c.batch_size, c.num_prompts) for c in configs] == [(1, 3, 3), (2, 3, 6),
                                                                         (4, 3, 12)]
    resident = options.Variant(options.RESIDENT, "klotski").policy(configs[0])
    assert resident.device_budget is None and resident.host_budget is None
    assert options.Variant("klotski", "klotski").policy(configs[1]).device_budget == 1000


def test_options_are_validated() -> None:
    with pytest.raises(PolicyError, match="--schedules"):
        options.BenchOptions(schedules=("klotski", "deepspeed"))
    with pytest.raises(PolicyError, match="repeats"):
        options.BenchOptions(repeats=0)


def test_synthetic_prompts_are_seeded_and_avoid_special_tokens() -> None:
    a = options.synthetic_prompts(5, 7, 10, [0, 1, 2], seed=3)
    assert a == options.synthetic_prompts(5, 7, 10, [0, 1, 2], seed=3)
    assert a[:2] == options.synthetic_prompts(2, 7, 10, [0, 1, 2], seed=3)  # prefixes agree
    assert all(len(p) == 7 and min(p) >= 3 and max(p) < 10 for p in a)


# ---- hf-accelerate helpers --------------------------------------------------------------------
def test_hf_max_memory_and_tiers() -> None:
    mm = bench_hf.max_memory
    assert mm(None, 500, device_ram=None, host_ram=9) is None  # CPU-only, no device budget
    assert mm(100, 500, device_ram=None, host_ram=9) == {"cpu": 100}  # the rest to disk
    assert mm(None, None, device_ram=70, host_ram=9) is None
    assert mm(100, None, device_ram=70, host_ram=9) == {0: 100, "cpu": 9}
    assert mm(None, 50, device_ram=70, host_ram=9) == {0: 70, "cpu": 50}
    dm = {"model.embed_tokens": "cpu", "model.layers.1": "disk", "model.layers.10": 0}
    assert bench_hf.tier_of("model.layers.1.mlp.experts", dm) == "disk"
    assert bench_hf.tier_of("model.layers.10.self_attn.q_proj", dm) == 0
    assert bench_hf.tier_of("lm_head", {"": "cpu"}) == "cpu"
    ids, mask = bench_hf.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_require_hf_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(bench_hf.HFUnavailable, match="needs torch and accelerate"):
        bench_hf.require_hf()


# ---- report -----------------------------------------------------------------------------------
def fake_rows() -> list[dict]:
    base = {"prompt_len": 8, "gen_len": 3, "num_prompts": 4, "groups_option": None,
            "batch_size_option": None, "device_budget_bytes": 10**6, "host_budget_bytes": None,
            "cold_disk": True, "io_mode": "buffered", "repeats": 2, "preset": "cpu"}
    done = {"groups": 2, "batch_size": 2, "prefill_tokens_per_s": 100.0,
            "decode_tokens_per_s": 10.0, "io_wait_s": 0.1, "io_wait_fraction": 0.05,
            "bytes_read_disk": 10**6, "bytes_to_device": 2 * 10**6, "peak_device_bytes": 9 * 10**5,
            "peak_host_bytes": None, "efficiency": 0.5, "skipped": None}
    plan = {"groups": 1, "batch_size": 4, "hot_experts": None, "prefetch": "threshold 0.5",
            "cost_source": "prior", "predicted_throughput_tokens_per_s": 16.0}
    return [{**base, **done, "schedule": s, "throughput_tokens_per_s": t, "throughput_min": t - 1,
             "throughput_max": t + 1, "plan": plan if s == "klotski" else None}
            for s, t in (("klotski", 20.0), ("lru", 10.0), ("resident", 40.0))] + [
        {**base, "schedule": "flexgen", "skipped": "device budget 1 bytes is below the minimum "
                                                   "5000000 bytes for the flexgen schedule"}]


def test_markdown_table() -> None:
    table = report.markdown_table(fake_rows())
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| schedule"))
    assert len(lines[header].split("|")) == len(lines[header + 2].split("|"))
    assert "| lru | 2 x 2 | 10.0 |" in table and table.count("0.50x") == 1  # lru vs klotski
    assert "skipped: device budget below its minimum of 5.0 MB" in table
    assert "cold disk" in table and "median of 2" in table
    assert ("- klotski: the planner (prior costs) chose 1 group(s) x 4, prefetch threshold 0.5; "
            "it predicted 16.0 tok/s, measured 20.0 (-20%)") in table


def fake_tracer() -> Tracer:
    tracer = Tracer()
    t0 = time.perf_counter()
    for k, step in enumerate(("prefill", "decode 1", "decode 2")):
        s = t0 + k
        tracer.add("compute", "attention", s, s + 0.1, step=step, layer=0)
        tracer.add("compute", "wait", s + 0.1, s + 0.3, step=step, layer=0)
        tracer.add("compute", "expert", s + 0.3, s + 0.5, step=step, layer=0, expert=1)
        tracer.add("io-0", "load expert", s + 0.05, s + 0.3, step=step, layer=0, expert=1)
    return tracer


def test_plot_file(tmp_path: pathlib.Path) -> None:
    from klotski_jax.bench.plot import decode_window, plot

    rows = fake_rows()
    swept = [{**r, "groups_option": n} for n in (1, 2) for r in rows]
    for name, data, tracer in (("one.png", rows, None), ("all.png", swept, fake_tracer())):
        path = plot(tmp_path / name, data, tracer)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    step, lo, hi = decode_window(fake_tracer().to_json()["traceEvents"])
    assert step == "decode 2" and hi - lo == pytest.approx(0.5e6, rel=1e-3)


# ---- end to end through the CLI ---------------------------------------------------------------
def test_cli_bench_end_to_end(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    files = {k: tmp_path / f"out.{k}" for k in ("jsonl", "png", "trace", "md")}
    rc, out, err = run_cli(["bench", str(tiny_ckpt), "--schedules", "klotski,flexgen,hf-accelerate",
                        "--cold-disk", "--json", str(files["jsonl"]), "--plot", str(files["png"]),
                        "--trace", str(files["trace"]), "--markdown", str(files["md"]),
                        *TINY_ARGS], capsys)
    assert rc == 0, err
    rows = read_rows(files["jsonl"])
    assert [r["schedule"] for r in rows] == ["klotski", "flexgen", "hf-accelerate", "resident"]
    for r in rows:
        assert r["skipped"] is None, r["skipped"]
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["generated_tokens"] == 2 * 3 and r["num_prompts"] == 2
        assert r["throughput_tokens_per_s"] > 0 and 0 <= r["io_wait_fraction"] <= 1
        assert r["efficiency"] is None or (r["efficiency"] > 0 and math.isfinite(r["efficiency"]))
        assert r["command"].startswith("klotski bench ") and r["machine"]["nproc"] >= 1
    klotski, hf = rows[0], rows[2]
    assert 0 < rows[3]["efficiency"] <= 1  # the resident row against its compute bound
    assert klotski["device_budget_bytes"] < klotski["weight_bytes"] and klotski["cold_disk"]
    # Both runs keep the exactness contract, so they agree wherever it pins the tokens.
    assert klotski["same_tokens_as_resident"] >= bench_guaranteed_agreement(tiny_ckpt, klotski)
    assert hf["bytes_to_device"] > 0 and hf["placement"]["device_map_tiers"]  # offloaded
    assert files["png"].stat().st_size > 10_000
    assert json.loads(files["trace"].read_text())["traceEvents"]
    assert "| klotski | " in out and "| resident (no budget: the bound) |" in out
    report = files["md"].read_text()
    assert "- command: `klotski bench " in report and "- machine: " in report
    assert "| hf-accelerate | 1 x 2 |" in report
    assert "cpu preset" in out or "tokens -> 3 new" in out


def test_cli_bench_without_torch_and_small_budget(
        tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    path = tmp_path / "rows.jsonl"
    rc, out, err = run_cli(["bench", str(tiny_ckpt), "--schedules", "sequential,hf-accelerate",
                        "--json", str(path), *TINY_ARGS[:-3], "--device-budget", "40%", "-q"],
                       capsys)
    assert rc == 0, err
    rows = {r["schedule"]: r for r in read_rows(path)}
    assert "needs torch and accelerate" in rows["hf-accelerate"]["skipped"]
    # 40% is below sequential's minimum (one whole layer of experts streams) even for a batch of 1
    assert "below the minimum" in rows["sequential"]["skipped"]
    for r in (rows["hf-accelerate"], rows["sequential"]):
        assert all(r[f] is None for f in options.FIELDS[1:])
    assert rows["resident"]["skipped"] is None
    assert "skipped: needs torch and accelerate" in out or "hf-accelerate | skipped" in out
    # At 50% a batch of 2 does not fit sequential's minimum, a batch of 1 does: two rounds of 1.
    path.unlink()
    rc, out, err = run_cli(["bench", str(tiny_ckpt), "--schedules", "sequential", "--json",
                            str(path), *TINY_ARGS[:-3], "--device-budget", "50%", "-q"], capsys)
    assert rc == 0, err
    seq = {r["schedule"]: r for r in read_rows(path)}["sequential"]
    assert seq["skipped"] is None and (seq["batch_size"], seq["rounds"]) == (1, 2)
    assert "| sequential | 1 x 1 (2 rounds) |" in out


def test_cli_bench_prompts_file(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [5, 6, 7]}\n\n{"prompt_token_ids": [8, 9]}\n')
    path = tmp_path / "rows.jsonl"
    rc, _, err = run_cli(["bench", str(tiny_ckpt), "--schedules", "lru", "--prompts", str(prompts),
                      "--gen-len", "2", "--repeats", "1", "--json", str(path), "-q"], capsys)
    assert rc == 0, err
    rows = read_rows(path)
    assert [(r["num_prompts"], r["prompt_len"], r["prompts_file"]) for r in rows] == [
        (2, 3, str(prompts))] * 2
    assert rows[0]["prompt_tokens"] == 5 and rows[0]["generated_tokens"] == 4
    prompts.write_text('{"prompt_token_ids": [5, 999]}\n')  # outside the vocabulary of 96
    rc, _, err = run_cli(["bench", str(tiny_ckpt), "--prompts", str(prompts), "-q"], capsys)
    assert rc == 2 and "prompts.jsonl:1" in err


def test_cli_bench_profile_first(tiny_ckpt: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from klotski_jax import engine_profile

    calls = []
    monkeypatch.setattr(engine_profile, "profile_checkpoint",
                        lambda ckpt: calls.append(ckpt) or (None, pathlib.Path("p.json"), True))
    rc, _, err = run_cli(["bench", str(tiny_ckpt), "--profile", "--schedules", "lru", "--repeats",
                      "1", "--gen-len", "2", "--num-prompts", "2", "--prompt-len", "4"], capsys)
    assert rc == 0, err
    assert calls == [tiny_ckpt] and "profile: measured p.json" in err


def test_cli_bench_user_errors(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["bench", str(tiny_ckpt), "--schedules", "klotski,deepspeed"], capsys)
    assert rc == 2 and "--schedules" in err
    rc, _, err = run_cli(["bench", str(tmp_path / "nope"), "-q"], capsys)
    assert rc == 2 and err.startswith("error:")
    rc, _, err = run_cli(["bench", str(tiny_ckpt), "--device-budget", "12 parsecs", "-q"], capsys)
    assert rc == 2 and "cannot parse size" in err


def test_machine_info() -> None:
    info = machine_info()
    assert info["nproc"] >= 1 and info["cpu"] and info["platform"] in ("cpu", "gpu", "tpu",
                                                                         "cuda", "rocm")
