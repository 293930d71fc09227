"""`klotski plan`: choose n groups, batch size, prefetch rule and placement for a budget
(planning/planner.py over the cached profile)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from klotski_jax.cli.options import (
    budget_options,
    devices_arg,
    io_options,
    non_negative_int,
    positive_int,
    size,
    unit_interval,
)
from klotski_jax.constants import PolicyError


# ---- plan ---------------------------------------------------------------------------------------
def _load_profile(args: argparse.Namespace, cfg: Any) -> Any:
    from klotski_jax.engine_profile import profile_checkpoint
    from klotski_jax.planning.costs import Profile, model_key

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


def _device_count(devices: int | str | None) -> int:
    """The devices to plan for: N (any number: a plan for another machine too), "all" (this
    machine's local devices), or the engine's default here (every accelerator, one CPU)."""
    import jax

    from klotski_jax.planning.policy import Policy
    from klotski_jax.runtime.devices import resolve_devices

    if isinstance(devices, int):
        return devices
    if devices == "all":
        return jax.local_device_count()
    return len(resolve_devices(Policy()))


def _cmd(args: argparse.Namespace) -> int:
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.engine import disk_tier, reread_tier
    from klotski_jax.planning.planner import Planner, PlanRequest
    from klotski_jax.planning.policy import Policy
    from klotski_jax.planning.prefetcher import CorrelationTable

    reader = CheckpointReader(args.ckpt)
    base = Policy(io_mode=args.io_mode, devices=_device_count(args.devices))
    req = PlanRequest(
        prompt_len=args.prompt_len, gen_len=args.gen_len, num_prompts=args.prompts,
        batch_size=args.batch_size, groups=args.groups, hot_experts=args.hot_experts,
        prefetch_threshold=args.prefetch_threshold,
        device_budget=size(args.device_budget, args.ckpt),
        host_budget=size(args.host_budget, args.ckpt), max_groups=args.max_groups,
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


def add(sub: Any) -> None:
    p = sub.add_parser(
        "plan", parents=[budget_options(device_required=True), io_options()],
        help="choose n groups, batch size, prefetch rule and placement for a budget",
        description="Predict prefill and decode times of the klotski schedule from the profile "
                    "and pick the feasible (n, batch size, prefetch threshold) with the best "
                    "throughput "
                    "(generated tokens / (prefill + decode time)). Exit 2 with the smallest "
                    "working budget when nothing fits.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="fix the batch size")
    p.add_argument("--groups", type=positive_int, metavar="N", help="fix n")
    p.add_argument("--prefetch-threshold", type=unit_interval, metavar="P",
                   help="fix the prefetch threshold (default: choose)")
    p.add_argument("--hot-experts", type=non_negative_int, metavar="K",
                   help="the fixed-K hot-set rule with this K instead of a threshold")
    p.add_argument("--prompts", type=positive_int, metavar="N",
                   help="prompts to generate for (default: any number, up to 256 per round)")
    p.add_argument("--prompt-len", type=positive_int, default=128, metavar="L",
                   help="prompt tokens (default: 128)")
    p.add_argument("--gen-len", type=positive_int, default=32, metavar="G",
                   help="new tokens per prompt (default: 32)")
    p.add_argument("--max-groups", type=positive_int, default=16, metavar="N",
                   help="largest n searched (default: 16)")
    p.add_argument("--profile", metavar="FILE", help="a profile JSON (default: the cached one, "
                                                     "measured now if there is none)")
    p.add_argument("--devices", type=devices_arg, default=None, metavar="N|all",
                   help="plan for N devices, each with --device-budget (any N: a plan for "
                        "another machine too), or all of this machine's; default: what "
                        "`klotski generate` would use here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd)
