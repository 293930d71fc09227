"""Hot-expert prediction: which experts of a layer to prefetch before its routing is known.

`HotPredictor` is the interface the schedules use; `PreviousLayerPopularity` is the simplest
correct rule: the experts most routed to by all tokens of all groups in the previous MoE layer of
the same step (for the first MoE layer, in the first MoE layer of the previous step). The
correlation-aware prefetcher plugs in behind the same interface.
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


class PreviousLayerPopularity:
    """Hot set of layer L = the top-k experts by routed tokens at the MoE layer before L."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int) -> None:
        self.moe_layers = moe_layers
        self.num_experts = num_experts
        self._counts: dict[int, np.ndarray] = {}

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
        self._counts[layer] = np.bincount(experts.reshape(-1), minlength=self.num_experts)


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
