"""The correlation-aware hot-expert prefetcher (a `HotPredictor`), and its table on disk.

Per MoE layer L (position p among the MoE layers) a table counts, token by token, which expert b
the token picked at L given the path of experts it picked at the l MoE layers before L:

  l = 1 (the paper's choice): counts[p][a, b] += 1 for every a picked at p-1 and b picked at p;
  l > 1: the row is a path (a_{p-l}, ..., a_{p-1}) with each a_j one of the token's top-k picks
  at MoE layer p-l+j; a token adds 1 to (path, b) for each of its k^l paths and k picks b.
  Rows are indexed a_{p-l} * E^(l-1) + ... + a_{p-1}. Early layers (p < l) use paths of length p.
  Position 0 (the first MoE layer) has no predecessor: its row is plain popularity.

`predict(L, K)` sums the rows of the paths of every token of all groups at the previous MoE
layers of the current step and returns the K experts with the largest sums (ties: more popular
first, then lower id); without a previous layer (position 0, or a new step) or without data for
the rows, it falls back to popularity at L.

`expected_use(L, tokens)` turns the same rows into per-token pick probabilities: a token whose
path row r has counts c[r, :] picks b with probability k * c[r, b] / sum(c[r, :]) (each path
row of a token adds k picks), averaged over its k^l paths; rows without data use popularity.
The probability that the step routes to b is then 1 - prod_t (1 - q_{t,b}) (hot.py). For a
step whose previous-layer routing is not known yet (the first MoE layer, or a prefetch for the
next step) every token gets the popularity row. `observe(L, experts)` updates the table in memory
(the online update) and remembers the routing for the next layers' predictions.

The table is built by `klotski calibrate` and stored in the checkpoint directory as
`prefetch_table.npz` (arrays) + `prefetch_table.json` (metadata with the npz's sha256), both
written atomically. A run loads a copy and never writes it back.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from klotski_jax.planning.hot import uniform_use, use_from_pick_probs
from klotski_jax.util import write_atomic

TABLE_FILE = "prefetch_table.npz"
META_FILE = "prefetch_table.json"
TABLE_FORMAT = "klotski-jax-prefetch-table"
TABLE_VERSION = 1
MAX_ROWS = 1 << 20  # E^l rows per layer at most
# E^l x E cells per layer at most (64 MiB of float64 counts): at E = 256 a path of 2 layers
# would be 16.8M cells (128 MiB) per layer, 7.5 GB for DeepSeek-V3's 58 MoE layers.
MAX_CELLS = 1 << 23


class TableError(ValueError):
    """A prefetch table that does not fit the model, or a file that is not one."""


@dataclasses.dataclass
class CorrelationTable:
    """counts[p]: [E^min(l, p), E] per MoE position p; popularity [n_moe, E]: tokens that picked
    each expert; tokens[p]: tokens observed at position p."""

    moe_layers: tuple[int, ...]
    num_experts: int
    path_length: int
    counts: list[np.ndarray]
    popularity: np.ndarray
    tokens: np.ndarray

    @classmethod
    def empty(cls, moe_layers: Sequence[int], num_experts: int, path_length: int = 1
              ) -> CorrelationTable:
        if path_length < 1:
            raise TableError(f"path length must be >= 1, got {path_length}")
        if num_experts ** path_length > MAX_ROWS:
            raise TableError(f"path length {path_length} needs {num_experts}^{path_length} rows "
                             f"per layer, more than {MAX_ROWS}")
        if num_experts ** (path_length + 1) > MAX_CELLS:
            raise TableError(f"path length {path_length} needs {num_experts}^{path_length} rows "
                             f"x {num_experts} experts = {num_experts ** (path_length + 1)} "
                             f"counts per layer, more than {MAX_CELLS} (64 MiB); use a shorter "
                             f"path")
        n = len(moe_layers)
        counts = [np.zeros((num_experts ** min(path_length, p), num_experts))
                  for p in range(n)]
        return cls(tuple(moe_layers), num_experts, path_length, counts,
                   np.zeros((n, num_experts)), np.zeros(n))

    def copy(self) -> CorrelationTable:
        return dataclasses.replace(self, counts=[c.copy() for c in self.counts],
                                   popularity=self.popularity.copy(), tokens=self.tokens.copy())

    def routing_probs(self) -> list[list[float]] | None:
        """Per MoE layer, the probability that a token picks each expert (for the planner)."""
        if not self.tokens.all():
            return None
        return [(pop / t).clip(0, 1).tolist() for pop, t in zip(self.popularity, self.tokens)]

    # ---- files --------------------------------------------------------------------------------
    def save(self, ckpt_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None
             ) -> pathlib.Path:
        """Write the npz, then the JSON naming its hash, each atomically (temp file + rename)."""
        buf = io.BytesIO()
        arrays = {f"counts_{p}": c for p, c in enumerate(self.counts)}
        np.savez(buf, popularity=self.popularity, tokens=self.tokens, **arrays)
        data = buf.getvalue()
        d = pathlib.Path(ckpt_dir)
        doc = {"format": TABLE_FORMAT, "version": TABLE_VERSION,
               "moe_layers": list(self.moe_layers), "num_experts": self.num_experts,
               "path_length": self.path_length, "tokens": self.tokens.tolist(),
               "npz_sha256": hashlib.sha256(data).hexdigest(),
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               **(meta or {})}
        write_atomic(d / TABLE_FILE, data, fsync=True)
        write_atomic(d / META_FILE, json.dumps(doc, indent=1) + "\n", fsync=True)
        return d / TABLE_FILE

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike[str]) -> CorrelationTable | None:
        """The checkpoint's table, or None if it has none. TableError if it is damaged."""
        d = pathlib.Path(ckpt_dir)
        if not (d / META_FILE).exists():
            return None
        try:
            doc = json.loads((d / META_FILE).read_text())
            data = (d / TABLE_FILE).read_bytes()
        except (OSError, ValueError) as e:
            raise TableError(f"{d / META_FILE}: unreadable prefetch table: {e}") from None
        if doc.get("format") != TABLE_FORMAT or doc.get("version") != TABLE_VERSION:
            raise TableError(f"{d / META_FILE}: not a {TABLE_FORMAT} v{TABLE_VERSION}")
        if hashlib.sha256(data).hexdigest() != doc.get("npz_sha256"):
            raise TableError(f"{d / TABLE_FILE} does not match the hash in {META_FILE}")
        with np.load(io.BytesIO(data)) as z:
            n = len(doc["moe_layers"])
            return cls(tuple(doc["moe_layers"]), int(doc["num_experts"]),
                       int(doc["path_length"]), [z[f"counts_{p}"] for p in range(n)],
                       z["popularity"], z["tokens"])

    def check(self, moe_layers: Sequence[int], num_experts: int) -> None:
        if tuple(moe_layers) != self.moe_layers or num_experts != self.num_experts:
            raise TableError(f"prefetch table is for MoE layers {list(self.moe_layers)} x "
                             f"{self.num_experts} experts, the model has {list(moe_layers)} x "
                             f"{num_experts}")


