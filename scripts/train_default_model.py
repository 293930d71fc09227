"""Train the embedded default model: a small Mixtral on text that ships with CPython.

Corpus (no download; exactly what `corpus_documents()` builds, in this order):
  1. The language reference of `pydoc_data.topics`: one document per topic, sorted by topic name.
  2. Standard-library docstrings, read with `ast` from the `.py` sources under
     `sysconfig.get_paths()["stdlib"]` (nothing is imported or executed): every file, sorted by
     path, except those under a directory named in `EXCLUDED_DIRS` or starting with "config-".
     One document per module: "Module NAME" and the module docstring, then, in source order,
     each public (not "_"-prefixed) class as "class Name(bases)" and each public function or
     method as "Name.method(args)", each followed by its cleaned docstring (`ast.get_docstring`).
     Nested functions are skipped; so are modules without any docstring.
A document is held out for validation when crc32 of its id ("topic:NAME" / "module:NAME") is
0 modulo 20 (about 5%). The byte-level BPE tokenizer is trained on the training documents only.
The text differs between Python versions; the log records the version and the corpus hashes.

Training: documents are tokenized as `<s> text </s>`, concatenated and cut into windows of
seq_len + 1 tokens with stride seq_len; each epoch visits the windows in a seeded random order.
The model is trained with our JAX model code (`klotski_jax.models.training`: the NNX modules the
engine serves, top-k-only MoE, Mixtral's load-balancing loss) and optax AdamW (warm-up + cosine
decay, global-norm clipping) in an `nnx.Optimizer`, from a fixed seed. The run logs the train loss
of every step and the validation loss every `--eval-every` steps to `training_log.json`.

Checkpoints: every `--checkpoint-every` steps and after its last step, the run saves an orbax
checkpoint in RUN_DIR/checkpoints/STEP (float32 params, optimizer state, step, the log so far;
the 3 latest are kept). `--resume` continues from the latest one (same options otherwise) and
gives the loss curve of an uninterrupted run; a checkpoint of another configuration, corpus or
seed is refused. A fresh run refuses to start over existing checkpoints unless `--restart`.

Export: an HF Mixtral checkpoint (bf16 `model.safetensors` with per-expert keys, `config.json`,
`generation_config.json`, tokenizer files) that `transformers.MixtralForCausalLM` loads. The
exported bf16 weights are then converted with our converter and measured: train / validation
loss and perplexity, routing skew per layer on the validation text, samples (greedy, and with
the demo's repetition penalty through the engine). A model card
(README.md) with those numbers and the log are written next to the weights.

Usage:
  .venv/bin/python scripts/train_default_model.py --overwrite        # the shipped model
  .venv/bin/python scripts/train_default_model.py --tiny --steps 5   # a smoke test (seconds)
  .venv/bin/python scripts/train_default_model.py --stop-after 20    # a prefix of the real run
  .venv/bin/python scripts/train_default_model.py --overwrite --resume  # continue an interrupted run
  .venv/bin/python scripts/train_default_model.py --rewrite-card     # the card from the log
  .venv/bin/python scripts/train_default_model.py --remeasure        # re-measure, new card
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import platform
import shlex
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("train_default_model")
ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED = 20250211  # Klotski's arXiv date; any fixed value works
CHECKPOINT_EVERY = 100  # steps (about 2 minutes of the shipped run on 2 CPU cores)
KEEP_CHECKPOINTS = 3

# Directories of the stdlib tree whose docstrings are left out: tests, GUI code, vendored or
# generated modules, and third-party packages.
EXCLUDED_DIRS: tuple[str, ...] = (
    "__phello__", "__pycache__", "dist-packages", "encodings", "ensurepip", "idlelib", "lib2to3",
    "site-packages", "test", "tests", "tkinter", "turtledemo")
VALIDATION_MODULUS = 20  # crc32(doc id) % 20 == 0 -> validation

# The shipped model's architecture (HF Mixtral config fields; vocab_size comes from the
# tokenizer). 16 layers, experts 89% of the 21 MB: a 25% device budget holds 4 whole layers,
# enough for every schedule's streaming minimum (flexgen double-buffers two layers of experts)
# beside the KV caches and activations of a small batch.
ARCH: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": True,
    "rope_theta": 10000.0, "max_position_embeddings": 1024,
}
TINY_ARCH: dict[str, Any] = {
    **ARCH, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
}


@dataclasses.dataclass(frozen=True)
class Options:
    out_dir: pathlib.Path
    run_dir: pathlib.Path
    tiny: bool
    steps: int
    stop_after: int | None
    checkpoint_every: int
    resume: bool
    restart: bool
    seed: int
    vocab_size: int
    batch_size: int
    seq_len: int
    peak_lr: float
    warmup_steps: int
    router_aux_loss_coef: float
    eval_every: int
    repro_steps: int
    sample_tokens: int
    overwrite: bool
    rewrite_card: bool
    remeasure: bool
    argv: tuple[str, ...]


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: 2-layer width-32 model on pydoc_data.topics only, vocab 512")
    p.add_argument("--out-dir", type=pathlib.Path, default=None,
                   help="where the HF checkpoint goes (default: klotski_jax/data/default_model, "
                        "or RUN_DIR/default_model with --tiny)")
    p.add_argument("--run-dir", type=pathlib.Path, default=None,
                   help="tokenizer, log and float32 params (default: build/train_default_model)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1100; tiny 5)")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="train only the first K steps of the schedule, write the log, no export "
                        "(the checkpoint at step K lets --resume continue the run later)")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help=f"save an orbax checkpoint (params, optimizer state, step, log) in "
                        f"RUN_DIR/checkpoints every N steps and after the last step run; the "
                        f"{KEEP_CHECKPOINTS} latest are kept; 0: only after the last step "
                        f"(default {CHECKPOINT_EVERY})")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in RUN_DIR/checkpoints (same options; "
                        "the loss curve is the uninterrupted run's); fails if there is none or it "
                        "is from a different configuration")
    p.add_argument("--restart", action="store_true",
                   help="delete RUN_DIR/checkpoints and train from step 0 (a fresh run refuses to "
                        "start over existing checkpoints otherwise)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--vocab-size", type=int, default=None, help="default 3072; tiny 512")
    p.add_argument("--batch-size", type=int, default=None, help="default 8; tiny 4")
    p.add_argument("--seq-len", type=int, default=None, help="default 256; tiny 32")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 12")
    p.add_argument("--router-aux-loss-coef", type=float, default=0.02,
                   help="Mixtral-8x7B's value (the HF config default is 0.001)")
    p.add_argument("--eval-every", type=int, default=None, help="default 100; tiny: only at the ends")
    p.add_argument("--repro-steps", type=int, default=None,
                   help="after training, rerun the first N steps from scratch and compare the "
                        "losses (default 20; tiny 0)")
    p.add_argument("--sample-tokens", type=int, default=None, help="default 40; tiny 4")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--remeasure", action="store_true",
                   help="no training: measure the checkpoint in OUT_DIR again (losses, routing, "
                        "samples of the current demo prompts), update its log and card")
    p.add_argument("--rewrite-card", action="store_true",
                   help="only rewrite OUT_DIR/README.md from OUT_DIR/training_log.json")
    a = p.parse_args(argv)
    tiny = a.tiny
    steps = a.steps if a.steps is not None else (5 if tiny else 1100)
    if steps < 1 or (a.stop_after is not None and not 1 <= a.stop_after <= steps):
        p.error("--steps must be >= 1 and --stop-after in 1..steps")
    if a.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    if a.resume and a.restart:
        p.error("--resume and --restart exclude each other")
    run_dir = a.run_dir or ROOT / "build" / ("train_default_model" + ("-tiny" if tiny else ""))
    out_dir = a.out_dir or (run_dir / "default_model" if tiny
                            else ROOT / "klotski_jax" / "data" / "default_model")
    pick = lambda v, full, small: v if v is not None else (small if tiny else full)
    return Options(
        out_dir=out_dir, run_dir=run_dir, tiny=tiny, steps=steps, stop_after=a.stop_after,
        checkpoint_every=a.checkpoint_every, resume=a.resume, restart=a.restart,
        seed=a.seed, vocab_size=pick(a.vocab_size, 3072, 512), batch_size=pick(a.batch_size, 8, 4),
        seq_len=pick(a.seq_len, 256, 32), peak_lr=a.lr,
        warmup_steps=a.warmup_steps if a.warmup_steps is not None else max(1, steps // 12),
        router_aux_loss_coef=a.router_aux_loss_coef,
        eval_every=pick(a.eval_every, 100, steps), repro_steps=pick(a.repro_steps, 20, 0),
        sample_tokens=pick(a.sample_tokens, 40, 4), overwrite=a.overwrite,
        rewrite_card=a.rewrite_card, remeasure=a.remeasure,
        argv=tuple(sys.argv[1:] if argv is None else argv))


# ---- corpus -----------------------------------------------------------------------------------

def pydoc_documents() -> list[tuple[str, str]]:
    """(id, text) of every `pydoc_data.topics` page, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"topic:{name}", topics[name]) for name in sorted(topics)]


