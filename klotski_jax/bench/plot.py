"""`klotski bench --plot FILE.png`: throughput by schedule, throughput against n (when swept),
and the timeline of one decode step of a traced klotski run, showing where compute waited.

matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

COLORS = {"attention": "#4C72B0", "router": "#8172B2", "expert": "#55A868", "experts": "#55A868",
          "combine": "#64B5CD", "dense mlp": "#937860", "wait": "#C44E52", "load expert": "#DD8452",
          "load dense": "#CCB974"}


def plot(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], tracer: Any = None
         ) -> pathlib.Path:
    """Write the figure to `path` (PNG) and return the path."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    swept = len({r["groups_option"] for r in rows}) > 1
    trace = tracer.to_json() if tracer is not None else None
    panels = 1 + swept + (trace is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.8 * panels), squeeze=False)
    axes = list(axes[:, 0])
    by_schedule(axes.pop(0), rows)
    if swept:
        against_n(axes.pop(0), rows)
    if trace is not None:
        timeline(axes.pop(0), trace)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def by_schedule(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bars of the first configuration's throughputs, with the repeats' spread."""
    first = rows[0]["groups_option"], rows[0]["num_prompts"]
    done = [r for r in rows if (r["groups_option"], r["num_prompts"]) == first
            and not r.get("skipped")]
    names = [r["schedule"] for r in done]
    tput = [r["throughput_tokens_per_s"] for r in done]
    err = [[t - r["throughput_min"] for t, r in zip(tput, done)],
           [r["throughput_max"] - t for t, r in zip(tput, done)]]
    colors = ["#BBBBBB" if n == "resident" else "#C44E52" if n == "hf-accelerate"
              else "#4C72B0" if n.startswith("klotski") else "#55A868" for n in names]
    ax.bar(range(len(done)), tput, yerr=err, color=colors, capsize=3)
    ax.set_xticks(range(len(done)), names, rotation=20, ha="right")
    for i, (t, r) in enumerate(zip(tput, done)):
        ax.text(i, max(t, r["throughput_max"]), f"{t:.1f}", ha="center", va="bottom", fontsize=8)
    r0 = rows[0]
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"throughput by schedule: {r0['num_prompts']} x {r0['prompt_len']} -> "
                 f"{r0['gen_len']} tokens, device budget {_size(r0['device_budget_bytes'])} "
                 f"(resident: no budget)")


def against_n(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Throughput of each schedule against the number of groups n."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if not r.get("skipped") and r["groups_option"] is not None:
            series.setdefault(r["schedule"], []).append(
                (r["groups_option"], r["throughput_tokens_per_s"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle=":" if name == "resident" else "-")
    ns = sorted({n for pts in series.values() for n, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("batch groups n (each of the same batch size)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("throughput against n")
    ax.legend(fontsize=8)


def decode_window(events: Sequence[Mapping[str, Any]]) -> tuple[str, float, float] | None:
    """(step name, start us, end us) of the middle decode step's compute events."""
    steps: dict[str, list[float]] = {}
    for e in events:
        step = e.get("args", {}).get("step", "")
        if e.get("ph") == "X" and step.startswith("decode") and e["name"] != "wait":
            lo_hi = steps.setdefault(step, [float("inf"), float("-inf")])
            lo_hi[0] = min(lo_hi[0], e["ts"])
            lo_hi[1] = max(lo_hi[1], e["ts"] + e["dur"])
    if not steps:
        return None
    name = sorted(steps, key=lambda s: int(s.split()[-1]))[len(steps) // 2]
    return name, steps[name][0], steps[name][1]


def timeline(ax: Any, trace: Mapping[str, Any]) -> None:
    """Lanes of one decode step: compute (waits in red) and each I/O thread's loads."""
    events = trace["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e["name"] == "thread_name"}
    window = decode_window(events)
    if window is None:
        ax.text(0.5, 0.5, "no decode step in the trace", ha="center", transform=ax.transAxes)
        return
    step, lo, hi = window
    order = sorted(lanes, key=lambda t: (lanes[t] != "compute", lanes[t]))
    rows = {tid: i for i, tid in enumerate(order)}
    seen: set[str] = set()
    waited = 0.0
    for e in events:
        if e.get("ph") != "X" or e["ts"] + e["dur"] < lo or e["ts"] > hi:
            continue
        start, end = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)
        waited += (end - start) if e["name"] == "wait" else 0.0
        label = e["name"] if e["name"] not in seen else None
        seen.add(e["name"])
        ax.broken_barh([((start - lo) / 1e3, (end - start) / 1e3)], (rows[e["tid"]] - 0.4, 0.8),
                       facecolors=COLORS.get(e["name"], "#999999"), label=label)
    ax.set_yticks(range(len(order)), [lanes[t] for t in order])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    ax.set_title(f"timeline of {step} (klotski): compute waited {waited / 1e3:.1f} of "
                 f"{(hi - lo) / 1e3:.1f} ms (red)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _size(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 1e6:,.1f} MB"
