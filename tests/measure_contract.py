"""Measure the deviations behind the exactness contract's tolerances (tests/contract.py).

    .venv/bin/python tests/measure_contract.py [--out DIR] [--quick]

Not a test (pytest does not collect it): it prints the numbers docs/exactness.md quotes.
Models: the eight tiny families of hf_models.py in float32 and
converted to bfloat16, and the bfloat16 default model (three batches: short texts, long texts,
random tokens). For each, the reference logits (`Model.logits`) are computed once per "kernel"
in a subprocess each, since a patched projection must be in place before anything is traced:

  as-is     the code as it is
  split2/3/5  every projection sums its contraction in 2, 3 or 5 blocks (another blocking, as
            another CPU's or GPU's kernel would)
  upcast    every projection upcasts both operands to float32 (HIGHEST precision)
  noexcess  XLA_FLAGS=--xla_allow_excess_precision=false (XLA keeps every bf16 rounding)

Then `Engine.logits` of every schedule and ablation, 1-3 groups, at the minimum and at an
unlimited device budget, runs with the code as it is, and each run is compared with every
kernel's reference: the largest per-position deviation and the mean one, relative to the
reference's max |logit| M over valid positions (contract.logit_deviation). Last, greedy flips
between kernels: the largest top-2 margin (/ M) at a position whose argmax differs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (JAX on CPU, highest float32 precision, compile cache)
import contract  # noqa: E402
import numpy as np  # noqa: E402

from klotski_jax.bench.hf import left_pad as hf_left_pad  # noqa: E402

KERNELS = ("as-is", "split2", "split3", "split5", "upcast", "noexcess")
POLICIES = [
    *[dict(schedule="klotski", multi_batch=m, hot_only_prefetch=h, reorder=r)
      for m, h, r in itertools.product([True, False], repeat=3)],
    dict(schedule="flexgen"), dict(schedule="lru"), dict(schedule="sequential"),
]
TEXTS_SHORT = ["The with statement is used to", "A class", "In Python, a list comprehension",
               "Exceptions are raised when an error occurs and the interpreter stops the current "
               "block", "A generator function returns an iterator that yields values one at a "
               "time, so", "import os"]
TEXTS_LONG = [
    "The with statement is used to wrap the execution of a block with methods defined by a "
    "context manager.", "A class is a blueprint",
    "In Python, a list comprehension offers a shorter syntax when you want to create a new list "
    "based on the values of an existing list.", "Decorators are",
    "The global interpreter lock, or GIL, is a mutex that protects access to Python objects, "
    "preventing multiple threads from executing Python bytecodes at once.", "To open a file, use",
    "Dictionaries map keys to values; keys must be hashable and",
    "def main():\n    args = parse_args()\n    for item in args.items:\n        print(item)"]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id prompts -> left-padded ids and mask [B, S] (int32)."""
    ids, mask = hf_left_pad(prompts, pad)
    return ids.astype(np.int32), mask.astype(np.int32)


