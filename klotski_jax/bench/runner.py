"""The runner of `klotski bench`: bandwidths, the runs in their order, and the rows.

`Bench` holds one invocation: the checkpoint, its configurations and prompts, an `Engine` per
(configuration, variant) and the HF peer (hf.py), and every timed run's statistics. Its `run()`
takes the disk and device bandwidths from the profiler (its cached profile when there is one,
else measured), runs `options.run_order` under a progress bar, and turns the runs into one row
per (configuration, variant) with the lower bound (bounds.py) and efficiency. `run_bench` is the
entry point of `klotski bench`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib
import platform
import statistics
from typing import Any

from klotski_jax import profiler
from klotski_jax.bench.bounds import BoundInputs, lower_bound
from klotski_jax.bench.metrics import aggregate, run_metrics
from klotski_jax.bench.options import (
    ENGINE_SCHEDULES,
    FIELDS,
    HF_SCHEDULE,
    PRESETS,
    RESIDENT,
    SAMPLE_REPETITION_PENALTY,
    BenchConfig,
    BenchOptions,
    Variant,
    configurations,
    resolve_preset,
    rounds,
    run_order,
    status,
    synthetic_prompts,
    variants,
    when,
)
from klotski_jax.bench.report import markdown_report, markdown_table
from klotski_jax.constants import PolicyError
from klotski_jax.util import progress, write_atomic


# ---- machine ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """nproc, CPU model, load, the accelerator and library versions."""
    import jax

    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    versions = {}
    for dist in ("torch", "transformers", "accelerate"):  # without importing them
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "loadavg": [round(x, 2) for x in load],
            "python": platform.python_version(), "jax": jax.__version__,
            "device": str(jax.devices()[0]), "platform": jax.default_backend(), **versions}


def storage_read_bytes() -> int | None:
    """Bytes this process has read from storage (page-cache hits excluded), where Linux says."""
    try:
        for line in pathlib.Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# ---- the runner -------------------------------------------------------------------------------
class Bench:
    """One `klotski bench` invocation: checkpoint, configurations, rows, runs and their rows."""

    def __init__(self, opts: BenchOptions, ckpt: pathlib.Path) -> None:
        from klotski_jax.engine import Engine
        from klotski_jax.generate_io import resolve_size
        from klotski_jax.models.specs import total_bytes

        self.opts, self.ckpt = opts, ckpt
        check_device_counts(opts.devices)
        self.base = Engine(ckpt)
        self.cfg = self.base.config
        self.weight_bytes = total_bytes(self.cfg)
        self.preset = resolve_preset(opts.preset)
        self.configs = configurations(
            opts, self.preset, resolve_size(opts.device_budget, weight_bytes=self.weight_bytes),
            resolve_size(opts.host_budget, weight_bytes=self.weight_bytes))
        self.prompts = [self._prompts(c) for c in self.configs]
        if opts.prompts:  # the file decides the prompt length (and count, unless given)
            self.configs = [dataclasses.replace(c, prompt_len=max(map(len, p)), num_prompts=len(p))
                            for c, p in zip(self.configs, self.prompts)]
        self.variants = variants(opts.schedules, opts.ablation, opts.quantized, opts.devices)
        self.stores: dict[str, pathlib.Path] = {}  # --quantized scheme -> its store
        self.by_label = {v.label: v for v in self.variants}
        self.runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        self.tokens: dict[tuple[int, str], list[list[int]]] = {}
        self.placements: dict[tuple[int, str], dict[str, Any]] = {}
        self.plans: dict[tuple[int, str], dict[str, Any] | None] = {}
        self.device_counts: dict[tuple[int, str], int] = {}  # devices each engine row ran on
        self.skipped: dict[tuple[int, str], str] = {}
        self.tracer: Any = None
        self.bandwidths: dict[str, Any] = {}
        self._engines: dict[tuple[int, str], Any] = {}
        self._hf: dict[tuple[int | None, int | None], Any] = {}
        self._hf_info: dict[tuple[int, str], dict[str, Any]] = {}
        self._tmp: Any = None

    # ---- prompts ------------------------------------------------------------------------------
    def _prompts(self, c: BenchConfig) -> list[list[int]]:
        if not self.opts.prompts:
            special = {self.cfg.bos_token_id, self.cfg.pad_token_id, *self.cfg.eos_token_ids}
            return synthetic_prompts(c.num_prompts, c.prompt_len, self.cfg.vocab_size,
                                     sorted(t for t in special if t is not None), self.opts.seed)
        from klotski_jax import generate_io as gio

        records = gio.read_prompts(self.opts.prompts)
        gio.check_prompts(records, self.cfg.vocab_size, tokenizer=self.base.tokenizer is not None)
        ids = [self.base.encode([r.prompt])[0] for r in records]
        n = self.opts.num_prompts if not self.opts.sweep_groups else c.num_prompts
        return [ids[i % len(ids)] for i in range(n or len(ids))]

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Measure the bandwidths, run every (configuration, variant, repeat), build the rows."""
        import tempfile

        self._make_stores()
        if self.opts.profile:
            self._ensure_profile()
        self.bandwidths = profiler.bandwidths(self.base.reader, self.opts.io_mode)
        order = run_order(len(self.configs), [v.label for v in self.variants], self.opts.repeats)
        with tempfile.TemporaryDirectory(prefix="klotski-bench-") as tmp, \
                progress(len(order), unit="run", quiet=self.opts.quiet) as bar:
            self._tmp = pathlib.Path(tmp)
            for c, label, r in order:
                bar.set_description(f"{label} (config {c + 1}/{len(self.configs)}, "
                                    f"{'warm-up' if r < 0 else f'repeat {r + 1}'})")
                if (c, label) not in self.skipped:
                    self._run_one(c, self.by_label[label], r)
                bar.update()
            self._hf.clear()
        return [self.row(c, v) for c in range(len(self.configs)) for v in self.variants]

    def _make_stores(self) -> None:
        """The quantized stores of --quantized, converted from the checkpoint's HF source on
        first use (`<CKPT>-int4`, ...); a store that cannot be made skips its rows."""
        from klotski_jax.checkpoints.convert import quantized_sibling
        from klotski_jax.checkpoints.errors import ConversionError

        for q in self.opts.quantized:
            try:
                self.stores[q] = quantized_sibling(self.ckpt, q, self.opts.hf_dir,
                                                   progress=not self.opts.quiet)
            except ConversionError as e:
                for c in range(len(self.configs)):
                    self.skipped[(c, f"klotski {q}")] = f"no {q} store: {e}"
                status(f"klotski {q}: skipped: {e}", self.opts.quiet)

    def _ckpt(self, v: Variant) -> pathlib.Path:
        return self.stores[v.store] if v.store else self.ckpt

    def _ensure_profile(self) -> None:
        """The profile of this model on this device, as `klotski profile` makes it (the pieces
        measured, then calibrated against timed engine steps; once, then cached), so that
        klotski runs with the planner's choices over measured costs."""
        import time

        from klotski_jax.engine_profile import profile_checkpoint

        for ckpt in (self.ckpt, *self.stores.values()):
            start = time.perf_counter()
            _, path, measured = profile_checkpoint(ckpt)
            status(f"profile: {'measured' if measured else 'cached'} {path} "
                   f"({time.perf_counter() - start:.0f} s)", self.opts.quiet)

    def _run_one(self, c: int, v: Variant, r: int) -> None:
        from klotski_jax.bench.hf import HFUnavailable

        try:
            out = self._run_hf(c, v) if v.schedule == HF_SCHEDULE else self._run_engine(c, v, r)
        except PolicyError as e:  # a budget below the schedule's minimum: report, go on
            self.skipped[(c, v.label)] = str(e)
            status(f"{v.label}: skipped: {e}", self.opts.quiet)
            return
        except HFUnavailable as e:
            self.skipped[(c, v.label)] = str(e)
            status(f"{v.label}: skipped: {e}", self.opts.quiet)
            return
        except Exception as e:  # noqa: BLE001  (the peer's stack failing must not end the bench)
            if v.schedule != HF_SCHEDULE:
                raise
            self.skipped[(c, v.label)] = f"failed: {type(e).__name__}: {e}"
            status(f"{v.label}: failed, skipped: {type(e).__name__}: {e}", self.opts.quiet)
            return
        self.tokens[(c, v.label)] = out.pop("token_ids")
        if r >= 0:
            self.runs.setdefault((c, v.label), []).append(out)

    def _run_engine(self, c: int, v: Variant, r: int) -> dict[str, Any]:
        from klotski_jax.engine import Engine
        from klotski_jax.runtime.trace import Tracer

        key = (c, v.label)
        if key not in self._engines:
            self._engines[key] = Engine(self._ckpt(v), v.policy(self.configs[c]))
        tracer = None
        # The trace (for the plot and --trace) comes from the untimed warm-up run: tracing
        # times each piece to its end, which a timed run should not pay.
        if self.tracer is None and r < 0 and c == 0 and v.label == self._traced_label():
            tracer = self.tracer = Tracer()
        io0 = storage_read_bytes()
        gen = self._engines[key].generate(self.prompts[c], max_new_tokens=self.configs[c].gen_len,
                                          stop_at_eos=False, trace=tracer)
        io1 = storage_read_bytes()
        self.placements[key] = gen.placement
        self.plans[key] = getattr(gen, "plan", None)
        self.device_counts[key] = len(self._engines[key].devices)
        stats = gen.stats.to_dict()
        return {**stats, **run_metrics(stats, len(self.prompts[c])), "token_ids": gen.token_ids,
                "storage_read_bytes": None if io0 is None or io1 is None else io1 - io0}

    def _traced_label(self) -> str:
        engine = [v.label for v in self.variants if v.schedule in ENGINE_SCHEDULES]
        return "klotski" if "klotski" in engine else engine[0]

    def _run_hf(self, c: int, v: Variant) -> dict[str, Any]:
        from klotski_jax.bench.hf import HFPeer, HFUnavailable, require_hf

        require_hf()
        cfg = self.configs[c]
        budgets = (cfg.device_budget, cfg.host_budget)
        if budgets not in self._hf:
            self._hf.clear()  # one model in memory at a time
            hf_dir = self.opts.hf_dir or self.base.reader.manifest.get("source")
            if not hf_dir:
                raise HFUnavailable(f"{self.ckpt} records no HF source directory (pass --hf-dir)")
            self._hf[budgets] = HFPeer(hf_dir, self.cfg.dtype, *budgets,
                                       offload_dir=self._tmp / f"offload-{len(self._hf_info)}")
        peer = self._hf[budgets]
        self._hf_info[(c, v.label)] = peer.describe()
        io0 = storage_read_bytes()
        stats = peer.run(self.prompts[c], cfg.gen_len, cfg.batch_size or len(self.prompts[c]),
                         self.cfg.pad_token_id or 0, cfg.cold_disk)
        io1 = storage_read_bytes()
        return {**stats, **run_metrics(stats, len(self.prompts[c])),
                "storage_read_bytes": None if io0 is None or io1 is None else io1 - io0}

    # ---- rows ---------------------------------------------------------------------------------
    def config_fields(self, c: int) -> dict[str, Any]:
        """The JSON fields that describe configuration c (the same in each of its rows)."""
        cfg, m = self.configs[c], self.cfg
        return {
            "model": f"{m.family.value} {m.num_layers} layers, {m.num_experts} experts "
                     f"(top-{m.top_k}), hidden {m.hidden_size}, {m.dtype}" + (
                         f", experts {m.expert_quant.value} (group "
                         f"{m.expert_group_size or 'per row'})" if m.quantized else ""),
            "checkpoint": str(self.ckpt), "weight_bytes": self.weight_bytes,
            "preset": cfg.preset, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len,
            "num_prompts": cfg.num_prompts, "groups_option": cfg.groups,
            "batch_size_option": cfg.batch_size, "device_budget_bytes": cfg.device_budget,
            "host_budget_bytes": cfg.host_budget, "cold_disk": cfg.cold_disk,
            "io_mode": cfg.io_mode, "repeats": self.opts.repeats, "seed": self.opts.seed,
            "prompts_file": self.opts.prompts}

    def row(self, c: int, v: Variant) -> dict[str, Any]:
        """The JSON line of one (configuration, variant)."""
        head = {"schedule": v.label, "engine_schedule": v.schedule, "ablation": v.ablation,
                "policy_overrides": dict(v.overrides) or None, **self.config_fields(c),
                "store": v.store,  # --quantized rows: the quantized store they ran on
                "store_checkpoint": str(self.stores[v.store]) if v.store in self.stores else None}
        runs = self.runs.get((c, v.label))
        if not runs:
            reason = self.skipped.get((c, v.label), "not run")
            return {**head, **{f: None for f in FIELDS[1:]}, "skipped": reason}
        row = {**head, **aggregate(runs), "skipped": None}
        for f in FIELDS[1:]:
            row.setdefault(f, None)  # e.g. hf-accelerate's host peak on a CPU-only machine
        row["schedule"] = v.label
        bound = self.bound(c)
        # The bound is the budgeted configuration's; the resident row streams nothing, so its
        # own bound is the compute part alone (its fastest repeat: efficiency <= 1).
        key = "lower_bound_compute_s" if v.label == RESIDENT else "lower_bound_s"
        # (a quantized store moves other bytes: the checkpoint's bound is not its bound)
        row["efficiency"] = (bound[key] / row["total_s"]
                             if bound and row["total_s"] > 0 and not v.store else None)
        row["lower_bound"] = bound
        row["bandwidths"] = self.bandwidths
        row["placement"] = self.placements.get((c, v.label)) or self._hf_info.get((c, v.label))
        row["plan"] = plan = self.plans.get((c, v.label))  # the planner's choice, prediction
        row["planned_throughput_tokens_per_s"] = (plan or {}).get(
            "predicted_throughput_tokens_per_s")
        row |= self.device_fields(c, v, runs)
        row["same_tokens_as_resident"] = self._agreement(c, v.label)
        return row

    def device_fields(self, c: int, v: Variant, runs: list[dict[str, Any]]) -> dict[str, Any]:
        """What a row says of its devices: how many it ran on, the bytes moved to and the ledger
        peak of each (medians over the repeats), and the planner's predicted throughput on that
        many devices (klotski rows that the planner laid out; it models no other schedule)."""
        out: dict[str, Any] = {"devices": self.device_counts.get((c, v.label)),
                               "devices_option": list(self.opts.devices) or None}
        for field in ("bytes_to_device_per_device", "peak_device_bytes_per_device"):
            lists = [r[field] for r in runs if r.get(field)]
            out[field] = ([int(statistics.median(col)) for col in zip(*lists)] if lists
                          else None)
        plan = self.plans.get((c, v.label))
        out["predicted_throughput_tokens_per_s"] = (
            plan["predicted_throughput_tokens_per_s"]
            if plan and plan.get("devices", 1) == out["devices"] else None)
        return out

    def _agreement(self, c: int, label: str) -> float | None:
        """Share of generated tokens equal to the resident run's (greedy; bf16 may split)."""
        ref, got = self.tokens.get((c, RESIDENT)), self.tokens.get((c, label))
        if ref is None or got is None:
            return None
        pairs = [(a, b) for r, g in zip(ref, got) for a, b in zip(r, g)]
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else None

    def bound(self, c: int) -> dict[str, float] | None:
        """The lower bound of configuration c, from its resident run (None without one)."""
        from klotski_jax.planning import placement as pm

        runs, pl = self.runs.get((c, RESIDENT)), self.placements.get((c, RESIDENT))
        if not runs or not pl or not self.bandwidths:
            return None
        cfg, m = self.configs[c], self.cfg
        res = aggregate(runs)
        fastest = min(runs, key=lambda r: r["total_s"])  # a bound, not a typical run
        n_rounds = rounds(cfg.num_prompts, res["groups"] * res["batch_size"])
        steps = n_rounds * cfg.gen_len
        experts = len(m.moe_layer_ids) * m.num_experts
        # What stays on the device besides layer weights (an untied embedding may live on the
        # host: placement.device_global_bytes where the placement has it).
        device_globals = pm.device_global_bytes(m)
        fixed = device_globals + pl["kv_bytes"] + pl["activation_bytes"]
        dense = sum(pm.dense_layer_bytes(m))
        bw = self.bandwidths
        return lower_bound(BoundInputs(
            steps=steps, dense_bytes=dense, expert_bytes=experts * m.expert_bytes,
            activated_fraction=min(1.0, res["expert_computes"] / max(steps * experts, 1)),
            device_room=None if cfg.device_budget is None else cfg.device_budget - fixed,
            host_room=None if cfg.host_budget is None else
            cfg.host_budget - pm.global_bytes(m) - dense,
            cold_disk=cfg.cold_disk, direct_io=cfg.io_mode == "direct",
            disk_cold_bps=bw["disk_cold_bps"], disk_warm_bps=bw["disk_warm_bps"],
            h2d_bps=bw["h2d_bps"], compute_prefill_s=fastest["prefill_s"],
            compute_decode_s=fastest["decode_s"], rounds=n_rounds))


# ---- entry point ------------------------------------------------------------------------------
def check_device_counts(counts: tuple[int, ...]) -> None:
    """A PolicyError (exit status 2) before anything runs when a count of --devices exceeds this
    process's local devices; on a CPU it says how to simulate more."""
    if not counts:
        return
    import jax

    local = jax.local_devices()
    if max(counts) > len(local):
        platform = local[0].platform
        hint = (f"; on a CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{max(counts)} (set before JAX starts) to simulate that many devices"
                if platform == "cpu" else "")
        raise PolicyError(f"--devices {','.join(map(str, counts))}: this process has "
                          f"{len(local)} local {platform} device(s){hint}")


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
        write_atomic(opts.markdown, markdown_report(rows, workload))
    if opts.trace and bench.tracer is not None:
        bench.tracer.write(opts.trace)
    if opts.plot:
        from klotski_jax.bench.plot import plot

        plot(opts.plot, rows, bench.tracer)
    sample = sample_texts(bench, opts.sample) if opts.sample else None
    files = [f for f in (opts.json, opts.markdown, opts.plot, opts.trace if bench.tracer else None)
             if f]
    return {"rows": rows, "table": markdown_table(rows), "sample": sample, "workload": workload,
            "files": files}