def _module_name(rel: pathlib.PurePath) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _items(body: list[ast.stmt], prefix: str) -> Iterator[str]:
    """Public classes and functions of a module or class body, in source order, as text."""
    for node in body:
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc:
                yield f"class {prefix}{node.name}" + (f"({bases})" if bases else "") + f"\n\n{doc}"
            yield from _items(node.body, f"{prefix}{node.name}.")
        elif doc:
            yield f"{prefix}{node.name}({ast.unparse(node.args)})\n\n{doc}"


def stdlib_documents(stdlib: pathlib.Path | None = None) -> list[tuple[str, str]]:
    """(id, text) per standard-library module with docstrings (see the module docstring)."""
    stdlib = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib)
        if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # e.g. a Python 2 era file; none in CPython 3.11, but stay robust
        name = _module_name(rel)
        pieces = list(_items(tree.body, ""))
        if doc := ast.get_docstring(tree):
            pieces.insert(0, doc)
        if pieces:
            docs.append((f"module:{name}", f"Module {name}\n\n" + "\n\n".join(pieces)))
    return docs


def is_validation(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode()) % VALIDATION_MODULUS == 0


def corpus_documents(tiny: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) documents; tiny runs use the pydoc topics only."""
    docs = pydoc_documents() + ([] if tiny else stdlib_documents())
    return ([d for d in docs if not is_validation(d[0])], [d for d in docs if is_validation(d[0])])


def sha256_text(docs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for doc_id, text in docs:
        h.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def pack(tokenizer: Any, docs: Sequence[tuple[str, str]], seq_len: int, bos: int, eos: int
         ) -> np.ndarray:
    """Windows [m, seq_len + 1] of the token stream `<s> doc </s> <s> doc </s> ...`, stride
    seq_len (so every token is a target exactly once)."""
    encoded = tokenizer.encode_batch([text for _, text in docs], add_special_tokens=False)
    stream = np.concatenate([np.array([bos, *e.ids, eos], np.int32) for e in encoded])
    m = (len(stream) - 1) // seq_len
    idx = np.arange(m)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def windows(tokenizer_json: pathlib.Path, train_docs: Sequence[tuple[str, str]],
            val_docs: Sequence[tuple[str, str]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token windows of the documents with the saved tokenizer."""
    from tokenizers import Tokenizer

    from klotski_jax.checkpoints.default_model import BOS, EOS, SPECIAL_TOKENS

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    bos, eos = SPECIAL_TOKENS.index(BOS), SPECIAL_TOKENS.index(EOS)
    return (pack(tokenizer, train_docs, seq_len, bos, eos),
            pack(tokenizer, val_docs, seq_len, bos, eos))


