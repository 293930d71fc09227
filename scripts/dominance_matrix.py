"""The dominance matrix: klotski against every baseline, on models and workloads nobody tuned on.

For each model, each workload and each cost source (the planner's roofline prior without a
profile, or a measured `--profile`), one `klotski bench` runs klotski, flexgen, lru, sequential
and hf-accelerate side by side at a 25% device budget with the page cache evicted before each
run (`--cold-disk`) and buffered reads, median of --repeats alternating repeats, with no
hand-set --groups / --batch-size: every schedule runs with the engine's own choices. Each cell
writes its JSON lines, Markdown table and plot; the summary checks the targets:

  - klotski >= every other schedule in throughput;
  - klotski >= 1.2x flexgen and >= 1.5x sequential where the run is I/O-bound (sequential waits
    on I/O for more than 30% of its time);
  - klotski's efficiency (lower bound / measured time) >= 0.7;
  - with a profile, the planner's predicted throughput within 20% of the measured one.

Workloads (prompts x prompt tokens -> new tokens): a 8 x 64 -> 16, b 32 x 64 -> 16,
c 8 x 16 -> 64 (decode-heavy), d 32 x 128 -> 8 (prefill-heavy).

    .venv/bin/python scripts/make_bench_model.py mid16 /tmp/kb/mid16-hf --convert /tmp/kb/mid16
    .venv/bin/python scripts/dominance_matrix.py --model mid16=/tmp/kb/mid16 \\
        --model cpu-mid=/tmp/kb/cpu-mid --out benchmarks/results/dominance-20261130
    .venv/bin/python scripts/dominance_matrix.py --summarize benchmarks/results/dominance-20261130

Cells already written in --out are skipped (rerun one by deleting its files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

WORKLOADS = {"a": (8, 64, 16), "b": (32, 64, 16), "c": (8, 16, 64), "d": (32, 128, 8)}
BASELINES = ("flexgen", "lru", "sequential", "hf-accelerate")
COST_SOURCES = ("prior", "profile")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="a converted checkpoint (repeat for several)")
    p.add_argument("--workloads", default="a,b,c,d", help="names from WORKLOADS, comma-separated")
    p.add_argument("--costs", default="prior,profile",
                   help="prior (no profile: the planner's roofline prior) and/or profile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device-budget", default="25%")
    p.add_argument("--out", type=pathlib.Path, help="folder for the cells and the summary")
    p.add_argument("--summarize", type=pathlib.Path, metavar="DIR",
                   help="only write the summary of the cells in DIR")
    return p.parse_args(argv)


def cell_name(model: str, workload: str, costs: str) -> str:
    return f"{model}-{workload}-{costs}"


def run_cell(out: pathlib.Path, model: str, ckpt: str, workload: str, costs: str,
             args: argparse.Namespace, profiles: pathlib.Path) -> None:
    """One `klotski bench` (in its own process) for (model, workload, cost source)."""
    name = cell_name(model, workload, costs)
    if (out / f"{name}.jsonl").exists():
        print(f"{name}: done already", flush=True)
        return
    n, prompt, gen = WORKLOADS[workload]
    cmd = [sys.executable, "-m", "klotski_jax.cli", "bench", ckpt,
           "--schedules", ",".join(("klotski", *BASELINES)), "--device-budget",
           args.device_budget, "--cold-disk", "--io-mode", "buffered", "--prompt-len",
           str(prompt), "--gen-len", str(gen), "--num-prompts", str(n), "--repeats",
           str(args.repeats), "--json", str(out / f"{name}.jsonl"), "--markdown",
           str(out / f"{name}.md"), "--plot", str(out / f"{name}.png"), "-q"]
    if costs == "profile":
        cmd.append("--profile")
    # The prior's cells see a profile folder with no profile of the model (only the machine
    # rates, measured by the first of them); the profile's cells share one that has it.
    env = {**os.environ, "KLOTSKI_JAX_PROFILES": str(profiles / costs / model)}
    print(f"{name}: {' '.join(cmd[2:])}", flush=True)
    started = datetime.datetime.now()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"{name}: FAILED (exit {proc.returncode}), see {name}.log", flush=True)
        return
    print(f"{name}: {(datetime.datetime.now() - started).seconds} s", flush=True)


# ---- the summary ----------------------------------------------------------------------------------
def load_cell(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["schedule"]: r for r in rows}


def verdict(rows: dict[str, dict[str, Any]], costs: str) -> dict[str, Any]:
    """The targets of one cell: what holds, and the numbers behind it."""
    k = rows["klotski"]
    tput = k["throughput_tokens_per_s"]
    others = {s: rows[s]["throughput_tokens_per_s"] for s in BASELINES
              if s in rows and not rows[s].get("skipped")}
    seq = rows.get("sequential", {})
    io_bound = bool(seq) and not seq.get("skipped") and seq["io_wait_fraction"] > 0.3
    planned = k.get("planned_throughput_tokens_per_s")
    error = planned / tput - 1 if planned and tput else None
    checks = {"dominates": all(tput >= t for t in others.values()),
              "efficiency": (k.get("efficiency") or 0) >= 0.7}
    if io_bound:
        checks["flexgen_1.2x"] = "flexgen" in others and tput >= 1.2 * others["flexgen"]
        checks["sequential_1.5x"] = tput >= 1.5 * others["sequential"]
    if costs == "profile":
        checks["planner_20%"] = error is not None and abs(error) <= 0.2
    return {"klotski": tput, "others": others, "io_bound": io_bound, "error": error,
            "checks": checks, "layout": f"{k['groups']} x {k['batch_size']}",
            "prefetch": (k.get("plan") or {}).get("prefetch"),
            "skipped": {s: rows[s]["skipped"] for s in BASELINES
                        if s in rows and rows[s].get("skipped")}}


def summary(out: pathlib.Path) -> str:
    cells = sorted(out.glob("*.jsonl"))
    lines = [f"# Dominance matrix ({out.name})", "",
             "klotski against every baseline at a 25% device budget, page cache evicted before "
             "each run, buffered reads; the engine's own layout (no --groups / --batch-size). "
             "Cells: `<model>-<workload>-<costs>.{jsonl,md,png}`; workloads a 8x64->16, "
             "b 32x64->16, c 8x16->64, d 32x128->8; costs: prior = no profile (the roofline "
             "prior), profile = `--profile`.", "",
             "| cell | klotski layout, prefetch | klotski tok/s | flexgen | lru | sequential | "
             "hf-accelerate | seq. I/O wait | efficiency | predicted (error) | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    misses: list[str] = []
    details: list[str] = []
    for path in cells:
        name = path.stem
        costs = name.rsplit("-", 1)[1]
        rows = load_cell(path)
        v = verdict(rows, costs)
        k = rows["klotski"]
        cols = []
        for s in BASELINES:
            r = rows.get(s)
            if r is None or r.get("skipped"):
                cols.append("skipped")
            else:
                t = r["throughput_tokens_per_s"]
                cols.append(f"{t:.1f} ({v['klotski'] / t:.2f}x)")
        seq = rows.get("sequential", {})
        seq_wait = "" if not seq or seq.get("skipped") else f"{seq['io_wait_fraction']:.0%}"
        err = "" if v["error"] is None else (
            f"{k['planned_throughput_tokens_per_s']:.1f} ({v['error']:+.0%})")
        failed = [c for c, ok in v["checks"].items() if not ok]
        misses += [f"{name}: {c}" for c in failed]
        details += [f"- {name}: {why}" for why in miss_details(rows, v)]
        lines.append(f"| {name} | {v['layout']}, {v['prefetch'] or ''} | {v['klotski']:.1f} | "
                     + " | ".join(cols) + f" | {seq_wait} | {k.get('efficiency') or 0:.2f} | "
                     f"{err} | {'all met' if not failed else 'missed: ' + ', '.join(failed)} |")
    missed = {m.split(":")[0] for m in misses}
    lines += ["", f"Targets met in {len(cells) - len(missed)} of {len(cells)} cells."
              + (" Misses: " + "; ".join(misses) + "." if misses else "")]
    if details:
        lines += ["", "The misses beside the run-to-run spread (median [min - max] over the "
                  "repeats):", "", *details]
    return "\n".join(lines) + "\n"


def spread(row: dict[str, Any]) -> str:
    """A schedule's median throughput with the lowest and highest of its repeats."""
    t = row["throughput_tokens_per_s"]
    lo, hi = row.get("throughput_min"), row.get("throughput_max")
    return f"{t:.1f}" + (f" [{lo:.1f} - {hi:.1f}]" if lo is not None and hi is not None else "")


