"""HostTier: aligned staging reads of raw chunk files (buffered, O_DIRECT) and TensorStore reads,
bit-identical to CheckpointReader; the host cache and its accounting; page-cache eviction; and
the host minimum of the placement holding what the pipeline keeps in host RAM.
"""

from __future__ import annotations

import errno
import os
import pathlib
import random
import shutil
import tempfile
import threading

import jax
import numpy as np
import pytest
from hf_models import save_hf_model

import klotski_jax
from klotski_jax.checkpoints.errors import CorruptFileError
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.constants import ALIGN
from klotski_jax.models.specs import EXPERT_PARTS, Kind, expert_part_shape, total_bytes
from klotski_jax.planning.placement import (
    Workload,
    dense_layer_bytes,
    place,
    staged_expert_bytes,
)
from klotski_jax.planning.policy import IO_MODES, Policy
from klotski_jax.runtime import host as host_mod
from klotski_jax.runtime.host import HostTier, StagingBuffer, aligned_empty
from klotski_jax.runtime.ledger import MemoryLedger

DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny HF Mixtral converted once as float32 and once as bfloat16."""
    root = tmp_path_factory.mktemp("host_tier")
    _, hf = save_hf_model("mixtral", root / "hf")
    return {dtype: klotski_jax.convert(hf, root / dtype, dtype=dtype, progress=False)
            for dtype in DTYPES}


def _tier(ckpt: pathlib.Path, host_experts=frozenset(), io_mode: str = "buffered",
          capacity: int | None = None, timeout_s: float = 5.0) -> HostTier:
    reader = CheckpointReader(ckpt)
    return HostTier(reader, MemoryLedger("host", capacity, timeout_s=timeout_s), host_experts,
                    io_mode)


def _all_experts(cfg) -> list[tuple[int, int]]:
    return [(i, e) for i in cfg.moe_layer_ids for e in range(cfg.num_experts)]


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-identical: same dtype, shape and bytes (NaN-safe, bf16-safe)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def _assert_aligned(parts: dict[str, np.ndarray]) -> None:
    for part, arr in parts.items():
        assert arr.ctypes.data % ALIGN == 0, part


def _check_all_reads(tier: HostTier, *, expect_staging: bool) -> None:
    """Read every expert through the tier; compare each part with the TensorStore reference."""
    reader = tier.reader
    for layer, e in _all_experts(tier.cfg):
        parts, staging, disk, hit = tier.read_expert(layer, e, tier.take_staging)
        assert not hit and disk == tier.cfg.expert_bytes
        assert (staging is not None) == expect_staging
        assert list(parts) == list(EXPERT_PARTS)
        _assert_aligned(parts)
        for part in EXPERT_PARTS:
            assert parts[part].shape == expert_part_shape(tier.cfg, part)
            _assert_same(parts[part], reader.expert(layer, part, e))
        if staging is not None:
            tier.give_staging(staging)


# ---- reads are bit-identical to TensorStore -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("io_mode", IO_MODES)
def test_staging_reads_match_tensorstore(ckpts, dtype, io_mode):
    tier = _tier(ckpts[dtype], host_experts=frozenset(), io_mode=io_mode)
    assert tier.cfg.dtype == dtype and len(tier.cfg.moe_layer_ids) >= 2
    _check_all_reads(tier, expect_staging=True)
    # One staging buffer, reused for every read (given back each time) and accounted once.
    staging = {k: v for k, v in tier.ledger.held().items() if k != "dense"}
    assert len(staging) == 1 and list(staging.values()) == [staged_expert_bytes(tier.cfg)]
    assert tier.cached(*_all_experts(tier.cfg)[0]) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("io_mode", IO_MODES)
def test_cached_reads_match_tensorstore(ckpts, dtype, io_mode):
    tier = _tier(ckpts[dtype], host_experts=None, io_mode=io_mode)
    _check_all_reads(tier, expect_staging=False)
    experts = _all_experts(tier.cfg)
    for layer, e in experts:  # the second read of every expert comes from RAM
        cached = tier.cached(layer, e)
        parts, staging, disk, hit = tier.read_expert(layer, e, tier.take_staging)
        assert hit and disk == 0 and staging is None
        assert parts is cached
        _assert_aligned(parts)
        for part in EXPERT_PARTS:
            _assert_same(parts[part], tier.reader.expert(layer, part, e))


def test_staging_buffers_are_page_aligned_per_part(ckpts):
    tier = _tier(ckpts["float32"])
    buf = tier.take_staging()
    assert buf.buf.ctypes.data % ALIGN == 0
    assert buf.nbytes == staged_expert_bytes(tier.cfg) and buf.nbytes % ALIGN == 0
    end = 0
    for part in EXPERT_PARTS:
        assert buf.offsets[part] % ALIGN == 0 and buf.offsets[part] >= end
        region, padded = buf.region(part), buf.region(part, padded=True)
        n = tier.part_bytes[part]
        assert len(region) == n and len(padded) == -(-n // ALIGN) * ALIGN
        addr = np.frombuffer(region, np.uint8).ctypes.data
        assert addr % ALIGN == 0 and addr == buf.buf.ctypes.data + buf.offsets[part]
        end = buf.offsets[part] + len(padded)
    assert end == buf.nbytes
    # The tier hands a given-back buffer out again instead of allocating (and reserving) more.
    tier.give_staging(buf)
    assert tier.take_staging() is buf


@pytest.mark.parametrize("nbytes", [1, 100, 4095, 4096, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("align", [64, 4096])
def test_aligned_empty(nbytes, align):
    buf = aligned_empty(nbytes, align)
    assert buf.dtype == np.uint8 and buf.nbytes == nbytes
    assert buf.ctypes.data % align == 0
    buf[:] = 7  # writable over its whole length
    assert int(buf.sum()) == 7 * nbytes


def test_staging_buffer_of_unpadded_parts():
    sb = StagingBuffer({"gate": 10, "up": 4096, "down": 4097})
    assert sb.offsets == {"gate": 0, "up": 4096, "down": 8192}
    assert sb.nbytes == 8192 + 8192
    assert len(sb.region("down")) == 4097 and len(sb.region("down", padded=True)) == 8192


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_put_of_a_staging_view(ckpts, dtype):
    tier = _tier(ckpts[dtype])
    layer, e = _all_experts(tier.cfg)[-1]
    parts, staging, _, _ = tier.read_expert(layer, e, tier.take_staging)
    on_device = jax.block_until_ready(jax.device_put(parts))
    for part in EXPERT_PARTS:
        got = np.asarray(on_device[part])
        assert on_device[part].dtype == np.dtype(dtype)
        _assert_same(got, tier.reader.expert(layer, part, e))
    single = jax.device_put(parts["down"])
    _assert_same(np.asarray(single), tier.reader.expert(layer, "down", e))
    tier.give_staging(staging)


# ---- the host cache and its accounting ------------------------------------------------------

def test_dense_weights_are_held_and_accounted(ckpts):
    tier = _tier(ckpts["float32"])
    cfg = tier.cfg
    # Every dense array lives in host RAM, the globals (embedding, head) included.
    assert tier.ledger.held() == {"dense": total_bytes(cfg, Kind.DENSE)}
    assert [tier.dense_layer_bytes(i) for i in range(cfg.num_layers)] == dense_layer_bytes(cfg)
    assert set(tier.globals) == {"embed", "final_norm", "lm_head"}
    _assert_same(tier.layers[1]["attn"]["q"], tier.reader.dense("layers.1.attn.q"))
    _assert_same(tier.globals["embed"], tier.reader.dense("embed"))


def test_host_cache_hits_and_ledger(ckpts):
    tier = _tier(ckpts["bfloat16"], host_experts=None)
    cfg = tier.cfg
    staged = staged_expert_bytes(cfg)
    dense = tier.ledger.used
    parts, staging, disk, hit = tier.read_expert(0, 1, tier.take_staging)
    assert (staging, disk, hit) == (None, cfg.expert_bytes, False)
    assert tier.ledger.held()[("expert", 0, 1)] == staged
    assert tier.ledger.used == dense + staged
    again = tier.read_expert(0, 1, tier.take_staging)
    assert again == (parts, None, 0, True)  # a hit: nothing read from disk
    assert tier.ledger.used == dense + staged  # not counted twice
    for layer, e in _all_experts(cfg):
        tier.read_expert(layer, e, tier.take_staging)
    assert tier.ledger.used == dense + staged * len(_all_experts(cfg)) == tier.ledger.peak


def test_experts_outside_host_experts_always_go_to_disk(ckpts):
    tier = _tier(ckpts["float32"], host_experts=frozenset({(1, 2)}))
    cfg = tier.cfg
    for _ in range(2):
        parts, staging, disk, hit = tier.read_expert(0, 0, tier.take_staging)
        assert staging is not None and disk == cfg.expert_bytes and not hit
        assert tier.cached(0, 0) is None
        tier.give_staging(staging)
    first = tier.read_expert(1, 2, tier.take_staging)
    assert first[1] is None and first[2] == cfg.expert_bytes and not first[3]
    assert tier.read_expert(1, 2, tier.take_staging)[2:] == (0, True)
    keys = set(tier.ledger.held())
    assert ("expert", 1, 2) in keys and ("expert", 0, 0) not in keys
    assert sum(isinstance(k, tuple) and k[0] == "staging" for k in keys) == 1


def test_cacheable_expert_reads_through_staging_when_the_host_budget_is_full(ckpts):
    cfg = CheckpointReader(ckpts["float32"]).config
    staged = staged_expert_bytes(cfg)
    tier = _tier(ckpts["float32"], host_experts=None,
                 capacity=total_bytes(cfg, Kind.DENSE) + 2 * staged)
    spare = tier.take_staging()  # one staging buffer, reserved, then back in the pool
    tier.give_staging(spare)
    a = tier.read_expert(0, 0, tier.take_staging)
    assert a[1] is None and not a[3]  # cached: the host budget is now full
    assert tier.ledger.used == tier.ledger.capacity
    b = tier.read_expert(0, 1, tier.take_staging)  # cacheable, but no room: via staging
    assert b[1] is spare and b[2] == cfg.expert_bytes and not b[3]
    for part in EXPERT_PARTS:
        _assert_same(b[0][part], tier.reader.expert(0, part, 1))
    tier.give_staging(b[1])
    c = tier.read_expert(0, 2, tier.take_staging)
    assert c[1] is spare  # the same buffer again, no new reservation
    assert tier.ledger.used == tier.ledger.capacity
    assert tier.cached(0, 1) is None and tier.cached(0, 2) is None


def test_a_failed_cache_read_releases_its_reservation(ckpts, monkeypatch):
    tier = _tier(ckpts["float32"], host_experts=None)
    used = tier.ledger.used

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(tier, "_read_into", broken)
    with pytest.raises(OSError, match="disk on fire"):
        tier.read_expert(0, 3, tier.take_staging)
    assert tier.ledger.used == used and not tier.ledger.holds(("expert", 0, 3))
    monkeypatch.undo()
    parts, _, _, hit = tier.read_expert(0, 3, tier.take_staging)
    assert not hit
    _assert_same(parts["gate"], tier.reader.expert(0, "gate", 3))


def test_concurrent_reads_of_the_same_experts(ckpts):
    """I/O threads may read one expert at once: one caches it, none trips the ledger."""
    tier = _tier(ckpts["float32"], host_experts=None)
    experts = _all_experts(tier.cfg) * 3
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(seed: int) -> None:
        order = experts[:]
        random.Random(seed).shuffle(order)
        barrier.wait()
        try:
            for layer, e in order:
                parts, staging, _, _ = tier.read_expert(layer, e, tier.take_staging)
                _assert_same(parts["up"], tier.reader.expert(layer, "up", e))
                if staging is not None:
                    tier.give_staging(staging)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:1]
    for layer, e in _all_experts(tier.cfg):
        assert tier.cached(layer, e) is not None
        assert tier.ledger.holds(("expert", layer, e))


def test_bad_io_mode(ckpts):
    with pytest.raises(ValueError, match="io_mode"):
        _tier(ckpts["float32"], io_mode="mmap")


# ---- page cache and O_DIRECT ----------------------------------------------------------------

@pytest.mark.parametrize("io_mode", IO_MODES)
def test_evict_page_cache_then_read(ckpts, io_mode):
    tier = _tier(ckpts["bfloat16"], host_experts=frozenset(), io_mode=io_mode)
    cfg = tier.cfg
    count = tier.evict_page_cache()
    if hasattr(os, "posix_fadvise"):
        assert count == len(cfg.moe_layer_ids) * len(EXPERT_PARTS) * cfg.num_experts > 0
    else:  # pragma: no cover - not Linux
        assert count == 0
    _check_all_reads(tier, expect_staging=True)


def _direct_supported(path: pathlib.Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_mode_reads_with_o_direct(ckpts, monkeypatch):
    tier = _tier(ckpts["float32"], io_mode="direct")
    chunk = tier.reader.expert_chunk_path(0, "gate", 0)
    flags_seen, preadv_calls = [], []
    real_open, real_preadv = os.open, os.preadv

    def spy_open(path, flags, *args, **kwargs):
        flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    def spy_preadv(fd, buffers, offset, *args):
        n = real_preadv(fd, buffers, offset, *args)
        preadv_calls.append(n)
        return n

    monkeypatch.setattr(host_mod.os, "open", spy_open)
    monkeypatch.setattr(host_mod.os, "preadv", spy_preadv)
    _check_all_reads(tier, expect_staging=True)
    monkeypatch.undo()
    n_files = len(_all_experts(tier.cfg)) * len(EXPERT_PARTS)
    assert sum(bool(f & os.O_DIRECT) for f in flags_seen) == n_files
    if _direct_supported(chunk):
        assert preadv_calls == [tier.part_bytes[p] for _ in _all_experts(tier.cfg)
                                for p in EXPERT_PARTS]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_mode_falls_back_when_o_direct_open_fails(ckpts, monkeypatch):
    """A filesystem without O_DIRECT (e.g. tmpfs before Linux 6.6) refuses the open: EINVAL."""
    tier = _tier(ckpts["bfloat16"], io_mode="direct")
    refused = []
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(host_mod.os, "open", no_direct)
    _check_all_reads(tier, expect_staging=True)
    assert len(refused) == len(_all_experts(tier.cfg)) * len(EXPERT_PARTS)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_mode_falls_back_when_o_direct_read_fails(ckpts, monkeypatch):
    tier = _tier(ckpts["float32"], io_mode="direct")
    calls = []

    def failing_preadv(fd, buffers, offset, *args):
        calls.append(fd)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(host_mod.os, "preadv", failing_preadv)
    _check_all_reads(tier, expect_staging=True)
    if _direct_supported(tier.reader.expert_chunk_path(0, "up", 0)):
        assert calls


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
def test_reads_from_tmpfs(ckpts, io_mode):
    """On tmpfs O_DIRECT is refused (Linux < 6.6) or allowed: either way the reads are exact."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        ckpt = shutil.copytree(ckpts["float32"], pathlib.Path(shm) / "ckpt")
        tier = _tier(ckpt, host_experts=frozenset(), io_mode=io_mode)
        _check_all_reads(tier, expect_staging=True)
        _check_all_reads(_tier(ckpt, host_experts=None, io_mode=io_mode), expect_staging=False)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_short_chunk_file_is_an_error(ckpts, tmp_path, io_mode):
    ckpt = shutil.copytree(ckpts["float32"], tmp_path / "ckpt")
    tier = _tier(ckpt, host_experts=frozenset(), io_mode=io_mode)
    chunk = tier.reader.expert_chunk_path(1, "down", 2)
    os.truncate(chunk, os.path.getsize(chunk) - 4)
    with pytest.raises(CorruptFileError, match=r"layer 1 expert 2 \(down\): truncated: \d+ of \d+ bytes"):
        tier.read_expert(1, 2, tier.take_staging)
    parts, staging, _, _ = tier.read_expert(1, 1, tier.take_staging)  # the others still read
    _assert_same(parts["down"], tier.reader.expert(1, "down", 1))


