"""klotski on bf16, int8 and int4 expert stores of one model, side by side (`klotski bench`).

Converts an HF checkpoint three times (`klotski convert --quantize none|int8|int4`, reused when
already there), then runs `klotski bench` with the same workload and options on each store, in
fresh processes, and merges the rows into one table with the ratios to bf16: disk bytes per run
and throughput. The engine makes its own choices (`--profile`: the planner's n, batch size and
prefetch rule for each store); nothing is tuned per store.

Budgets come in two forms, each a table:
  share  `--device-budget 25% --host-budget 50%` of each store's own weight bytes: the same
         offloading regime (the same share of experts streamed), so the ratios measure what
         fewer bytes per expert buy.
  fixed  the bf16 store's 25% / 50% in bytes for every store: one machine's memory, where a
         quantized store also fits more of itself.
and two disk tiers: `cold` (`--cold-disk --io-mode direct`: every expert read from the disk) and
`warm` (buffered reads from the page cache, where dequantization's compute shows).

Usage:
  .venv/bin/python scripts/bench_quant.py /tmp/cpu-mid-hf --work /tmp/kq \\
      --out benchmarks/results/quant-bench-YYYYMMDD
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

SCHEMES = ("none", "int8", "int4")
LABEL = {"none": "bf16", "int8": "int8", "int4": "int4 g64"}
TIERS = {"cold": ["--cold-disk", "--io-mode", "direct"], "warm": ["--io-mode", "buffered"]}


def klotski(*args: str) -> list[str]:
    return [sys.executable, "-m", "klotski_jax.cli", *args]


def convert(hf_dir: pathlib.Path, work: pathlib.Path, scheme: str) -> pathlib.Path:
    out = work / f"{hf_dir.name}-{scheme}"
    if not (out / "manifest.json").is_file():
        subprocess.run(klotski("convert", str(hf_dir), str(out), "--quantize", scheme, "-q"),
                       check=True)
    return out


def weight_bytes(ckpt: pathlib.Path) -> int:
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.models.specs import total_bytes

    return total_bytes(CheckpointReader(ckpt).config)


def bench(ckpt: pathlib.Path, tier: str, device: str, host: str, repeats: int,
          out: pathlib.Path) -> dict[str, Any]:
    """One `klotski bench` of the klotski schedule; its JSON row."""
    cmd = klotski("bench", str(ckpt), "--schedules", "klotski", "--profile", "--device-budget",
                  device, "--host-budget", host, *TIERS[tier], "--repeats", str(repeats),
                  "--json", str(out), "-q")
    print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    (row,) = [json.loads(x) for x in out.read_text().splitlines()
              if json.loads(x)["schedule"] == "klotski"]
    row["command"] = "klotski " + " ".join(cmd[3:])
    return row


def table(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["scheme"] == "none")
    lines = ["| store | expert MB | n x batch | tok/s | x bf16 | disk MB | x bf16 | I/O wait % "
             "| device budget MB | host budget MB |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {LABEL[r['scheme']]} | {r['expert_bytes'] / 1e6:.2f} | {r['groups']} x "
            f"{r['batch_size']} | {r['throughput_tokens_per_s']:.1f} | "
            f"{r['throughput_tokens_per_s'] / base['throughput_tokens_per_s']:.2f} | "
            f"{r['bytes_read_disk'] / 1e6:.0f} | "
            f"{r['bytes_read_disk'] / max(base['bytes_read_disk'], 1):.2f} | "
            f"{100 * r['io_wait_fraction']:.0f} | {r['device_budget_bytes'] / 1e6:.0f} | "
            f"{r['host_budget_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets on the cold, share-budget table."""
    by = {r["scheme"]: r for r in rows}
    b, i8, i4 = by["none"], by["int8"], by["int4"]
    disk = i4["bytes_read_disk"] / b["bytes_read_disk"]
    t4 = i4["throughput_tokens_per_s"] / b["throughput_tokens_per_s"]
    t8 = i8["throughput_tokens_per_s"] / b["throughput_tokens_per_s"]
    ok = lambda c: "PASS" if c else "FAIL"
    return [f"- int4 disk bytes <= 0.3x bf16's: {disk:.3f}x, {ok(disk <= 0.3)}",
            f"- int4 throughput >= 1.8x bf16's: {t4:.2f}x, {ok(t4 >= 1.8)}",
            f"- int8 throughput >= 1.4x bf16's: {t8:.2f}x, {ok(t8 >= 1.4)}"]


