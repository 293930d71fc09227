"""A/B of batched expert calls: one engine with `expert_batch=1`, one with 4, same prompts,
warmed up, then three alternating runs each with the page cache evicted first; medians.

Usage: python ab_decode.py CKPT NUM_PROMPTS PROMPT_LEN NEW_TOKENS  (25% device budget)
"""

from __future__ import annotations

import sys

import numpy as np

import klotski_jax
from klotski_jax import Engine, Policy
from klotski_jax.models.specs import total_bytes


def main(ckpt: str, n: int, prompt_len: int, new: int) -> None:
    klotski_jax.use_compilation_cache()
    cfg = Engine(ckpt).config
    budget = total_bytes(cfg) // 4
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(n)]
    engines = {b: Engine(ckpt, Policy(device_budget=budget, evict_page_cache=True,
                                      expert_batch=b)) for b in (1, 4)}
    for engine in engines.values():
        engine.generate(prompts, max_new_tokens=new, stop_at_eos=False)  # warm-up
    runs: dict[int, list[tuple[float, float, float]]] = {1: [], 4: []}
    for rep in range(3):
        for b in (1, 4) if rep % 2 == 0 else (4, 1):
            st = engines[b].generate(prompts, max_new_tokens=new, stop_at_eos=False).stats
            runs[b].append((st.prefill_s, st.decode_s,
                            st.generated_tokens / (st.prefill_s + st.decode_s)))
    for b, r in runs.items():
        a = np.array(r)
        print(f"expert_batch={b}: prefill s {np.median(a[:, 0]):.3f}  decode s "
              f"{np.median(a[:, 1]):.3f}  tok/s {np.median(a[:, 2]):.1f}  all tok/s "
              f"{np.round(a[:, 2], 1).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:5]))
