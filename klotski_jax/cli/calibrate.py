"""`klotski calibrate`: build the correlation table of the hot-expert prefetcher
(planning/prefetcher.py) by running prompts through the engine."""

from __future__ import annotations

import argparse
import pathlib
import shlex
from typing import Any

from klotski_jax.cli.options import positive_int, size
from klotski_jax.constants import PolicyError


# ---- calibrate ----------------------------------------------------------------------------------
def _cmd(args: argparse.Namespace) -> int:
    from klotski_jax import generate_io as gio
    from klotski_jax.checkpoints.manifest import read_manifest
    from klotski_jax.config import ModelConfig
    from klotski_jax.engine import Engine
    from klotski_jax.planning.policy import Policy
    from klotski_jax.planning.prefetcher import TABLE_FILE, CorrelationPrefetcher, TableError

    if args.path_length < 1:
        raise PolicyError(f"--path-length must be >= 1, got {args.path_length}")
    records = gio.read_prompts(args.input)
    policy = Policy(groups=1, batch_size=args.batch_size,
                    device_budget=size(args.device_budget, args.ckpt))
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


def add(sub: Any) -> None:
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
    p.add_argument("--max-new-tokens", type=positive_int, default=16, metavar="N",
                   help="tokens generated per prompt, their routing counted too (default: 16)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                   help="prompts per round (default: 8)")
    p.add_argument("--device-budget", metavar="SIZE", help="device memory cap (default: none)")
    p.set_defaults(func=_cmd)
