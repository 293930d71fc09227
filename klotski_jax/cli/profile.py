"""`klotski profile`: measure the model's compute and transfer costs on this device (profiler.py,
calibrated against the engine by engine_profile.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from klotski_jax.cli.options import positive_int, size


# ---- profile ------------------------------------------------------------------------------------
def _cmd(args: argparse.Namespace) -> int:
    from klotski_jax import profiler
    from klotski_jax.engine_profile import profile_checkpoint

    if not args.verbose:  # one "placement" info line per calibration run would bury the output
        logging.getLogger("klotski_jax.engine").setLevel(logging.WARNING)
    opts = profiler.ProfileOptions(repeats=args.repeats, quick=args.quick,
                                   device_budget=size(args.device_budget, args.ckpt))
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
    from klotski_jax.planning.costs import CostModel

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


def add(sub: Any) -> None:
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
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                   help="timed runs per shape, the median is kept (default: 5)")
    p.add_argument("--quick", action="store_true", help="small grids (tests, a first look)")
    p.set_defaults(func=_cmd)