def report(results: dict[str, list[dict[str, Any]]], opts: argparse.Namespace,
           argv: Sequence[str] | None) -> None:
    """results.md from the rows (also `--report-only`, from an earlier run's rows.jsonl)."""
    now = datetime.datetime.now(datetime.UTC)
    first = results[next(iter(results))][0]
    md = [f"# klotski on bf16, int8 and int4 expert stores ({now:%Y-%m-%d %H:%M} UTC)", "",
          f"- model: {opts.hf_dir} ({first['model']})",
          "- machine: " + (", ".join(f"{k} {v}" for k, v in first["machine"].items()
                                     if k != "loadavg")
                           if first.get("machine") else f"{os.cpu_count()} CPUs"),
          f"- measured: {first.get('date', '?')}",
          f"- command: `python scripts/bench_quant.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}`",
          "- each row: `klotski bench --schedules klotski --profile` (the planner's choices for "
          "that store), median of the repeats; `x bf16` = ratio to the bf16 row of the table",
          ""]
    for key, rows in results.items():
        budget, tier = key.split("-")
        what = (f"{opts.device_share} device / {opts.host_share} host of each store's bytes"
                if budget == "share" else
                f"the bf16 store's {opts.device_share} / {opts.host_share} in bytes for every store")
        disk = ("cold disk, O_DIRECT: every expert read from the disk" if tier == "cold"
                else "page cache, buffered reads")
        md += [f"## {what}; {disk}", "", f"workload: {rows[0]['num_prompts']} prompts x "
               f"{rows[0]['prompt_len']} tokens -> {rows[0]['gen_len']} new", "", table(rows), ""]
        if tier == "cold":
            md += ["Targets (issue 12: cold disk, O_DIRECT, 25% device budget):", "",
                   *verdicts(rows), ""]
    (opts.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=pathlib.Path, help="HF checkpoint (e.g. make_bench_model.py "
                   "cpu-mid)")
    p.add_argument("--work", type=pathlib.Path, required=True, help="where the stores go")
    p.add_argument("--out", type=pathlib.Path, required=True, help="results directory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device-share", default="25%")
    p.add_argument("--host-share", default="50%")
    p.add_argument("--budgets", default="share,fixed", help="share, fixed or both")
    p.add_argument("--tiers", default="cold,warm", help="cold, warm or both")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md from OUT/rows.jsonl without running anything")
    opts = p.parse_args(argv)
    if opts.report_only:
        results: dict[str, list[dict[str, Any]]] = {}
        for line in (opts.out / "rows.jsonl").read_text().splitlines():
            row = json.loads(line)
            results.setdefault(row["table"], []).append(row)
        report(results, opts, argv)
        return 0
    opts.work.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    stores = {s: convert(opts.hf_dir, opts.work, s) for s in SCHEMES}
    sizes = {s: weight_bytes(c) for s, c in stores.items()}
    frac = lambda share: float(share.rstrip("%")) / 100
    results = {}
    for budget in opts.budgets.split(","):
        for tier in opts.tiers.split(","):
            rows = []
            for s in SCHEMES:
                if budget == "share":
                    dev, host = opts.device_share, opts.host_share
                else:
                    dev = str(int(frac(opts.device_share) * sizes["none"]))
                    host = str(int(frac(opts.host_share) * sizes["none"]))
                row = bench(stores[s], tier, dev, host, opts.repeats,
                            opts.work / f"row-{budget}-{tier}-{s}.jsonl")
                from klotski_jax.checkpoints.store import CheckpointReader

                row["scheme"] = s
                row["expert_bytes"] = CheckpointReader(stores[s]).config.expert_bytes
                row["store_weight_bytes"] = sizes[s]
                rows.append(row)
            results[f"{budget}-{tier}"] = rows
    with open(opts.out / "rows.jsonl", "w") as f:
        for key, rows in results.items():
            for r in rows:
                f.write(json.dumps({"table": key, **r}) + "\n")
    report(results, opts, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
