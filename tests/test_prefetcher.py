"""The correlation-aware prefetcher on routing with a known structure (layer L's expert is a
function of layer L-1's), its statistics, online updates, path length 2, and the table file.

The statistics are computed with `score_hot_set`, the function the scheduler's RunStats use.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from klotski_jax.planning.hot import score_hot_set
from klotski_jax.planning.prefetcher import (
    META_FILE,
    TABLE_FILE,
    CorrelationPrefetcher,
    CorrelationTable,
    TableError,
)

E = 4
LAYERS = (0, 1, 2)


def f(a: np.ndarray) -> np.ndarray:
    """The known structure: a token that picked a at layer L-1 picks a + 1 (mod E) at L."""
    return (a + 1) % E


def routing(first: list[int]) -> list[np.ndarray]:
    """Top-1 routing [N, 1] of every MoE layer for tokens that pick `first` at layer 0."""
    out = [np.array(first)[:, None]]
    for _ in LAYERS[1:]:
        out.append(f(out[-1]))
    return out


def run_step(pf: CorrelationPrefetcher, layers: list[np.ndarray], k: int
             ) -> list[tuple[list[int], int, bool]]:
    """Predict each layer before observing it, as the scheduler does; (prediction, routed
    predicted experts, exact top-k) per layer."""
    out = []
    for layer, experts in zip(LAYERS, layers):
        pred = pf.predict(layer, k)
        counts = np.bincount(experts.reshape(-1), minlength=E)
        out.append((pred, *score_hot_set(pred, counts, k)))
        pf.observe(layer, experts)
    return out


def calibrated(steps: int = 3) -> CorrelationPrefetcher:
    pf = CorrelationPrefetcher.fresh(LAYERS, E)
    for _ in range(steps):
        run_step(pf, routing([0, 0, 1]), k=2)
    return pf


def test_known_structure_is_predicted_exactly():
    """Warm-up on tokens picking (0, 0, 1) at layer 0: layer 1 gets rows 0 (twice) and 1 -> the
    scores are [0, 4s, s, 0] -> {1, 2}, the true routing {1: 2 tokens, 2: 1 token}; layer 0 uses
    popularity (0: 2s, 1: s) -> {0, 1}. Every prediction is exact: precision 1, accuracy 1."""
    pf = calibrated()
    assert pf.table.counts[1][0].tolist() == [0, 6, 0, 0]  # 2 tokens x 3 steps: 0 -> 1
    assert pf.table.counts[1][1].tolist() == [0, 0, 3, 0]
    assert pf.table.popularity[0].tolist() == [6, 3, 0, 0]
    got = run_step(pf, routing([0, 0, 1]), k=2)
    assert [p for p, _, _ in got] == [[0, 1], [1, 2], [2, 3]]
    assert [(hits, exact) for _, hits, exact in got] == [(2, True)] * 3


def test_unseen_routing_misses_then_online_updates_learn_it():
    """Tokens now pick (2, 2, 3) at layer 0, so (3, 3, 0) at 1 and (0, 0, 1) at 2. Step 1:
    layer 0 by popularity predicts {0, 1}; layers 1 and 2 find empty rows (2, 3 and 3, 0) and
    fall back to popularity, {1, 2} and {2, 3}: nothing predicted is routed (precision 0/6,
    accuracy 0/3).
    Step 2, after the online update: rows 2 -> 3 and 3 -> 0 exist, layers 1-2 are exact, and
    layer 0's popularity is now {0: 6, 1: 3, 2: 2, 3: 1} -> {0, 1}, still wrong."""
    pf = calibrated()
    first = run_step(pf, routing([2, 2, 3]), k=2)
    assert [p for p, _, _ in first] == [[0, 1], [1, 2], [2, 3]]
    hits = sum(h for _, h, _ in first)
    assert (hits, sum(e for _, _, e in first)) == (0, 0)
    second = run_step(pf, routing([2, 2, 3]), k=2)
    assert [p for p, _, _ in second] == [[0, 1], [3, 0], [0, 1]]
    assert [(h, e) for _, h, e in second] == [(0, False), (2, True), (2, True)]
    frozen = CorrelationPrefetcher(calibrated().table, online=False)
    run_step(frozen, routing([2, 2, 3]), k=2)
    assert run_step(frozen, routing([2, 2, 3]), k=2)[1][0] == [1, 2]  # no update, no learning


