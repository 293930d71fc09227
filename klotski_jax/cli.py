"""`klotski` command line: thin, typed wrappers over the Python API.

Every subcommand is a function taking parsed options; errors that are the user's (bad input,
budgets, existing outputs) print one `error: ...` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from klotski_jax.config import ConfigError
from klotski_jax.pipeline.policy import IO_MODES, Policy, PolicyError, Schedule  # no JAX import

EXIT_USER_ERROR = 2


# ---- option types: argparse rejects bad values with exit status 2 -------------------------------
def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# ---- convert / demo ---------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from klotski_jax.checkpoints.convert import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(f"converted {args.hf_dir} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from klotski_jax.demo import run_demo

    run_demo(cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens, rebuild=args.rebuild)
    return 0


# ---- generate ---------------------------------------------------------------------------------
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
        pinned_host={"auto": None, "on": True, "off": False}[opts.pinned_host])


def _progress_bar(total: int, quiet: bool) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A tqdm bar over generated tokens on stderr (off with -q or when stderr is not a TTY)."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="generating", unit="tok", file=sys.stderr, leave=False)
    return bar.update, bar.close


def run_generate(opts: GenerateOptions) -> dict[str, Any]:
    """Generate for the prompts of `opts` and write the requested files.

    Returns {"results": output objects, "stats": the --stats document}. Raises InputError,
    PolicyError (BudgetError states the minimum budget) or FileNotFoundError for user errors;
    no output file is written unless generation succeeded.
    """
    from klotski_jax import generate_io as gio
    from klotski_jax.checkpoints.manifest import read_manifest
    from klotski_jax.config import ModelConfig
    from klotski_jax.engine import Engine
    from klotski_jax.models.specs import total_bytes
    from klotski_jax.pipeline.trace import Tracer

    records = gio.read_prompts(opts.input) if opts.input else gio.prompts_from_args(opts.prompts)
    config = ModelConfig.from_dict(read_manifest(opts.ckpt)["config"])  # sizes need weight bytes
    weight_bytes = total_bytes(config)
    policy = _policy(opts, weight_bytes)
    engine = Engine(opts.ckpt, policy)
    gio.check_prompts(records, config.vocab_size, tokenizer=engine.tokenizer is not None)
    prompt_ids = []
    for r in records:  # tokenize here so an error names the prompt's line
        try:
            prompt_ids.extend(engine.encode([r.prompt]))
        except ValueError as e:
            raise gio.InputError(f"{r.where}: {e}") from None

    tracer = Tracer() if opts.trace else None
    update, close = _progress_bar(len(records) * opts.max_new_tokens, opts.quiet)
    try:
        gen = engine.generate(prompt_ids, max_new_tokens=opts.max_new_tokens,
                              temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                              trace=tracer, progress=update,
                              repetition_penalty=opts.repetition_penalty)
    finally:
        close()
    results = gio.results(records, gen.token_ids, gen.texts)
    stats = {**gen.stats.to_dict(), "weight_bytes": weight_bytes,
             "max_new_tokens": opts.max_new_tokens, "prompts": len(records),
             "placement": gen.placement, "policy": dataclasses.asdict(policy), "plan": gen.plan,
             "checkpoint": str(engine.reader.path)}
    if opts.output:
        gio.write_jsonl(opts.output, results)
    if opts.stats:
        gio.write_json(opts.stats, stats)
    if tracer is not None:
        tracer.write(opts.trace)
    return {"results": results, "stats": stats}


def _cmd_generate(args: argparse.Namespace) -> int:
    opts = GenerateOptions.from_args(args)
    out = run_generate(opts)
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
              f"{s['groups']} group(s) x {s['batch_size']}; device peak "
              f"{s['peak_device_bytes']:,} B of {'unlimited' if budget is None else f'{budget:,} B'}"
              f"; waited on I/O {s['io_wait_s']:.2f} s", file=sys.stderr)
    return 0


def _check_generate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ablations only mean something for the schedules that have them."""
    if args.command != "generate":
        return
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


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate with the pipeline under device / host memory budgets",
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
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                   help="new tokens per prompt, fewer if EOS comes first (default: 32)")
    p.add_argument("--schedule", choices=[s.value for s in Schedule], default="klotski",
                   help="klotski (default), or the baselines flexgen, lru (mixtral-offloading), "
                        "sequential (HF Accelerate)")
    p.add_argument("--device-budget", metavar="SIZE",
                   help="device memory cap: 512MB, 2GiB, or 30%% of the weight bytes "
                        "(default: unlimited)")
    p.add_argument("--host-budget", metavar="SIZE", help="host RAM cap (same forms)")
    p.add_argument("--groups", type=_positive_int, default=None, metavar="N",
                   help="batch groups n sharing each loaded layer (klotski, flexgen; default: "
                        "the planner's choice for klotski, over the cached profile or else "
                        "the roofline prior; 2 for flexgen)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="sequences per group (default: the planner's choice, else prompts split "
                        "evenly over the groups)")
    p.add_argument("--prefetch-threshold", type=_unit_interval, default=None, metavar="P",
                   help="klotski: prefetch every expert the coming step routes to with "
                        "probability >= P (0: the whole layer; default: the planner's choice)")
    p.add_argument("--hot-experts", type=_non_negative_int, default=None, metavar="K",
                   help="klotski: prefetch the K predicted hottest experts instead (the paper's "
                        "fixed K; overrides --prefetch-threshold)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=_probability, default=1.0, metavar="P",
                   help="nucleus sampling mass when --temperature > 0 (default: 1)")
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0, metavar="R",
                   help="> 1 discourages repeating generated tokens (HF semantics; default: 1, "
                        "off; about 1.3 helps small models that loop)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    p.add_argument("--trace", metavar="FILE",
                   help="write a Chrome trace-event JSON (open in ui.perfetto.dev)")
    p.add_argument("--stats", metavar="FILE", help="write the run's statistics as JSON")
    p.add_argument("--no-multi-batch", dest="multi_batch", action="store_false",
                   help="ablation: each group runs through the model alone")
    p.add_argument("--no-hot-only-prefetch", dest="hot_only_prefetch", action="store_false",
                   help="ablation (klotski): prefetch the whole MoE layer, not just hot experts")
    p.add_argument("--no-reorder", dest="reorder", action="store_false",
                   help="ablation (klotski): run experts in id order, not hot first / load order")
    p.add_argument("--io-mode", choices=IO_MODES, default="buffered",
                   help="expert reads: buffered readinto, direct (O_DIRECT), or tensorstore")
    p.add_argument("--evict-page-cache", action="store_true",
                   help="drop the checkpoint's files from the page cache first (true disk reads)")
    p.add_argument("--pinned-host", choices=("auto", "on", "off"), default="auto",
                   help="keep the host expert cache in pinned (page-locked) host memory, which "
                        "makes host-to-device copies asynchronous; auto (default): on GPU/TPU, "
                        "off on CPU; on fails where the device has no pinned_host memory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or info logs")
    p.set_defaults(func=_cmd_generate)


