"""`klotski bench`: throughput of the schedules, side by side, on one checkpoint and workload.

Every schedule runs in this one process, on the same prompts (token ids) and the same budgets:
klotski, flexgen, lru, sequential (our engine), hf-accelerate (HF transformers + accelerate
offloading, the real peer; see bench_hf.py) and `resident` (klotski with every weight on the
device: the compute bound the efficiency figure uses). Each (configuration, schedule) runs once
untimed (warm-up: compiles, first reads), then `repeats` timed runs; within a repeat the
schedules alternate, and the order rotates by one every repeat, so slow drift of a shared
machine does not favour whichever runs first.

Configurations: the base workload, or one per n of `--sweep-groups` (n groups of a fixed
per-group batch, so n x batch sequences). `--ablation` adds the paper's ladder on our engine:
single-batch simple pipeline -> + multi-batch -> + hot-only prefetch -> + reorder (= klotski).

Metrics per (schedule, configuration): the paper's throughput (generated tokens / (prefill +
decode) seconds), prefill and decode throughput apart, I/O wait and its share of the time,
bytes read from the chunk files and moved to the device, memory peaks, and an efficiency figure:
a lower bound for this machine over the measured time (`lower_bound`). One JSON line per
(schedule, configuration), a Markdown table, and optionally a plot (bench_plot.py) and a trace.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import pathlib
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from klotski_jax.pipeline.policy import Policy, PolicyError

if TYPE_CHECKING:
    from klotski_jax.bench_runner import Bench

log = logging.getLogger(__name__)

ENGINE_SCHEDULES = ("klotski", "flexgen", "lru", "sequential")
HF_SCHEDULE = "hf-accelerate"
SCHEDULES = (*ENGINE_SCHEDULES, HF_SCHEDULE)
RESIDENT = "resident"  # klotski with unlimited budgets: every weight on the device

# The paper's ablation ladder (section 6): each rung turns one idea of klotski on.
ABLATION_LADDER: tuple[tuple[str, dict[str, bool]], ...] = (
    ("simple", {"multi_batch": False, "hot_only_prefetch": False, "reorder": False}),
    ("+multi-batch", {"multi_batch": True, "hot_only_prefetch": False, "reorder": False}),
    ("+hot-only", {"multi_batch": True, "hot_only_prefetch": True, "reorder": False}),
    ("+reorder", {}),  # = klotski
)
FIELDS = ("schedule", "throughput_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s",
          "io_wait_s", "io_wait_fraction", "bytes_read_disk", "bytes_to_device",
          "peak_device_bytes", "peak_host_bytes", "efficiency")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A workload's default shape."""

    name: str
    prompt_len: int
    gen_len: int
    num_prompts: int
    note: str