# ---- the placement's host minimum holds what the pipeline keeps in RAM ----------------------

@pytest.mark.parametrize("schedule", ["klotski", "flexgen", "lru", "sequential"])
@pytest.mark.parametrize("device", ["min", "mid", "all"])
def test_host_minimum_holds_the_pipeline(ckpts, schedule, device):
    """At host budget == min_host_bytes, the tier holds the dense weights plus a staging buffer
    for every device-resident expert (its device array may alias it for the whole run) and for
    every streamed expert the device budget admits, without ever waiting for host memory."""
    reader = CheckpointReader(ckpts["float32"])
    cfg = reader.config
    pol = Policy(schedule=schedule)
    w = Workload(1, 4, 6, 6) if pol.single_group else Workload(2, 2, 6, 6)
    dmin = place(cfg, pol.replace(device_budget=None), w).min_device_bytes
    budget = {"min": dmin, "mid": dmin + 5 * cfg.expert_bytes, "all": None}[device]
    pol = pol.replace(device_budget=budget)
    host_min = place(cfg, pol, w).min_host_bytes
    pl = place(cfg, pol.replace(host_budget=host_min), w)
    assert pl.host_experts == frozenset()

    host = MemoryLedger("host", host_min, timeout_s=1.0)  # a stuck reservation fails fast
    tier = HostTier(reader, host, pl.host_experts, "buffered")
    dev = MemoryLedger("device", budget)
    dev.reserve("fixed", pl.fixed_device_bytes)
    if pl.dense_resident:
        dev.reserve("dense", sum(dense_layer_bytes(cfg)))
    held = []
    for layer, e in sorted(pl.device_experts):  # pinned for the run, staging kept
        dev.reserve(("expert", layer, e), cfg.expert_bytes)
        held.append(tier.read_expert(layer, e, tier.take_staging))
    for layer, e in _all_experts(cfg):  # then stream as many as the device admits at once
        if (layer, e) in pl.device_experts:
            continue
        if not dev.try_reserve(("expert", layer, e), cfg.expert_bytes):
            break
        held.append(tier.read_expert(layer, e, tier.take_staging))
    assert all(h[1] is not None for h in held)  # nothing fit in a host cache at the minimum
    assert len(held) >= len(pl.device_experts) + min(
        pl.expert_slots, len(_all_experts(cfg)) - len(pl.device_experts))
    assert host.peak <= host_min
    assert not host.try_reserve("one more", staged_expert_bytes(cfg))  # and it is tight