def miss_details(rows: dict[str, dict[str, Any]], v: dict[str, Any]) -> list[str]:
    """One line per missed target with its numbers: for a baseline ahead of klotski, whether
    the two schedules' repeats overlap (a miss inside the noise) or not."""
    k, out = rows["klotski"], []
    if not v["checks"]["dominates"]:
        for s, t in v["others"].items():
            if t <= v["klotski"]:
                continue
            overlap = (k.get("throughput_max") or 0) >= (rows[s].get("throughput_min") or 1e30)
            out.append(f"{s} {spread(rows[s])} tok/s ahead of klotski {spread(k)} "
                       f"({t / v['klotski'] - 1:+.0%}; the repeats "
                       f"{'overlap' if overlap else 'do not overlap'})")
    if not v["checks"]["efficiency"]:
        out.append(f"klotski's efficiency {k.get('efficiency') or 0:.2f} < 0.7")
    for c in ("flexgen_1.2x", "sequential_1.5x"):
        if c in v["checks"] and not v["checks"][c]:
            base = c.split("_")[0]
            out.append(f"I/O-bound cell: klotski {v['klotski'] / v['others'][base]:.2f}x "
                       f"{base}, target {c.split('_')[1]}")
    if "planner_20%" in v["checks"] and not v["checks"]["planner_20%"]:
        out.append(f"planner predicted {k.get('planned_throughput_tokens_per_s') or 0:.1f} "
                   f"tok/s against {v['klotski']:.1f} measured ({v['error']:+.0%})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        text = summary(args.summarize)
        (args.summarize / "summary.md").write_text(text)
        print(text)
        return 0
    if not args.model or not args.out:
        print("error: --model NAME=CKPT (one or more) and --out DIR are needed", file=sys.stderr)
        return 2
    models = [m.split("=", 1) for m in args.model]
    args.out.mkdir(parents=True, exist_ok=True)
    profiles = args.out / "profiles"  # kept with the results: the costs the planner used
    for name, ckpt in models:
        for costs in args.costs.split(","):
            for w in args.workloads.split(","):
                run_cell(args.out, name, ckpt, w, costs, args, profiles)
    text = summary(args.out)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
