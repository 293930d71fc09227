"""The Markdown table and report of `klotski bench` rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from klotski_jax.bench.options import RESIDENT


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f}"


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per configuration; the last column compares each throughput with klotski's."""
    out: list[str] = []
    configs: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["prompt_len"], r["gen_len"], r["num_prompts"], r["groups_option"],
               r["batch_size_option"], r["device_budget_bytes"], r["host_budget_bytes"])
        configs.setdefault(key, []).append(r)
    for group in configs.values():
        r0 = group[0]
        # the klotski row (with --devices: klotski on the first device count)
        klotski = next((r["throughput_tokens_per_s"] for r in group
                        if r["schedule"] in ("klotski", _first_klotski(group))
                        and r["throughput_tokens_per_s"]), None)
        budget = lambda b: "unlimited" if b is None else f"{b / 1e6:,.1f} MB"
        n = f", n = {r0['groups_option']}" if r0["groups_option"] is not None else ""
        out += [f"**{r0['num_prompts']} prompts x {r0['prompt_len']} tokens -> {r0['gen_len']} "
                f"new{n}** ({r0['preset']} preset), device budget {budget(r0['device_budget_bytes'])}"
                f", host budget {budget(r0['host_budget_bytes'])}"
                f"{', cold disk' if r0['cold_disk'] else ''}, io {r0['io_mode']}, median of "
                f"{r0['repeats']}", "",
                "| schedule | n x batch | tok/s | prefill tok/s | decode tok/s | I/O wait s (%) | "
                "disk MB | to device MB | peak device MB | peak host MB | efficiency | vs klotski |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            out.append(_table_line(r, klotski))
        out += [""] + [_plan_line(r) for r in group if r.get("plan")]
        out.append("")
        if any(r.get("devices_option") for r in group):
            out += [devices_table(group), ""]
    return "\n".join(out)


def _first_klotski(group: Sequence[Mapping[str, Any]]) -> str | None:
    """The label of klotski on the first device count of --devices ("klotski @1dev")."""
    counts = next((r["devices_option"] for r in group if r.get("devices_option")), None)
    return f"klotski @{counts[0]}dev" if counts else None


def _per_device(values: Sequence[int] | None) -> str:
    return "" if not values else " / ".join(_mb(v) for v in values)


def devices_table(group: Sequence[Mapping[str, Any]]) -> str:
    """The rows of --devices side by side: per engine schedule and device count, the measured
    throughput and the planner's prediction (klotski; each also as a multiple of that schedule's
    first device count), and the MB moved to and the ledger peak of each device."""
    first: dict[str, float] = {}
    pred_first: dict[str, float] = {}
    lines = ["Per device count (expert parallelism; `devices`: local devices of the run, "
             "`--device-budget` on each; predicted: the planner's klotski prediction for that "
             "many devices, each with its own link and compute):", "",
             "| schedule | devices | tok/s | measured vs first | predicted tok/s | "
             "predicted vs first | to device MB per device | peak device MB per device |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in group:
        if r.get("devices") is None or r.get("skipped"):
            continue
        key = r["schedule"].split(" @")[0]
        tput, pred = r["throughput_tokens_per_s"], r.get("predicted_throughput_tokens_per_s")
        first.setdefault(key, tput)
        if pred:
            pred_first.setdefault(key, pred)
        vs = lambda x, ref: f"{x / ref:.2f}x" if x and ref else ""
        lines.append(f"| {r['schedule']} | {r['devices']} | {tput:.1f} | {vs(tput, first[key])} | "
                     f"{_f(pred)} | {vs(pred, pred_first.get(key))} | "
                     f"{_per_device(r.get('bytes_to_device_per_device'))} | "
                     f"{_per_device(r.get('peak_device_bytes_per_device'))} |")
    return "\n".join(lines)


def _plan_line(r: Mapping[str, Any]) -> str:
    p = r["plan"]
    return (f"- {r['schedule']}: the planner ({p.get('cost_source', 'profile')} costs) chose "
            f"{p['groups']} group(s) x {p['batch_size']}, prefetch {p['prefetch']}; it predicted "
            f"{p['predicted_throughput_tokens_per_s']:.1f} tok/s, measured "
            f"{r['throughput_tokens_per_s']:.1f} "
            f"({p['predicted_throughput_tokens_per_s'] / r['throughput_tokens_per_s'] - 1:+.0%})")


def short_reason(reason: str) -> str:
    """A skip reason short enough for a table cell (the JSON line has it whole)."""
    import re

    m = re.search(r"(device|host) budget \d+ bytes is below the minimum (\d+) bytes", reason)
    if m:
        return f"{m.group(1)} budget below its minimum of {int(m.group(2)) / 1e6:,.1f} MB"
    return reason if len(reason) <= 80 else reason[:77] + "..."


def _peak(r: Mapping[str, Any]) -> str:
    """The ledger's device peak, and XLA's own (process-wide) where the backend reports it."""
    xla = r.get("device_peak_bytes_in_use")
    return _mb(r["peak_device_bytes"]) + ("" if xla is None else f" (XLA {_mb(xla)})")


def _table_line(r: Mapping[str, Any], klotski: float | None) -> str:
    name = r["schedule"] + (" (no budget: the bound)" if r["schedule"] == RESIDENT else "")
    if r.get("skipped"):
        return f"| {name} | skipped: {short_reason(r['skipped'])} |" + " |" * 10
    tput = r["throughput_tokens_per_s"]
    vs = f"{tput / klotski:.2f}x" if klotski else ""
    rounds = f" ({r['rounds']} rounds)" if r.get("rounds", 1) > 1 else ""
    return (f"| {name} | {r['groups']} x {r['batch_size']}{rounds} | {tput:.1f} | "
            f"{_f(r['prefill_tokens_per_s'])} | {_f(r['decode_tokens_per_s'])} | "
            f"{r['io_wait_s']:.2f} ({r['io_wait_fraction']:.0%}) | {_mb(r['bytes_read_disk'])} | "
            f"{_mb(r['bytes_to_device'])} | {_peak(r)} | "
            f"{_mb(r['peak_host_bytes'])} | {_f(r['efficiency'], '.2f')} | {vs} |")


def markdown_report(rows: Sequence[Mapping[str, Any]], workload: str) -> str:
    """A results file: date, machine, command, workload, bandwidths, then the tables."""
    r0 = rows[0]
    m, bw = r0["machine"], next((r["bandwidths"] for r in rows if r.get("bandwidths")), None)
    libs = ", ".join(f"{k} {m[k]}" for k in ("jax", "torch", "transformers", "accelerate")
                     if m.get(k))
    lines = [f"# klotski bench: {r0['model']} ({r0['date']})", "",
             f"- command: `{r0['command']}`",
             f"- checkpoint: `{r0['checkpoint']}` ({r0['weight_bytes'] / 1e6:,.1f} MB of weights)",
             f"- machine: {m['nproc']} x {m['cpu']}, {m['device']}; load average "
             f"{' / '.join(map(str, m['loadavg']))} (1 / 5 / 15 min, at the end); {libs}, "
             f"Python {m['python']}",
             f"- {workload}"]
    if bw:
        lines.append(f"- bandwidths ({bw['source']}): disk {bw['disk_cold_bps'] / 1e9:.2f} GB/s "
                     f"with the page cache evicted, {bw['disk_warm_bps'] / 1e9:.2f} GB/s from it; "
                     f"host -> device {bw['h2d_bps'] / 1e9:,.1f} GB/s")
    lines += ["- tok/s = generated tokens / (prefill + decode) s, the paper's metric; prefill "
              "tok/s = prompt tokens / prefill s; efficiency = lower bound / measured time", "",
              markdown_table(rows)]
    return "\n".join(lines)
