"""Measured costs of one model on one device: the `Profile` record and the `CostModel` over it.

Plain Python and numpy (no JAX), so the planner built on it is unit-testable with hand-made
profiles. `klotski_jax.profiler` measures a Profile on the real device; this module only
reads one and turns its samples into cost functions:

- compute, in seconds, as the scheduler pays it (the jitted step plus the host-side work around
  it): attention of one group (batch b, t new tokens, s cache slots), the router of one group, the
  per-layer routing bookkeeping, one expert over a padded bucket of rows, the combine of one group
  (with the shared expert), a dense MLP, and the LM head of one group;
- transfers, in seconds per item: one expert from the host cache, from disk with the page cache
  evicted, from disk through a warm page cache; one layer's dense weights as a function of bytes;
  on several devices, the all-reduce that combines their experts' outputs (`all_reduce`).

Attention, router, combine and head are fitted with small non-negative linear models (a fixed
cost plus per-token terms), so the planner can ask for shapes that were not measured; expert
compute is looked up per padding bucket (`bucket`), exactly as the scheduler pads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from klotski_jax.config import ModelConfig
from klotski_jax.constants import bucket

PROFILE_FORMAT = "klotski-jax-profile"
PROFILE_VERSION = 1

# ModelConfig fields that change a measured cost (shapes and dtype, not token ids or eps).
SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "num_experts", "top_k", "expert_intermediate_size", "moe_layers",
                "sliding_windows", "dense_intermediate_size", "shared_expert_intermediate_size",
                "qkv_bias", "o_bias", "qk_norm", "clip_qkv", "tie_word_embeddings", "dtype")

# Shapes of the other attentions (latent, partial rotary), keyed only where they are used so
# that profiles of the older families keep their keys.
MLA_SHAPE_FIELDS = ("attention", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                    "rotary_dim")

Samples = tuple[tuple[float, ...], ...]


def model_key(cfg: ModelConfig) -> str:
    """A short hash of the config's shape fields: profiles are reusable across equal shapes.
    Quantized experts (another expert step, other bytes per load) add their scheme and group
    size; unquantized models keep the keys they had before quantization existed."""
    d = cfg.to_dict()
    shape = {k: d[k] for k in SHAPE_FIELDS}
    shape["clip_qkv"] = shape["clip_qkv"] is not None
    if cfg.quantized:
        shape["expert_quant"], shape["expert_group_size"] = d["expert_quant"], d[
            "expert_group_size"]
    if d["attention"] != "gqa" or d["rotary_dim"]:  # (absent for the older families' keys)
        shape |= {k: d[k] for k in MLA_SHAPE_FIELDS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Profile:
    """Costs measured on one device for one model shape. Seconds; sample rows end in seconds.

    attention_prefill / attention_decode: (batch, new tokens, cache slots, s) for one group.
    router: (tokens of the group, s); routing: (tokens of all groups, s) per MoE layer;
    expert: (bucket rows, s) for one expert; combine / dense_mlp: (tokens of the group, s);
    head: (batch, s) per group per step (embedding, last-token logits, sampling).
    expert_host_s / expert_disk_cold_s / expert_disk_warm_s: one expert load through the
    pipeline's transfers (request to done) from the host cache, from disk with the page cache
    evicted, from the page cache; expert_release_s: the compute thread's share of a streamed
    expert (get + release). dense_load: (bytes, s) of one layer's dense weights to the device.
    overhead_layer_s / overhead_expert_s: what whole engine steps cost beyond the pieces (the
    scheduler's bookkeeping per layer and per expert computed, cold caches), fitted to timed
    steps of the real engine; expert_prefetch_s: what a prefetched expert costs the compute
    thread beyond expert_release_s (its load queues for memory on an I/O thread: hand-offs
    between threads), fitted the same way; io_interference: the share of I/O-thread time the
    compute lane loses to it (CPU contention: near 1 on a small CPU box, near 0 on an
    accelerator).
    bandwidth: bytes/s of the raw edges (disk_to_host, host_to_device, host_copy), for reports.
    """

    device: dict[str, str]
    model_key: str
    attention_prefill: Samples
    attention_decode: Samples
    router: Samples
    routing: Samples
    expert: Samples
    combine: Samples
    head: Samples
    expert_host_s: float
    expert_disk_cold_s: float
    expert_disk_warm_s: float
    expert_release_s: float
    dense_load: Samples
    dense_mlp: Samples = ()
    overhead_layer_s: float = 0.0
    overhead_expert_s: float = 0.0
    expert_prefetch_s: float = 0.0
    io_interference: float = 0.0
    bandwidth: dict[str, float] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    _SAMPLES = ("attention_prefill", "attention_decode", "router", "routing", "expert",
                "combine", "head", "dense_load", "dense_mlp")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in self._SAMPLES:
            d[name] = [list(row) for row in d[name]]
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        if d.get("format") != PROFILE_FORMAT or d.get("version") != PROFILE_VERSION:
            raise ValueError(f"not a {PROFILE_FORMAT} v{PROFILE_VERSION} profile")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for name in cls._SAMPLES:
            values[name] = tuple(tuple(float(x) for x in row) for row in values.get(name, ()))
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))


def fit_nonnegative(samples: Samples, features: Callable[[tuple[float, ...]], list[float]]
         ) -> np.ndarray:
    """Non-negative least squares by dropping negative terms: y ~ features(x) . coef."""
    if not samples:
        return np.zeros(len(features((1.0,) * 4)))
    x = np.array([features(row[:-1]) for row in samples], np.float64)
    y = np.array([row[-1] for row in samples], np.float64)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


class CostModel:
    """Cost functions of a Profile (seconds). Memoises the expected per-expert costs."""

    def __init__(self, profile: Profile) -> None:
        self.profile = p = profile
        linear = lambda r: [1.0, r[0]]
        fit = lambda samples, f=linear: tuple(float(x) for x in fit_nonnegative(samples, f))
        self._prefill = fit(p.attention_prefill, lambda r: [1.0, r[0] * r[1], r[0] * r[1] * r[2]])
        self._decode = fit(p.attention_decode, lambda r: [1.0, r[0], r[0] * r[2]])
        self._router = fit(p.router)
        self._routing = fit(p.routing)
        self._combine = fit(p.combine)
        self._mlp = fit(p.dense_mlp)
        self._head = fit(p.head)
        self._dense = fit(p.dense_load)
        # Noise only adds time, and a bigger bucket never costs less: a bucket's cost is the
        # least measured at it or at any bigger bucket (a monotone envelope from below).
        pts = sorted((int(r[0]), r[1]) for r in p.expert)
        self._expert = [(b, min(s for _, s in pts[i:])) for i, (b, _) in enumerate(pts)]
        self._memo: dict[tuple[int, float], tuple[float, float]] = {}
        self._bucket_cost: dict[int, float] = {}

    # ---- compute ------------------------------------------------------------------------------
    def attention(self, b: int, t: int, s: int) -> float:
        """One group's attention block: b sequences, t new tokens each, s cache slots."""
        if t == 1:
            c0, c1, c2 = self._decode
            return c0 + c1 * b + c2 * b * s
        c0, c1, c2 = self._prefill
        return c0 + c1 * b * t + c2 * b * t * s

    def router(self, tokens: int) -> float:
        """One group's router over its tokens, routing copied to the host."""
        return self._router[0] + self._router[1] * tokens

    def routing(self, tokens: int) -> float:
        """Per MoE layer: routing bookkeeping and prediction over all groups' tokens."""
        return self._routing[0] + self._routing[1] * tokens

    def combine(self, tokens: int) -> float:
        """One group's combine (routed output, shared expert, residual)."""
        return self._combine[0] + self._combine[1] * tokens

    def dense_mlp(self, tokens: int) -> float:
        """One group's dense MLP (layers without experts)."""
        return self._mlp[0] + self._mlp[1] * tokens

    def head(self, b: int) -> float:
        """Per group and step: embedding, last-token logits, sampling."""
        return self._head[0] + self._head[1] * b

    def expert(self, rows: int) -> float:
        """One expert over `rows` tokens (padded to its bucket, as the scheduler runs it)."""
        if rows <= 0 or not self._expert:
            return 0.0
        size = bucket(rows)
        hit = self._bucket_cost.get(size)
        if hit is None:
            hit = self._bucket_cost[size] = self._expert_bucket(size)
        return hit

    def _expert_bucket(self, size: int) -> float:
        pts = self._expert
        for j, (b_, s_) in enumerate(pts):
            if b_ == size or (b_ > size and j == 0):
                return s_
            if b_ > size:  # a bucket the profile did not measure: between its neighbours
                b0, s0 = pts[j - 1]
                return s0 + (s_ - s0) * (size - b0) / (b_ - b0)
        if len(pts) == 1:
            return pts[0][1] * size / pts[0][0]
        (b0, s0), (b1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) / (b1 - b0) * (size - b1)  # linear past the largest bucket

    # ---- transfers ----------------------------------------------------------------------------
    def dense_load(self, nbytes: int) -> float:
        """One layer's dense weights (nbytes) to the device."""
        return self._dense[0] + self._dense[1] * nbytes if nbytes else 0.0

    def all_reduce(self, nbytes: int, devices: int) -> float:
        """The combine of expert parallelism: the devices' accumulators of nbytes each summed
        and replicated (one psum per MoE layer). A ring all-reduce sends and receives
        2 (D - 1) / D x nbytes per device, at `bandwidth["device_to_device_Bps"]` where the
        profile has it, else at its host-to-device rate (the link the devices share with the
        host: peer links are rarely slower), else at the dense-load fit's rate; plus one jitted
        call's fixed cost (the combine fit's). Zero on one device."""
        if devices <= 1 or nbytes <= 0:
            return 0.0
        bw = self.profile.bandwidth
        bps = bw.get("device_to_device_Bps") or bw.get("host_to_device_Bps")
        per_byte = 1.0 / bps if bps else self._dense[1]
        return self._combine[0] + 2.0 * (devices - 1) / devices * nbytes * per_byte

    def expert_load(self, tier: str) -> float:
        """One expert to the device from 'host' (cache), 'disk' (cold) or 'page_cache'."""
        p = self.profile
        return {"host": p.expert_host_s, "disk": p.expert_disk_cold_s,
                "page_cache": p.expert_disk_warm_s, "device": 0.0}[tier]

    # ---- routing statistics -------------------------------------------------------------------
    def expert_expectation(self, tokens: int, p: float) -> tuple[float, float]:
        """(P(routed), E[compute; routed]) of an expert each of `tokens` tokens picks with
        probability p: its token count is Binomial(tokens, p), padded to a bucket."""
        key = (tokens, round(p, 9))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = _binomial_cost(tokens, p, self.expert)
        return hit


def _binomial_cost(n: int, p: float, cost: Callable[[int], float]) -> tuple[float, float]:
    """(1 - P(X=0), E[cost(X); X > 0]) for X ~ Binomial(n, p), summed over the likely window
    (a normal approximation per padding bucket once the window is wide)."""
    if n <= 0 or p <= 0:
        return 0.0, 0.0
    if p >= 1:
        return 1.0, cost(n)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    if sd > 30:  # X >= 1 with certainty; cost is constant per bucket (previous bucket, b]
        cdf = lambda x: 0.5 * (1 + math.erf((x + 0.5 - mean) / (sd * math.sqrt(2))))
        lo, hi = max(1, int(mean - 12 * sd)), min(n, int(mean + 12 * sd) + 1)
        total, below, size = 0.0, lo - 1, bucket(lo)
        while below < hi:
            total += (cdf(min(size, n)) - cdf(below)) * cost(size)
            below, size = size, bucket(size + 1)
        return 1.0, total
    lo, hi = max(1, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 2)
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for x in range(lo, hi + 1):
        log_pmf = (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
                   + x * log_p + (n - x) * log_q)
        total += math.exp(log_pmf) * cost(x)
    return 1.0 - math.exp(n * log_q), total


def expected_distinct(tokens: int, probs: Sequence[float]) -> float:
    """Expected number of distinct experts `tokens` tokens route to (uniform top-k:
    E * (1 - (1 - k/E)^N))."""
    return sum(1.0 - (1.0 - p) ** tokens for p in probs)
