"""Expert parallelism on several devices (a 1-D mesh of simulated CPU devices).

Every schedule on 2, 4 and 8 devices gives the single-device reference's tokens under the
exactness contract (tests/contract.py), at the smallest per-device budget its placement accepts,
with every device's ledger peak within that budget (`verify_memory` also checks each device's
live arrays), each routed expert computed on the device that owns it, I/O lanes per device in
the trace, and nothing compiled after the warm-up. JAX fixes its device count when it starts:
the runs happen in one child process (tests/mesh_runs.py) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import contract
import numpy as np
import pytest
from hf_models import save_hf_model

import klotski_jax
from klotski_jax.engine import prompt_bucket
from klotski_jax.planning.placement import Workload, expert_owners, place
from klotski_jax.planning.policy import Policy, PolicyError

TESTS = pathlib.Path(__file__).resolve().parent
NEW = 5
LENGTHS = (7, 11, 5, 9, 6)
RUNS = [  # (family, schedule, devices): the fast suite's runs, in one child process
    *[("qwen3_moe", s, 2) for s in ("klotski", "flexgen", "lru", "sequential")],
]  # 4 devices: the two-process job below; 4 and 8 with the slow runs
SLOW_RUNS = [  # more of the matrix, with the slow tests (another child: about a minute cold)
    ("qwen3_moe", "klotski", 4), ("qwen3_moe", "klotski", 8), ("qwen3_moe", "lru", 4),
    ("qwen3_moe", "flexgen", 8),
    ("qwen3_moe", "sequential", 4),
    ("deepseek_v3", "klotski", 2),  # latent attention, shared experts, a dense layer
    ("deepseek_v3", "lru", 4),
]
FAMILIES = ("deepseek_v3", "qwen3_moe")


def forced_devices_env(n: int) -> dict[str, str]:
    """The environment of a child process with n simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_in_child(runs: list[tuple[str, str, int]], models: dict, root: pathlib.Path
                 ) -> dict[tuple[str, str, int], dict]:
    """Each run at the smallest per-device budget, in one child with 8 simulated devices."""
    specs = [{"ckpt": models[f][0], "prompts": models[f][1], "new": NEW, "schedule": s,
              "devices": d, "budget": "min", "batch_size": 3, "trace": s == "klotski"}
             for f, s, d in runs]
    (root / "spec.json").write_text(json.dumps(specs))
    subprocess.run([sys.executable, str(TESTS / "mesh_runs.py"), str(root / "spec.json"),
                    str(root / "out.json")], check=True, env=forced_devices_env(8), timeout=900)
    records = json.loads((root / "out.json").read_text())
    return {tuple(r): rec for r, rec in zip(runs, records)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: its checkpoint, prompts, the reference's greedy run, tolerance and config."""
    root = tmp_path_factory.mktemp("mesh-models")
    out = {}
    for family in FAMILIES:
        _, hf = save_hf_model(family, root / family / "hf")
        ckpt = klotski_jax.convert(hf, root / family / "ckpt", progress=False)
        model = klotski_jax.load(ckpt)
        rng = np.random.default_rng(7)
        prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in LENGTHS]
        ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
        mask = np.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, ids.shape[1] - len(p):] = p
            mask[r, ids.shape[1] - len(p):] = 1
        tol = contract.tolerance(model.config.dtype)
        out[family] = (str(ckpt), prompts, contract.reference_greedy(model, ids, mask, NEW, tol),
                       tol, model.config)
    return out


@pytest.fixture(scope="module")
def mesh(models, tmp_path_factory):
    """The records of every run of RUNS (one child), and the models."""
    return run_in_child(RUNS, models, tmp_path_factory.mktemp("mesh")), models


def check_run(run: tuple[str, str, int], rec: dict, models: dict) -> None:
    """One run's record against the reference and its per-device budget."""
    _, _, want, tol, cfg = models[run[0]]
    family, schedule, devices = run
    contract.assert_greedy_matches(rec["tokens"], want.tokens, want.logits, tol,
                                   what=f"{schedule} on {devices} devices")
    assert rec["devices"] == devices and rec["placement"]["devices"] == devices
    assert len(rec["peaks"]) == devices and max(rec["peaks"]) == rec["peak"]
    assert all(0 < p <= rec["budget"] for p in rec["peaks"]), (rec["peaks"], rec["budget"])
    assert len(rec["bytes_per_device"]) == devices and all(b > 0 for b in rec["bytes_per_device"])
    assert rec["compiled_after_warm_up"] == []
    if rec["spec"]["trace"]:
        # one compute lane; expert loads on each device's own lanes; experts on every device
        assert "compute" in rec["lanes"]
        io_devices = {int(m.group(1)) for lane in rec["lanes"]
                      if (m := re.fullmatch(r"io-(?:host-)?d(\d+)(?:-\d+)?", lane))}
        assert io_devices == set(range(devices)), rec["lanes"]
        if cfg.num_experts >= devices:
            assert rec["expert_devices"] == list(range(devices))


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}dev")
def test_every_schedule_on_several_devices_keeps_the_contract_and_budgets(mesh, run):
    records, models = mesh
    check_run(run, records[run], models)


@pytest.mark.slow
def test_more_schedules_families_and_device_counts(models, tmp_path):
    records = run_in_child(SLOW_RUNS, models, tmp_path)
    for run in SLOW_RUNS:
        check_run(run, records[run], models)