def prepare(out: pathlib.Path, quick: bool) -> dict[str, tuple[pathlib.Path, list[str]]]:
    """Checkpoints and input batches: {model name: (checkpoint, [batch files])}."""
    from hf_models import CONFIGS, save_hf_model

    import klotski_jax
    from klotski_jax.checkpoints.default_model import default_checkpoint

    models: dict[str, tuple[pathlib.Path, list[str]]] = {}
    families = ["mixtral", "qwen2_moe"] if quick else sorted(CONFIGS)
    for name in families:
        hf_dir = out / f"{name}-hf"
        if not hf_dir.exists():
            save_hf_model(name, hf_dir)
        for dtype in ("float32", "bfloat16"):
            ckpt = out / f"{name}-{dtype}"
            if not ckpt.exists():
                klotski_jax.convert(hf_dir, ckpt, dtype=dtype, progress=False)
            rng = np.random.default_rng(7)  # tests/test_pipeline.py's prompts
            ids, mask = left_pad([rng.integers(3, 96, n).tolist() for n in (7, 11, 5, 9, 6)], 0)
            batch = out / f"{name}-{dtype}.batch0.npz"
            np.savez(batch, ids=ids, mask=mask)
            models[f"{name}-{dtype}"] = (ckpt, [str(batch)])
    ckpt = default_checkpoint(cache_dir=out / "default-cache")
    model = klotski_jax.load(ckpt)
    tok, cfg = model.tokenizer, model.config
    rng = np.random.default_rng(11)
    batches = [[tok(t)["input_ids"] for t in TEXTS_SHORT]]
    if not quick:
        batches += [[tok(t)["input_ids"] for t in TEXTS_LONG],
                    [rng.integers(4, cfg.vocab_size, n).tolist()
                     for n in (64, 41, 30, 57, 12, 33, 50, 8)]]
    files = []
    for i, prompts in enumerate(batches):
        ids, mask = left_pad(prompts, cfg.pad_token_id or 0)
        files.append(str(out / f"default.batch{i}.npz"))
        np.savez(files[-1], ids=ids, mask=mask)
    models["default-bfloat16"] = (ckpt, files)
    return models