class CorrelationPrefetcher:
    """HotPredictor over a CorrelationTable, updated online in memory."""

    def __init__(self, table: CorrelationTable, *, online: bool = True, top_k: int = 2) -> None:
        self.table = table
        self.online = online
        self._top_k = top_k  # the prior's k before any routing is observed
        self._pos = {layer: p for p, layer in enumerate(table.moe_layers)}
        self._step: dict[int, np.ndarray] = {}  # position -> [N, top_k] of the current step

    @classmethod
    def fresh(cls, moe_layers: Sequence[int], num_experts: int, path_length: int = 1,
              top_k: int = 2) -> CorrelationPrefetcher:
        """An empty table: learns from the run's first steps (its warm-up) onwards."""
        return cls(CorrelationTable.empty(moe_layers, num_experts, path_length), top_k=top_k)

    def _rows(self, p: int) -> np.ndarray | None:
        """[N, k^l] row indices of every token's paths into counts[p], or None if unknown."""
        length = min(self.table.path_length, p)
        if length == 0:
            return None
        path = [self._step.get(q) for q in range(p - length, p)]
        if any(x is None for x in path) or len({len(x) for x in path}) != 1:
            return None
        e = self.table.num_experts
        idx = np.zeros((len(path[0]), 1), np.int64)
        for picks in path:
            idx = (idx[:, :, None] * e + picks[:, None, :].astype(np.int64)).reshape(len(idx), -1)
        return idx

    def predict(self, layer: int, k: int) -> list[int]:
        p = self._pos[layer]
        t = self.table
        if k <= 0:
            return []
        rows = self._rows(p)
        scores = None
        if rows is not None:
            # Each distinct path row once, weighted by how many tokens' paths it is: a
            # 4096-token prefill at top-8 has 32768 paths over at most E^l distinct rows, and
            # gathering one [E] row per path would copy 32768 x E floats.
            u, mult = np.unique(rows, return_counts=True)
            scores = mult.astype(np.float64) @ t.counts[p][u]
        if scores is None or not scores.any():
            scores = t.popularity[p]
        if not scores.any():
            return []
        order = np.lexsort((np.arange(t.num_experts), -t.popularity[p], -scores))
        return [int(e) for e in order[:k] if scores[e] > 0]

    def _popularity_pick(self, p: int) -> np.ndarray | None:
        t = self.table
        return t.popularity[p] / t.tokens[p] if t.tokens[p] else None

    def expected_use(self, layer: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        p, t = self._pos[layer], self.table
        k = int(round(t.popularity[p].sum() / t.tokens[p])) if t.tokens[p] else None
        pop = self._popularity_pick(p)
        rows = self._rows(p)
        if rows is None or k is None or len(rows) != tokens:
            if pop is None:
                return uniform_use(t.num_experts, self._top_k, tokens)
            return uniform_use(t.num_experts, self._top_k, tokens, pop)
        # The conditional pick probabilities of each distinct row [U, E], then each token's
        # mean over its paths, accumulated path by path: never a [T, paths, E] array (200 MB
        # for a 4096-token prefill at E = 256, top-8).
        u, inv = np.unique(rows, return_inverse=True)
        inv = inv.reshape(rows.shape)
        c = t.counts[p][u]
        total = c.sum(-1, keepdims=True)
        cond = np.where(total > 0, k * c / np.maximum(total, 1), pop[None, :])
        q = np.zeros((len(rows), t.num_experts))
        for j in range(rows.shape[1]):
            q += cond[inv[:, j]]
        return use_from_pick_probs(q / rows.shape[1])

    def observe(self, layer: int, experts: np.ndarray) -> None:
        p = self._pos[layer]
        if p == 0:
            self._step = {}
        experts = np.asarray(experts).reshape(len(experts), -1)
        if self.online:
            t = self.table
            t.popularity[p] += np.bincount(experts.reshape(-1), minlength=t.num_experts)
            t.tokens[p] += len(experts)
            rows = self._rows(p)
            if rows is not None and len(rows) == len(experts):
                _add_pairs(t.counts[p], rows, experts)
        self._step[p] = experts


def _add_pairs(counts: np.ndarray, rows: np.ndarray, experts: np.ndarray) -> None:
    """counts[r, b] += 1 for each token's every path row r (rows [T, paths]) and pick b
    (experts [T, k]), as one count of the flat cell indices: np.add.at over the T x paths x k
    pairs is unbuffered and per element. A bincount over all cells when the table is not much
    larger than the pairs (l = 1), else the distinct cells only (long paths: E^l x E cells)."""
    if not counts.flags.c_contiguous:  # no flat view to count into
        np.add.at(counts, (rows[:, :, None], experts[:, None, :]), 1)
        return
    e = counts.shape[1]
    cells = (rows[:, :, None].astype(np.int64) * e + experts[:, None, :]).reshape(-1)
    flat = counts.reshape(-1)  # a view
    if flat.size <= 8 * cells.size:
        flat += np.bincount(cells, minlength=flat.size)
    else:
        u, n = np.unique(cells, return_counts=True)
        flat[u] += n