def test_several_devices_need_less_budget_each_for_whole_layer_schedules(models):
    """flexgen and sequential hold a whole MoE layer: on 2 devices each holds half of it."""
    cfg = models["qwen3_moe"][4]
    work = Workload(2, 3, 16, 16)
    for schedule in ("flexgen", "sequential"):
        one = place(cfg, Policy(schedule=schedule, devices=1), work).min_device_bytes
        two = place(cfg, Policy(schedule=schedule, devices=2), work).min_device_bytes
        per_layer = cfg.num_experts * cfg.expert_bytes
        assert one - two == (per_layer - -(-cfg.num_experts // 2) * cfg.expert_bytes) * (
            2 if schedule == "flexgen" else 1)


def test_expert_owners_balance_count_and_load(models):
    cfg = models["deepseek_v3"][4]
    owners = expert_owners(cfg, 3)
    for layer in cfg.moe_layer_ids:
        counts = np.bincount(owners[layer], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert all(owners[i] == () for i in range(cfg.num_layers) if i not in cfg.moe_layer_ids)
    # skewed load: the two hottest experts land on different devices, and the loads balance
    e = cfg.num_experts
    load = [[0.5, 0.4] + [0.01] * (e - 2) for _ in cfg.moe_layer_ids]
    owners = expert_owners(cfg, 2, load)
    layer = cfg.moe_layer_ids[0]
    assert owners[layer][0] != owners[layer][1]
    totals = [sum(p for p, o in zip(load[0], owners[layer]) if o == d) for d in range(2)]
    assert abs(totals[0] - totals[1]) < 0.15


def test_resident_experts_are_per_device(models):
    """With room for resident experts, each device keeps only experts it owns, and no more
    than its budget holds."""
    cfg = models["qwen3_moe"][4]
    work = Workload(2, 3, 16, 16)
    pol = Policy(devices=2)
    lo = place(cfg, pol, work)
    pl = place(cfg, pol.replace(device_budget=lo.min_device_bytes + 40 * cfg.expert_bytes), work)
    per = [sum(pl.owner(i, e) == d for i, e in pl.device_experts) for d in range(2)]
    assert sum(per) == len(pl.device_experts) and min(per) > 0
    assert abs(per[0] - per[1]) <= 1


def test_asking_for_more_devices_than_there_are_is_a_clear_error(models):
    with pytest.raises(PolicyError, match=r"devices=64 but this process has \d+ local cpu"):
        klotski_jax.Engine(models["qwen3_moe"][0], Policy(devices=64))
    with pytest.raises(PolicyError, match="devices must be"):
        Policy(devices=0)


def test_cli_generate_on_two_devices_reports_per_device_peaks(mesh, tmp_path):
    """`klotski generate --devices 2 --stats` (a child with 8 simulated devices): the reference's
    tokens, and the stats list each device's peak beside the overall one; asking for more
    devices than there are is a one-line error with exit status 2."""
    records, models = mesh
    ckpt, prompts, want, tol, _ = models["qwen3_moe"]
    budget = records[("qwen3_moe", "klotski", 2)]["budget"]  # the smallest for this layout
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "klotski_jax.cli", "generate", ckpt, "--input", str(src),
           "--output", str(out), "--stats", str(stats), "--max-new-tokens", str(NEW),
           "--devices", "2", "--device-budget", str(budget), "--groups", "2", "--batch-size", "3"]
    run = subprocess.run(cmd, env=forced_devices_env(8), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "on 2 devices" in run.stderr
    rows = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    contract.assert_greedy_matches(rows, want.tokens, want.logits, tol, what="--devices 2")
    s = json.loads(stats.read_text())
    assert len(s["peak_device_bytes_per_device"]) == 2
    assert s["peak_device_bytes"] == max(s["peak_device_bytes_per_device"])
    assert all(p <= s["device_budget_bytes"] for p in s["peak_device_bytes_per_device"])
    assert s["placement"]["devices"] == 2 and s["policy"]["devices"] == 2
    bad = subprocess.run(cmd[:-6] + ["--devices", "9"], env=forced_devices_env(8),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "error: devices=9 but this process has 8 local cpu device(s)" in bad.stderr
    assert "Traceback" not in bad.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_run_one_mesh(mesh, tmp_path):
    """A multi-host job on one machine: two `klotski generate --distributed` processes with two
    simulated devices each (CPU collectives over gloo) form one 4-device mesh, stream at the
    smallest per-device budget, give the reference's tokens, and only process 0 writes files."""
    records, models = mesh
    ckpt, prompts, want, tol, _ = models["qwen3_moe"]
    s_len = prompt_bucket(max(LENGTHS))
    cache = -(-(s_len + NEW) // 32) * 32  # as the engine sizes its caches
    budget = place(models["qwen3_moe"][4], Policy(groups=2, batch_size=3, devices=4),
                   Workload(2, 3, s_len, cache - s_len)).min_device_bytes  # the smallest
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    port = free_port()
    procs = []
    for pid in range(2):
        env = forced_devices_env(2) | {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                       "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        out = tmp_path / f"out{pid}"
        out.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "klotski_jax.cli", "generate", ckpt, "--input", str(src),
             "--output", str(out / "out.jsonl"), "--stats", str(out / "stats.json"),
             "--max-new-tokens", str(NEW), "--device-budget", str(budget), "--groups", "2",
             "--batch-size", "3", "--distributed"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert not (tmp_path / "out1" / "out.jsonl").exists()  # process 0 writes the outputs
    rows = [json.loads(line)["token_ids"]
            for line in (tmp_path / "out0" / "out.jsonl").read_text().splitlines()]
    contract.assert_greedy_matches(rows, want.tokens, want.logits, tol, what="2 hosts x 2")
    s = json.loads((tmp_path / "out0" / "stats.json").read_text())
    assert s["placement"]["devices"] == 4
    peaks = s["peak_device_bytes_per_device"]  # process 0's devices; the others' are 0
    assert len(peaks) == 4 and all(0 < p <= budget for p in peaks[:2]) and peaks[2:] == [0, 0]
    assert all(b > 0 for b in s["bytes_to_device_per_device"][:2])
