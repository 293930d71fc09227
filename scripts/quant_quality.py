"""Quality of quantized routed experts on the embedded default model (bf16 vs int8 vs int4).

Converts the default model's HF checkpoint (the packaged bf16 Mixtral, through
`default_checkpoint()`'s cache copy) with `klotski_jax.convert` into one store per scheme:

  bf16 (no quantization); int8 per row; int8 group 64; int4 group 32 / 64 / 128, each int4 once
  with least-squares refinement of the scales and zero points (manifest method "rtn+lsq",
  `--refine`) and once without ("rtn", the converter's default). Group 128 does not divide the experts'
  intermediate width (192): the converter refuses it, and the row records the refusal.

and measures each store with the reference model (`klotski_jax.load`, all weights resident, the
experts dequantized on the device exactly as the engine does):

- validation perplexity: exp of the mean next-token cross-entropy over every target of the
  validation windows (`corpus_documents()` / `windows()` of scripts/train_default_model.py:
  `<s> doc </s>` streams cut into windows of 256 + 1 tokens; all 256 targets of each window
  count), the definition of the model card's "validation perplexity" (`measure_export`, which
  measures a float32 conversion; the "float32" reference row repeats that measurement);
- its relative change vs bf16;
- teacher-forced top-1 agreement with bf16: the share of validation positions where the
  argmax of the logits equals bf16's argmax;
- greedy agreement with bf16: `generate_reference` (greedy) continues the first 64 tokens of 8
  evenly spaced validation windows by 32 tokens; the share of generated tokens equal to bf16's
  (position by position) and the mean length of the agreeing prefix;
- expert bytes per expert (`config.expert_bytes`, what the engine moves) and their ratio to
  bf16, and the checkpoint's total size on disk;
- the relative weight error of all routed experts: sum of squared error / sum of squares,
  the quantized store's arrays dequantized with `models.quant.dequantize_np` against the bf16
  store's arrays (which are the HF weights exactly).

It then checks the targets: int8 (per row) perplexity within 1% of bf16, int4 group 64 (the
default, round-to-nearest) within 10%, and prints PASS / FAIL for each.

Usage:
  export JAX_COMPILATION_CACHE_DIR=.jax_cache   # optional, speeds up reruns
  .venv/bin/python scripts/quant_quality.py                      # all validation windows
  .venv/bin/python scripts/quant_quality.py --max-windows 16     # a quick look
  .venv/bin/python scripts/quant_quality.py --work /tmp/qq --out benchmarks/results/quant-quality-X

Writes OUT/quality.json (every number, machine, versions, date, command line) and
OUT/quality.md (table, refinement summary, target verdicts); OUT defaults to
benchmarks/results/quant-quality-<YYYYMMDD>/. Stores go to --work (default: a temporary
directory, removed at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("quant_quality")
ROOT = pathlib.Path(__file__).resolve().parent.parent

INT8_TARGET = 0.01  # int8 (per row): perplexity within 1% of bf16
INT4_TARGET = 0.10  # int4 group 64 (round-to-nearest, the default): within 10%


@dataclasses.dataclass(frozen=True)
class Variant:
    """One store: how `klotski_jax.convert` is called."""

    name: str
    quantize: str  # "none", "int8", "int4"
    group_size: int | None  # None: the converter's default (per row for int8)
    refine: bool = False  # the converter's default
    dtype: str | None = None  # None: the HF config's (bfloat16)
    reference_only: bool = False  # the model card check: no weight error (same weights as bf16)


BASELINE = "bf16"
VARIANTS: tuple[Variant, ...] = (
    Variant(BASELINE, "none", None),
    Variant("int8-row", "int8", None),
    Variant("int8-g64", "int8", 64),
    *(Variant(f"int4-g{g}-{m}", "int4", g, refine=(m == "lsq"))
      for g in (32, 64, 128) for m in ("rtn", "lsq")),
)
CARD_CHECK = Variant("float32", "none", None, dtype="float32", reference_only=True)
INT8_TARGET_ROW, INT4_TARGET_ROW = "int8-row", "int4-g64-rtn"


@dataclasses.dataclass(frozen=True)
class Options:
    work: pathlib.Path | None
    out: pathlib.Path
    hf_dir: pathlib.Path | None
    max_windows: int | None
    batch: int
    greedy_prompts: int
    prompt_len: int
    new_tokens: int
    card_check: bool
    argv: tuple[str, ...]
    update_card: bool = False
    card_from: pathlib.Path | None = None


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=pathlib.Path, default=None,
                   help="where the converted stores go (kept); default: a temporary directory")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="results directory (default benchmarks/results/quant-quality-<date>)")
    p.add_argument("--hf-dir", type=pathlib.Path, default=None,
                   help="HF checkpoint to convert (default: the embedded default model)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="use only the first N validation windows (default: all)")
    p.add_argument("--batch", type=int, default=8, help="windows per logits call")
    p.add_argument("--greedy-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--update-card", action="store_true",
                   help="also record the summary in the packaged default model's "
                        "training_log.json and rewrite its model card")
    p.add_argument("--card-from", type=pathlib.Path, default=None, metavar="QUALITY_JSON",
                   help="only update the model card from an earlier run's quality.json")
    p.add_argument("--no-card-check", action="store_true",
                   help="skip the float32 store that reproduces the model card's perplexity")
    a = p.parse_args(argv)
    if a.max_windows is not None and a.max_windows < 1:
        p.error("--max-windows must be >= 1")
    today = datetime.date.today().strftime("%Y%m%d")
    out = a.out or ROOT / "benchmarks" / "results" / f"quant-quality-{today}"
    return Options(work=a.work, out=out, hf_dir=a.hf_dir, max_windows=a.max_windows,
                   batch=a.batch, greedy_prompts=a.greedy_prompts, prompt_len=a.prompt_len,
                   new_tokens=a.new_tokens, card_check=not a.no_card_check,
                   argv=tuple(sys.argv if argv is None else ["scripts/quant_quality.py", *argv]),
                   update_card=a.update_card, card_from=a.card_from)


# ---- validation text ----------------------------------------------------------------------------

def _training_script() -> ModuleType:
    path = ROOT / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def validation_windows(hf_dir: pathlib.Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The model card's validation windows [m, seq_len + 1] (same corpus, tokenizer, seq_len),
    and what they were checked against."""
    tdm = _training_script()
    record_path = hf_dir / "training_log.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    seq_len = record["options"]["seq_len"] if record else 256
    train_docs, val_docs = tdm.corpus_documents(tiny=False)
    info: dict[str, Any] = {"seq_len": seq_len, "val_documents": len(val_docs),
                            "val_sha256": tdm.sha256_text(val_docs)}
    if record:
        same = info["val_sha256"] == record["corpus"]["val_sha256"]
        info["matches_training_corpus"] = same
        if not same:
            log.warning("this Python's validation text differs from the one the model was trained "
                        "on (Python %s): perplexities will not match the card",
                        record["environment"]["python"])
    _, val = tdm.windows(hf_dir / "tokenizer.json", train_docs, val_docs, seq_len)
    return val, info


