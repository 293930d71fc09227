"""Compare our reference decode speed with HF transformers (torch) in memory, on the same model.

Both sides run greedy generation of the same batch of prompts for the same number of new tokens,
with every weight in memory: ours is `Model.generate_reference` (jitted per-layer JAX steps, KV
cache), HF's is `MixtralForCausalLM.generate` (or whichever class the checkpoint names). Warm-up
runs are excluded; each side is timed `--repeats` times and the median is reported. Prefill is
timed as a 1-new-token call, decode as the rest of a full call (N-1 one-token steps).

Also checks that the greedy tokens agree (fraction of identical generated tokens; bf16 runs may
diverge after a near-tie, float32 runs should agree exactly).

Usage (default model, float32 and bfloat16):
  .venv/bin/python scripts/compare_hf_speed.py
  .venv/bin/python scripts/compare_hf_speed.py --hf-dir PATH --dtype float32 --batch 8
Writes benchmarks/results/compare_hf_speed-<date>.{json,md} and prints one JSON line per dtype.
Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("compare_hf_speed")
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Options:
    hf_dir: pathlib.Path | None
    dtypes: tuple[str, ...]
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    out_dir: pathlib.Path
    seed: int


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", type=pathlib.Path, default=None,
                   help="local HF MoE checkpoint (default: the embedded default model)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                   help="repeatable; default: float32 and bfloat16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed needs at least one decode step)")
    return Options(a.hf_dir, tuple(a.dtype or ("float32", "bfloat16")), a.batch, a.prompt_len,
                   a.new_tokens, a.repeats, a.out_dir, a.seed)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Run fn once untimed (warm-up, compiles), then `repeats` times; (last output, median s)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def speeds(gen: Callable[[int], np.ndarray], opts: Options) -> dict[str, Any]:
    """Time a generate function `gen(new_tokens) -> ids [B, S + new_tokens]`."""
    _, prefill_s = median_time(lambda: gen(1), opts.repeats)
    out, total_s = median_time(lambda: gen(opts.new_tokens), opts.repeats)
    decode_s = max(total_s - prefill_s, 1e-9)
    b, n = opts.batch, opts.new_tokens
    return {"prefill_s": prefill_s, "total_s": total_s,
            "prefill_tokens_per_s": b * opts.prompt_len / prefill_s,
            "decode_tokens_per_s": b * (n - 1) / decode_s,
            "generated_tokens_per_s": b * n / total_s,
            "tokens": out[:, opts.prompt_len:]}


def ours(ckpt_dir: pathlib.Path, ids: np.ndarray, opts: Options) -> dict[str, Any]:
    import klotski_jax

    model = klotski_jax.load(ckpt_dir)
    return speeds(lambda n: np.asarray(model.generate_reference(ids, n)), opts)


def hf(hf_dir: pathlib.Path, dtype: str, ids: np.ndarray, opts: Options) -> dict[str, Any]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(hf_dir, dtype=getattr(torch, dtype), local_files_only=True).eval()
    # Exactly n tokens with no EOS stop, like ours (`min_new_tokens` would instead mask EOS out
    # of the argmax and change the tokens). Greedy, KV cache.
    model.generation_config.eos_token_id = None
    input_ids = torch.from_numpy(ids.astype(np.int64))
    mask = torch.ones_like(input_ids)

    def gen(n: int) -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=n, pad_token_id=config.pad_token_id).numpy()
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return out

    return speeds(gen, opts)


def machine() -> dict[str, Any]:
    """The bench's machine description (nproc, CPU, load, versions) plus torch's thread count."""
    import torch

    from klotski_jax.bench.runner import machine_info

    return {**machine_info(), "torch_threads": torch.get_num_threads()}


def run_dtype(hf_dir: pathlib.Path, dtype: str, ids: np.ndarray, opts: Options,
              tmp: pathlib.Path) -> dict[str, Any]:
    """One configuration: convert at `dtype`, time ours and HF's, compare their tokens."""
    from klotski_jax.checkpoints.convert import convert

    ckpt = convert(hf_dir, tmp / f"ckpt-{dtype}", dtype=dtype, progress=False)
    mine = ours(ckpt, ids, opts)
    theirs = hf(hf_dir, dtype, ids, opts)
    a, b = mine.pop("tokens"), theirs.pop("tokens")
    same = a == b
    first_diff = [int(np.argmin(r)) if not r.all() else None for r in same]
    return {"dtype": dtype, "batch": opts.batch, "prompt_len": opts.prompt_len,
            "new_tokens": opts.new_tokens, "repeats": opts.repeats,
            "ours": mine, "hf_torch": theirs,
            "decode_speedup": mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "token_agreement": float(same.mean()), "first_divergence_per_row": first_diff}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Reference decode speed vs HF transformers ({report['date']})", "",
             f"- command: `{report['command']}`",
             f"- model: {report['model']}",
             f"- machine: {m['nproc']} x {m['cpu']} (1-min load average {m['loadavg'][0]:.1f}); "
             f"jax {m['jax']} on {m['device']}, torch {m['torch']} ({m['torch_threads']} "
             f"threads), transformers {m['transformers']}, Python {m['python']}",
             "- greedy, all weights in memory, warm-up excluded, median of repeats; prefill = a "
             "1-new-token call, decode = the rest of a full call", "",
             "| dtype | batch x prompt -> new | impl | prefill ms | decode tok/s | "
             "generated tok/s | token agreement |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        shape = f"{r['batch']} x {r['prompt_len']} -> {r['new_tokens']}"
        for name, key in (("klotski-jax reference", "ours"), ("HF torch", "hf_torch")):
            s = r[key]
            agree = f"{r['token_agreement']:.1%}" if key == "ours" else ""
            lines.append(f"| {r['dtype']} | {shape} | {name} | {s['prefill_s'] * 1e3:.1f} | "
                         f"{s['decode_tokens_per_s']:.1f} | {s['generated_tokens_per_s']:.1f} | "
                         f"{agree} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    if opts.hf_dir is None:
        from klotski_jax.checkpoints.default_model import default_checkpoint
        from klotski_jax.constants import cache_root

        default_checkpoint()
        hf_dir, model_name = cache_root() / "default-hf", "embedded default model"
    else:
        hf_dir, model_name = opts.hf_dir, str(opts.hf_dir)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(opts.seed).integers(4, vocab, (opts.batch, opts.prompt_len))
    ids = ids.astype(np.int32)
    results = []
    with tempfile.TemporaryDirectory(prefix="klotski-speed-") as tmp:
        for dtype in opts.dtypes:
            log.info("timing %s", dtype)
            r = run_dtype(hf_dir, dtype, ids, opts, pathlib.Path(tmp))
            print(json.dumps(r), flush=True)
            results.append(r)
    now = datetime.datetime.now(datetime.UTC)
    report = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "model": model_name,
              "command": shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
              "machine": machine(), "results": results}
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    stem = opts.out_dir / f"compare_hf_speed-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    log.info("wrote %s.{json,md}", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