PRESETS = {
    "paper": Preset("paper", 512, 32, 32, "the paper's prompt 512 / output 32"),
    "cpu": Preset("cpu", 32, 8, 8, "the CPU preset, smaller than the paper's prompt 512 / "
                  "output 32 so that a 2-core machine finishes in minutes"),
}


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The options of `klotski bench`; SIZE budgets stay text until the weight bytes are known."""

    ckpt: str | None = None  # None: the embedded default model
    schedules: tuple[str, ...] = SCHEDULES
    preset: str = "auto"  # auto: "paper" on an accelerator, "cpu" on a CPU-only machine
    prompt_len: int | None = None
    gen_len: int | None = None
    num_prompts: int | None = None
    batch_size: int | None = None
    groups: int | None = None  # None: the Policy default (the planner's choice when it has one)
    prompts: str | None = None  # JSON Lines file like `klotski generate --input`
    seed: int = 0
    device_budget: str | None = None
    host_budget: str | None = None
    cold_disk: bool = False
    io_mode: str = "buffered"
    profile: bool = False  # measure (or reuse) the planner's profile first: klotski is planned
    repeats: int = 2
    ablation: bool = False
    sweep_groups: tuple[int, ...] = ()
    hf_dir: str | None = None
    json: str | None = None
    markdown: str | None = None  # the table with the date, machine and command: a results file
    plot: str | None = None
    trace: str | None = None
    sample: int = 0
    quiet: bool = False
    command: str = ""  # recorded in every JSON line

    def __post_init__(self) -> None:
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad or not self.schedules:
            raise PolicyError(f"--schedules must be a non-empty list of {', '.join(SCHEDULES)}; "
                              f"got {', '.join(self.schedules) or 'nothing'}")
        if self.preset not in ("auto", *PRESETS):
            raise PolicyError(f"preset must be auto, {' or '.join(PRESETS)}, got {self.preset!r}")
        if self.repeats < 1:
            raise PolicyError(f"repeats must be >= 1, got {self.repeats}")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One workload shape under one pair of budgets (bytes; None: unlimited)."""

    prompt_len: int
    gen_len: int
    num_prompts: int
    groups: int | None
    batch_size: int | None
    device_budget: int | None
    host_budget: int | None
    cold_disk: bool
    io_mode: str
    preset: str

    def policy(self, schedule: str, **overrides: Any) -> Policy:
        """The engine policy of `schedule` under this configuration's budgets and layout."""
        kw: dict[str, Any] = {"schedule": schedule, "device_budget": self.device_budget,
                              "host_budget": self.host_budget, "batch_size": self.batch_size,
                              "io_mode": self.io_mode, "evict_page_cache": self.cold_disk}
        if self.groups is not None:
            kw["groups"] = self.groups
        return Policy(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a schedule, or an ablation rung of klotski, or the resident bound."""

    label: str
    schedule: str  # engine schedule, or hf-accelerate
    overrides: tuple[tuple[str, Any], ...] = ()
    ablation: str | None = None

    def policy(self, cfg: BenchConfig) -> Policy:
        """The policy of this row under `cfg` (resident: no budgets)."""
        over = dict(self.overrides)
        if self.label == RESIDENT:
            over |= {"device_budget": None, "host_budget": None}
        return cfg.policy(self.schedule, **over)


# ---- plan -------------------------------------------------------------------------------------
def variants(schedules: Sequence[str], ablation: bool) -> list[Variant]:
    """The rows to run: the schedules, the ablation rungs (the last is klotski), the bound."""
    out = [Variant(s, s) for s in schedules]
    if ablation:
        for name, flags in ABLATION_LADDER[:-1]:
            out.append(Variant(f"klotski {name}", "klotski", tuple(flags.items()), name))
        if "klotski" not in schedules:
            out.append(Variant("klotski", "klotski", (), ABLATION_LADDER[-1][0]))
    out.append(Variant(RESIDENT, "klotski"))
    return out


def run_order(n_configs: int, labels: Sequence[str], repeats: int
              ) -> list[tuple[int, str, int]]:
    """(configuration, label, repeat) in execution order; repeat -1 is the untimed warm-up.

    Per configuration: every label's warm-up, then `repeats` rounds in which the labels
    alternate, the order rotated by one each round (A B C, B C A, C A B, ...).
    """
    order = []
    for c in range(n_configs):
        order += [(c, label, -1) for label in labels]
        for r in range(repeats):
            k = r % len(labels)
            order += [(c, label, r) for label in [*labels[k:], *labels[:k]]]
    return order


def default_groups() -> int | None:
    """Policy's default n (None once a planner chooses it)."""
    return {f.name: f.default for f in dataclasses.fields(Policy)}["groups"]


def configurations(opts: BenchOptions, preset: Preset, device_budget: int | None,
                   host_budget: int | None) -> list[BenchConfig]:
    """The base configuration, or one per n of --sweep-groups (n x a fixed per-group batch)."""
    num = opts.num_prompts or preset.num_prompts
    base = BenchConfig(prompt_len=opts.prompt_len or preset.prompt_len,
                       gen_len=opts.gen_len or preset.gen_len, num_prompts=num,
                       groups=opts.groups, batch_size=opts.batch_size,
                       device_budget=device_budget, host_budget=host_budget,
                       cold_disk=opts.cold_disk, io_mode=opts.io_mode, preset=preset.name)
    if not opts.sweep_groups:
        return [base]
    batch = opts.batch_size or max(1, num // (opts.groups or default_groups() or 2))
    return [dataclasses.replace(base, groups=n, batch_size=batch, num_prompts=n * batch)
            for n in opts.sweep_groups]


def synthetic_prompts(n: int, length: int, vocab_size: int, special: Sequence[int], seed: int
                      ) -> list[list[int]]:
    """n seeded prompts of `length` random token ids, none of them a special token."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special), np.int64))
    return [allowed[rng.integers(0, len(allowed), length)].tolist() for _ in range(n)]


# ---- metrics ----------------------------------------------------------------------------------
def run_metrics(stats: Mapping[str, Any], sequences: int) -> dict[str, float]:
    """Throughputs of one run from its RunStats fields. The first token of each sequence comes
    out of the prefill; decode throughput counts the tokens of the one-token steps."""
    prefill, decode = stats["prefill_s"], stats["decode_s"]
    total = prefill + decode
    generated = stats["generated_tokens"]
    decode_tokens = max(generated - sequences, 0)
    return {
        "total_s": total,
        "throughput_tokens_per_s": generated / total if total > 0 else 0.0,
        "prefill_tokens_per_s": stats["prompt_tokens"] / prefill if prefill > 0 else 0.0,
        "decode_tokens_per_s": decode_tokens / decode if decode > 0 else 0.0,
        "io_wait_fraction": stats["io_wait_s"] / total if total > 0 else 0.0,
    }


@dataclasses.dataclass(frozen=True)
class BoundInputs:
    """What the lower bound of one configuration needs (bytes, bytes/s, seconds)."""

    steps: int  # decoder steps: rounds x gen_len (a prefill and gen_len - 1 decode steps)
    dense_bytes: int  # all layers' dense weights (attention, norms, routers, shared experts)
    expert_bytes: int  # all routed experts
    activated_fraction: float  # share of (layer, expert) pairs a step uses, measured
    device_room: int | None  # device bytes left for weights beside the fixed part
    host_room: int | None  # host bytes left for experts beside the globals and dense weights
    cold_disk: bool
    direct_io: bool  # every read hits the disk (O_DIRECT), not the page cache
    disk_cold_bps: float
    disk_warm_bps: float
    h2d_bps: float
    compute_prefill_s: float  # the same workload with every weight resident: its prefills
    compute_decode_s: float  # ... and its decode steps
    rounds: int = 1  # prefill steps (each round starts with an empty host cache)


def lower_bound(b: BoundInputs) -> dict[str, float]:
    """A lower bound on the time of one run on this machine, and its parts.

    Each step uses its dense weights and the activated experts (A bytes); at most `device_room`
    of them can stay on the device between steps, so each step moves at least A - room to it.
    Each round's host cache starts empty, so the activated experts not on the device are read
    from the chunk files at least once per round, by its prefill (at the cold-disk bandwidth
    with --cold-disk, else at the page-cache one); those beyond device and host room again at
    every decode step. Disk reads and device transfers can overlap each other and compute, but
    not across the phases: a round's prefill needs its first reads, and decoding starts after
    it. So the bound is max(prefill I/O, prefill compute) + max(decode I/O, decode compute),
    with the compute times of the all-resident run.
    """
    inf = float("inf")
    room = inf if b.device_room is None else max(b.device_room, 0)
    host = inf if b.host_room is None else max(b.host_room, 0)
    experts = b.activated_fraction * b.expert_bytes
    per_step = max(0.0, b.dense_bytes + experts - room)
    decode_steps = max(0, b.steps - b.rounds)
    first = b.rounds * max(0.0, experts - room)
    again = decode_steps * max(0.0, experts - room - host)
    first_bps = b.disk_cold_bps if b.cold_disk or b.direct_io else b.disk_warm_bps
    again_bps = b.disk_cold_bps if b.direct_io else b.disk_warm_bps
    prefill_io = max(first / first_bps, b.rounds * per_step / b.h2d_bps)
    decode_io = max(again / again_bps, decode_steps * per_step / b.h2d_bps)
    prefill = max(prefill_io, b.compute_prefill_s)
    decode = max(decode_io, b.compute_decode_s)
    return {"lower_bound_s": prefill + decode, "lower_bound_io_s": prefill_io + decode_io,
            "lower_bound_prefill_s": prefill, "lower_bound_decode_s": decode,
            "lower_bound_disk_s": first / first_bps + again / again_bps,
            "lower_bound_h2d_s": b.steps * per_step / b.h2d_bps,
            "lower_bound_compute_s": b.compute_prefill_s + b.compute_decode_s,
            "min_bytes_to_device": int(b.steps * per_step),
            "min_bytes_read_disk": int(first + again)}


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of every numeric field, the throughput spread."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    for k in keys:  # byte counts stay integers
        if isinstance(runs[0][k], int):
            row[k] = int(row[k])
    tput = [r["throughput_tokens_per_s"] for r in runs]
    row["throughput_per_repeat"] = tput
    row["throughput_min"], row["throughput_max"] = min(tput), max(tput)
    return row


def resolve_preset(name: str) -> Preset:
    """auto: the paper's workload on an accelerator, the CPU preset on a CPU-only machine."""
    if name != "auto":
        return PRESETS[name]
    import jax

    return PRESETS["cpu" if jax.default_backend() == "cpu" else "paper"]


def when() -> str:
    """Now, in UTC, for the results."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def rounds(num_prompts: int, per_round: int) -> int:
    """How many rounds of per_round sequences the engine runs for num_prompts."""
    return math.ceil(num_prompts / per_round)


def status(msg: str, quiet: bool) -> None:
    """A line for the user on stderr (the table owns stdout)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)



# ---- report -----------------------------------------------------------------------------------
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
        klotski = next((r["throughput_tokens_per_s"] for r in group
                        if r["schedule"] == "klotski" and r["throughput_tokens_per_s"]), None)
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
    return "\n".join(out)


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
            f"{_mb(r['bytes_to_device'])} | {_mb(r['peak_device_bytes'])} | "
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


# ---- entry point ------------------------------------------------------------------------------
def resolve_checkpoint(ckpt: str | None) -> pathlib.Path:
    """The checkpoint directory; None: the embedded default model (built on first use)."""
    if ckpt is not None:
        return pathlib.Path(ckpt)
    from klotski_jax.checkpoints.default_model import default_checkpoint

    return default_checkpoint()


def describe_workload(bench: Bench) -> str:
    """One line: the workload, where its values came from, and how it compares to the paper's."""
    c, p, o = bench.configs[0], bench.preset, bench.opts
    paper = PRESETS["paper"]
    given = [name for name, v in (("prompt-len", o.prompt_len), ("gen-len", o.gen_len),
                                  ("num-prompts", o.num_prompts)) if v]
    source = ("" if len(given) == 3 else f"; {p.name} preset" +
              (f" except --{', --'.join(given)}" if given else "") + f": {p.note}")
    smaller = f"smaller than the paper's prompt {paper.prompt_len} / output {paper.gen_len}"
    if (c.prompt_len, c.gen_len) != (paper.prompt_len, paper.gen_len) and smaller not in source:
        source += f"; {smaller}"
    sweep = f", groups swept over {list(o.sweep_groups)}" if o.sweep_groups else ""
    return (f"workload: {c.num_prompts} prompts x {c.prompt_len} tokens -> {c.gen_len} new "
            f"tokens{sweep}{source}")


SAMPLE_REPETITION_PENALTY = 1.3


def sample_texts(bench: Bench, n: int) -> list[tuple[str, str]] | str:
    """(prompt, continuation) of a few text prompts with klotski under the first budgets, or why
    there are none."""
    from klotski_jax.demo import PROMPTS
    from klotski_jax.engine import Engine

    engine = Engine(bench.ckpt, bench.configs[0].policy("klotski"))
    if engine.tokenizer is None:
        return "no sample: the checkpoint has no tokenizer"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    try:
        # A tiny model loops under plain greedy decoding; a mild repetition penalty keeps the
        # sample readable (the timed runs above are plain greedy).
        gen = engine.generate(prompts, max_new_tokens=max(bench.configs[0].gen_len, 24),
                              repetition_penalty=SAMPLE_REPETITION_PENALTY)
    except PolicyError as e:
        return f"no sample: {e}"
    return list(zip(prompts, gen.texts or []))


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark of `opts`; write its JSON lines, plot and trace; return the rows, the
    Markdown table and the sample. User errors raise PolicyError / InputError /
    FileNotFoundError before anything runs."""
    from klotski_jax import generate_io as gio
    from klotski_jax.bench_runner import Bench, machine_info

    bench = Bench(opts, resolve_checkpoint(opts.ckpt))
    status(f"klotski bench: {bench.ckpt}, {len(bench.configs)} configuration(s) x "
           f"{len(bench.variants)} rows x {opts.repeats} repeats (+ a warm-up each)", opts.quiet)
    rows = bench.run()
    meta = {"date": when(), "machine": machine_info(), "command": opts.command}
    rows = [{**r, **meta} for r in rows]
    workload = describe_workload(bench)
    if opts.json:
        gio.write_jsonl(opts.json, rows)
    if opts.markdown:
        gio.write_atomic(opts.markdown, markdown_report(rows, workload))
    if opts.trace and bench.tracer is not None:
        bench.tracer.write(opts.trace)
    if opts.plot:
        from klotski_jax.bench_plot import plot

        plot(opts.plot, rows, bench.tracer)
    sample = sample_texts(bench, opts.sample) if opts.sample else None
    files = [f for f in (opts.json, opts.markdown, opts.plot, opts.trace if bench.tracer else None)
             if f]
    return {"rows": rows, "table": markdown_table(rows), "sample": sample, "workload": workload,
            "files": files}