def train_config(opts: Options) -> Any:
    from klotski_jax.models.training import TrainConfig

    return TrainConfig(steps=opts.steps, peak_lr=opts.peak_lr, warmup_steps=opts.warmup_steps,
                       router_aux_loss_coef=opts.router_aux_loss_coef)


def repro_check(opts: Options, cfg: Any, train_windows: np.ndarray, run_log: dict[str, Any]
                ) -> dict[str, Any]:
    """Rerun the first `repro_steps` steps from scratch; compare their losses with the run's."""
    from klotski_jax.models.training import fit

    n = min(opts.repro_steps, len(run_log["steps"]))
    _, again = fit(cfg, train_config(opts), train_windows, train_windows[:0],
                   batch_size=opts.batch_size, seed=opts.seed, steps_to_run=n)
    a = np.array([s["loss"] for s in run_log["steps"][:n]])
    b = np.array([s["loss"] for s in again["steps"]])
    diff = float(np.abs(a - b).max())
    log.info("reproducibility: first %d steps rerun, max |loss difference| %.3g", n, diff)
    return {"steps": n, "max_abs_loss_diff": diff}


# ---- measuring the exported model -------------------------------------------------------------

def measure_export(opts: Options, hf_dir: pathlib.Path, train_windows: np.ndarray,
                   val_windows: np.ndarray) -> dict[str, Any]:
    """Convert the exported bf16 checkpoint with our converter (to float32, exact) and measure
    losses, routing and greedy samples of the shipped weights."""
    import klotski_jax
    from klotski_jax.bench.options import SAMPLE_REPETITION_PENALTY
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.demo import PROMPTS
    from klotski_jax.engine import Engine
    from klotski_jax.models import training as T
    from klotski_jax.planning.policy import Policy

    ckpt = klotski_jax.convert(hf_dir, opts.run_dir / "export-f32", dtype="float32",
                               overwrite=True, progress=False)
    reader = CheckpointReader(ckpt)
    cfg = reader.config
    trained = T.model_from_params(cfg, reader.read_all())
    train_sample = train_windows[: len(val_windows)]  # as many windows as validation, fixed
    train_loss = T.eval_loss(trained, train_sample, opts.batch_size)
    val_loss = T.eval_loss(trained, val_windows, opts.batch_size)
    skew = T.routing_skew(trained, val_windows, opts.batch_size)

    model = klotski_jax.load(ckpt)
    batch = model.tokenizer(list(PROMPTS), padding=True, return_tensors="np")
    out = model.generate_reference(batch["input_ids"], opts.sample_tokens,
                                   attention_mask=batch["attention_mask"])
    texts = model.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
    # What the demo shows: greedy with a mild repetition penalty, through the engine.
    penalised = Engine(ckpt, Policy()).generate(
        list(PROMPTS), max_new_tokens=opts.sample_tokens,
        repetition_penalty=SAMPLE_REPETITION_PENALTY).texts or []
    return {"train_loss": train_loss, "train_ppl": math.exp(train_loss),
            "train_windows": len(train_sample), "val_loss": val_loss,
            "val_ppl": math.exp(val_loss), "val_windows": len(val_windows), "routing": skew,
            "samples": [{"prompt": p, "continuation": t} for p, t in zip(PROMPTS, texts,
                                                                         strict=True)],
            "sample_repetition_penalty": SAMPLE_REPETITION_PENALTY,
            "samples_penalised": [{"prompt": p, "continuation": t}
                                  for p, t in zip(PROMPTS, penalised, strict=True)]}


