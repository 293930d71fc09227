"""The planner's predicted scaling of a checkpoint over device counts (expert parallelism).

For each device count the planner plans the workload as if the run spanned that many devices,
each with the device budget, its own host-to-device link and its own expert compute
(klotski_jax/planning/scaling.py), over one of two cost sources:

  measured   this machine's cached profile of the model (`klotski profile`; else the roofline
             prior over this machine's rates), i.e. devices each as fast as this one;
  pcie-gpu   the roofline prior (klotski_jax/planning/prior.py) over ASSUMED rates of a GPU on
             its own PCIe 4.0 x16 link (ACCELERATOR below: not measured here).

    .venv/bin/python scripts/predict_scaling.py CKPT [--devices 1,2,4,8] [--rates measured]
        [--device-budget 25%] [--prompt-len 32 --gen-len 8 --num-prompts 8] [--markdown FILE]

Prints a Markdown table (and writes it with --markdown): per count the plan, the predicted
prefill and decode step, throughput and speed-up over the first count.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klotski_jax.config import ModelConfig  # noqa: E402
from klotski_jax.planning.costs import Profile  # noqa: E402
from klotski_jax.planning.planner import PlanRequest  # noqa: E402
from klotski_jax.planning.policy import Policy, parse_size  # noqa: E402
from klotski_jax.planning.prior import MachineRates, prior_profile  # noqa: E402
from klotski_jax.planning.scaling import predicted_scaling  # noqa: E402

# Assumed, not measured: a datacenter GPU on its own PCIe 4.0 x16 link (pinned host copies at
# 25 GB/s), bf16 matmuls at 400 TFLOP/s, HBM at 2.5 TB/s, 15 us per jitted call, 30 us per I/O
# hand-off, an NVMe disk at 3 GB/s (10 GB/s from the page cache), no CPU contention between the
# I/O threads and the compute thread. The all-reduce runs at the host link's 25 GB/s (no
# NVLink assumed).
ACCELERATOR = MachineRates(
    device={"platform": "gpu", "device_kind": "assumed PCIe 4.0 x16 GPU (not measured)"},
    dispatch_s=15e-6, matmul_flops={"bfloat16": 400e12, "float32": 50e12}, memory_bps=2.5e12,
    load_s=30e-6, h2d_bps=25e9, disk_cold_bps=3e9, disk_warm_bps=10e9, routing_s=(50e-6, 1e-8),
    io_interference=0.0)


def profile_of(cfg: ModelConfig, rates: str) -> tuple[Profile, str]:
    """The costs to plan with and a line saying where they come from."""
    if rates == "pcie-gpu":
        return prior_profile(cfg, ACCELERATOR), "roofline prior over ASSUMED PCIe-GPU rates"
    from klotski_jax import profiler

    prof = profiler.load_cached(cfg)
    if prof is not None:
        return prof, f"this machine's measured profile ({profiler.cache_path(cfg)})"
    machine, _ = profiler.machine_rates()
    return prior_profile(cfg, machine), "roofline prior over this machine's measured rates"


def table(entries: list[dict], source: str, budget: int | None, req: PlanRequest) -> str:
    ms = lambda s: "" if s is None else f"{s * 1e3:,.1f}"
    budget_text = "unlimited" if budget is None else f"{budget / 1e6:,.1f} MB"
    lines = [f"Predicted by the planner from {source}; device budget {budget_text} on each "
             f"device; {req.num_prompts} prompts x {req.prompt_len} tokens -> {req.gen_len} new.",
             "", "| devices | plan | predicted prefill ms | predicted decode step ms | "
             "predicted tok/s | speed-up |", "|---:|---|---:|---:|---:|---:|"]
    for e in entries:
        if e["error"]:
            lines.append(f"| {e['devices']} | no plan: {e['error'][:80]} | | | | |")
            continue
        lines.append(f"| {e['devices']} | {e['groups']} x {e['batch_size']}, {e['prefetch']}, "
                     f"{e['expert_slots']} slots, {e['device_resident_experts']} resident "
                     f"experts per device | {ms(e['predicted_prefill_s'])} | "
                     f"{ms(e['predicted_decode_step_s'])} | "
                     f"{e['predicted_throughput_tokens_per_s']:,.1f} | {e['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--devices", default="1,2,4,8", help="device counts (default: 1,2,4,8)")
    p.add_argument("--rates", choices=("measured", "pcie-gpu"), default="measured")
    p.add_argument("--device-budget", default="25%", help="per device: bytes, units or a share "
                                                          "of the weights, or none")
    p.add_argument("--host-budget", default="none")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--disk-tier", choices=("disk", "page_cache"), default="page_cache",
                   help="what a first read of an expert costs (page_cache: buffered reads of "
                        "files already in RAM, as `klotski bench` without --cold-disk)")
    p.add_argument("--markdown", help="write the table here too")
    p.add_argument("--json", help="write the entries as JSON here")
    args = p.parse_args(argv)

    from klotski_jax.models.specs import total_bytes

    manifest = json.loads((pathlib.Path(args.ckpt) / "manifest.json").read_text())
    cfg = ModelConfig.from_dict(manifest["config"])
    size = lambda text: None if text == "none" else parse_size(text, total=total_bytes(cfg))
    req = PlanRequest(prompt_len=args.prompt_len, gen_len=args.gen_len,
                      num_prompts=args.num_prompts, device_budget=size(args.device_budget),
                      host_budget=size(args.host_budget), disk_tier=args.disk_tier)
    prof, source = profile_of(cfg, args.rates)
    counts = [int(x) for x in args.devices.split(",") if x.strip()]
    entries = predicted_scaling(cfg, prof, None, Policy(), req, counts)
    text = table(entries, source, req.device_budget, req)
    print(text)
    command = shlex.join(["scripts/predict_scaling.py", *(argv or sys.argv[1:])])
    if args.markdown:
        pathlib.Path(args.markdown).write_text(f"- command: `{command}`\n\n{text}\n")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"command": command, "source": source, "entries": entries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
