"""The correlation prefetcher at E = 256, top-8: table bytes, and per MoE layer the time and
temporary memory of observe, and of predict + expected_use, for steps of 8 to 4096 tokens.

Run from the repository root: PYTHONPATH=. .venv/bin/python
benchmarks/results/deepseek-scale-20261201/measure_prefetcher.py
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from klotski_jax.planning.prefetcher import CorrelationPrefetcher, CorrelationTable

E, K = 256, 8
LAYERS = (1, 2, 3, 4)


def main() -> None:
    rng = np.random.default_rng(0)
    table = CorrelationTable.empty(LAYERS, E, 1)
    print(f"counts per MoE layer: {table.counts[1].shape} {table.counts[1].dtype}, "
          f"{table.counts[1].nbytes} bytes")
    pf = CorrelationPrefetcher(table, top_k=K)
    for tokens in (8, 64, 512, 4096):
        picks = [np.argsort(rng.random((tokens, E)), axis=1)[:, :K] for _ in LAYERS]
        t0 = time.perf_counter()
        for _ in range(3):
            for p, layer in enumerate(LAYERS):
                pf.observe(layer, picks[p])
        observe = (time.perf_counter() - t0) / 3 / len(LAYERS)
        tracemalloc.start()
        t0 = time.perf_counter()
        for p, layer in enumerate(LAYERS[1:], 1):
            pf._step = {q: picks[q] for q in range(p)}  # the step's routing so far
            pf.predict(layer, K)
            pf.expected_use(layer, tokens)
        use = (time.perf_counter() - t0) / (len(LAYERS) - 1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{tokens} tokens: observe {observe * 1e3:.2f} ms, predict + expected_use "
              f"{use * 1e3:.2f} ms, peak temporaries {peak / 1e6:.1f} MB (per layer)")


if __name__ == "__main__":
    main()