# ---- model card -------------------------------------------------------------------------------

def model_card(record: dict[str, Any]) -> str:
    """README.md for the exported checkpoint; every number comes from `record` (this run)."""
    from klotski_jax.config import ModelConfig
    from klotski_jax.models.specs import Kind, layer_specs, total_bytes

    hf, c, e, o = record["hf_config"], record["corpus"], record["export"], record["options"]
    env, r = record["environment"], e["routing"]
    cfg = ModelConfig.from_hf_config(hf)
    quarter = (total_bytes(cfg) // 4) // (sum(s.size for s in layer_specs(cfg, 0)) * cfg.itemsize)
    n_params = total_bytes(cfg) / cfg.itemsize
    last = record["steps"][-25:]
    rows = {
        "family": "Mixtral (`MixtralForCausalLM`): RMSNorm, RoPE (theta "
                  f"{cfg.rope_theta:g}), SwiGLU experts",
        "layers": f"{cfg.num_layers}, all MoE",
        "hidden size": f"{cfg.hidden_size}; {cfg.num_heads} query / {cfg.num_kv_heads} KV heads "
                       f"of {cfg.head_dim}",
        "experts": f"{cfg.num_experts} per layer, top-{cfg.top_k}, intermediate size "
                   f"{cfg.expert_intermediate_size}",
        "vocabulary": f"{cfg.vocab_size} (byte-level BPE), embeddings "
                      f"{'tied' if cfg.tie_word_embeddings else 'untied'}",
        "parameters": f"{n_params / 1e6:.2f}M: {e['safetensors_bytes'] / 1e6:.1f} MB in bfloat16, "
                      f"experts {total_bytes(cfg, Kind.EXPERT) / total_bytes(cfg):.0%} of the bytes",
        "offloading": f"a device budget of 25% of the weight bytes holds {quarter} whole layers",
    }
    table = lambda head, lines: "\n".join([head, "|" + "---|" * head.count(" | ") + "---|",
                                            *lines])
    arch = table("| | |", [f"| {k} | {v} |" for k, v in rows.items()])
    splits = table("| split | documents | characters | tokens | sha256 of the text |", [
        f"| {name} | {c[k + '_documents']} | {c[k + '_chars']:,} | {c[k + '_tokens']:,} | "
        f"`{c[k + '_sha256'][:16]}` |" for name, k in (("train", "train"), ("validation", "val"))])
    results = table("| text | windows | loss | perplexity |", [
        f"| {name} | {e[k + '_windows']} | {e[k + '_loss']:.3f} | {e[k + '_ppl']:.1f} |"
        for name, k in (("train (its first windows)", "train"), ("validation", "val"))])
    curve = table("| step | train loss (mean of 10 steps) | validation loss | validation ppl |", [
        f"| {v['step']} | {_train_at(record, v['step'])} | {v['val_loss']:.3f} | "
        f"{v['val_ppl']:.1f} |" for v in record["evals"]])
    skew = table("| layer | two most-used experts' share | which | mean per window |", [
        f"| {i} | {share:.1%} | {r['top2_experts'][i]} | {r['top2_share_per_window'][i]:.1%} |"
        for i, share in enumerate(r["top2_share"])])
    sample_list = lambda key: "\n".join(f"- *{s['prompt']}* ...`{s['continuation']!r}`"
                                         for s in e.get(key, []))
    samples = sample_list("samples")
    penalised = (f"\n\nWith a repetition penalty of {e['sample_repetition_penalty']:g} (what "
                 f"the bench sample of `make demo` uses; klotski engine):\n\n"
                 + sample_list("samples_penalised")) if e.get("samples_penalised") else ""
    repro = record.get("reproducibility")
    repro_line = (f"This run reran its first {repro['steps']} steps from scratch after training;\n"
                  f"the largest difference between the two loss curves was "
                  f"{repro['max_abs_loss_diff']:.2g}." if repro else "")
    excluded = ", ".join(f"`{d}`" for d in EXCLUDED_DIRS)
    quantized = quantization_section(record.get("quantization_quality"))
    resumed = record.get("resumed_at") or []
    resume_line = (
        f"The script saves an orbax checkpoint of the run (float32 params, optimizer state, step,\n"
        f"loss log) in its run directory every {o.get('checkpoint_every', CHECKPOINT_EVERY)} "
        f"steps (`--checkpoint-every`); an interrupted run\ncontinues with the same command plus "
        f"`--resume`, on the loss curve of an uninterrupted run.\n" + (
            f"This run was resumed at step{'s' if len(resumed) > 1 else ''} "
            f"{', '.join(map(str, resumed))}." if resumed else "This run was not interrupted."))
    return f"""# klotski-jax default model: a small Mixtral trained on CPython's documentation

The embedded default model of klotski-jax (`klotski demo`, `default_checkpoint()`): an HF
`MixtralForCausalLM` checkpoint trained from scratch by `scripts/train_default_model.py` with
klotski-jax's own JAX model code. Its text uses the words and phrasing of the Python
documentation, but it is a {n_params / 1e6:.1f}M-parameter model trained for
{record["train_wall_s"] / 60:.0f} minutes on a 2-core CPU (validation perplexity
{e["val_ppl"]:.0f}): its sentences read like the documentation phrase by phrase but say
nothing coherent, and greedy decoding tends to repeat itself (a repetition penalty of about 1.3
helps; see the samples). It knows only that domain: prompts about anything else get
documentation-flavoured noise. Its router spreads tokens
unevenly over the experts, as real MoE models do, so hot-expert prefetching has something to
predict.

Files: `config.json`, `generation_config.json`, `model.safetensors` (bfloat16, per-expert keys
`model.layers.{{i}}.block_sparse_moe.experts.{{e}}.w1/w2/w3.weight`), `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`, `training_log.json` (every step's losses and
every number below) and this card.

## Architecture

{arch}

## Corpus

Text that ships with CPython {env["python"]}, no download (`corpus_documents()` in the script):

- the language reference in `pydoc_data.topics`, one document per topic;
- the docstrings of the standard library's `.py` sources, read with `ast` (nothing imported),
  one document per module: `Module NAME` and the module docstring, then public classes as
  `class Name(bases)` and public functions and methods as `Name.method(args)`, each followed by
  its docstring; directories {excluded} and `config-*` are left out.

A document is held out for validation when `crc32(id) % {VALIDATION_MODULUS} == 0`.

{splits}

The tokenizer (byte-level BPE, `tokenizers` {env["tokenizers"]}; `<unk> <s> </s> <pad>` are ids
0-3) is trained on the training split only. Documents are tokenized as `<s> text </s>`,
concatenated and cut into windows of {o["seq_len"]} + 1 tokens.

## Training

```sh
{record["command"]}
```

{resume_line}

- {record["steps_run"]} steps of {o["batch_size"]} x {o["seq_len"]} tokens: \
{record["steps"][-1]["tokens"]:,} tokens, {record["steps"][-1]["tokens"] / c["train_tokens"]:.2f} \
epochs; seed {o["seed"]}; float32.
- optax AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices), peak learning rate
  {o["peak_lr"]:g} after {o["warmup_steps"]} warm-up steps, cosine decay to 10%, gradients
  clipped at global norm 1.0.
- Loss: next-token cross-entropy + {o["router_aux_loss_coef"]:g} x Mixtral's load-balancing
  loss (transformers' `load_balancing_loss_func`: pooled over layers, 2.0 when balanced).
- The MoE computes only each token's top-2 experts (`combine_grouped`: assignments sorted by
  expert, one small matmul per block of 64 rows). It is the same sum as the reference model's
  dense oracle (a test checks values and gradients), so the trained model is exactly the model
  the engine serves, at about a third of the oracle's expert FLOPs.
- {record["train_wall_s"] / 60:.1f} minutes in the training loop, validation included
  ({record["tokens_per_s"]:.0f} training tokens/s), {record["total_wall_s"] / 60:.1f} minutes
  in all, on {env["machine"]}; jax {env["jax"]}, transformers
  {env["transformers"]}.

## Results

Measured on the exported bfloat16 weights (converted to float32 by `klotski convert`), per
token:

{results}

The training batches of the last {len(last)} steps averaged a cross-entropy of
{sum(s["ce"] for s in last) / len(last):.3f}; the last load-balancing loss was
{last[-1]["aux"]:.3f}. Loss curve (float32 weights; `training_log.json` has every step):

{curve}

## Routing skew

Share of the top-2 assignments of the validation text ({r["tokens"]:,} tokens) that go to the
two most-used experts of each layer (25% if routing were uniform), and the same share within
each {o["seq_len"]}-token window, averaged (what one batch sees). The balancing loss is pooled
over layers, so it evens out the experts' totals across layers, not within each layer.

{skew}

## Samples

Greedy continuations of the demo prompts ({o["sample_tokens"]} new tokens, reference model):

{samples}{penalised}

{quantized}## Reproducibility

Rerunning the command with the same seed, Python, jax and tokenizers versions on the same kind
of machine gives the same loss curve within float noise (XLA may order float sums differently
on other machines). {repro_line}
"""


def quantization_section(q: dict[str, Any] | None) -> str:
    """The card's "Quantized experts" section from the log's `quantization_quality` (written
    by scripts/quant_quality.py --update-card); empty when the log has none."""
    if not q:
        return ""
    base = q["rows"]["bf16"]
    lines = []
    for r in q["rows"].values():
        if r["quantize"] == "none":
            continue
        group = "per row" if r["group_size"] is None else str(r["group_size"])
        lines.append(f"| {r['quantize']} | {group} | {r['method']} | {r['val_ppl']:.2f} | "
                     f"{100 * r['ppl_rel_change']:+.2f}% | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['expert_bytes_ratio']:.3f} |")
    return f"""## Quantized experts

`klotski convert --quantize int8|int4` on this model (`scripts/quant_quality.py`,
{q["date"][:10]}; `{q["source"]}`): validation perplexity of the stores (bf16:
{base["val_ppl"]:.2f}), its change against bf16, the share of the {q["validation_tokens"]:,}
validation positions whose top-1 token equals bf16's, and the bytes of an expert against bf16.
`rtn` is round-to-nearest (the default), `rtn+lsq` adds the least-squares refinement
(`--refine`). Group 128 does not divide the experts' width (192): the converter refuses it.

| experts | group | method | validation ppl | vs bf16 | top-1 = bf16 | bytes vs bf16 |
|---|---|---|---|---|---|---|
{chr(10).join(lines)}

"""


def _train_at(record: dict[str, Any], step: int) -> str:
    """Mean training loss over the 10 steps up to `step` ("-" at step 0)."""
    window = [s["loss"] for s in record["steps"] if step - 10 < s["step"] <= step]
    return f"{sum(window) / len(window):.3f}" if window else "-"


# ---- main -------------------------------------------------------------------------------------

def hf_config(arch: dict[str, Any], vocab_size: int, aux_coef: float) -> dict[str, Any]:
    """A transformers-5 style Mixtral config.json."""
    from klotski_jax.checkpoints.default_model import BOS, EOS, PAD, SPECIAL_TOKENS

    arch = dict(arch)
    theta = arch.pop("rope_theta")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "attention_dropout": 0.0, "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS), "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "dtype": "bfloat16", "hidden_act": "silu", "initializer_range": 0.02,
        "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "router_aux_loss_coef": aux_coef, "router_jitter_noise": 0.0, "sliding_window": None,
        "use_cache": True, "vocab_size": vocab_size, **arch}


