"""`klotski convert`: an HF MoE checkpoint to the klotski-jax format."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _cmd_convert(args: argparse.Namespace) -> int:
    # orbax asks JAX for the process index while it saves the dense checkpoint, which starts
    # JAX's backends: keep a conversion off the accelerator (and its memory) unless the user
    # chose a platform.
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from klotski_jax.checkpoints.convert import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.quiet, quantize=args.quantize, group_size=args.group_size,
                  refine=args.refine)
    print(f"converted {args.hf_dir} -> {out}")
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert an HF MoE checkpoint to the klotski-jax format")
    p.add_argument("hf_dir", help="local HF model directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="store weights in this dtype (default: the config's dtype)")
    p.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="store the routed experts quantized (dense weights, router and shared "
                        "experts keep --dtype): int8 moves about half, int4 about 0.28x the "
                        "bytes of bf16; fp8 (e4m3, a float32 scale per GxG block) about half, "
                        "and from an FP8 checkpoint it keeps the experts' fp8 bytes as they are")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="inputs per quantization group (default: 64 for int4, one group per "
                        "output row for int8); must divide hidden_size and the expert width. "
                        "fp8: the block side (default: the FP8 source's block, else 128)")
    p.add_argument("--refine", action="store_true",
                   help="refine the round-to-nearest int8/int4 scales and zero points by least "
                        "squares per group (lower weight error; no better perplexity measured)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)