def patch_projections(kernel: str) -> None:
    """Replace layers.linear by an emulated other kernel (before anything is traced)."""
    import jax.numpy as jnp

    from klotski_jax.models import layers

    f32 = jnp.float32

    def finish(y: Any, x: Any, w: Any, b: Any, lead: tuple[int, ...]) -> Any:
        y = y.astype(jnp.promote_types(x.dtype, w.dtype)).reshape(*lead, w.shape[0])
        return y if b is None else y + b

    def split(parts: int) -> Any:
        def linear(x: Any, w: Any, b: Any = None) -> Any:
            lead, d = x.shape[:-1], x.shape[-1]
            rows, step = x.reshape(math.prod(lead), d), -(-d // parts)
            y = sum(jnp.einsum("nd,fd->nf", rows[:, i:i + step], w[:, i:i + step],
                               preferred_element_type=f32) for i in range(0, d, step))
            return finish(y, x, w, b, lead)
        return linear

    def upcast(x: Any, w: Any, b: Any = None) -> Any:
        lead, d = x.shape[:-1], x.shape[-1]
        y = jnp.einsum("nd,fd->nf", x.reshape(-1, d).astype(f32), w.astype(f32),
                       precision="highest")
        return finish(y, x, w, b, lead)

    if kernel.startswith("split"):
        layers.linear = split(int(kernel[5:]))
    elif kernel == "upcast":
        layers.linear = upcast


def reference_logits(kernel: str, out: pathlib.Path, models: dict[str, Any]) -> None:
    """(In a subprocess) Model.logits of every batch under `kernel` -> out/ref-<kernel>.npz."""
    import klotski_jax

    patch_projections(kernel)
    logits = {}
    for name, (ckpt, batches) in models.items():
        model = klotski_jax.load(ckpt)
        for i, batch in enumerate(batches):
            b = np.load(batch)
            logits[f"{name}/{i}"] = model.logits(b["ids"], b["mask"])
    np.savez(out / f"ref-{kernel}.npz", **logits)


def engine_runs(models: dict[str, Any], refs: dict[str, Any]) -> list[dict[str, Any]]:
    """Engine.logits of every policy x groups x budget vs every kernel's reference."""
    from klotski_jax.engine import Engine
    from klotski_jax.planning.placement import Workload, place
    from klotski_jax.planning.policy import Policy

    rows = []
    for name, (ckpt, batches) in models.items():
        cfg = Engine(ckpt).config
        for i, batch in enumerate(batches):
            b = np.load(batch)
            ids, mask = b["ids"], b["mask"]
            s = ids.shape[1]
            for p, groups in itertools.product(POLICIES, (1, 2, 3)):
                base = Policy(groups=groups, **p)
                lay = Engine(ckpt, base).layout(len(ids))
                g, bs = lay.groups, lay.batch
                lo = place(cfg, base, Workload(g, bs, s, -(-(s + 1) // 32) * 32 - s)).min_device_bytes
                for budget in (lo, None):
                    got = Engine(ckpt, base.replace(device_budget=budget)).logits(ids, mask)
                    for kernel, ref in refs.items():
                        dev = contract.logit_deviation(got, ref[f"{name}/{i}"], mask)
                        rows.append(dict(model=name, batch=i, schedule=p["schedule"],
                                         kernel=kernel, position=dev.position, mean=dev.mean))
        print(f"  {name}: done", flush=True)
    return rows


def flips(models: dict[str, Any], refs: dict[str, Any]) -> dict[str, float]:
    """Per model: the largest reference top-2 margin / M at a position where two kernels'
    argmax differ (0 when none differs)."""
    worst: dict[str, float] = {}
    for name, (_, batches) in models.items():
        for i, batch in enumerate(batches):
            valid = np.load(batch)["mask"] > 0
            for a, b in itertools.permutations(refs, 2):
                x, y = refs[a][f"{name}/{i}"][valid], refs[b][f"{name}/{i}"][valid]
                split = x.argmax(-1) != y.argmax(-1)
                m = contract.margins(x)[split] / np.abs(x).max()
                worst[name] = max(worst.get(name, 0.0), float(m.max()) if m.size else 0.0)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=None, help="work folder (default: a temp one)")
    ap.add_argument("--quick", action="store_true", help="two families, one default-model batch")
    ap.add_argument("--reference", help=argparse.SUPPRESS)  # the subprocess of one kernel
    opts = ap.parse_args()
    out = opts.out or pathlib.Path(tempfile.mkdtemp(prefix="klotski-contract-"))
    out.mkdir(parents=True, exist_ok=True)
    models = prepare(out, opts.quick)
    if opts.reference:
        reference_logits(opts.reference, out, models)
        return
    for kernel in KERNELS:
        env = dict(os.environ)
        if kernel == "noexcess":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false")
        args = [sys.executable, __file__, "--out", str(out), "--reference", kernel]
        subprocess.run(args + (["--quick"] if opts.quick else []), env=env, check=True)
        print(f"reference logits: {kernel}", flush=True)
    refs = {k: dict(np.load(out / f"ref-{k}.npz")) for k in KERNELS}
    rows = engine_runs(models, refs)

    def group(model: str) -> str:
        return "bfloat16 default" if model.startswith("default") else (
            "bfloat16 tiny" if model.endswith("bfloat16") else "float32 tiny")

    print("\nlargest deviation / M of Engine.logits (all schedules) vs each kernel's reference:")
    print(f"{'models':18s} {'kernel':9s} {'per position':>13s} {'mean':>10s}")
    for g in ("float32 tiny", "bfloat16 tiny", "bfloat16 default"):
        for kernel in KERNELS:
            sel = [r for r in rows if group(r["model"]) == g and r["kernel"] == kernel]
            print(f"{g:18s} {kernel:9s} {max(r['position'] for r in sel):13.2e} "
                  f"{max(r['mean'] for r in sel):10.2e}")
    print("\nper schedule, largest over kernels (per position):")
    for g in ("float32 tiny", "bfloat16 default"):
        for sched in ("klotski", "flexgen", "lru", "sequential"):
            sel = [r["position"] for r in rows if group(r["model"]) == g and r["schedule"] == sched]
            print(f"  {g:18s} {sched:10s} {max(sel):.2e}")
    print("\ngreedy flips between kernels: largest reference margin / M at a flip")
    for name, m in flips(models, refs).items():
        print(f"  {name:28s} {m:.2e}")
    print(f"\ncontract: float32 {contract.FLOAT32}\n          bfloat16 {contract.BFLOAT16}")


if __name__ == "__main__":
    main()
