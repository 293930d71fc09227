"""`klotski profile`, `klotski plan` and `klotski calibrate`: the planner's and the prefetcher's
subcommands, thin wrappers over pipeline/profiler.py, pipeline/planner.py and
pipeline/prefetcher.py. `cli.build_parser` adds them; user errors exit 2 there.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shlex
import sys
from typing import Any

from klotski_jax.cli import _non_negative_int, _positive_int, _unit_interval
from klotski_jax.pipeline.policy import IO_MODES, PolicyError


def _weight_bytes(ckpt: str) -> int:
    from klotski_jax.checkpoints.manifest import read_manifest
    from klotski_jax.config import ModelConfig
    from klotski_jax.models.specs import total_bytes

    return total_bytes(ModelConfig.from_dict(read_manifest(ckpt)["config"]))


def _size(text: str | None, ckpt: str) -> int | None:
    from klotski_jax.generate_io import resolve_size

    return resolve_size(text, weight_bytes=_weight_bytes(ckpt))


# ---- profile ------------------------------------------------------------------------------------
def _cmd_profile(args: argparse.Namespace) -> int:
    from klotski_jax.pipeline import profiler
    from klotski_jax.profiling import profile_checkpoint

    if not args.verbose:  # one "placement" info line per calibration run would bury the output
        logging.getLogger("klotski_jax.engine").setLevel(logging.WARNING)
    opts = profiler.ProfileOptions(repeats=args.repeats, quick=args.quick,
                                   device_budget=_size(args.device_budget, args.ckpt))
    prof, path, measured = profile_checkpoint(args.ckpt, refresh=args.refresh, options=opts)
    if args.out:
        profiler.write_profile(prof, args.out)
    how = (f"measured in {prof.meta.get('elapsed_s', '?')} s" if measured
           else "cached (--refresh measures again)")
    print(f"profile of {args.ckpt} on {prof.device['platform']} ({prof.device['device_kind']}), "
          f"model shape {prof.model_key}: {how}")
    print(f"cache: {path}" + (f"; copy: {args.out}" if args.out else ""))
    for line in _summary(prof):
        print("  " + line)
    return 0


def _summary(prof: Any) -> list[str]:
    from klotski_jax.pipeline.costs import CostModel

    c, ms = CostModel(prof), lambda s: f"{s * 1e3:.3f} ms"
    bw = prof.bandwidth
    return [
        f"attention per group, decode b=1 / b=8 (64 slots): {ms(c.attention(1, 1, 64))} / "
        f"{ms(c.attention(8, 1, 64))}; prefill 8 x 32: {ms(c.attention(8, 32, 64))}",
        f"router per group (8 tokens): {ms(c.router(8))}; routing bookkeeping per layer: "
        f"{ms(c.routing(16))}",
        f"one expert, 2 / 64 tokens: {ms(c.expert(2))} / {ms(c.expert(64))}",
        f"expert load: host cache {ms(prof.expert_host_s)}, page cache "
        f"{ms(prof.expert_disk_warm_s)}, disk (evicted) {ms(prof.expert_disk_cold_s)}",
        f"bandwidth: disk->host {bw.get('disk_to_host_Bps', 0) / 1e9:.2f} GB/s, host->device "
        f"{bw.get('host_to_device_Bps', 0) / 1e9:.2f} GB/s, host copy "
        f"{bw.get('host_copy_Bps', 0) / 1e9:.2f} GB/s",
    ]


def _add_profile(sub: Any) -> None:
    p = sub.add_parser(
        "profile", help="measure the model's compute and transfer costs on this device",
        description="Time attention, router, experts, combine, LM head and the expert / dense "
                    "transfers (disk with the page cache evicted, page cache, host cache) with "
                    "the model's real shapes on the default JAX device. Cached per device kind "
                    "and model shape, reused by `klotski plan` and the engine.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--device-budget", metavar="SIZE",
                   help="skip measured shapes whose working set exceeds a quarter of this")
    p.add_argument("--out", metavar="FILE", help="also write the profile JSON here")
    p.add_argument("--refresh", action="store_true", help="measure again even if cached")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                   help="timed runs per shape, the median is kept (default: 5)")
    p.add_argument("--quick", action="store_true", help="small grids (tests, a first look)")
    p.set_defaults(func=_cmd_profile)


# ---- plan ---------------------------------------------------------------------------------------
def _load_profile(args: argparse.Namespace, cfg: Any) -> Any:
    from klotski_jax.pipeline.costs import Profile, model_key
    from klotski_jax.profiling import profile_checkpoint

    if args.profile:
        try:
            prof = Profile.from_json(pathlib.Path(args.profile).read_text())
        except (ValueError, TypeError) as e:
            raise PolicyError(f"{args.profile}: not a profile: {e}") from None
        if prof.model_key != model_key(cfg):
            raise PolicyError(f"{args.profile} profiles another model shape ({prof.model_key}, "
                              f"this checkpoint is {model_key(cfg)})")
        return prof
    prof, path, measured = profile_checkpoint(args.ckpt)
    if measured:
        print(f"no cached profile: measured one ({path})", file=sys.stderr)
    return prof


def _cmd_plan(args: argparse.Namespace) -> int:
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.engine import disk_tier, reread_tier
    from klotski_jax.pipeline.planner import Planner, PlanRequest
    from klotski_jax.pipeline.policy import Policy
    from klotski_jax.pipeline.prefetcher import CorrelationTable

    reader = CheckpointReader(args.ckpt)
    base = Policy(io_mode=args.io_mode)
    req = PlanRequest(
        prompt_len=args.prompt_len, gen_len=args.gen_len, num_prompts=args.prompts,
        batch_size=args.batch_size, groups=args.groups, hot_experts=args.hot_experts,
        prefetch_threshold=args.prefetch_threshold,
        device_budget=_size(args.device_budget, args.ckpt),
        host_budget=_size(args.host_budget, args.ckpt), max_groups=args.max_groups,
        disk_tier=disk_tier(base), reread_tier=reread_tier(base))
    table = CorrelationTable.load(reader.path)
    routing = table.routing_probs() if table is not None else None
    planner = Planner(reader.config, _load_profile(args, reader.config), routing, base=base)
    plan = planner.plan(req)
    if args.json:
        doc = {**plan.to_dict(), "request": vars(req) | {"cache_len": req.cache_len},
               "routing_statistics": "calibration table" if routing else "uniform top-k"}
        print(json.dumps(doc, indent=2))
    else:
        print(plan.describe())
    return 0


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="choose n groups, batch size, prefetch rule and placement for a budget",
        description="Predict prefill and decode times of the klotski schedule from the profile "
                    "and pick the feasible (n, batch size, prefetch threshold) with the best "
                    "throughput "
                    "(generated tokens / (prefill + decode time)). Exit 2 with the smallest "
                    "working budget when nothing fits.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--device-budget", metavar="SIZE", required=True,
                   help="device memory cap: 512MB, 2GiB, 25%% of the weights, or none")
    p.add_argument("--host-budget", metavar="SIZE", help="host RAM cap (default: unlimited)")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="fix the batch size")
    p.add_argument("--groups", type=_positive_int, metavar="N", help="fix n")
    p.add_argument("--prefetch-threshold", type=_unit_interval, metavar="P",
                   help="fix the prefetch threshold (default: choose)")
    p.add_argument("--hot-experts", type=_non_negative_int, metavar="K",
                   help="the fixed-K hot-set rule with this K instead of a threshold")
    p.add_argument("--prompts", type=_positive_int, metavar="N",
                   help="prompts to generate for (default: any number, up to 256 per round)")
    p.add_argument("--prompt-len", type=_positive_int, default=128, metavar="L",
                   help="prompt tokens (default: 128)")
    p.add_argument("--gen-len", type=_positive_int, default=32, metavar="G",
                   help="new tokens per prompt (default: 32)")
    p.add_argument("--max-groups", type=_positive_int, default=16, metavar="N",
                   help="largest n searched (default: 16)")
    p.add_argument("--io-mode", choices=IO_MODES, default="buffered",
                   help="direct: first expert reads cost a true disk read (default: page cache)")
    p.add_argument("--profile", metavar="FILE", help="a profile JSON (default: the cached one, "
                                                     "measured now if there is none)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


# ---- calibrate ----------------------------------------------------------------------------------
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from klotski_jax import generate_io as gio
    from klotski_jax.checkpoints.manifest import read_manifest
    from klotski_jax.config import ModelConfig
    from klotski_jax.engine import Engine
    from klotski_jax.pipeline.policy import Policy
    from klotski_jax.pipeline.prefetcher import TABLE_FILE, CorrelationPrefetcher, TableError

    if args.path_length < 1:
        raise PolicyError(f"--path-length must be >= 1, got {args.path_length}")
    records = gio.read_prompts(args.input)
    policy = Policy(groups=1, batch_size=args.batch_size,
                    device_budget=_size(args.device_budget, args.ckpt))
    cfg = ModelConfig.from_dict(read_manifest(args.ckpt)["config"])
    try:
        prefetcher = CorrelationPrefetcher.fresh(cfg.moe_layer_ids, cfg.num_experts,
                                                 args.path_length, top_k=cfg.top_k)
    except TableError as e:
        raise PolicyError(str(e)) from None
    # One prefetcher (one table) across all rounds, learning online from an empty table.
    engine = Engine(args.ckpt, policy, predictor_factory=lambda _cfg: prefetcher)
    gio.check_prompts(records, cfg.vocab_size, tokenizer=engine.tokenizer is not None)
    ids = sorted(engine.encode([r.prompt for r in records]), key=len)  # little padding
    gen = engine.generate(ids, max_new_tokens=args.max_new_tokens, stop_at_eos=False)
    meta = {"input": str(pathlib.Path(args.input).resolve()), "prompts": len(records),
            "max_new_tokens": args.max_new_tokens,
            "command": shlex.join(["klotski", *getattr(args, "argv", [])])}
    prefetcher.table.save(engine.reader.path, meta)
    st = gen.stats
    print(f"calibrated {engine.reader.path / TABLE_FILE}: path length {args.path_length}, "
          f"{int(prefetcher.table.tokens[0])} tokens per layer from {len(records)} prompts")
    if st.hot_precision is not None:
        print(f"online during calibration: precision {st.hot_precision:.1%}, hot-set accuracy "
              f"{st.hot_set_accuracy:.1%}")
    return 0


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate", help="build the correlation table of the hot-expert prefetcher",
        description="Run prompts through the engine, count per MoE layer which expert each "
                    "token picks given the experts it picked in the previous layer(s), and save "
                    "the table in the checkpoint directory (prefetch_table.npz + .json).")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--input", metavar="FILE", required=True,
                   help='JSON Lines prompts: {"prompt": ...} or {"prompt_token_ids": [...]}')
    p.add_argument("--path-length", type=int, default=1, metavar="L",
                   help="previous MoE layers a row conditions on (default: 1, the paper's)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens generated per prompt, their routing counted too (default: 16)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                   help="prompts per round (default: 8)")
    p.add_argument("--device-budget", metavar="SIZE", help="device memory cap (default: none)")
    p.set_defaults(func=_cmd_calibrate)


def add_planner_commands(sub: Any) -> None:
    """Register profile, plan and calibrate on the `klotski` subparsers."""
    _add_profile(sub)
    _add_plan(sub)
    _add_calibrate(sub)
