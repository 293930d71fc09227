"""The planner's cost prior: a `Profile` computed from a model's shapes and a few machine rates.

Plain Python (no JAX). Without a measured profile of a model (`klotski profile`), the engine
still plans n, the batch size and the prefetch rule: it measures a handful of rates of the
machine once (`profiler.machine_rates`, a few seconds, cached per device like a profile) and
predicts every cost the planner needs from the model's shapes with a roofline:

  a jitted call costs `dispatch_s` plus, per matmul [rows, in] x [out, in], the larger of its
  FLOPs at the measured matmul rate and its weight bytes at the measured memory bandwidth
  (a decode step's projections stream their weights; a prefill's are FLOP-bound);
  attention adds its score and value FLOPs and reads the KV cache once;
  a transfer costs `load_s` (the I/O thread's hand-off) plus bytes at the disk / page-cache /
  host-to-device bandwidth of its tier; a prefetched expert costs one more hand-off.

The prior is only as good as a roofline: it ignores cache effects, fusion and the shapes XLA
handles badly. It exists to choose a sensible layout on a first run; `klotski profile` measures
the real costs at the engine's shapes and is what the planner's predictions are checked against.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from klotski_jax.config import Attn, ModelConfig
from klotski_jax.constants import buckets_upto
from klotski_jax.planning.costs import Profile, model_key

RATES_FORMAT = "klotski-jax-machine-rates"
RATES_VERSION = 1
EXPERT_BUCKETS = tuple(buckets_upto(4096))  # every padding bucket of 2 .. 4096 rows


@dataclasses.dataclass(frozen=True)
class MachineRates:
    """Rates of one device and its host, measured once (seconds, bytes/s, FLOP/s).

    dispatch_s: one small jitted call from Python to its result on the host.
    matmul_flops: {dtype: FLOP/s} of a large projection through `layers.linear`.
    memory_bps: bytes/s of weights streamed through a projection of 2 rows.
    load_s: an I/O thread's hand-off of a tiny transfer (submit, device_put, result).
    h2d_bps, disk_cold_bps, disk_warm_bps: host -> device, disk with the page cache evicted,
    and a read from the page cache.
    routing_s: (fixed s, s per token) of the scheduler's routing bookkeeping in NumPy.
    io_interference: share of I/O-thread time the compute thread loses to it (CPU contention:
    2 / cores on a CPU backend, 0 on an accelerator).
    """

    device: dict[str, str]
    dispatch_s: float
    matmul_flops: dict[str, float]
    memory_bps: float
    load_s: float
    h2d_bps: float
    disk_cold_bps: float
    disk_warm_bps: float
    routing_s: tuple[float, float]
    io_interference: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({"format": RATES_FORMAT, "version": RATES_VERSION, **d}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> MachineRates:
        d = json.loads(text)
        if d.get("format") != RATES_FORMAT or d.get("version") != RATES_VERSION:
            raise ValueError(f"not a {RATES_FORMAT} v{RATES_VERSION} file")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["routing_s"] = tuple(values["routing_s"])
        return cls(**values)


class _Roofline:
    """Cost of the engine's jitted pieces on one machine for one model."""

    def __init__(self, cfg: ModelConfig, rates: MachineRates) -> None:
        self.cfg, self.r = cfg, rates
        self.flops = rates.matmul_flops.get(cfg.dtype) or max(rates.matmul_flops.values())
        self.f32 = rates.matmul_flops.get("float32") or self.flops
        self.size = cfg.itemsize

    def mm(self, rows: int, out: int, inn: int) -> float:
        """[rows, inn] x [out, inn]: FLOP-bound or weight-bandwidth-bound, whichever is slower
        (one row runs as two, as `layers.linear` does)."""
        rows = max(rows, 2)
        return max(2.0 * rows * out * inn / self.flops, out * inn * self.size / self.r.memory_bps)

    def stream(self, nbytes: float) -> float:
        return nbytes / self.r.memory_bps

    def attention(self, b: int, t: int, s: int) -> float:
        c, n = self.cfg, b * t
        if c.attention is Attn.MLA:
            proj, scores = self._latent_attention(b, t, s)
        else:
            proj = (self.mm(n, c.q_size, c.hidden_size) + 2 * self.mm(n, c.kv_size, c.hidden_size)
                    + self.mm(n, c.hidden_size, c.q_size))
            scores = 4.0 * b * c.num_heads * t * s * c.head_dim / self.f32
        kv = self.stream(1.0 * b * s * c.kv_token_bytes)
        softmax = self.stream(3.0 * 4 * b * c.num_heads * t * s)
        acts = self.stream(4.0 * n * c.hidden_size * 4)
        return self.r.dispatch_s + proj + scores + kv + softmax + acts

    def _latent_attention(self, b: int, t: int, s: int) -> tuple[float, float]:
        """MLA's projections and score/context work, in the form `layers.mla_attend` picks
        (absorbed: queries and outputs through kv_b per token; expanded: kv_b over the cache)."""
        c, n = self.cfg, b * t
        d, h, lat, r = c.hidden_size, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
        nope, v = c.qk_nope_head_dim, c.v_head_dim
        q = (self.mm(n, c.q_lora_rank, d) + self.mm(n, c.q_size, c.q_lora_rank)
             if c.q_lora_rank else self.mm(n, c.q_size, d))
        proj = q + self.mm(n, lat + r, d) + self.mm(n, d, c.o_size)
        if c.mla_absorbs(t, s):
            proj += 2.0 * n * h * lat * (nope + v) / self.f32
            scores = 2.0 * b * h * t * s * (2 * lat + r) / self.f32
        else:
            proj += self.mm(b * s, h * (nope + v), lat)
            scores = 2.0 * b * h * t * s * (nope + r + v) / self.f32
        return proj, scores

    def router(self, m: int) -> float:
        c = self.cfg
        return 2 * self.r.dispatch_s + self.mm(m, c.num_experts, c.hidden_size) + self.stream(
            3.0 * m * c.hidden_size * 4)

    def expert(self, rows: int) -> float:
        c = self.cfg
        f, d = c.expert_intermediate_size, c.hidden_size
        # Quantized experts are dequantized before the matmuls: the stored bytes are read, and
        # the dequantized weights written (and read again by the matmuls, which mm counts).
        dequant = (c.expert_bytes + 3 * f * d * self.size) if c.quantized else 0
        return (self.r.dispatch_s + 2 * self.mm(rows, f, d) + self.mm(rows, d, f)
                + self.stream(4.0 * rows * (d * 4 + f * 4) + dequant))

    def combine(self, m: int) -> float:
        c = self.cfg
        cost = self.r.dispatch_s + self.stream(4.0 * m * c.hidden_size * 4)
        if c.shared_expert_intermediate_size:
            f = c.shared_expert_intermediate_size
            cost += 2 * self.mm(m, f, c.hidden_size) + self.mm(m, c.hidden_size, f)
        return cost

    def dense_mlp(self, m: int) -> float:
        c = self.cfg
        f = c.dense_intermediate_size or c.expert_intermediate_size
        return (self.r.dispatch_s + 2 * self.mm(m, f, c.hidden_size)
                + self.mm(m, c.hidden_size, f))

    def head(self, b: int) -> float:
        c = self.cfg
        return (3 * self.r.dispatch_s + self.mm(b, c.vocab_size, c.hidden_size)
                + self.stream(4.0 * b * c.vocab_size))

    def load(self, nbytes: int, bps: float | None = None) -> float:
        """A transfer of nbytes: hand-off, the tier's read (bps; None: already in host RAM),
        then host -> device."""
        read = 0.0 if bps is None else nbytes / bps
        return self.r.load_s + read + nbytes / self.r.h2d_bps


