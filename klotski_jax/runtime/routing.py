"""The state a decoder step passes between the scheduler's verbs: the batch groups, the routing
of the MoE layer running now, the step itself, and the ready experts gathered for batched
calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from klotski_jax.models.reference import KVCache


class GroupState:
    """One batch group: its KV cache and the tokens it feeds at the next step."""

    def __init__(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray,
                 index: int = 0) -> None:
        self.index = index  # unique within a run: names the group's KV cache transfers
        self.cache = cache
        self.tokens = tokens  # [b, t]
        self.positions = positions  # [b, t]
        self.next_tokens: np.ndarray | None = None  # sampled from the last step's logits

    def feed(self, tokens: np.ndarray) -> None:
        """Next step: one new token per sequence, in the next cache slot."""
        self.positions = self.positions[:, -1:] + 1
        self.tokens = np.asarray(tokens, np.int32).reshape(-1, 1)
        self.cache.valid[:, self.cache.length] = True


class Routing:
    """Where the tokens of all groups go in one MoE layer (host numpy, after the routers)."""

    def __init__(self, experts: list[np.ndarray], weights: list[np.ndarray]) -> None:
        self.experts = experts  # per group [b*t, top_k]
        self.weights = weights
        sizes = [len(e) for e in experts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(np.int32)
        flat = np.concatenate(experts)  # [N, top_k]
        self.all_experts = flat
        self.all_weights = np.concatenate(weights)
        picks = flat.reshape(-1)
        self.counts = np.bincount(picks, minlength=0)
        # Every (token, pick) sorted by expert once (stable: tokens ascending within an expert),
        # so an expert's rows are one slice instead of a scan of all picks per expert.
        order = np.argsort(picks, kind="stable")
        self._rows = (order // flat.shape[1]).astype(np.int32)
        self._weights = self.all_weights.reshape(-1)[order].astype(np.float32)
        self._start = np.concatenate([[0], np.cumsum(self.counts)])

    def rows(self, e: int, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token rows (into the concatenated tokens) routed to e, ascending, and their routing
        weights."""
        if e >= len(self.counts):
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        lo, hi = self._start[e], self._start[e + 1]
        rows, wts = self._rows[lo:hi], self._weights[lo:hi]
        if group is not None:
            first = self.offsets[group]
            a, b = np.searchsorted(rows, [first, first + len(self.experts[group])])
            rows, wts = rows[a:b], wts[a:b]
        return rows, wts

    def routed(self) -> set[int]:
        return {int(e) for e in np.unique(self.all_experts)}


@dataclasses.dataclass
class Step:
    """One decoder step of all groups, passed to every verb of the scheduler that needs it.

    name: the step's label in traces ("prefill", "decode 3"); tokens: tokens in flight this
    step; next_tokens: tokens the next step feeds (one per sequence when decoding); routing: the
    routing of the MoE layer running now (set by the router phase; its offsets say where each
    group's rows start in the concatenated MoE input)."""

    name: str
    groups: list[GroupState]
    tokens: int
    next_tokens: int
    routing: Routing | None = None

    @property
    def one_token(self) -> bool:
        """Whether every sequence feeds one token (a decode step): where experts get few rows
        each and batched expert calls pay (`Policy.expert_batch`)."""
        return self.tokens == self.next_tokens

    def tokens_at(self, layer: int) -> int:
        """Tokens in flight when `layer` runs next: this step's, or the next step's (decode)."""
        return self.next_tokens if layer == 0 else self.tokens


@dataclasses.dataclass
class Ready:
    """An expert whose weights are on its device, with its rows of the step's MoE input."""

    e: int
    device: int  # the index of its device in the run's devices
    weights: Any  # its state {gate, up, down} on the device
    padded_rows: np.ndarray  # [bucket] (steps.pad_rows)
    padded_weights: np.ndarray  # [bucket]
    rows: np.ndarray  # the real rows
    trace: dict[str, Any]


class ExpertBatches:
    """Ready experts of few rows gathered into batched calls: up to `size` experts of one
    device and one row bucket per call (`steps.experts_apply`). `on_computed(experts)`: called
    after each call with the experts it computed (klotski releases them there when a load waits
    for memory)."""

    def __init__(self, size: int, on_computed: Callable[[list[int]], None] | None = None
                 ) -> None:
        self.size = size
        self.on_computed = on_computed
        self._open: dict[tuple[int, int], list[Ready]] = {}

    def add(self, item: Ready) -> list[Ready] | None:
        """Gather `item`; returns its batch once the batch is full (to be computed now)."""
        key = (item.device, len(item.padded_rows))
        batch = self._open.setdefault(key, [])
        batch.append(item)
        if len(batch) < self.size:
            return None
        return self._open.pop(key)

    def drain(self) -> list[list[Ready]]:
        """Every batch still gathering, in the order they were opened; empties the gatherer."""
        out = list(self._open.values())
        self._open.clear()
        return out
