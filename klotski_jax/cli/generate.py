"""`klotski generate`: generation with a pipeline schedule under device / host memory budgets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from klotski_jax.cli.options import (
    budget_options,
    compute_options,
    device_options,
    io_options,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    unit_interval,
)
from klotski_jax.planning.policy import Policy, Schedule  # no JAX import
from klotski_jax.util import progress


# ---- options ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """The options of `klotski generate`, typed; sizes stay text until the checkpoint is known
    (a percentage is of its weight bytes)."""

    ckpt: str
    prompts: tuple[str, ...] = ()
    input: str | None = None
    output: str | None = None
    max_new_tokens: int = 32
    schedule: str = "klotski"
    device_budget: str | None = None
    host_budget: str | None = None
    groups: int | None = None  # None: the planner chooses (see Engine.layout)
    batch_size: int | None = None
    prefetch_threshold: float | None = None  # None: the planner chooses
    hot_experts: int | None = None  # K: the fixed-size hot set instead of the threshold rule
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    trace: str | None = None
    stats: str | None = None
    multi_batch: bool = True
    hot_only_prefetch: bool = True
    reorder: bool = True
    io_mode: str = "buffered"
    evict_page_cache: bool = False
    pinned_host: str = "auto"
    allow_long_context: bool = False
    verify: bool = True
    devices: int | str | None = None  # None: all local accelerators (one device on a CPU)
    expert_batch: int = Policy.expert_batch  # ready experts of few rows per jitted call
    distributed: bool = False  # join a multi-host job first (runtime/multihost.py)
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerateOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["prompts"] = tuple(args.prompts or ())
        return cls(**values)


def _policy(opts: GenerateOptions, weight_bytes: int) -> Policy:
    from klotski_jax.generate_io import resolve_size

    return Policy(
        schedule=opts.schedule, groups=opts.groups, batch_size=opts.batch_size,
        prefetch_threshold=opts.prefetch_threshold, hot_experts=opts.hot_experts,
        device_budget=resolve_size(opts.device_budget, weight_bytes=weight_bytes),
        host_budget=resolve_size(opts.host_budget, weight_bytes=weight_bytes),
        multi_batch=opts.multi_batch, hot_only_prefetch=opts.hot_only_prefetch,
        reorder=opts.reorder, io_mode=opts.io_mode, evict_page_cache=opts.evict_page_cache,
        pinned_host={"auto": None, "on": True, "off": False}[opts.pinned_host],
        verify_checksums=opts.verify, devices=opts.devices, expert_batch=opts.expert_batch)


def run_generate(opts: GenerateOptions) -> dict[str, Any]:
    """Generate for the prompts of `opts` and write the requested files.

    Returns {"results": output objects, "stats": the --stats document}. Raises InputError,
    PolicyError (BudgetError states the minimum budget) or FileNotFoundError for user errors;
    no output file is written unless generation succeeded.
    """
    from klotski_jax import generate_io as gio
    from klotski_jax.engine import Engine
    from klotski_jax.runtime import multihost
    from klotski_jax.runtime.trace import Tracer

    if opts.distributed:  # before anything starts JAX's backends
        multihost.initialize()
    writer = multihost.is_writer()  # a multi-host job: process 0 writes the files

    records = gio.read_prompts(opts.input) if opts.input else gio.prompts_from_args(opts.prompts)
    weight_bytes = gio.checkpoint_weight_bytes(opts.ckpt)  # sizes need weight bytes
    policy = _policy(opts, weight_bytes)
    engine = Engine(opts.ckpt, policy)
    gio.check_prompts(records, engine.config.vocab_size, tokenizer=engine.tokenizer is not None)
    prompt_ids = []
    for r in records:  # tokenize here so an error names the prompt's line
        try:
            ids = engine.encode([r.prompt])
            if not opts.allow_long_context:
                engine.check_context(len(ids[0]), opts.max_new_tokens, where="the prompt")
        except ValueError as e:
            raise gio.InputError(f"{r.where}: {e}") from None
        prompt_ids.extend(ids)

    tracer = Tracer() if opts.trace else None
    with progress(len(records) * opts.max_new_tokens, desc="generating", unit="tok",
                  quiet=opts.quiet or not writer) as bar:
        gen = engine.generate(prompt_ids, max_new_tokens=opts.max_new_tokens,
                              temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                              top_k=opts.top_k, min_p=opts.min_p,
                              trace=tracer, progress=bar.update,
                              repetition_penalty=opts.repetition_penalty,
                              allow_long_context=opts.allow_long_context)
    results = gio.results(records, gen.token_ids, gen.texts)
    stats = {**gen.stats.to_dict(), "weight_bytes": weight_bytes,
             "max_new_tokens": opts.max_new_tokens, "prompts": len(records),
             "placement": gen.placement, "policy": dataclasses.asdict(engine.policy), "plan": gen.plan,
             "checkpoint": str(engine.reader.path)}
    if writer and opts.output:
        gio.write_jsonl(opts.output, results)
    if writer and opts.stats:
        gio.write_json(opts.stats, stats)
    if writer and tracer is not None:
        tracer.write(opts.trace)
    return {"results": results, "stats": stats, "writer": writer}


def _cmd(args: argparse.Namespace) -> int:
    opts = GenerateOptions.from_args(args)
    out = run_generate(opts)
    if not out["writer"]:  # another process of a multi-host job reports
        return 0
    if not opts.output:  # one JSON value per line: continuations may contain newlines
        for r in out["results"]:
            print(json.dumps(r.get("text", r["token_ids"]), ensure_ascii=False))
    s = out["stats"]
    if not opts.quiet and s.get("plan"):
        p = s["plan"]
        print(f"planner ({p['cost_source']} costs): {p['groups']} group(s) x {p['batch_size']}, "
              f"prefetch {p['prefetch']}; "
              f"predicted {p['predicted_throughput_tokens_per_s']:.1f} tok/s, binding "
              f"{p['binding_constraint']}, n limited by {p['limited_by']}", file=sys.stderr)
    if not opts.quiet:
        budget = s["device_budget_bytes"]
        print(f"{s['generated_tokens']} tokens in {s['total_s']:.2f} s "
              f"({s['throughput_tokens_per_s']:.1f} tok/s), {s['schedule']} schedule, "
              f"{s['groups']} group(s) x {s['batch_size']}"
              + (f" on {len(per)} devices" if len(per := s["peak_device_bytes_per_device"]) > 1
                 else "") + "; device peak "
              + (f"{s['peak_device_bytes']:,} B" if len(per) < 2 else
                 f"per device {', '.join(f'{x:,}' for x in per)} B")
              + f" of {'unlimited' if budget is None else f'{budget:,} B'}"
              + (" each" if len(per) > 1 and budget is not None else "")
              + ("" if s.get("device_peak_bytes_in_use") is None else
                 f" (XLA's own peak in this process: {s['device_peak_bytes_in_use']:,} B)")
              + f"; waited on I/O {s['io_wait_s']:.2f} s", file=sys.stderr)
    return 0


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ablations only mean something for the schedules that have them."""
    if args.schedule != "klotski":
        for flag, on in (("--no-hot-only-prefetch", args.hot_only_prefetch),
                         ("--no-reorder", args.reorder),
                         ("--prefetch-threshold", args.prefetch_threshold is None),
                         ("--hot-experts", args.hot_experts is None)):
            if not on:
                parser.error(f"{flag} applies to --schedule klotski only")
    if not args.multi_batch and args.schedule in ("lru", "sequential"):
        parser.error("--no-multi-batch applies to klotski and flexgen (lru and sequential run "
                     "one group)")