def _install(src: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
    """Move the finished export to out_dir (replacing it only with --overwrite). The old
    directory is renamed aside first and deleted only once the new one is in place."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists (pass --overwrite to replace it)")
        out_dir.replace(old)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(out_dir))
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    opts = parse_args(argv)
    if opts.rewrite_card:
        record = json.loads((opts.out_dir / "training_log.json").read_text())
        (opts.out_dir / "README.md").write_text(model_card(record))
        return 0
    if opts.remeasure:
        remeasure(opts)
        return 0
    if opts.stop_after is None and opts.out_dir.exists() and not opts.overwrite:
        raise FileExistsError(f"{opts.out_dir} exists (pass --overwrite to replace it)")
    t_all = time.perf_counter()
    import jax
    import tokenizers
    import transformers

    from klotski_jax.checkpoints.default_model import (
        build_tokenizer,
        write_hf_checkpoint,
    )
    from klotski_jax.config import ModelConfig
    from klotski_jax.models.training import CheckpointError, TrainCheckpoints, fit, flat_params

    checkpoints = TrainCheckpoints(opts.run_dir / "checkpoints", every=opts.checkpoint_every,
                                   keep=KEEP_CHECKPOINTS)
    latest = checkpoints.latest_step()  # fail early, before the corpus and tokenizer
    if opts.resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoints.directory} to resume from")
    if opts.restart:
        checkpoints.clear()
    elif not opts.resume and latest is not None:
        raise CheckpointError(f"{checkpoints.directory} holds checkpoints of an earlier run (up to "
                              f"step {latest}): pass --resume to continue it, or --restart to "
                              f"delete them and train from step 0")
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = corpus_documents(opts.tiny)
    log.info("corpus: %d train documents (%.2f MB), %d validation (%.2f MB)", len(train_docs),
             sum(len(t) for _, t in train_docs) / 1e6, len(val_docs),
             sum(len(t) for _, t in val_docs) / 1e6)
    tok_dir = opts.run_dir / "tokenizer"
    arch = TINY_ARCH if opts.tiny else ARCH
    vocab = build_tokenizer(tok_dir, (t for _, t in train_docs), opts.vocab_size,
                            arch["max_position_embeddings"])
    train_windows, val_windows = windows(tok_dir / "tokenizer.json", train_docs, val_docs,
                                         opts.seq_len)
    log.info("tokens: %d train windows, %d validation windows of %d", len(train_windows),
             len(val_windows), opts.seq_len)

    hf = hf_config(arch, vocab, opts.router_aux_loss_coef)
    cfg = ModelConfig.from_hf_config(hf).replace(dtype="float32")  # train in float32
    run_steps = opts.stop_after or opts.steps
    try:
        model, run_log = fit(cfg, train_config(opts), train_windows, val_windows,
                             batch_size=opts.batch_size, seed=opts.seed, steps_to_run=run_steps,
                             eval_every=opts.eval_every, checkpoints=checkpoints,
                             resume=opts.resume)
    finally:
        checkpoints.close()
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    # The command of the whole run: a resumed run is the uninterrupted one (its log's
    # "resumed_at" says where it was resumed).
    command = [a for a in opts.argv if a not in ("--resume", "--restart")]
    record: dict[str, Any] = {
        "command": "python scripts/train_default_model.py " + shlex.join(command),
        "options": {k: _show_path(v) if isinstance(v, pathlib.Path) else v
                    for k, v in dataclasses.asdict(opts).items()},
        "hf_config": hf,
        "environment": {"python": platform.python_version(), "jax": jax.__version__,
                        "tokenizers": tokenizers.__version__,
                        "transformers": transformers.__version__,
                        "machine": f"{platform.machine()}, {jax.device_count()} "
                                   f"{jax.devices()[0].platform} device(s)"},
        "corpus": {"train_documents": len(train_docs), "val_documents": len(val_docs),
                   "train_chars": sum(len(t) for _, t in train_docs),
                   "val_chars": sum(len(t) for _, t in val_docs),
                   "train_tokens": int(train_windows.size - len(train_windows)),
                   "val_tokens": int(val_windows.size - len(val_windows)),
                   "train_sha256": sha256_text(train_docs), "val_sha256": sha256_text(val_docs),
                   "val_ids": [d for d, _ in val_docs]},
        "steps_run": run_steps, **run_log}
    if opts.stop_after is not None:
        _write_log(opts.run_dir / f"training_log-stop{opts.stop_after}.json", record)
        return 0

    _write_npz(opts.run_dir / "params.npz", params)
    if opts.repro_steps:
        record["reproducibility"] = repro_check(opts, cfg, train_windows, run_log)
    export = opts.run_dir / "export"
    shutil.rmtree(export, ignore_errors=True)
    write_hf_checkpoint(export, hf, params, tok_dir)
    record["export"] = measure_export(opts, export, train_windows, val_windows)
    record["export"]["safetensors_bytes"] = (export / "model.safetensors").stat().st_size
    record["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    _write_log(export / "training_log.json", record)
    (export / "README.md").write_text(model_card(record))
    _install(export, opts.out_dir, opts.overwrite)
    e = record["export"]
    log.info("wrote %s: train loss %.3f, validation loss %.3f (ppl %.1f), %.1f MB", opts.out_dir,
             e["train_loss"], e["val_loss"], e["val_ppl"], e["safetensors_bytes"] / 1e6)
    return 0


def remeasure(opts: Options) -> None:
    """Measure the exported checkpoint in out_dir again with its run's options (same corpus,
    windows, sample length), e.g. after the demo prompts changed; the training record is kept,
    its "export" section and the card are replaced (written to temporary files, then renamed)."""
    log_path = opts.out_dir / "training_log.json"
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_path} not found: --remeasure needs an exported checkpoint")
    record = json.loads(log_path.read_text())
    o, c = record["options"], record["corpus"]
    train_docs, val_docs = corpus_documents(o["tiny"])
    if (sha256_text(train_docs), sha256_text(val_docs)) != (c["train_sha256"], c["val_sha256"]):
        raise ValueError(f"this Python's corpus differs from the one {log_path} was trained on "
                         f"(Python {record['environment']['python']}); measure there")
    train_windows, val_windows = windows(opts.out_dir / "tokenizer.json", train_docs, val_docs,
                                         o["seq_len"])
    size = record["export"]["safetensors_bytes"]
    measured = dataclasses.replace(opts, batch_size=o["batch_size"], seq_len=o["seq_len"],
                                   sample_tokens=o["sample_tokens"])
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    record["export"] = {**measure_export(measured, opts.out_dir, train_windows, val_windows),
                        "safetensors_bytes": size}
    _write_log(opts.out_dir / "training_log.json", record)
    _write_text(opts.out_dir / "README.md", model_card(record))
    e = record["export"]
    log.info("re-measured %s: validation loss %.3f (ppl %.1f)", opts.out_dir, e["val_loss"],
             e["val_ppl"])


def _show_path(path: pathlib.Path) -> str:
    """A path relative to the repository when it is inside it (the log ships in the package)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _write_log(path: pathlib.Path, record: dict[str, Any]) -> None:
    _write_text(path, json.dumps(record, indent=1) + "\n")


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file beside path, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _write_text(path: pathlib.Path, text: str) -> None:
    """Write to a temporary file beside path, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    from klotski_jax.models.training import CheckpointError

    try:
        sys.exit(main())
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:  # a message, no traceback
        sys.exit(f"error: {e}")
