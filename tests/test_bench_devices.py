"""`klotski bench --devices`: one row per engine schedule and device count, with the bytes each
device received, each device's ledger peak and the planner's prediction for that count.

The row plan, the table and the error for too many devices are tested directly; one end-to-end
run goes through the CLI in a child process with 4 simulated CPU devices (JAX fixes its device
count when it starts). No timing assertions.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from cli_helpers import run_cli
from test_bench import TINY_ARGS, read_rows

from klotski_jax.bench import options, report
from klotski_jax.planning.policy import PolicyError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_variants_per_device_count() -> None:
    rows = options.variants(["klotski", "lru", "hf-accelerate"], ablation=False, devices=(1, 2))
    assert [(v.label, v.devices) for v in rows] == [
        ("klotski @1dev", 1), ("klotski @2dev", 2), ("lru @1dev", 1), ("lru @2dev", 2),
        ("hf-accelerate", None), ("resident", 1)]
    cfg = options.configurations(options.BenchOptions(), options.PRESETS["cpu"], None, None)[0]
    assert rows[1].policy(cfg).devices == 2 and rows[5].policy(cfg).devices == 1
    assert [v.devices for v in options.variants(["klotski"], ablation=False)] == [None, None]
    for bad in ((0,), (2, 2)):
        with pytest.raises(PolicyError, match="--devices"):
            options.BenchOptions(devices=bad)


def test_devices_table() -> None:
    base = {"prompt_len": 8, "gen_len": 3, "num_prompts": 2, "groups_option": None,
            "batch_size_option": None, "device_budget_bytes": 10**6, "host_budget_bytes": None,
            "preset": "cpu", "cold_disk": False, "io_mode": "buffered", "repeats": 1,
            "groups": 1, "batch_size": 2, "prefill_tokens_per_s": 1.0,
            "decode_tokens_per_s": 1.0, "io_wait_s": 0.0, "io_wait_fraction": 0.0,
            "bytes_read_disk": 0, "bytes_to_device": 0, "peak_device_bytes": 0,
            "peak_host_bytes": 0, "efficiency": None, "skipped": None,
            "devices_option": [1, 2]}
    rows = [{**base, "schedule": "klotski @1dev", "devices": 1, "throughput_tokens_per_s": 10.0,
             "predicted_throughput_tokens_per_s": 12.0, "bytes_to_device_per_device": [3e6],
             "peak_device_bytes_per_device": [1e6]},
            {**base, "schedule": "klotski @2dev", "devices": 2, "throughput_tokens_per_s": 9.0,
             "predicted_throughput_tokens_per_s": 21.0,
             "bytes_to_device_per_device": [2e6, 1.5e6],
             "peak_device_bytes_per_device": [1e6, 0.9e6]}]
    table = report.markdown_table(rows)
    assert "| klotski @2dev | 2 | 9.0 | 0.90x | 21.0 | 1.75x | 2.0 / 1.5 | 1.0 / 0.9 |" in table
    assert "| klotski @2dev | 1 x 2 | 9.0 |" in table and "0.90x |" in table  # vs klotski @1dev


def test_more_devices_than_the_process_has_is_a_user_error(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["bench", str(tmp_path / "never-read"), "--devices", "1,64", "-q"],
                         capsys)
    assert rc == 2 and "--devices 1,64" in err
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=64" in err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from hf_models import save_hf_model

    import klotski_jax

    root = tmp_path_factory.mktemp("tiny-devices")
    save_hf_model("mixtral", root / "hf")
    return klotski_jax.convert(root / "hf", root / "ckpt", progress=False)


def test_cli_bench_rows_per_device_count(tiny_ckpt: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """klotski on 1 and 2 of 4 simulated devices: a row each, with its device count, the bytes
    moved to and the peak of each device, and the planner's prediction for that count."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=4").strip())
    jsonl, md = tmp_path / "rows.jsonl", tmp_path / "rows.md"
    proc = subprocess.run(
        [sys.executable, "-m", "klotski_jax.cli", "bench", str(tiny_ckpt), "--schedules",
         "klotski", "--devices", "1,2", "--json", str(jsonl), "--markdown", str(md), *TINY_ARGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["schedule"]: r for r in read_rows(jsonl)}
    assert list(rows) == ["klotski @1dev", "klotski @2dev", "resident"]
    for label, d in (("klotski @1dev", 1), ("klotski @2dev", 2)):
        r = rows[label]
        assert r["skipped"] is None and r["devices"] == d and r["devices_option"] == [1, 2]
        assert len(r["bytes_to_device_per_device"]) == d
        assert sum(r["bytes_to_device_per_device"]) == r["bytes_to_device"]
        assert all(b > 0 for b in r["bytes_to_device_per_device"])
        assert len(r["peak_device_bytes_per_device"]) == d
        assert max(r["peak_device_bytes_per_device"]) <= r["device_budget_bytes"]
        assert r["predicted_throughput_tokens_per_s"] > 0
        assert r["plan"]["devices"] == d and r["placement"]["devices"] == d
    assert rows["resident"]["devices"] == 1
    text = md.read_text()
    assert "Per device count" in text and "| klotski @2dev | 2 |" in text
