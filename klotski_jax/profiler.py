"""The profiler: measure a model's costs on the actual default JAX device (`klotski profile`).

Every compute piece runs the jitted step the scheduler runs (models/blocks.py, runtime/steps.py)
with the model's real weights and shapes, plus the host-side work the scheduler does around it
(array conversions, routing bookkeeping, row gathering and padding), so the times are what the
pipeline pays. Each shape is warmed up (compiled) first; a time is the median of `repeats` runs.
Transfers go through the pipeline's own `HostTier` and `Transfers`: an expert from disk with the
page cache evicted, the same from the page cache, from the host cache, and each layer's dense
weights; plus the raw bandwidth of disk -> host, host -> device and a host copy.

Profiles are cached as JSON under `<cache>/profiles/` (cache: KLOTSKI_JAX_CACHE, else the XDG
cache, else ~/.cache/klotski-jax; KLOTSKI_JAX_PROFILES names the folder itself), one file per
device kind and model shape (`costs.model_key`), and reused unless refreshed.

`machine_rates` measures the few rates of the cost prior (prior.py) in a few seconds, once per
device kind (`machines/<slug>.json` under the same folder): what the engine plans with when a model
has no profile yet.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import ModelConfig
from klotski_jax.constants import cache_root, round_up
from klotski_jax.models import blocks, layers
from klotski_jax.models.modules import layer_state
from klotski_jax.models.specs import expert_leaves, nest
from klotski_jax.planning.costs import Profile, expected_distinct, fit_nonnegative, model_key
from klotski_jax.planning.hot import PreviousLayerPopularity
from klotski_jax.planning.placement import Workload, dense_layer_bytes, place
from klotski_jax.planning.planner import Planner, PlanRequest
from klotski_jax.planning.policy import Policy
from klotski_jax.planning.prior import MachineRates
from klotski_jax.planning.simulate import PrefetchRule
from klotski_jax.runtime import steps
from klotski_jax.runtime.host import HostTier, StagingBuffer, aligned_empty, evict_files, read_file
from klotski_jax.runtime.ledger import MemoryLedger
from klotski_jax.runtime.routing import Routing
from klotski_jax.runtime.trace import RunStats, Tracer
from klotski_jax.runtime.transfers import Transfers, cache_memory
from klotski_jax.util import write_atomic

log = logging.getLogger(__name__)

# probe(groups, batch, device_budget, prompt_len, new_tokens[, prefetch_threshold]) ->
# (prefill s, decode step s): whole steps of the real engine, warm-up excluded
# (klotski_jax.engine_profile.engine_probe).
Probe = Callable[..., tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """How much to measure. `quick` shrinks every grid (tests, first runs of the engine)."""

    repeats: int = 5
    warmup: int = 2
    max_rows: int = 4096  # largest expert bucket / router and combine token count
    transfer_samples: int = 6  # experts read per transfer kind
    quick: bool = False
    device_budget: int | None = None  # skip shapes whose working set exceeds a quarter of it


# ---- cache --------------------------------------------------------------------------------------
def device_info() -> dict[str, str]:
    """What a profile is keyed by: the default device's platform and kind."""
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": str(d.device_kind)}


def cache_dir() -> pathlib.Path:
    """$KLOTSKI_JAX_PROFILES, else `<cache>/profiles` (the default model's cache root)."""
    if env := os.environ.get("KLOTSKI_JAX_PROFILES"):
        return pathlib.Path(env).expanduser()
    return cache_root() / "profiles"


def cache_path(cfg: ModelConfig) -> pathlib.Path:
    """The cache file of this model shape on this device."""
    info = device_info()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{info['platform']}-{info['device_kind']}".lower())
    return cache_dir() / f"{slug.strip('-')}-{model_key(cfg)}.json"


def load_cached(cfg: ModelConfig) -> Profile | None:
    """The cached profile of this model shape on this device, or None."""
    path = cache_path(cfg)
    try:
        return Profile.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as e:
        if path.exists():
            log.warning("ignoring unreadable profile %s: %s", path, e)
        return None