def test_prediction_sums_the_rows_of_all_tokens():
    """Rows add up over every token of all groups: 3 tokens from expert 0 outvote 2 from 3."""
    pf = CorrelationPrefetcher.fresh(LAYERS, E)
    t = pf.table
    t.counts[1][0] = [0, 5, 0, 0]
    t.counts[1][3] = [0, 0, 4, 3]
    pf.observe(0, np.array([[0], [0], [0], [3], [3]]))
    assert pf.predict(1, 1) == [1]  # 15 vs 8 and 6
    assert pf.predict(1, 3) == [1, 2, 3]
    assert pf.predict(1, 0) == []


def test_path_length_two_separates_what_one_layer_cannot():
    """Layer 2's expert is (a0 + a1) mod E: with l = 1 the row of a1 alone is ambiguous, with
    l = 2 the path (a0, a1) decides. Tokens: (0, 1) -> 1 and (2, 1) -> 3."""
    def step(pf: CorrelationPrefetcher, tokens: list[tuple[int, int]]) -> list[int]:
        a0 = np.array([t[0] for t in tokens])[:, None]
        a1 = np.array([t[1] for t in tokens])[:, None]
        pf.observe(0, a0)
        pf.observe(1, a1)
        pred = pf.predict(2, 1)
        pf.observe(2, (a0 + a1) % E)
        return pred

    for length, want in ((1, [[1], [1]]), (2, [[1], [3]])):
        pf = CorrelationPrefetcher.fresh(LAYERS, E, path_length=length)
        for _ in range(3):
            step(pf, [(0, 1)] * 2 + [(2, 1)])  # 2:1 for expert 1 over 3 in the row of a1 = 1
        assert [step(pf, [(0, 1)]), step(pf, [(2, 1)])] == want
    assert pf.table.counts[2].shape == (E * E, E) and pf.table.counts[1].shape == (E, E)


def test_scores_of_hot_sets():
    counts = np.array([5, 3, 3, 0])
    assert score_hot_set([0, 1], counts, 2) == (2, True)
    assert score_hot_set([0, 2], counts, 2) == (2, True)  # a tie at the boundary is a top-2
    assert score_hot_set([1, 2], counts, 2) == (2, False)
    assert score_hot_set([0, 3], counts, 2) == (1, False)
    assert score_hot_set([0], counts, 2) == (1, False)  # fewer than K is not the top-K


def test_table_round_trip_is_atomic_and_checked(tmp_path):
    table = calibrated().table
    table.save(tmp_path, {"input": "x.jsonl"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TABLE_FILE, META_FILE])
    back = CorrelationTable.load(tmp_path)
    assert back.path_length == 1 and back.moe_layers == LAYERS
    assert all((a == b).all() for a, b in zip(back.counts, table.counts))
    assert back.routing_probs()[0] == pytest.approx([6 / 9, 3 / 9, 0, 0])
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["input"] == "x.jsonl" and meta["tokens"] == [9, 9, 9]
    back.check(LAYERS, E)
    with pytest.raises(TableError, match="MoE layers"):
        back.check((0, 1), E)
    (tmp_path / TABLE_FILE).write_bytes((tmp_path / TABLE_FILE).read_bytes() + b"x")
    with pytest.raises(TableError, match="hash"):
        CorrelationTable.load(tmp_path)
    assert CorrelationTable.load(tmp_path / "none") is None
    with pytest.raises(TableError, match="rows"):
        CorrelationTable.empty(LAYERS, 128, path_length=3)


def test_a_run_never_writes_the_table_back(tmp_path):
    """The engine's predictor works on a copy: updates stay in memory, the files keep their
    bytes (checked end to end with a real run in test_cli_planner)."""
    table = calibrated().table
    table.save(tmp_path)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    loaded = CorrelationTable.load(tmp_path)
    pf = CorrelationPrefetcher(loaded.copy())
    for first in itertools.islice(itertools.cycle([[2, 2, 3], [1, 0, 3]]), 6):
        run_step(pf, routing(first), k=2)
    assert not (pf.table.counts[1] == loaded.counts[1]).all()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tmp_path.iterdir()} == digest
