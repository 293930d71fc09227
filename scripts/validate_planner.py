"""Check the planner against measurements on the demo model: predicted vs measured throughput.

For each configuration (device budget, host budget, batch size b) the planner chooses n (and the
prefetch rule) with b fixed; then every feasible n in 1..--max-groups is run with
`Engine.generate` on n x b seeded random prompts (one untimed warm-up run, then --repeats timed
runs, median throughput = generated tokens / (prefill + decode) seconds) and predicted with the
same prefetch rule. The table says how far each prediction is off and whether the planner's n is
within 10% of the best measured n.

    .venv/bin/python scripts/validate_planner.py [--ckpt DIR] [--repeats 3] [--max-groups 6]

Writes benchmarks/results/validate_planner-<date>.{md,json} (date, machine, command, rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    device_budget: str  # SIZE, e.g. "25%"
    batch_size: int
    host_budget: str | None = None


CONFIGS = (
    Config("A", "25%", 4),
    Config("B", "50%", 8),
    Config("C", "25%", 2, host_budget="60%"),
    Config("D", "none", 4),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="converted checkpoint (default: the embedded default model)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--max-groups", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default="A,B,C,D", help="names from CONFIGS, comma-separated")
    p.add_argument("--refresh-profile", action="store_true", help="measure the profile again")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def measure(ckpt: pathlib.Path, policies: dict[int, Any], prompts: dict[int, list[list[int]]],
            gen_len: int, repeats: int) -> dict[int, dict[str, Any]]:
    """Per n: median throughput of `repeats` runs after one warm-up run (compiles excluded).
    Repeats are interleaved over n, so a change of the machine's load hits every n alike."""
    from klotski_jax.engine import Engine

    engines = {n: Engine(ckpt, pol) for n, pol in policies.items()}
    for n, engine in engines.items():
        engine.generate(prompts[n], max_new_tokens=gen_len, stop_at_eos=False)
    runs: dict[int, list[Any]] = {n: [] for n in engines}
    for _ in range(repeats):
        for n, engine in engines.items():
            runs[n].append(engine.generate(prompts[n], max_new_tokens=gen_len,
                                           stop_at_eos=False).stats)
    out = {}
    for n, rs in runs.items():
        tput = [r.throughput_tokens_per_s for r in rs]
        med = rs[int(np.argsort(tput)[len(tput) // 2])]
        out[n] = {"throughput": statistics.median(tput), "runs": tput,
                  "prefill_s": med.prefill_s, "decode_step_s": med.decode_s / max(1, gen_len - 1),
                  "io_wait_s": med.io_wait_s, "compute_s": med.compute_s,
                  "expert_loads": med.expert_loads}
    return out


def run_config(cfg: Config, ckpt: pathlib.Path, args: argparse.Namespace, planner: Any,
               weight_bytes: int) -> dict[str, Any]:
    """Plan with b fixed, then predict and measure every feasible n of one configuration."""
    from klotski_jax.generate_io import resolve_size
    from klotski_jax.planning.planner import PlanRequest
    from klotski_jax.planning.policy import Policy

    dev = resolve_size(cfg.device_budget, weight_bytes=weight_bytes)
    host = resolve_size(cfg.host_budget, weight_bytes=weight_bytes)
    req = PlanRequest(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=cfg.batch_size,
                      device_budget=dev, host_budget=host, max_groups=args.max_groups,
                      disk_tier="page_cache", reread_tier="page_cache")
    plan = planner.plan(req)
    rng = np.random.default_rng(0)
    vocab = planner.cfg.vocab_size
    preds = {n: p for n in range(1, args.max_groups + 1)
             if (p := planner.evaluate(req, n, cfg.batch_size, plan.prefetch)) is not None}
    prompts = {n: [rng.integers(4, vocab, args.prompt_len).tolist()
                   for _ in range(n * cfg.batch_size)] for n in preds}
    policies = {n: Policy(groups=n, batch_size=cfg.batch_size, hot_experts=plan.hot_experts,
                          prefetch_threshold=plan.prefetch_threshold, device_budget=dev,
                          host_budget=host) for n in preds}
    load = os.getloadavg()[0]
    got = measure(ckpt, policies, prompts, args.gen_len, args.repeats)
    rows = []
    for n, pred in preds.items():
        m = got[n]
        rows.append({"n": n, "predicted": pred.predicted_throughput_tokens_per_s,
                     "predicted_prefill_s": pred.predicted_prefill_s,
                     "predicted_decode_step_s": pred.predicted_decode_step_s,
                     "predicted_bubble_fraction": pred.predicted_bubble_fraction, **m,
                     "error": pred.predicted_throughput_tokens_per_s / m["throughput"] - 1})
        print(f"  {cfg.name} n={n}: predicted {rows[-1]['predicted']:.1f}, measured "
              f"{m['throughput']:.1f} tok/s ({rows[-1]['error']:+.0%}; runs "
              f"{min(m['runs']):.1f}-{max(m['runs']):.1f})", flush=True)
    best = max(rows, key=lambda r: r["throughput"])
    chosen = next(r for r in rows if r["n"] == plan.groups)
    return {"config": dataclasses.asdict(cfg), "device_budget_bytes": dev,
            "host_budget_bytes": host, "plan": plan.to_dict(), "rows": rows,
            "planner_n": plan.groups, "best_n": best["n"],
            "planner_vs_best": chosen["throughput"] / best["throughput"],
            "load_average": [load, os.getloadavg()[0]]}


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": str(d.device_kind),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "jax": jax.__version__}


def markdown(doc: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    lines = [f"# Planner validation, {doc['date']}", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ",
             f"Checkpoint: {doc['checkpoint']} ({doc['model']}); prompt {doc['prompt_len']} tokens, "
             f"{doc['gen_len']} new; profile {doc['profile']}; routing statistics: "
             f"{doc['routing_statistics']}; {doc['repeats']} timed runs per point", "",
             "| config | device / host budget | b | n | prefetch | predicted tok/s | measured tok/s "
             "(min-max) | error | planner's n | best n |",
             "|---|---|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for c in doc["configs"]:
        cf = c["config"]
        for r in c["rows"]:
            lines.append(
                f"| {cf['name']} | {cf['device_budget']} / {cf['host_budget'] or 'none'} "
                f"| {cf['batch_size']} | {r['n']} | {c['plan']['prefetch']} "
                f"| {r['predicted']:.1f} | {r['throughput']:.1f} ({min(r['runs']):.0f}-"
                f"{max(r['runs']):.0f}) | {r['error']:+.0%} "
                f"| {'**yes**' if r['n'] == c['planner_n'] else ''} "
                f"| {'**yes**' if r['n'] == c['best_n'] else ''} |")
    lines += ["", "| config | planner's n | binding | limited by | measured at planner's n / best "
                  "measured | load average (start, end) |", "|---|---:|---|---|---:|---|"]
    for c in doc["configs"]:
        lo, hi = c["load_average"]
        lines.append(f"| {c['config']['name']} | {c['planner_n']} | "
                     f"{c['plan']['binding_constraint']} | {c['plan']['limited_by']} | "
                     f"{c['planner_vs_best']:.0%} | {lo:.1f}, {hi:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from klotski_jax.checkpoints.default_model import default_checkpoint
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.engine_profile import profile_checkpoint
    from klotski_jax.models.specs import total_bytes
    from klotski_jax.planning.planner import Planner
    from klotski_jax.planning.prefetcher import CorrelationTable

    ckpt = pathlib.Path(args.ckpt) if args.ckpt else default_checkpoint()
    cfg = CheckpointReader(ckpt).config
    profile, path, measured = profile_checkpoint(ckpt, refresh=args.refresh_profile)
    print(f"profile {path} ({'measured now' if measured else 'cached'})", flush=True)
    table = CorrelationTable.load(ckpt)  # the engine predicts with it, the planner counts on it
    planner = Planner(cfg, profile, table.routing_probs() if table else None)
    wanted = set(args.configs.split(","))
    results = [run_config(c, ckpt, args, planner, total_bytes(cfg))
               for c in CONFIGS if c.name in wanted]
    now = datetime.datetime.now()
    doc = {"date": now.isoformat(timespec="seconds"), "machine": machine(),
           "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
           "checkpoint": str(ckpt), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
           "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                     "experts": cfg.num_experts, "top_k": cfg.top_k,
                     "weight_bytes": total_bytes(cfg)},
           "repeats": args.repeats, "profile": f"{path.name} ({profile.meta.get('created')})",
           "routing_statistics": "prefetch table" if table else "uniform top-k",
           "configs": results}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"validate_planner-{now:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