def write_profile(profile: Profile, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write a profile atomically (temp file + rename)."""
    return write_atomic(path, profile.to_json())


def get_profile(ckpt_dir: str | os.PathLike[str], *, refresh: bool = False,
                options: ProfileOptions | None = None, probe: Probe | None = None
                ) -> tuple[Profile, pathlib.Path, bool]:
    """(profile, its cache file, whether it was measured now): the cached one unless refresh.
    With a `probe` (timed engine steps) the overheads are calibrated too (`calibrate`)."""
    reader = CheckpointReader(ckpt_dir)
    path = cache_path(reader.config)
    cached = None if refresh else load_cached(reader.config)
    if cached is not None:
        return cached, path, False
    t0 = time.perf_counter()
    # The engine steps are timed first, in a fresh process: after the pieces' measurement
    # (disk reads, evicted page caches, many compiles) they ran up to 40% slower here.
    steps = None if probe is None else probe_steps(probe, reader.config)
    profile = measure(reader, options or ProfileOptions())
    if steps is not None:
        profile = calibrate(profile, reader.config, steps)
        profile.meta["elapsed_s"] = round(time.perf_counter() - t0, 2)
    write_profile(profile, path)
    return profile, path, True


# ---- machine rates (the cost prior's inputs) -------------------------------------------------------
def rates_path() -> pathlib.Path:
    """The cache file of this device kind's machine rates."""
    info = device_info()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{info['platform']}-{info['device_kind']}".lower())
    return cache_dir() / "machines" / f"{slug.strip('-')}.json"


def machine_rates(*, refresh: bool = False) -> tuple[MachineRates, bool]:
    """(this device's rates, whether they were measured now): the cached ones unless refresh."""
    path = rates_path()
    if not refresh:
        try:
            return MachineRates.from_json(path.read_text()), False
        except (OSError, ValueError, TypeError, KeyError) as e:
            if path.exists():
                log.warning("ignoring unreadable machine rates %s: %s", path, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    rates = measure_rates(path.parent)
    write_atomic(path, rates.to_json())
    return rates, True


def _best(fn: Callable[[], Any], n: int) -> float:
    """The fastest of n timed calls after one warm-up (a rate: noise only slows it)."""
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(scratch: pathlib.Path, file_mb: int = 48) -> MachineRates:
    """Measure the prior's rates on jax.devices()[0] (a few seconds; see prior.MachineRates).
    `scratch`: a folder for the disk test file (removed afterwards)."""
    t0 = time.perf_counter()
    device = jax.devices()[0]
    # A call like the scheduler's: a dict of weights, an activation and NumPy arguments.
    args = ({f"w{i}": jnp.zeros(8, jnp.float32) for i in range(8)}, jnp.zeros(8, jnp.float32),
            np.zeros((2, 4), np.int32), np.int32(3), np.ones((2, 4), bool))
    call = jax.jit(lambda w, x, pos, at, ok: x + sum(w.values()) + at + pos.sum() + ok.sum())
    dispatch = statistics.median(
        [_best(lambda: np.asarray(call(*args)), 20) for _ in range(3)])
    proj = jax.jit(layers.linear)
    flops = {}
    for dt in ("bfloat16", "float32"):
        x, w = jnp.ones((512, 1024), dt), jnp.ones((2048, 1024), dt)
        flops[dt] = 2 * 512 * 2048 * 1024 / _best(  # ~10 ms each: best of 12 (a busy core
            lambda x=x, w=w: jax.block_until_ready(proj(x, w)), 12)  # halved a best of 5)
    w = jnp.ones((8192, 2048), jnp.bfloat16)
    x = jnp.ones((2, 2048), jnp.bfloat16)
    memory = w.nbytes / _best(lambda: jax.block_until_ready(proj(x, w)), 5)
    h2d = h2d_bps(32 << 20)
    small = aligned_empty(4096)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = statistics.median(_best(lambda: pool.submit(
            lambda: jax.block_until_ready(jax.device_put(small, device))).result(), 10)
            for _ in range(3))
    cold, warm = _disk_rates(scratch, file_mb << 20)
    rng = np.random.default_rng(0)
    routing = []
    for n in (64, 2048):
        experts = [rng.integers(0, 8, (n // 2, 2)).astype(np.int32)] * 2
        weights = [np.ones(e.shape, np.float32) for e in experts]
        routing.append((n, _best(lambda ex=experts, wt=weights: [Routing(ex, wt).rows(e)
                                                                  for e in range(8)], 5)))
    (n0, s0), (n1, s1) = routing
    slope = max(0.0, (s1 - s0) / (n1 - n0))
    cores = os.cpu_count() or 1
    return MachineRates(
        device=device_info(), dispatch_s=dispatch, matmul_flops=flops, memory_bps=memory,
        load_s=load, h2d_bps=h2d, disk_cold_bps=cold, disk_warm_bps=warm,
        routing_s=(max(0.0, s0 - slope * n0), slope),
        io_interference=min(1.0, 2.0 / cores) if device.platform == "cpu" else 0.0,
        meta={"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "elapsed_s": round(time.perf_counter() - t0, 2), "jax": jax.__version__,
              "cores": cores})


def _disk_rates(scratch: pathlib.Path, nbytes: int) -> tuple[float, float]:
    """(bytes/s with the page cache evicted, bytes/s from the page cache) of a test file read
    in 4 MiB chunks into an aligned buffer, as the host tier reads expert chunks."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch, prefix=".disk-test-")
    path = pathlib.Path(name)
    chunk = 4 << 20
    try:
        with os.fdopen(fd, "wb") as f:
            block = np.random.default_rng(0).integers(0, 255, chunk, np.uint8).tobytes()
            for _ in range(nbytes // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        buf = aligned_empty(chunk)

        def read() -> float:
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(memoryview(buf)):
                    pass
            return (nbytes // chunk) * chunk / (time.perf_counter() - t0)

        evict_files([path])
        cold = read()
        warm = max(read(), read())
        return cold, warm
    finally:
        path.unlink(missing_ok=True)


# ---- raw bandwidths (also `klotski bench`'s) ------------------------------------------------------
def bandwidths(reader: CheckpointReader, io_mode: str, max_bytes: int = 64 << 20) -> dict[str, Any]:
    """Disk -> host (chunk files, page cache evicted; then again, warm) and host -> device
    (`jax.device_put` of an aligned buffer) bandwidths in bytes/s.

    From the cached profile of this model on this device when there is one (`klotski profile`),
    else measured here and now on up to max_bytes of expert chunk files.
    """
    profiled = profiled_bandwidths(reader.config)
    if profiled is not None:
        return profiled
    paths = _chunk_files(reader, max_bytes)
    evict_files(paths)
    cold = read_bps(paths, io_mode == "direct")
    read_bps(paths, False)  # into the page cache (after O_DIRECT reads, it is still empty)
    warm = read_bps(paths, False)
    return {"disk_cold_bps": cold, "disk_warm_bps": warm, "h2d_bps": h2d_bps(max_bytes),
            "measured_bytes": sum(p.stat().st_size for p in paths), "source": "measured"}


def profiled_bandwidths(cfg: ModelConfig) -> dict[str, Any] | None:
    """Bandwidths of the cached profile (None without one): disk with the page cache evicted,
    a page-cache read (a host copy), host -> device."""
    try:
        profile = load_cached(cfg)
        if profile is None:
            return None
        bw = profile.bandwidth
        return {"disk_cold_bps": float(bw["disk_to_host_Bps"]),
                "disk_warm_bps": float(bw["host_copy_Bps"]),
                "h2d_bps": float(bw["host_to_device_Bps"]),
                "source": f"profile {cache_path(cfg)}"}
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # another profile format
        log.warning("not using the cached profile's bandwidths (%s); measuring them", e)
        return None


def _chunk_files(reader: CheckpointReader, max_bytes: int) -> list[pathlib.Path]:
    """Expert chunk files spread over the layers, up to max_bytes (at least one expert)."""
    cfg = reader.config
    pairs = [(i, e) for e in range(cfg.num_experts) for i in cfg.moe_layer_ids]  # layer-interleaved
    out: list[pathlib.Path] = []
    total = 0
    for layer, e in pairs:
        if out and total + cfg.expert_bytes > max_bytes:
            break
        out += [reader.expert_chunk_path(layer, leaf.name, e) for leaf in expert_leaves(cfg)]
        total += cfg.expert_bytes
    return out


def read_bps(paths: Sequence[pathlib.Path], direct: bool) -> float:
    """Read every file whole into an aligned buffer, as the host tier does; bytes/s."""
    sizes = [p.stat().st_size for p in paths]
    buf = aligned_empty(round_up(max(sizes)))
    start = time.perf_counter()
    for p, n in zip(paths, sizes):
        read_file(p, memoryview(buf[:n]), memoryview(buf[:round_up(n)]), direct)
    return sum(sizes) / max(time.perf_counter() - start, 1e-9)


def h2d_bps(nbytes: int, repeats: int = 3) -> float:
    """Best of a few device_puts of an aligned host buffer (aliased, not copied, on CPU) to the
    default device, after one warm-up put."""
    host = aligned_empty(nbytes)
    host[:] = 1
    device = jax.devices()[0]
    return nbytes / max(_best(lambda: jax.block_until_ready(jax.device_put(host, device)),
                              repeats), 1e-9)


# ---- timing -------------------------------------------------------------------------------------
def _median(fn: Callable[[], Any], opts: ProfileOptions) -> float:
    for _ in range(opts.warmup):
        fn()
    times = []
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _round32(n: int) -> int:
    return -(-n // 32) * 32


# ---- the measurement ----------------------------------------------------------------------------
def measure(reader: CheckpointReader, opts: ProfileOptions) -> Profile:
    """Measure every cost of reader's model on jax.devices()[0]."""
    cfg = reader.config
    t0 = time.perf_counter()
    moe = cfg.moe_layer_ids[0]
    w = jax.device_put(layer_state({n: reader.dense(n) for n in _dense_names(reader, moe)}, moe))
    grids = _grids(cfg, opts)
    out: dict[str, Any] = {}
    out["attention_prefill"] = [(b, t, s, _attention(cfg, w, moe, b, t, s, opts))
                                for b, t, s in grids["prefill"]]
    out["attention_decode"] = [(b, 1, s, _attention(cfg, w, moe, b, 1, s, opts))
                               for b, s in grids["decode"]]
    out["router"] = [(m, _router(cfg, w, m, opts)) for m in grids["tokens"]]
    out["routing"] = [(n, _routing(cfg, n, opts)) for n in grids["tokens"] if n >= 2]
    out["combine"] = [(m, _combine(cfg, w, m, opts)) for m in grids["tokens"]]
    out["head"] = [(b, _head(cfg, reader, b, opts)) for b in grids["heads"]]
    dense = [i for i in range(cfg.num_layers) if not cfg.moe_layers[i]]
    if dense:
        wd = jax.device_put(layer_state({n: reader.dense(n)
                                        for n in _dense_names(reader, dense[0])}, dense[0]))
        out["dense_mlp"] = [(m, _dense_mlp(cfg, wd, m, opts)) for m in grids["tokens"]]
    transfers, bandwidth = _transfers(reader, opts)
    expert_w = _expert_weights(reader, moe)
    max_rows = min(opts.max_rows, 128) if opts.quick else opts.max_rows
    out["expert"] = [(r, _expert(cfg, expert_w, r, opts)) for r in steps.buckets_upto(max_rows)]
    out["io_interference"] = _interference(reader, expert_w, opts)
    meta = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "checkpoint": str(reader.path), "repeats": opts.repeats, "quick": opts.quick,
            "elapsed_s": round(time.perf_counter() - t0, 2), "jax": jax.__version__,
            "expert_bytes": cfg.expert_bytes}
    return Profile(device=device_info(), model_key=model_key(cfg), **out, **transfers,
                   bandwidth=bandwidth, meta=meta)


def _grids(cfg: ModelConfig, opts: ProfileOptions) -> dict[str, list[Any]]:
    """The shapes measured: small grids, fitted by costs.CostModel."""
    if opts.quick:
        prefill = [(1, 16, 32), (4, 16, 32), (2, 32, 64)]
        decode = [(1, 32), (8, 32), (8, 64)]
        tokens, heads = [1, 16, 128], [1, 8]
    else:
        prefill = [(b, t, _round32(t + 32)) for b, t in ((1, 32), (1, 128), (8, 32), (8, 128),
                                                         (32, 32))]
        decode = [(b, s) for b in (1, 8, 64) for s in (64, 256)]
        tokens, heads = [1, 8, 64, 512, 4096], [1, 8, 64]
    tokens = [m for m in tokens if m <= max(opts.max_rows, 2)]
    if opts.device_budget is not None:  # a working set of scores + KV under a quarter of it
        fits = lambda b, t, s: (3 * b * cfg.num_heads * t * s * 4
                                + b * s * cfg.kv_token_bytes) <= opts.device_budget / 4
        prefill = [x for x in prefill if fits(*x)] or prefill[:1]
        decode = [x for x in decode if fits(x[0], 1, x[1])] or decode[:1]
    return {"prefill": prefill, "decode": decode, "tokens": tokens, "heads": heads}


def _dense_names(reader: CheckpointReader, layer: int) -> list[str]:
    prefix = f"layers.{layer}."
    return [n for n, e in reader.manifest["tensors"].items()
            if n.startswith(prefix) and e["kind"] == "dense"]


def _attention(cfg: ModelConfig, w: Any, layer: int, b: int, t: int, s: int,
               opts: ProfileOptions) -> float:
    """One group's attention step as Scheduler._attention runs it."""
    dt = jnp.dtype(cfg.dtype)
    h = jnp.zeros((b, t, cfg.hidden_size), dt)
    kv = [tuple(jnp.zeros((b, s, *shape), dt) for shape in cfg.kv_cache_shapes)]
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    valid = np.ones((b, s), bool)

    def run() -> None:
        out, kv[0] = blocks.attention_block(
            w, h, positions, kv[0], np.int32(0), valid,
            cfg=cfg, window=cfg.sliding_windows[layer])
        jax.block_until_ready(out)

    return _median(run, opts)


def _router(cfg: ModelConfig, w: Any, m: int, opts: ProfileOptions) -> float:
    """One group's router with the routing copied to the host (Scheduler._route)."""
    h = jax.random.normal(jax.random.key(0), (m, 1, cfg.hidden_size)).astype(cfg.dtype)

    def run() -> None:
        _, wg, eg = steps.route_group(w, h, cfg=cfg)
        np.asarray(eg)
        np.asarray(wg)

    return _median(run, opts)


def _random_routing(cfg: ModelConfig, n: int, groups: int = 2, seed: int = 0,
                    expert0_rows: int | None = None) -> Routing:
    """Random top-k routing of n tokens in `groups` groups; with `expert0_rows`, exactly that
    many tokens (the first ones) pick expert 0."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n, cfg.num_experts)), axis=1)[:, : cfg.top_k]
    if expert0_rows is not None:
        others = np.argsort(rng.random((n, cfg.num_experts - 1)), axis=1) + 1
        experts = others[:, : cfg.top_k].copy()
        experts[:expert0_rows, 0] = 0
    weights = np.full((n, cfg.top_k), 1.0 / cfg.top_k, np.float32)
    cut = np.array_split(np.arange(n), min(groups, n))
    return Routing([experts[c].astype(np.int32) for c in cut], [weights[c] for c in cut])


def _routing(cfg: ModelConfig, n: int, opts: ProfileOptions) -> float:
    """Per MoE layer: routing bookkeeping, prediction, the concatenated input and accumulator."""
    rng = np.random.default_rng(0)
    experts = [rng.integers(0, cfg.num_experts, (n // 2, cfg.top_k)).astype(np.int32),
               rng.integers(0, cfg.num_experts, (n - n // 2, cfg.top_k)).astype(np.int32)]
    weights = [np.ones(e.shape, np.float32) for e in experts]
    xs = [jnp.zeros((len(e), cfg.hidden_size), cfg.dtype) for e in experts]
    pred = PreviousLayerPopularity(cfg.moe_layer_ids, cfg.num_experts, cfg.top_k)
    layer = cfg.moe_layer_ids[0]

    def run() -> None:
        routing = Routing(experts, weights)
        pred.observe(layer, routing.all_experts)
        pred.predict(layer, cfg.top_k)
        x_all = jnp.concatenate(xs)
        jax.block_until_ready(jnp.zeros(x_all.shape, jnp.float32))

    return _median(run, opts)


def _expert_weights(reader: CheckpointReader, layer: int) -> dict[str, jax.Array]:
    """Expert 0 of `layer` on the device, as the state a load gives the scheduler."""
    return nest({leaf.name: jax.device_put(reader.expert(layer, leaf.name, 0))
                 for leaf in expert_leaves(reader.config)})


EXPERT_STEP_TOKENS = 16384  # the largest token matrix an expert's timing gathers from


def _expert(cfg: ModelConfig, w: dict[str, jax.Array], rows: int, opts: ProfileOptions
            ) -> float:
    """One expert over a full bucket of `rows` tokens, as Scheduler._expert runs it: gather its
    rows from the routing, pad, run. The scheduler dispatches a layer's experts back to back
    and does not wait for each, so a burst of them is timed: the cost per expert."""
    # The step's tokens, if every expert got `rows` of them (E / k x rows), but no more than
    # 16384: a step of 4096 rows per expert is at most 4 x the largest step the profile
    # measures (max_rows tokens) at Mixtral's E / k = 4 (the sizes it always had); at
    # DeepSeek-V3's E / k = 32 it would be 131072 tokens, a 5.6 GB input and accumulator.
    n = max(rows, min(rows * cfg.num_experts // cfg.top_k, EXPERT_STEP_TOKENS))
    routing = _random_routing(cfg, n, expert0_rows=rows)
    x = jnp.zeros((n, cfg.hidden_size), cfg.dtype)
    acc = [jnp.zeros((n, cfg.hidden_size), jnp.float32)]
    burst = 4

    def run() -> None:
        for _ in range(burst):
            r, wts = routing.rows(0)
            pr, pw = steps.pad_rows(r, wts)
            acc[0], _ = steps.expert_apply(acc[0], x, pr, pw, w,
                                           block=blocks.expert_block(cfg))
        jax.block_until_ready(acc[0])

    return _median(run, opts) / burst


def _combine(cfg: ModelConfig, w: Any, m: int, opts: ProfileOptions) -> float:
    """One group's combine (routed output + shared expert + residual)."""
    h = jnp.zeros((m, 1, cfg.hidden_size), cfg.dtype)
    x = jnp.zeros((m, cfg.hidden_size), cfg.dtype)
    acc = jnp.zeros((m, cfg.hidden_size), jnp.float32)
    return _median(lambda: jax.block_until_ready(
        steps.finish_moe(w, h, x, acc, np.int32(0), cfg=cfg)), opts)


def _dense_mlp(cfg: ModelConfig, w: Any, m: int, opts: ProfileOptions) -> float:
    h = jnp.zeros((m, 1, cfg.hidden_size), cfg.dtype)
    return _median(lambda: jax.block_until_ready(blocks.dense_mlp_block(w, h, cfg=cfg)), opts)


def _head(cfg: ModelConfig, reader: CheckpointReader, b: int, opts: ProfileOptions) -> float:
    """Per group and step: embedding (an untied one is looked up on the host, as
    Scheduler._embed does), last-token logits to the host, greedy sampling."""
    embed = reader.dense("embed")
    norm = jax.device_put(reader.dense("final_norm"))
    head = jax.device_put(embed if cfg.tie_word_embeddings else reader.dense("lm_head"))
    tokens = np.zeros((b, 1), np.int32)

    def run() -> None:
        if cfg.tie_word_embeddings:
            h = blocks.embed(head, tokens)
        else:
            h = jax.device_put(np.take(embed, tokens, axis=0))
        logits = steps.last_token_logits(norm, head, h, cfg=cfg)
        np.asarray(logits).argmax(-1)

    return _median(run, opts)


# ---- transfers ----------------------------------------------------------------------------------
def _sample_experts(cfg: ModelConfig, count: int) -> list[tuple[int, int]]:
    """Experts spread over the MoE layers (distinct files, so no read hits another's pages)."""
    all_ = [(i, e) for i in cfg.moe_layer_ids for e in range(cfg.num_experts)]
    step = max(1, len(all_) // max(1, count))
    return all_[::step][:count]


def _load_times(transfers: Transfers, keys: list[Any]) -> tuple[list[float], list[float]]:
    """(I/O time from request to done, compute-side get + release time) of each key, serially."""
    io, side = [], []
    for key in keys:
        t0 = time.perf_counter()
        transfers.request(key).result()
        t1 = time.perf_counter()
        transfers.get(key)
        transfers.release(key)
        io.append(t1 - t0)
        side.append(time.perf_counter() - t1)
    return io, side


def _transfers(reader: CheckpointReader, opts: ProfileOptions
               ) -> tuple[dict[str, Any], dict[str, float]]:
    """Expert loads from disk (page cache evicted), page cache and host cache, dense layers."""
    cfg = reader.config
    keys = [("expert", i, e) for i, e in _sample_experts(cfg, opts.transfer_samples)]
    device = jax.devices()[0]  # the cache lives where the engine keeps it (pinned on GPU/TPU)
    pinned = device.platform != "cpu" and "pinned_host" in {
        m.kind for m in device.addressable_memories()}
    cached = HostTier(reader, MemoryLedger("host", None), None,  # caches every expert
                      host_memory=cache_memory(device, pinned))
    uncached = HostTier(reader, MemoryLedger("host", None), frozenset())  # reads every time
    out: dict[str, Any] = {}
    for name, tier in (("cold", cached), ("host", cached), ("warm", uncached)):
        if name == "cold":
            cached.evict_page_cache()
        tr = Transfers(tier, MemoryLedger("device", None), io_threads=1, tracer=Tracer(False),
                       stats=RunStats())
        try:
            if name == "warm":  # the pipeline's first use of a staging buffer allocates it
                _load_times(tr, keys[:1])
            io, side = _load_times(tr, keys)
            out[name] = statistics.median(io)
            out.setdefault("side", []).extend(side)
            if name == "host":
                dense = [("dense", i) for i in range(min(cfg.num_layers, 4))]
                _load_times(tr, dense[:1])
                dense_io, _ = _load_times(tr, dense)
                out["dense"] = [(tr.nbytes(k), t) for k, t in zip(dense, dense_io)]
        finally:
            tr.close()
    transfers = {"expert_disk_cold_s": out["cold"], "expert_host_s": out["host"],
                 "expert_disk_warm_s": out["warm"], "expert_release_s": statistics.median(
                     out["side"]), "dense_load": out["dense"]}
    return transfers, _bandwidth(reader, cached, keys, opts)


def _bandwidth(reader: CheckpointReader, tier: HostTier, keys: list[Any],
               opts: ProfileOptions) -> dict[str, float]:
    """Raw bytes/s of disk -> host (page cache evicted), host -> device and a host copy."""
    staging = StagingBuffer(tier.part_bytes)
    nbytes = sum(tier.part_bytes.values())
    tier.evict_page_cache()
    t0 = time.perf_counter()
    for _, layer, e in keys:
        for part in tier.part_bytes:
            read_file(reader.expert_chunk_path(layer, part, e), staging.region(part),
                       staging.region(part, padded=True), direct=False)
    disk = nbytes * len(keys) / (time.perf_counter() - t0)
    parts = tier.views(staging)
    device = jax.devices()[0]
    h2d = nbytes / _median(lambda: jax.block_until_ready(jax.device_put(parts, device)), opts)
    size = max(nbytes, 64 << 20)  # larger than the CPU caches
    src, dst = np.ones(size, np.uint8), np.empty(size, np.uint8)
    copy = size / _median(lambda: np.copyto(dst, src), opts)
    return {"disk_to_host_Bps": disk, "host_to_device_Bps": h2d, "host_copy_Bps": copy}


def _interference(reader: CheckpointReader, w: dict[str, jax.Array], opts: ProfileOptions,
                  io_threads: int = 2, window_s: float = 0.4) -> float:
    """The share of I/O-thread time the compute thread loses to it: a burst of expert
    computations timed alone, then while `io_threads` threads read expert chunk files from the
    disk (page cache evicted) into staging buffers as the host tier does. (A slowdown per second
    of reading: near 1 when both compete for the same few cores, near 0 on an accelerator.)"""
    cfg = reader.config
    rows = 256
    n = rows * cfg.num_experts // cfg.top_k
    routing = _random_routing(cfg, n, expert0_rows=rows)
    x = jnp.zeros((n, cfg.hidden_size), cfg.dtype)
    acc = [jnp.zeros((n, cfg.hidden_size), jnp.float32)]
    r, wts = routing.rows(0)
    pr, pw = steps.pad_rows(r, wts)

    def compute(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            acc[0], _ = steps.expert_apply(acc[0], x, pr, pw, w,
                                           block=blocks.expert_block(cfg))
        jax.block_until_ready(acc[0])
        return time.perf_counter() - t0

    compute(2)
    one = min(compute(2) for _ in range(3)) / 2
    reps = max(4, int(window_s / max(one, 1e-6)))
    alone = min(compute(reps) for _ in range(2))
    tier = HostTier(reader, MemoryLedger("host", None), frozenset())  # reads every time
    tier.evict_page_cache()
    experts = [(i, e) for e in range(cfg.num_experts) for i in cfg.moe_layer_ids]
    stop = threading.Event()
    busy = [0.0] * io_threads

    def read(k: int) -> None:
        for j in range(k, len(experts), io_threads):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            _, staging, _, _ = tier.read_expert(*experts[j], tier.take_staging)
            tier.give_staging(staging)
            busy[k] += time.perf_counter() - t0

    threads = [threading.Thread(target=read, args=(k,)) for k in range(io_threads)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    before = list(busy)
    together = compute(reps)
    io = sum(busy) - sum(before)
    stop.set()
    for t in threads:
        t.join()
    if io <= 0:
        return 0.0
    return float(min(1.0, max(0.0, (together - alone) / io)))


# ---- whole-step calibration ---------------------------------------------------------------------
CALIBRATION_SHAPES = ((1, 1, 16), (2, 4, 16), (1, 8, 64))  # (groups, batch, prompt tokens)


CALIBRATION_NEW = 4  # new tokens of each calibration run

Steps = dict[tuple[Any, ...], tuple[float, float]]


STREAMED_SHAPE = (2, 4, 16)  # the streamed calibration run: every expert from the host cache


def streamed_budget(cfg: ModelConfig) -> int:
    """A device budget at which, for STREAMED_SHAPE, the dense weights stay resident and every
    expert streams (from the host cache) through E + top-k slots: what a streamed expert costs
    the compute thread beyond its computation, without slot starvation."""
    n, b, p = STREAMED_SHAPE
    req = PlanRequest(prompt_len=p, gen_len=CALIBRATION_NEW)
    pl = place(cfg, Policy(groups=n, batch_size=b, hot_experts=cfg.top_k),
               Workload(n, b, p, req.cache_len - p))
    slots = cfg.num_experts + cfg.top_k
    return pl.fixed_device_bytes + sum(dense_layer_bytes(cfg)) + slots * cfg.expert_bytes


def probe_steps(probe: Probe, cfg: ModelConfig) -> Steps:
    """(prefill s, decode step s) of the engine at each CALIBRATION_SHAPE, all resident, and at
    STREAMED_SHAPE with every expert streamed: loaded when routed (key (n, b, p, "cold")) and
    prefetched (key (n, b, p, "prefetched"), the whole next layer)."""
    out: dict[Any, tuple[float, float]] = {
        (n, b, p): probe(n, b, None, p, CALIBRATION_NEW) for n, b, p in CALIBRATION_SHAPES}
    n, b, p = STREAMED_SHAPE
    for name, threshold in (("cold", 1.0), ("prefetched", 0.0)):
        out[(n, b, p, name)] = probe(n, b, streamed_budget(cfg), p, CALIBRATION_NEW, threshold)
    return out


def calibrate(profile: Profile, cfg: ModelConfig, measured: Steps | Probe) -> Profile:
    """Fit the overheads the pieces miss to timed steps of the real engine.

    Per layer and per computed expert: least squares over the prefill and decode residuals
    (measured - predicted) of a few all-resident shapes (`probe_steps`; a probe is run here).
    The I/O interference is measured directly (`_interference`), not fitted.
    """
    if callable(measured):
        measured = probe_steps(measured, cfg)
    zero = dataclasses.replace(profile, overhead_layer_s=0.0, overhead_expert_s=0.0)
    k, new = cfg.top_k, CALIBRATION_NEW
    uniform = [cfg.top_k / cfg.num_experts] * cfg.num_experts
    n_moe = len(cfg.moe_layer_ids)
    rows = []
    for n, b, prompt in CALIBRATION_SHAPES:
        req = PlanRequest(prompt_len=prompt, gen_len=new, groups=n, batch_size=b, hot_experts=k,
                          disk_tier="page_cache", reread_tier="page_cache")
        pred = Planner(cfg, zero).evaluate(req, n, b, k)
        prefill, decode = measured[(n, b, prompt)]
        for tokens, got, want in ((n * b, decode, pred.predicted_decode_step_s),
                                  (n * b * prompt, prefill, pred.predicted_prefill_s)):
            rows.append((cfg.num_layers, n_moe * expected_distinct(tokens, uniform), got - want))
    layer_s, expert_s = fit_nonnegative(tuple(rows), lambda r: [r[0], r[1]])
    fitted = dataclasses.replace(zero, overhead_layer_s=float(layer_s),
                                 overhead_expert_s=float(expert_s))
    # What a streamed expert costs the compute thread (request, get, release hand-offs): where
    # the streamed decode step lands between the predictions with none and with 1 s each; first
    # loaded when routed, then prefetched (what prefetching adds on top).
    n, b, prompt = STREAMED_SHAPE
    req = PlanRequest(prompt_len=prompt, gen_len=new, groups=n, batch_size=b,
                      device_budget=streamed_budget(cfg), disk_tier="page_cache",
                      reread_tier="page_cache")
    release, prefetch = profile.expert_release_s, 0.0

    def solve(field: str, rule: PrefetchRule, measured_s: float, base: Profile) -> float:
        at = {x: Planner(cfg, dataclasses.replace(base, **{field: x})).evaluate(
            req, n, b, rule).predicted_decode_step_s for x in (0.0, 1.0)}
        return (measured_s - at[0.0]) / (at[1.0] - at[0.0]) if at[1.0] > at[0.0] else 0.0

    if (n, b, prompt, "cold") in measured:
        release = max(release, solve("expert_release_s", PrefetchRule(threshold=1.0),
                                     measured[(n, b, prompt, "cold")][1], fitted))
        fitted = dataclasses.replace(fitted, expert_release_s=float(release))
    if (n, b, prompt, "prefetched") in measured:
        prefetch = max(0.0, solve("expert_prefetch_s", PrefetchRule(threshold=0.0),
                                  measured[(n, b, prompt, "prefetched")][1], fitted))
    meta = {**profile.meta, "calibration": {
        "shapes": {"x".join(map(str, key)): v for key, v in measured.items()},
        "residuals_s": [r[2] for r in rows], "measured_release_s": profile.expert_release_s}}
    return dataclasses.replace(fitted, expert_prefetch_s=float(prefetch), meta=meta)
