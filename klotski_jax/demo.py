"""`klotski demo`: convert the embedded default model, generate from a few prompts, report speed.

This is the "main job" a newcomer runs first (`make demo`). It needs no download and no torch:
the default model, a small Mixtral trained on CPython's documentation that ships inside the
package, is converted into the cache directory on first use (see checkpoints/default_model.py).
Generation uses the all-experts-resident reference model (`Model.generate_reference`, greedy,
KV cache).

The continuations read like Python documentation (a small model: fluent-looking, often wrong);
the demo shows that the whole path (convert -> load -> tokenize -> prefill/decode ->
detokenize) works, and how fast.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# In the default model's domain (CPython's documentation): it knows nothing else.
PROMPTS: tuple[str, ...] = (
    "The with statement is used to",
    "Return a new list containing",
    "If the file does not exist,",
    "In Python, a class definition",
)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure_generation(model: Any, ids: np.ndarray, mask: np.ndarray,
                       max_new_tokens: int) -> dict[str, Any]:
    """Greedy-generate `max_new_tokens` and time prefill and decode apart, compile excluded.

    Prefill is timed as a 1-new-token call (prompt forward + picking the first token; a
    0-token call would return before JAX's asynchronous dispatch finished); decode as the rest of
    a full call, i.e. max_new_tokens - 1 one-token steps. Both calls run once untimed first, so
    JIT compilation is excluded (and reported as `warmup_s`).
    """
    gen = lambda n: model.generate_reference(ids, n, attention_mask=mask)
    t0 = time.perf_counter()
    gen(1)
    gen(max_new_tokens)
    compile_s = time.perf_counter() - t0
    _, prefill_s = _timed(gen, 1)
    out, total_s = _timed(gen, max_new_tokens)
    batch = ids.shape[0]
    decode_s = max(total_s - prefill_s, 1e-9)
    prompt_tokens = int(mask.sum())
    return {
        "batch": batch,
        "prompt_len": int(ids.shape[1]),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "warmup_s": compile_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": (batch * (max_new_tokens - 1) / decode_s
                                if max_new_tokens > 1 else None),
        # Klotski's headline metric: generated tokens / (prefill + decode) time.
        "generated_tokens_per_s": batch * max_new_tokens / total_s,
        "output_ids": out,
    }


def _tokenizer(model: Any, ckpt_dir: os.PathLike[str]) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:  # older loaders: the converter copies the tokenizer files next to the weights
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.fspath(ckpt_dir))
    tok.padding_side = "left"  # batched greedy generation appends on the right
    return tok


def run_demo(cache_dir: str | os.PathLike[str] | None = None, max_new_tokens: int = 32,
             rebuild: bool = False, prompts: Sequence[str] = PROMPTS) -> dict[str, Any]:
    """Build (or reuse) the default model, generate from `prompts`, print text and tokens/s.

    Returns the measurements (see `measure_generation`) plus the prompts, continuations and
    checkpoint paths, so callers and tests can check them without parsing the printout.
    """
    import jax

    import klotski_jax
    from klotski_jax.checkpoints.default_model import default_checkpoint
    from klotski_jax.constants import cache_root

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    root = cache_root(cache_dir)
    t0 = time.perf_counter()
    ckpt = default_checkpoint(cache_dir, rebuild=rebuild)
    model = klotski_jax.load(ckpt)
    setup_s = time.perf_counter() - t0
    cfg = model.config
    tok = _tokenizer(model, ckpt)
    batch = tok(list(prompts), padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)

    log.info("generating %d new tokens for %d prompts on %s", max_new_tokens, len(prompts),
             jax.devices()[0])
    stats = measure_generation(model, ids, mask, max_new_tokens)
    new_ids = stats.pop("output_ids")[:, ids.shape[1]:]
    continuations = tok.batch_decode(new_ids, skip_special_tokens=True)

    print(f"klotski-jax demo: default {cfg.family.value} model, {cfg.num_layers} layers, "
          f"{cfg.num_experts} experts (top-{cfg.top_k}), {cfg.dtype}, trained on CPython's "
          f"documentation (a small model: doc-like words, repetitive sentences)")
    print(f"checkpoint: {ckpt} (ready in {setup_s:.1f} s)")
    for prompt, cont in zip(prompts, continuations, strict=True):
        print(f"\n> {prompt}\n  ...{cont!r}")
    print(f"\nbatch {stats['batch']} x prompt {stats['prompt_len']} (left-padded), "
          f"{max_new_tokens} new tokens, greedy, reference model on {jax.devices()[0].platform}")
    print(f"  warm-up (JIT compile): {stats['warmup_s']:.2f} s, excluded below")
    print(f"  prefill: {stats['prefill_tokens_per_s']:.1f} prompt tokens/s "
          f"({stats['prefill_s'] * 1e3:.0f} ms)")
    if stats["decode_tokens_per_s"] is not None:
        print(f"  decode:  {stats['decode_tokens_per_s']:.1f} tokens/s "
              f"({max_new_tokens - 1} steps in {stats['decode_s']:.2f} s)")
    print(f"  overall: {stats['generated_tokens_per_s']:.1f} generated tokens/s "
          f"(generated tokens / (prefill + decode) time)")
    print(f"\ncached files: {root} (default-hf/ = HF checkpoint, default/ = converted); "
          f"remove with: rm -rf {root}")
    return {**stats, "checkpoint": str(ckpt), "cache_dir": str(root), "setup_s": setup_s,
            "prompts": list(prompts), "continuations": continuations}
