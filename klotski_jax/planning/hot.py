"""Hot-expert prediction: which experts of a layer to prefetch before its routing is known.

`HotPredictor` is the interface the schedules use. It answers two questions:
- `predict(L, K)`: the K experts of layer L most likely routed (the paper's fixed-K rule);
- `expected_use(L, tokens)`: per expert, the probability that at least one of the coming step's
  `tokens` tokens routes to it, and the expected number of tokens it gets. The klotski schedule
  prefetches every expert whose probability reaches the policy's threshold, most expected tokens
  first, so the prefetch grows with the tokens in flight: a 4096-token prefill prefetches the
  whole layer, a decode step of a few sequences only its hot experts.

If each token picks expert e with probability q_e (the q_e of a layer sum to top_k), and tokens
pick independently, then P(routed) = 1 - prod_t (1 - q_{t,e}) and E[tokens] = sum_t q_{t,e}.
Where q comes from, best first: the calibrated correlation table given each token's picks at the
previous MoE layer (prefetcher.CorrelationPrefetcher), the layer's popularity measured so far in
the run, else the uniform top-k prior q_e = k / E, P(routed) = 1 - (1 - k/E)^tokens.

`PreviousLayerPopularity` is the simplest correct predictor: K experts = the most routed at the
previous MoE layer of the same step (for the first MoE layer, at the first MoE layer of the
previous step); its expected use is the layer's measured popularity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class HotPredictor(Protocol):
    def predict(self, layer: int, k: int) -> list[int]:
        """Up to k experts of `layer` to prefetch, most likely first."""
        ...

    def observe(self, layer: int, experts: np.ndarray) -> None:
        """The routing of all tokens of all groups at `layer`: expert ids [tokens, top_k]."""
        ...

    def expected_use(self, layer: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(P(routed) [E], expected tokens [E]) of each expert of `layer` in a step that feeds
        `tokens` tokens through it."""
        ...


def use_from_pick_probs(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(routed), expected tokens) per expert from per-token pick probabilities q [T, E]."""
    q = np.clip(np.asarray(q, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-q).sum(0)  # -inf where some token picks e surely
    return -np.expm1(log_miss), q.sum(0)


def uniform_use(num_experts: int, top_k: int, tokens: int,
                pick: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(routed), expected tokens) when each of `tokens` tokens picks expert e with the same
    probability pick[e] (default: the uniform top-k prior k / E)."""
    q = np.full(num_experts, top_k / num_experts) if pick is None else np.clip(pick, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        p = -np.expm1(tokens * np.log1p(-q))
    return p, tokens * q


def prefetch_order(p_routed: np.ndarray, expected: np.ndarray, threshold: float) -> list[int]:
    """Experts with P(routed) >= threshold, most expected tokens first (ties: lower id)."""
    keep = [e for e in range(len(p_routed)) if p_routed[e] >= threshold - 1e-12
            and p_routed[e] > 0]
    return sorted(keep, key=lambda e: (-expected[e], e))


class PreviousLayerPopularity:
    """Hot set of layer L = the top-k experts by routed tokens at the MoE layer before L."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, top_k: int = 2) -> None:
        self.moe_layers = moe_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self._counts: dict[int, np.ndarray] = {}
        self._popularity: dict[int, np.ndarray] = {}  # layer -> picks so far in the run
        self._tokens: dict[int, int] = {}

    def _source(self, layer: int) -> int:
        pos = self.moe_layers.index(layer)
        return self.moe_layers[pos - 1] if pos > 0 else layer  # first MoE layer: last step's

    def predict(self, layer: int, k: int) -> list[int]:
        counts = self._counts.get(self._source(layer))
        if counts is None or k <= 0:
            return []
        order = np.argsort(-counts, kind="stable")
        return [int(e) for e in order[:k] if counts[e] > 0]

    def observe(self, layer: int, experts: np.ndarray) -> None:
        counts = np.bincount(experts.reshape(-1), minlength=self.num_experts)
        self._counts[layer] = counts
        self._popularity[layer] = self._popularity.get(layer, 0) + counts
        self._tokens[layer] = self._tokens.get(layer, 0) + len(experts)

    def expected_use(self, layer: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        seen = self._tokens.get(layer, 0)
        pick = self._popularity[layer] / seen if seen else None
        return uniform_use(self.num_experts, self.top_k, tokens, pick)


def score_hot_set(predicted: Sequence[int], counts: np.ndarray, k: int) -> tuple[int, bool]:
    """(how many predicted experts were routed to, whether the prediction is a true top-k).

    counts[e]: tokens routed to expert e. A true top-k has exactly min(k, E) experts and no
    unpredicted expert got more tokens than a predicted one (ties at the boundary allowed).
    """
    predicted = list(predicted)
    routed = sum(int(counts[e] > 0) for e in predicted)
    others = [int(counts[e]) for e in range(len(counts)) if e not in predicted]
    exact = (len(predicted) == min(k, len(counts)) and
             (not predicted or not others or min(int(counts[e]) for e in predicted) >= max(others)))
    return routed, exact