# ---- bench ------------------------------------------------------------------------------------
def _schedule_list(text: str) -> tuple[str, ...]:
    from klotski_jax.bench import SCHEDULES

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SCHEDULES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                         f"{', '.join(SCHEDULES)}; got {text!r}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(s.strip()) for s in text.split(",") if s.strip()) or (
        _positive_int(""),)


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from klotski_jax.bench import SAMPLE_REPETITION_PENALTY, BenchOptions, run_bench

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


def _add_bench(sub: Any) -> None:
    from klotski_jax.bench import PRESETS, SCHEDULES

    p = sub.add_parser(
        "bench", help="throughput of the schedules (and HF accelerate) side by side",
        description="Run the schedules on the same prompts and budgets, alternating, with "
                    "repeats after a warm-up; print a Markdown table, write JSON lines, a plot "
                    "and a trace. See README 'Performance'.")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None,
                   help="checkpoint written by `klotski convert` (default: the embedded default "
                        "model, built on first use)")
    p.add_argument("--schedules", type=_schedule_list, default=SCHEDULES, metavar="LIST",
                   help=f"comma-separated, any of {','.join(SCHEDULES)} (default: all; "
                        "hf-accelerate is skipped without torch)")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="workload defaults: paper (512/32, 32 prompts) or cpu (32/8, 8 prompts); "
                        "auto: cpu when JAX has no accelerator")
    p.add_argument("--prompt-len", type=_positive_int, metavar="N", help="synthetic prompt tokens")
    p.add_argument("--gen-len", type=_positive_int, metavar="N", help="new tokens per prompt")
    p.add_argument("--num-prompts", type=_positive_int, metavar="N")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="sequences per group")
    p.add_argument("--groups", type=_positive_int, metavar="N",
                   help="batch groups n (default: the engine's default)")
    p.add_argument("--prompts", metavar="FILE",
                   help="JSON Lines prompts like `generate --input` (default: seeded random ids)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--device-budget", metavar="SIZE", help="512MB, 2GiB or 25%% of the weights")
    p.add_argument("--host-budget", metavar="SIZE", help="host RAM cap (same forms)")
    p.add_argument("--cold-disk", action="store_true",
                   help="evict the checkpoint from the page cache before each run")
    p.add_argument("--io-mode", choices=IO_MODES, default="buffered",
                   help="expert reads (direct: O_DIRECT, every read from the disk)")
    p.add_argument("--profile", action="store_true",
                   help="profile the model on this device first (cached, see `klotski profile`), "
                        "so klotski runs with the planner's n, batch size and K")
    p.add_argument("--repeats", type=_positive_int, default=2, help="timed runs (default: 2)")
    p.add_argument("--ablation", action="store_true",
                   help="add the paper's ladder: simple, +multi-batch, +hot-only, +reorder")
    p.add_argument("--sweep-groups", type=_int_list, metavar="LIST",
                   help="e.g. 1,2,4,8: one configuration per n, each n x --batch-size prompts")
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
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klotski", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an HF MoE checkpoint to the klotski-jax format")
    p.add_argument("hf_dir", help="local HF model directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="store weights in this dtype (default: the config's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="build the embedded default model and run the main job")
    p.add_argument("--cache-dir", default=None,
                   help="where the default model is built (default: ~/.cache/klotski-jax)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached default model")
    p.set_defaults(func=_cmd_demo)

    _add_generate(sub)
    from klotski_jax.cli_planner import add_planner_commands

    add_planner_commands(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `klotski` console script; returns the exit status."""
    from klotski_jax.checkpoints.errors import ConversionError
    from klotski_jax.generate_io import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench
    _check_generate_args(parser, args)
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # e.g. "Unable to initialize backend 'tpu'" on every CPU/GPU start
        logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ConversionError, ConfigError, PolicyError, InputError, FileNotFoundError,
            FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