def add(sub: Any) -> None:
    p = sub.add_parser(
        "generate", parents=[budget_options(), io_options(), compute_options(),
                                     device_options()],
        help="generate with the pipeline under device / host memory budgets",
        description="Generate continuations with a pipeline schedule, streaming weights from "
                    "host RAM and disk so the device holds at most --device-budget bytes.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                     help="a text prompt (repeat for a batch); needs the checkpoint's tokenizer")
    src.add_argument("--input", metavar="FILE",
                     help='JSON Lines: {"prompt": "..."} or {"prompt_token_ids": [...]} per line')
    p.add_argument("--output", metavar="FILE",
                   help='JSON Lines: each input object plus "token_ids" and "text" (default: '
                        "print one JSON string / token list per prompt to stdout)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="new tokens per prompt, fewer if EOS comes first (default: 32)")
    p.add_argument("--schedule", choices=[s.value for s in Schedule], default="klotski",
                   help="klotski (default), or the baselines flexgen, lru (mixtral-offloading), "
                        "sequential (HF Accelerate)")
    p.add_argument("--groups", type=positive_int, default=None, metavar="N",
                   help="batch groups n sharing each loaded layer (klotski, flexgen; default: "
                        "the planner's choice for klotski, over the cached profile or else "
                        "the roofline prior; 2 for flexgen)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="sequences per group (default: the planner's choice, else prompts split "
                        "evenly over the groups)")
    p.add_argument("--prefetch-threshold", type=unit_interval, default=None, metavar="P",
                   help="klotski: prefetch every expert the coming step routes to with "
                        "probability >= P (0: the whole layer; default: the planner's choice)")
    p.add_argument("--hot-experts", type=non_negative_int, default=None, metavar="K",
                   help="klotski: prefetch the K predicted hottest experts instead (the paper's "
                        "fixed K; overrides --prefetch-threshold)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="nucleus sampling mass when --temperature > 0 (default: 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample among the K most likely tokens when --temperature > 0 "
                        "(default: 0, off)")
    p.add_argument("--min-p", type=unit_interval, default=0.0, metavar="P",
                   help="drop tokens less than P times as likely as the most likely one when "
                        "--temperature > 0 (default: 0, off)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, metavar="R",
                   help="> 1 discourages repeating generated tokens (HF semantics; default: 1, "
                        "off; about 1.3 helps small models that loop)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="generate past the model's max_position_embeddings (refused by default: "
                        "the model was never trained at those positions)")
    p.add_argument("--trace", metavar="FILE",
                   help="write a Chrome trace-event JSON (open in ui.perfetto.dev)")
    p.add_argument("--stats", metavar="FILE", help="write the run's statistics as JSON")
    p.add_argument("--no-multi-batch", dest="multi_batch", action="store_false",
                   help="ablation: each group runs through the model alone")
    p.add_argument("--no-hot-only-prefetch", dest="hot_only_prefetch", action="store_false",
                   help="ablation (klotski): prefetch the whole MoE layer, not just hot experts")
    p.add_argument("--no-reorder", dest="reorder", action="store_false",
                   help="ablation (klotski): run experts in id order, not hot first / load order")
    p.add_argument("--evict-page-cache", action="store_true",
                   help="drop the checkpoint's files from the page cache first (true disk reads)")
    p.add_argument("--pinned-host", choices=("auto", "on", "off"), default="auto",
                   help="keep the host expert cache, host-resident dense layers and KV "
                        "caches in pinned (page-locked) host memory, which makes "
                        "host-to-device copies asynchronous; auto (default): on GPU/TPU, "
                        "off on CPU; on falls back to ordinary host memory, with a warning, where "
                        "the device has no pinned_host memory")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking each expert's checksum on its first read from disk (and "
                        "the dense files' at start-up)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host job (one process per host, started alike on each): "
                        "JAX's distributed runtime from the environment (TPU pod slices, SLURM "
                        "and Open MPI are detected; else JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID); the mesh spans every host's "
                        "devices and process 0 writes the outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or info logs")
    p.set_defaults(func=_cmd, check=check_args)
