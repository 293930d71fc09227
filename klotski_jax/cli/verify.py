"""`klotski verify`: check every file of a converted checkpoint against its manifest's
checksums (checkpoints/checksums.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def _cmd(args: argparse.Namespace) -> int:
    from klotski_jax.checkpoints import checksums
    from klotski_jax.checkpoints.manifest import read_manifest

    manifest = read_manifest(args.ckpt)
    if "checksums" not in manifest:
        print(f"error: {args.ckpt}: no checksums recorded (converted before klotski-jax recorded "
              "them); `klotski convert HF_DIR OUT_DIR --overwrite` adds them", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    problems, n_files, nbytes = checksums.verify(args.ckpt, manifest, args.experts_only,
                                                 progress=not args.quiet)
    for p in problems:
        print(f"error: {args.ckpt}: {p}", file=sys.stderr)
    dt = time.perf_counter() - t0
    what = "expert files" if args.experts_only else "files"
    if problems:
        print(f"{len(problems)} bad of {n_files} {what}: re-convert the checkpoint with "
              "`klotski convert HF_DIR OUT_DIR --overwrite`", file=sys.stderr)
        return 2
    print(f"ok: {n_files} {what} ({nbytes / 1e6:,.1f} MB) match their checksums "
          f"({dt:.1f} s)")
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a checkpoint's files against their checksums",
                       description="Read every file of a converted checkpoint and compare its "
                                   "size and XXH3-64 checksum with the manifest's; report each "
                                   "bad file by layer, expert and part (or tensor). Exit 0 "
                                   "when clean, 2 otherwise.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `klotski convert`")
    p.add_argument("--experts-only", action="store_true",
                   help="check the expert store only (the bulk of the bytes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