def prior_profile(cfg: ModelConfig, rates: MachineRates) -> Profile:
    """The Profile the roofline predicts for `cfg` on the machine of `rates`, at the shapes the
    profiler would measure (the planner fits and reads it like a measured one)."""
    from klotski_jax.planning.placement import dense_layer_bytes

    roof = _Roofline(cfg, rates)
    s = lambda n: -(-n // 32) * 32 + 32  # cache slots beside n tokens
    prefill = [(b, t, s(t)) for b, t in ((1, 32), (1, 128), (8, 32), (8, 128), (32, 128))]
    decode = [(b, sl) for b in (1, 8, 64) for sl in (64, 512)]
    tokens = [1, 8, 64, 512, 4096]
    r0, r1 = rates.routing_s
    dense = sorted(set(dense_layer_bytes(cfg)))
    eb = cfg.expert_bytes
    meta = {"source": "prior", "rates": dataclasses.asdict(rates),
            "note": "roofline prior from machine rates; `klotski profile` measures the model"}
    return Profile(
        device=dict(rates.device), model_key=model_key(cfg),
        attention_prefill=tuple((b, t, sl, roof.attention(b, t, sl)) for b, t, sl in prefill),
        attention_decode=tuple((b, 1, sl, roof.attention(b, 1, sl)) for b, sl in decode),
        router=tuple((m, roof.router(m)) for m in tokens),
        routing=tuple((n, r0 + r1 * n) for n in tokens if n >= 2),
        expert=tuple((r, roof.expert(r)) for r in EXPERT_BUCKETS),
        combine=tuple((m, roof.combine(m)) for m in tokens),
        head=tuple((b, roof.head(b)) for b in (1, 8, 64)),
        expert_host_s=roof.load(eb),
        expert_disk_cold_s=roof.load(eb, rates.disk_cold_bps),
        expert_disk_warm_s=roof.load(eb, rates.disk_warm_bps),
        expert_release_s=2 * rates.dispatch_s,
        # A prefetched expert is issued before the memory it needs is free, so its load queues
        # on an I/O thread instead of being put inline when routed: at least one more thread
        # hand-off. Priced at zero, every prefetch looks free and the planner prefetches whole
        # layers even where loads cost nothing (host-cached experts on a CPU backend).
        expert_prefetch_s=rates.load_s,
        dense_load=tuple((n, roof.load(n)) for n in dense) + ((2 * dense[-1],
                                                                roof.load(2 * dense[-1])),),
        dense_mlp=tuple((m, roof.dense_mlp(m)) for m in tokens) if not all(cfg.moe_layers)
        else (),
        overhead_layer_s=4 * rates.dispatch_s,
        overhead_expert_s=2 * rates.dispatch_s,
        io_interference=rates.io_interference,
        bandwidth={"disk_to_host_Bps": rates.disk_cold_bps, "host_copy_Bps": rates.disk_warm_bps,
                   "host_to_device_Bps": rates.h2d_bps},
        meta=meta)


def is_prior(profile: Profile) -> bool:
    """Whether a profile is the roofline prior (not measured on the model)."""
    return profile.meta.get("source") == "prior"

