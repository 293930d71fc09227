"""Metrics of `klotski bench` runs: throughputs of one run, one row from repeated runs."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def run_metrics(stats: Mapping[str, Any], sequences: int) -> dict[str, float]:
    """Throughputs of one run from its RunStats fields. The first token of each sequence comes
    out of the prefill; decode throughput counts the tokens of the one-token steps."""
    prefill, decode = stats["prefill_s"], stats["decode_s"]
    total = prefill + decode
    generated = stats["generated_tokens"]
    decode_tokens = max(generated - sequences, 0)
    return {
        "total_s": total,
        "throughput_tokens_per_s": generated / total if total > 0 else 0.0,
        "prefill_tokens_per_s": stats["prompt_tokens"] / prefill if prefill > 0 else 0.0,
        "decode_tokens_per_s": decode_tokens / decode if decode > 0 else 0.0,
        "io_wait_fraction": stats["io_wait_s"] / total if total > 0 else 0.0,
    }


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of every numeric field, the throughput spread."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    for k in keys:  # byte counts stay integers
        if isinstance(runs[0][k], int):
            row[k] = int(row[k])
    tput = [r["throughput_tokens_per_s"] for r in runs]
    row["throughput_per_repeat"] = tput
    row["throughput_min"], row["throughput_max"] = min(tput), max(tput)
    return row
