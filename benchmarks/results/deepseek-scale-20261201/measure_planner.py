"""Planner time at DeepSeek shapes under the roofline prior (made-up GPU-like machine rates):
`klotski plan`'s search for the paper workload (32 prompts x 512 -> 32) at 25% of the weights
on the device and 50% in host RAM.

Run from the repository root: PYTHONPATH=. .venv/bin/python
benchmarks/results/deepseek-scale-20261201/measure_planner.py v3-10   (or a bench preset name)
"""

from __future__ import annotations

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))

import make_bench_model as mbm  # noqa: E402

from klotski_jax.config import ModelConfig  # noqa: E402
from klotski_jax.models.specs import total_bytes  # noqa: E402
from klotski_jax.planning.planner import Planner, PlanRequest  # noqa: E402
from klotski_jax.planning.prior import MachineRates, prior_profile  # noqa: E402

RATES = MachineRates(device={"platform": "gpu", "kind": "made-up"}, dispatch_s=50e-6,
                     matmul_flops={"bfloat16": 300e12, "float32": 50e12}, memory_bps=3e12,
                     load_s=100e-6, h2d_bps=25e9, disk_cold_bps=2e9, disk_warm_bps=10e9,
                     routing_s=(50e-6, 1e-7), io_interference=0.0)


def main(which: str) -> None:
    if which.startswith("v3-"):  # DeepSeek-V3's own config.json with fewer layers
        hf = {**mbm.BASES["deepseek_v3"], "num_hidden_layers": int(which[3:])}
    else:
        hf = mbm.hf_config(which)
    cfg = ModelConfig.from_hf_config(hf)
    weights = total_bytes(cfg)
    planner = Planner(cfg, prior_profile(cfg, RATES))
    req = PlanRequest(prompt_len=512, gen_len=32, num_prompts=32,
                      device_budget=weights // 4, host_budget=weights // 2)
    t0 = time.perf_counter()
    plan = planner.plan(req)
    print(f"{which}: E={cfg.num_experts}, {cfg.num_layers} layers, {weights / 1e9:.1f} GB: "
          f"planned in {time.perf_counter() - t0:.2f} s: {plan.describe().splitlines()[0]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v3-10")
