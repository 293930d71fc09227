"""`klotski bench`: throughput of the schedules (and HF accelerate) side by side."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from klotski_jax.bench.options import PRESETS, QUANTIZED, SCHEDULES  # no JAX import
from klotski_jax.cli.options import budget_options, compute_options, io_options, positive_int


# ---- options ----------------------------------------------------------------------------------
def _schedule_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SCHEDULES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                         f"{', '.join(SCHEDULES)}; got {text!r}")
    return names


def _quant_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names or any(n not in QUANTIZED for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                         f"{', '.join(QUANTIZED)}; got {text!r}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(positive_int(s.strip()) for s in text.split(",") if s.strip()) or (
        positive_int(""),)


def _cmd(args: argparse.Namespace) -> int:
    import shlex

    from klotski_jax.bench.options import SAMPLE_REPETITION_PENALTY, BenchOptions
    from klotski_jax.bench.runner import run_bench

    if not args.verbose:  # one "placement" info line per run would bury the table
        logging.getLogger("klotski_jax.engine").setLevel(logging.WARNING)
    names = {f.name for f in dataclasses.fields(BenchOptions)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["command"] = shlex.join(["klotski", *args.argv])
    out = run_bench(BenchOptions(**values))
    print(out["workload"] + "\n")
    print(out["table"])
    sample = out["sample"]
    if isinstance(sample, str):
        print(sample)
    elif sample:
        print(f"sample (klotski schedule, greedy, repetition penalty {SAMPLE_REPETITION_PENALTY}):")
        for prompt, text in sample:
            print(f"> {prompt}\n  ...{text!r}")
    if out["files"]:
        print(f"wrote {', '.join(out['files'])}")
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser(
        "bench", parents=[budget_options(), io_options(), compute_options()],
        help="throughput of the schedules (and HF accelerate) side by side",
        description="Run the schedules on the same prompts and budgets, alternating, with "
                    "repeats after a warm-up; print a Markdown table, write JSON lines, a plot "
                    "and a trace. See docs/benchmarks.md.")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None,
                   help="checkpoint written by `klotski convert` (default: the embedded default "
                        "model, built on first use)")
    p.add_argument("--schedules", type=_schedule_list, default=SCHEDULES, metavar="LIST",
                   help=f"comma-separated, any of {','.join(SCHEDULES)} (default: all; "
                        "hf-accelerate is skipped without torch)")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="workload defaults: paper (512/32, 32 prompts) or cpu (32/8, 8 prompts); "
                        "auto: cpu when JAX has no accelerator")
    p.add_argument("--prompt-len", type=positive_int, metavar="N", help="synthetic prompt tokens")
    p.add_argument("--gen-len", type=positive_int, metavar="N", help="new tokens per prompt")
    p.add_argument("--num-prompts", type=positive_int, metavar="N")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="sequences per group")
    p.add_argument("--groups", type=positive_int, metavar="N",
                   help="batch groups n (default: the engine's default)")
    p.add_argument("--prompts", metavar="FILE",
                   help="JSON Lines prompts like `generate --input` (default: seeded random ids)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--cold-disk", action="store_true",
                   help="evict the checkpoint from the page cache before each run")
    p.add_argument("--profile", action="store_true",
                   help="profile the model on this device first (cached, see `klotski profile`), "
                        "so klotski runs with the planner's n, batch size and K")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed runs (default: 2)")
    p.add_argument("--ablation", action="store_true",
                   help="add the paper's ladder: simple, +multi-batch, +hot-only, +reorder")
    p.add_argument("--quantized", type=_quant_list, metavar="LIST",
                   help="also run klotski on quantized stores of the model, e.g. int4 or "
                        "int8,int4, under the same budgets in bytes (converted from the "
                        "checkpoint's HF source into CKPT-int4 etc. on first use)")
    p.add_argument("--sweep-groups", type=_int_list, metavar="LIST",
                   help="e.g. 1,2,4,8: one configuration per n, each n x --batch-size prompts")
    p.add_argument("--devices", type=_int_list, metavar="LIST",
                   help="e.g. 1,2,4: run every engine schedule once per device count (expert "
                        "parallelism over that many local devices, --device-budget on each; "
                        "hf-accelerate runs once); rows add the bytes moved to each device and "
                        "the planner's predicted throughput on that count. On a CPU, "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices "
                        "(sharing the CPU's cores). Default: the engine's default device count")
    p.add_argument("--hf-dir", metavar="DIR",
                   help="HF checkpoint for hf-accelerate (default: the manifest's source)")
    p.add_argument("--json", metavar="FILE", help="one JSON line per (schedule, configuration)")
    p.add_argument("--markdown", metavar="FILE",
                   help="the table with the date, machine and command (a results file)")
    p.add_argument("--plot", metavar="FILE.png", help="throughput and a decode-step timeline")
    p.add_argument("--trace", metavar="FILE",
                   help="Chrome trace of the (untimed) warm-up klotski run")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="print N generated text samples (klotski, first budgets) at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines")
    p.set_defaults(func=_cmd)
