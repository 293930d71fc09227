"""Sampling (`engine.sample`): greedy at temperature 0, seeded reproducibility, and that top-k,
top-p and min-p never draw outside the set HF's warpers keep (checked against sets computed
independently here)."""

from __future__ import annotations

import numpy as np
import pytest

from klotski_jax.engine import sample

V = 50


def _logits(seed: int, rows: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (rows, V)).astype(np.float32)


def _probs(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def _draws(logits, n=300, **kw) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.stack([sample(logits, rng=rng, **kw) for _ in range(n)])  # [n, rows]


def test_temperature_zero_is_greedy_whatever_the_filters() -> None:
    x = _logits(0)
    for kw in ({}, {"top_k": 3}, {"min_p": 0.5}):
        got = sample(x, 0.0, 0.3, np.random.default_rng(0), **kw)
        np.testing.assert_array_equal(got, x.argmax(-1))


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    x = _logits(1)
    a = [sample(x, 1.0, 0.9, np.random.default_rng(3), top_k=10) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    draws = {tuple(sample(x, 1.0, 1.0, np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p: float) -> None:
    x = _logits(2)
    got = _draws(x, temperature=0.7, top_p=top_p)
    for r, row in enumerate(x):
        p = _probs(row, 0.7)
        order = np.argsort(-p)
        k = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest set reaching top_p
        nucleus = set(order[:k].tolist())
        assert set(got[:, r].tolist()) <= nucleus
    assert len(set(got[:, 0].tolist())) > 1 or top_p < 0.5  # it does sample, not argmax


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_the_k_most_likely(k: int) -> None:
    x = _logits(3)
    got = _draws(x, temperature=1.5, top_p=1.0, top_k=k)
    for r, row in enumerate(x):
        assert set(got[:, r].tolist()) <= set(np.argsort(-row)[:k].tolist())
    if k == 1:
        np.testing.assert_array_equal(got[0], x.argmax(-1))


def test_top_k_keeps_ties() -> None:
    x = np.array([[3.0, 3.0, 3.0, 0.0, -1.0]], np.float32)
    got = _draws(x, temperature=1.0, top_p=1.0, top_k=2)
    assert set(got[:, 0].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_never_samples_an_unlikely_token(min_p: float) -> None:
    x = _logits(4)
    got = _draws(x, temperature=1.0, top_p=1.0, min_p=min_p)
    for r, row in enumerate(x):
        p = _probs(row, 1.0)
        assert set(got[:, r].tolist()) <= set(np.flatnonzero(p >= min_p * p.max()).tolist())


def test_filters_compose_and_keep_the_most_likely() -> None:
    x = _logits(5)
    got = _draws(x, temperature=1.0, top_p=0.01, top_k=5, min_p=0.99)
    np.testing.assert_array_equal(got[0], x.argmax(-1))