# ---- measuring one store ------------------------------------------------------------------------

def _batches(windows: np.ndarray, batch: int) -> Any:
    """(inputs [batch, S], real rows): the last batch is padded with repeats of the first window
    so every call has one compiled shape."""
    for start in range(0, len(windows), batch):
        part = windows[start:start + batch]
        real = len(part)
        if real < batch:
            part = np.concatenate([part, np.repeat(windows[:1], batch - real, axis=0)])
        yield part, real


def teacher_forced(model: Any, windows: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """(mean next-token cross-entropy over every target, argmax [m, S] of the logits)."""
    total, count, argmax = 0.0, 0, []
    for part, real in _batches(windows, batch):
        logits = model.logits(part[:, :-1]).astype(np.float64)[:real]  # [b, S, V]
        targets = part[:real, 1:]
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total += float((lse - picked).sum())
        count += targets.size
        argmax.append(logits.argmax(axis=-1).astype(np.int32))
    return total / count, np.concatenate(argmax)


def greedy(model: Any, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """The generated tokens [n, new_tokens] of greedy decoding from prompts [n, P]."""
    return np.asarray(model.generate_reference(prompts, new_tokens))[:, prompts.shape[1]:]


def expert_weight_error(store: pathlib.Path, baseline: pathlib.Path) -> dict[str, Any]:
    """Sum of squared error / sum of squares of every routed expert weight (and per part)."""
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.models.quant import dequantize_np

    q_reader, b_reader = CheckpointReader(store), CheckpointReader(baseline)
    sse: dict[str, float] = {}
    ss: dict[str, float] = {}
    for layer, is_moe in enumerate(q_reader.config.moe_layers):
        if not is_moe:
            continue
        ref = b_reader.experts(layer)
        stored = q_reader.experts(layer)
        for part, w in ref.items():
            w = w.astype(np.float32)
            leaves = {k.split(".", 1)[1]: v for k, v in stored.items()
                      if k.startswith(part + ".")}
            deq = dequantize_np(leaves) if leaves else stored[part].astype(np.float32)
            sse[part] = sse.get(part, 0.0) + float(np.sum((deq.astype(np.float64) - w) ** 2))
            ss[part] = ss.get(part, 0.0) + float(np.sum(w.astype(np.float64) ** 2))
    return {"rel_sq_error": sum(sse.values()) / sum(ss.values()),
            "rel_sq_error_by_part": {p: sse[p] / ss[p] for p in sse}}


def disk_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@dataclasses.dataclass
class Baseline:
    store: pathlib.Path
    val_loss: float
    argmax: np.ndarray
    greedy: np.ndarray
    expert_bytes: int


def measure(v: Variant, store: pathlib.Path, opts: Options, val: np.ndarray, prompts: np.ndarray,
            base: Baseline | None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Every number of one converted store; also its argmax and greedy tokens."""
    import klotski_jax

    t0 = time.perf_counter()
    model = klotski_jax.load(store)
    cfg = model.config
    manifest = json.loads((store / "manifest.json").read_text())
    quant = (manifest.get("experts") or {}).get("quantization")
    loss, argmax = teacher_forced(model, val, opts.batch)
    t_tf = time.perf_counter() - t0
    row: dict[str, Any] = {
        "status": "ok", "val_loss": loss, "val_ppl": math.exp(loss),
        "val_windows": len(val), "val_tokens": int(val[:, 1:].size),
        "expert_bytes": cfg.expert_bytes, "disk_bytes": disk_bytes(store),
        "config": {"dtype": cfg.dtype, "expert_quant": cfg.expert_quant.value,
                   "expert_group_size": cfg.expert_group_size},
        "quantization": quant, "seconds_teacher_forced": t_tf}
    t1 = time.perf_counter()
    gen = greedy(model, prompts, opts.new_tokens)
    row["seconds_greedy"] = time.perf_counter() - t1
    if base is not None:
        row["ppl_rel_change"] = math.exp(loss - base.val_loss) - 1.0
        row["top1_agreement"] = float(np.mean(argmax == base.argmax))
        same = gen == base.greedy
        prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
        row["greedy_agreement"] = float(same.mean())
        row["greedy_prefix_mean"] = float(prefix.mean())
        row["greedy_prefix"] = prefix.tolist()
        row["expert_bytes_ratio"] = cfg.expert_bytes / base.expert_bytes
        if not v.reference_only:
            row.update(expert_weight_error(store, base.store))
    row["seconds"] = time.perf_counter() - t0
    del model
    return row, argmax, gen


# ---- report -------------------------------------------------------------------------------------

def _pct(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.{digits}f}%" if sign else f"{100 * x:.{digits}f}%"


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, limit, what in ((INT8_TARGET_ROW, INT8_TARGET, "int8 (per row)"),
                              (INT4_TARGET_ROW, INT4_TARGET, "int4 group 64 (rtn, default)")):
        r = rows.get(name, {})
        change = r.get("ppl_rel_change")
        ok = change is not None and abs(change) <= limit
        out.append({"target": f"{what} perplexity within {limit:.0%} of bf16", "row": name,
                    "limit": limit, "ppl_rel_change": change, "pass": ok})
    return out


def refinement_summary(rows: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """One sentence on rtn vs rtn+lsq for each int4 group size that converted."""
    pairs, parts = [], []
    for g in (32, 64, 128):
        rtn, lsq = rows.get(f"int4-g{g}-rtn", {}), rows.get(f"int4-g{g}-lsq", {})
        if rtn.get("status") != "ok" or lsq.get("status") != "ok":
            continue
        pair = {"group_size": g, "rel_sq_error_rtn": rtn["rel_sq_error"],
                "rel_sq_error_lsq": lsq["rel_sq_error"], "val_ppl_rtn": rtn["val_ppl"],
                "val_ppl_lsq": lsq["val_ppl"]}
        pairs.append(pair)
        err = lsq["rel_sq_error"] / rtn["rel_sq_error"] - 1
        ppl = lsq["val_ppl"] / rtn["val_ppl"] - 1
        parts.append(f"group {g}: weight error {_pct(err, 1, True)}, perplexity "
                     f"{rtn['val_ppl']:.3f} -> {lsq['val_ppl']:.3f} ({_pct(ppl, 2, True)})")
    if not pairs:
        return "No int4 pair converted; nothing to say about refinement.", pairs
    def lowered(key: str) -> str:
        down = [p[f"{key}_lsq"] < p[f"{key}_rtn"] for p in pairs]
        return ("lowered {} in every group size" if all(down) else
                "did not lower {} in any group size" if not any(down) else
                "lowered {} in some group sizes only")
    verdict = (f"Least-squares refinement (rtn+lsq vs rtn) "
               f"{lowered('rel_sq_error').format('the expert weight error')} and "
               f"{lowered('val_ppl').format('the validation perplexity')}")
    return f"{verdict}: {'; '.join(parts)}.", pairs


def markdown(result: dict[str, Any]) -> str:
    rows, env = result["rows"], result["environment"]
    v = result["validation"]
    lines = [
        "# Quantized experts: quality on the default model",
        "",
        f"`{result['command']}` on {result['date']} ({env['machine']}, {env['cpu_count']} CPUs, "
        f"jax {env['jax']} on {env['device']}; klotski-jax {env['klotski_jax']}, "
        f"commit {env['git_commit']}). Wall time {result['wall_seconds'] / 60:.1f} minutes.",
        "",
        f"Model: the embedded default model (16-layer Mixtral, hidden 128, 8 experts of "
        f"intermediate 192, bf16), converted from `{result['hf_dir']}`. Validation text: "
        f"{v['windows_used']} of the {v['windows_total']} validation windows of 256 + 1 tokens "
        f"({v['tokens']:,} target tokens)"
        + ("" if v["windows_used"] == v["windows_total"] else
           f" (**limited with --max-windows {v['windows_used']}**)")
        + f"; greedy: {result['greedy']['prompts']} windows' first {result['greedy']['prompt_len']} "
          f"tokens, {result['greedy']['new_tokens']} new tokens each.",
        "",
        "Perplexity: exp(mean next-token cross-entropy over every target of the windows), the "
        "model card's definition; \"vs bf16\": relative change of perplexity; top-1: share of "
        "validation positions whose logits' argmax equals bf16's (teacher-forced); greedy: share "
        "of generated tokens equal to bf16's, position by position, and the mean length of the "
        "agreeing prefix; weight error: sum of squared error / sum of squares over every routed "
        "expert weight (dequantized vs bf16).",
        "",
        "| store | experts | group | method | val ppl | vs bf16 | top-1 agree | greedy agree "
        "| agree prefix | bytes / expert | vs bf16 | disk MB | weight error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refused: list[str] = []
    for name, r in rows.items():
        spec = r["variant"]
        group = ("per row" if spec["quantize"] == "int8" and spec["group_size"] is None
                 else "-" if spec["quantize"] == "none" else str(spec["group_size"]))
        experts = (spec["dtype"] or "bf16") if spec["quantize"] == "none" else spec["quantize"]
        method = "-" if spec["quantize"] == "none" else ("rtn+lsq" if spec["refine"] else "rtn")
        if r["status"] != "ok":
            lines.append(f"| {name} | {experts} | {group} | {method} | refused (below) "
                         "| - | - | - | - | - | - | - | - |")
            refused.append(f"- {name}: the converter refused it ({r['error_type']}): "
                           f"{r['error']}")
            continue
        q = r.get("quantization") or {}
        method = q.get("method", method)
        change = "-" if name == BASELINE else _pct(r.get("ppl_rel_change"), 2, True)
        prefix = r.get("greedy_prefix_mean")
        rel = r.get("rel_sq_error")
        lines.append(
            f"| {name} | {experts} | {group} | {method} | {r['val_ppl']:.3f} | {change} "
            f"| {_pct(r.get('top1_agreement'), 1)} | {_pct(r.get('greedy_agreement'), 1)} "
            f"| {'-' if prefix is None else f'{prefix:.1f}'} | {r['expert_bytes']:,} "
            f"| {r.get('expert_bytes_ratio', 1.0):.3f} | {r['disk_bytes'] / 1e6:.2f} "
            f"| {'-' if rel is None else f'{rel:.2e}'} |")
    if refused:
        lines += ["", *refused]
    card = result.get("card")
    if card:
        lines += ["", f"The model card reports validation perplexity {card['card_val_ppl']:.2f} "
                  f"(float32 conversion of the bf16 weights); the float32 row here measures "
                  f"{card['float32_val_ppl']:.2f}"
                  + ("" if v["windows_used"] == v["windows_total"] else
                     " on the limited windows")
                  + f", and the bf16 store (bf16 arithmetic) {rows[BASELINE]['val_ppl']:.2f}. "
                  "The float32 store holds the same weights as bf16 (exactly), so its agreement "
                  "with bf16 is the floor set by bf16 arithmetic alone, not by quantization. "
                  f"Greedy agreement counts only {result['greedy']['prompts']} x "
                  f"{result['greedy']['new_tokens']} tokens, and one early divergence changes "
                  "everything after it: read it as coarse."]
    lines += ["", result["refinement"]["summary"], "", "## Targets", ""]
    for t in result["targets"]:
        change = t["ppl_rel_change"]
        lines.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: "
                     + ("not measured" if change is None else
                        f"{_pct(change, 2, True)} ({t['row']})"))
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    import jax

    import klotski_jax

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    dev = jax.devices()[0]
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "device": f"{dev.platform} ({dev.device_kind})", "num_devices": jax.device_count(),
            "klotski_jax": klotski_jax.__version__, "git_commit": commit,
            "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR")}


def run(opts: Options, work: pathlib.Path) -> dict[str, Any]:
    import klotski_jax
    from klotski_jax.checkpoints.default_model import default_checkpoint
    from klotski_jax.checkpoints.errors import ConversionError

    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    env = environment()  # before the run: the code that runs is the code recorded
    if opts.hf_dir is None:
        default = default_checkpoint(cache_dir=work / "cache")
        hf_dir = pathlib.Path(json.loads((default / "manifest.json").read_text())["source"])
    else:
        hf_dir = opts.hf_dir
    log.info("HF checkpoint: %s", hf_dir)
    val_all, val_info = validation_windows(hf_dir)
    val = val_all[: opts.max_windows] if opts.max_windows else val_all
    pick = np.unique(np.linspace(0, len(val) - 1, opts.greedy_prompts).round().astype(int))
    prompts = val[pick, : opts.prompt_len]
    log.info("%d of %d validation windows; greedy from windows %s", len(val), len(val_all),
             pick.tolist())

    variants = [*VARIANTS, *([CARD_CHECK] if opts.card_check else [])]
    rows: dict[str, dict[str, Any]] = {}
    base: Baseline | None = None
    for v in variants:
        store = work / "stores" / v.name
        spec = {"quantize": v.quantize, "group_size": v.group_size, "refine": v.refine,
                "dtype": v.dtype}
        t0 = time.perf_counter()
        try:
            klotski_jax.convert(hf_dir, store, dtype=v.dtype, quantize=v.quantize,
                                group_size=v.group_size, refine=v.refine, overwrite=True,
                                progress=False)
        except ConversionError as e:
            log.info("%s: refused by the converter: %s", v.name, e)
            rows[v.name] = {"variant": spec, "status": "refused", "error": str(e),
                            "error_type": type(e).__name__}
            continue
        t_conv = time.perf_counter() - t0
        row, argmax, gen = measure(v, store, opts, val, prompts, base)
        rows[v.name] = {"variant": spec, **row, "seconds_convert": t_conv}
        if v.name == BASELINE:
            base = Baseline(store, row["val_loss"], argmax, gen, row["expert_bytes"])
            rows[v.name]["greedy_tokens"] = gen.tolist()
        log.info("%s: ppl %.3f%s (%.0f s)", v.name, row["val_ppl"],
                 f", {100 * row['ppl_rel_change']:+.2f}% vs bf16, top-1 "
                 f"{100 * row['top1_agreement']:.1f}%" if "ppl_rel_change" in row else "",
                 row["seconds"] + t_conv)

    summary, pairs = refinement_summary(rows)
    card_ppl = None
    record_path = hf_dir / "training_log.json"
    if record_path.is_file():
        card_ppl = json.loads(record_path.read_text())["export"]["val_ppl"]
    return {
        "date": started,
        "command": shlex.join(opts.argv),
        "environment": env,
        "hf_dir": str(hf_dir),
        "validation": {**val_info, "windows_total": len(val_all), "windows_used": len(val),
                       "tokens": int(val[:, 1:].size), "max_windows": opts.max_windows},
        "greedy": {"prompts": len(pick), "windows": pick.tolist(), "prompt_len": opts.prompt_len,
                   "new_tokens": opts.new_tokens},
        "batch": opts.batch,
        "rows": rows,
        "card": ({"card_val_ppl": card_ppl, "float32_val_ppl": rows[CARD_CHECK.name]["val_ppl"]}
                 if card_ppl is not None and CARD_CHECK.name in rows else None),
        "refinement": {"summary": summary, "pairs": pairs},
        "targets": verdicts(rows),
        "wall_seconds": time.perf_counter() - t_start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "klotski_jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    opts = parse_args(argv)
    if opts.card_from is not None:
        update_card(json.loads(opts.card_from.read_text()), opts.card_from)
        return 0
    if opts.work is None:
        with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
            result = run(opts, pathlib.Path(tmp))
    else:
        opts.work.mkdir(parents=True, exist_ok=True)
        result = run(opts, opts.work.resolve())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (opts.out / "quality.md").write_text(md)
    print(md)
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}: {t['target']}")
    log.info("wrote %s and %s", opts.out / "quality.json", opts.out / "quality.md")
    if opts.update_card:
        update_card(result, opts.out / "quality.json")
    return 0


CARD_ROWS = ("bf16", "int8-row", "int8-g64", "int4-g32-rtn", "int4-g64-rtn", "int4-g64-lsq")


def update_card(result: dict[str, Any], source: pathlib.Path) -> None:
    """Record the results' summary in the packaged default model's training_log.json
    ("quantization_quality") and rewrite its model card from that log (the card's every number
    comes from the log; `model_card` renders the section)."""
    card_dir = ROOT / "klotski_jax" / "data" / "default_model"
    log_path = card_dir / "training_log.json"
    record = json.loads(log_path.read_text())
    keep = ("val_ppl", "ppl_rel_change", "top1_agreement", "expert_bytes_ratio", "rel_sq_error")
    rows = {name: {"quantize": r["variant"]["quantize"], "group_size": r["variant"]["group_size"],
                   "method": (r.get("quantization") or {}).get("method"),
                   **{k: r.get(k) for k in keep}}
            for name, r in result["rows"].items() if name in CARD_ROWS and r["status"] == "ok"}
    record["quantization_quality"] = {
        "date": result["date"], "source": str(source.relative_to(ROOT) if source.is_absolute()
                                               and ROOT in source.parents else source),
        "validation_tokens": result["validation"].get("tokens"), "rows": rows}
    train = _training_script()
    tmp_log, tmp_card = log_path.with_suffix(".json.tmp"), card_dir / "README.md.tmp"
    tmp_log.write_text(json.dumps(record, indent=1) + "\n")
    tmp_card.write_text(train.model_card(record))
    tmp_log.replace(log_path)
    tmp_card.replace(card_dir / "README.md")
    log.info("updated %s and the model card", log_path)


if __name__ == "__main__":
    sys.exit(main())
