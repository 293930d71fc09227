"""`klotski profile`, `klotski plan`, `klotski calibrate` and the engine's use of their outputs,
on a tiny converted Mixtral (3 layers, 4 experts, no tokenizer: token-id prompts).

Profiles are tiny (--quick --repeats 1) and go to a folder of this module
(KLOTSKI_JAX_PROFILES), never to the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil

import contract
import numpy as np
import pytest
from cli_helpers import run_cli

import klotski_jax
from klotski_jax import cli
from klotski_jax.engine import Engine
from klotski_jax.planning.costs import Profile
from klotski_jax.planning.policy import Policy
from klotski_jax.planning.prefetcher import META_FILE, TABLE_FILE, CorrelationPrefetcher

NEW = 4
PLAN_FIELDS = ("groups", "batch_size", "hot_experts", "placement", "predicted_prefill_s",
               "predicted_decode_step_s", "predicted_throughput_tokens_per_s",
               "predicted_bubble_fraction", "binding_constraint", "limited_by", "inequalities")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("planner-cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLOTSKI_JAX_PROFILES", str(root / "profiles"))
        from hf_models import save_hf_model

        save_hf_model("mixtral", root / "hf")
        ckpt = klotski_jax.convert(root / "hf", root / "ckpt", progress=False)
        yield ckpt, root




@pytest.fixture(scope="module")
def profiled(env) -> pathlib.Path:
    """`klotski profile --quick --repeats 1 --out FILE`: the profile file."""
    ckpt, root = env
    out = root / "profile.json"
    assert cli.main(["profile", str(ckpt), "--quick", "--repeats", "1", "--out", str(out)]) == 0
    return out


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 96, int(rng.integers(3, 9))).tolist() for _ in range(n)]


def test_profile_measures_caches_and_reuses(env, profiled, capsys):
    ckpt, root = env
    prof = Profile.from_json(profiled.read_text())
    assert prof.device["platform"] == "cpu" and prof.model_key
    assert prof.attention_decode and prof.expert and prof.expert_host_s > 0
    assert prof.expert_disk_cold_s > 0 and prof.dense_load and prof.bandwidth["disk_to_host_Bps"]
    assert 0.0 <= prof.io_interference <= 1.0 and "calibration" in prof.meta
    cached = list((root / "profiles").glob("*.json"))
    assert len(cached) == 1 and Profile.from_json(cached[0].read_text()) == prof
    rc, out, _ = run_cli(["profile", str(ckpt)], capsys)
    assert rc == 0 and "cached (--refresh measures again)" in out


def test_plan_json_and_infeasible_budget(env, profiled, capsys):
    ckpt, _ = env
    base = ["plan", str(ckpt), "--profile", str(profiled), "--prompt-len", "8", "--gen-len", "4"]
    rc, out, err = run_cli(base + ["--device-budget", "none", "--json", "--prompts", "6"], capsys)
    assert rc == 0, err
    plan = json.loads(out)
    assert all(k in plan for k in PLAN_FIELDS)
    assert plan["groups"] * plan["batch_size"] <= 6 * 2 and plan["predicted_throughput_tokens_per_s"] > 0
    assert set(plan["inequalities"]) == {"(4)", "(5)", "(6)", "(7)"}
    rc, out, err = run_cli(base + ["--device-budget", "1000"], capsys)
    assert rc == 2 and "below the minimum" in err and "of every layout" in err
    smallest = int(re.search(r"minimum (\d+) bytes", err).group(1))
    rc, out, err = run_cli(base + ["--device-budget", str(smallest)], capsys)
    assert rc == 0 and "plan: n = 1 group(s)" in out, err
    rc, _, err = run_cli(base + ["--device-budget", str(smallest - 1)], capsys)
    assert rc == 2
    rc, out, _ = run_cli(base + ["--device-budget", "none", "--batch-size", "3", "--groups", "2"],
                     capsys)
    assert rc == 0 and "n = 2 group(s) x batch 3" in out and "n limited by: fixed" in out
    # --devices: a plan for 4 devices (more than this process has: a prediction) at the
    # one-device minimum, where each device holds a quarter of the experts, predicts more
    rc, out, err = run_cli(base + ["--device-budget", str(smallest), "--json"], capsys)
    one = json.loads(out)
    rc, out, err = run_cli(base + ["--device-budget", str(smallest), "--devices", "4", "--json"],
                           capsys)
    assert rc == 0, err
    four = json.loads(out)
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["predicted_throughput_tokens_per_s"] > one["predicted_throughput_tokens_per_s"]


def test_generate_uses_the_planner_and_gives_the_reference_tokens(env, profiled, capsys):
    ckpt, root = env
    ps = prompts(5)
    model = klotski_jax.load(ckpt)
    s = max(map(len, ps))
    ids = np.zeros((len(ps), s), np.int32)
    mask = np.zeros_like(ids)
    for r, p in enumerate(ps):
        ids[r, s - len(p):], mask[r, s - len(p):] = p, 1
    ref = contract.reference_greedy(model, ids, mask, NEW)
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in ps))
    stats = root / "stats.json"
    rc, out, err = run_cli(["generate", str(ckpt), "--input", str(src), "--max-new-tokens", str(NEW),
                        "--device-budget", "50%", "--stats", str(stats)], capsys)
    assert rc == 0, err
    contract.assert_greedy_matches([json.loads(line) for line in out.splitlines()], ref.tokens,
                                   ref.logits, contract.tolerance(model.config.dtype),
                                   eos=model.config.eos_token_ids, what="the planner's layout")
    doc = json.loads(stats.read_text())
    assert doc["plan"] and (doc["groups"], doc["batch_size"]) == (doc["plan"]["groups"],
                                                                  doc["plan"]["batch_size"])
    assert "planner (profile costs): " in err and doc["policy"]["groups"] is None
    assert doc["plan"]["cost_source"] == "profile"
    # Without a profile the planner still chooses, from the roofline prior over machine rates.
    engine = Engine(ckpt, Policy())
    (root / "profiles").rename(root / "profiles-away")
    try:
        lay = engine.layout(5, 8, NEW)
        assert lay.plan is not None and lay.plan.cost_source == "prior"
        assert (lay.groups, lay.batch) == (lay.plan.groups, lay.plan.batch_size)
        assert lay.policy == lay.plan.policy(engine.policy)
        assert (root / "profiles" / "machines").is_dir()  # the rates, cached per device
    finally:
        shutil.rmtree(root / "profiles")
        (root / "profiles-away").rename(root / "profiles")


def test_calibrate_then_a_run_predicts_without_writing_back(env, capsys):
    ckpt, root = env
    src = root / "calib.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts(6, 9)))
    rc, out, err = run_cli(["calibrate", str(ckpt), "--input", str(src), "--max-new-tokens", "3"],
                       capsys)
    assert rc == 0, err
    assert "path length 1" in out and (ckpt / TABLE_FILE).exists()
    meta = json.loads((ckpt / META_FILE).read_text())
    assert meta["prompts"] == 6 and meta["path_length"] == 1
    digest = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in (TABLE_FILE,
                                                                                META_FILE)}
    engine = Engine(ckpt, Policy(groups=2, batch_size=2, device_budget=None))
    assert isinstance(engine._predictor_factory(engine.config), CorrelationPrefetcher)
    gen = engine.generate(prompts(4, 11), max_new_tokens=NEW, stop_at_eos=False)
    st = gen.stats
    assert st.hot_sets > 0 and st.hot_precision is not None and 0 <= st.hot_set_accuracy <= 1
    assert {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest()
            for n in (TABLE_FILE, META_FILE)} == digest
    rc, _, err = run_cli(["calibrate", str(ckpt), "--input", str(root / "missing.jsonl")], capsys)
    assert rc == 2 and "error:" in err
    rc, _, err = run_cli(["calibrate", str(ckpt), "--input", str(src), "--path-length", "0"], capsys)
    assert rc == 2 and "path-length" in err
    (ckpt / TABLE_FILE).unlink()  # later tests of this module see a checkpoint without a table
    (ckpt / META_FILE).unlink()
