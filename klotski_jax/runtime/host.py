"""The host and disk tiers: dense weights in RAM, a read-through expert cache, raw chunk reads.

One expert is three projections (gate, up, down), each a chunk file holding exactly its raw bytes
(the converter's zarr3 layout); a quantized expert is six or nine such files (each projection's
codes, scales and zero points: `specs.expert_leaves`), read the same way and dequantized only on
the device, inside the jitted expert step. The fast path reads those files with `readinto` (or O_DIRECT) into
a 4096-byte-aligned staging buffer, whose views `jax.device_put` can take without a copy; the
reference path reads the same expert through TensorStore. A test checks both are bit-identical.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from klotski_jax.checkpoints import checksums
from klotski_jax.checkpoints.errors import CorruptFileError
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.constants import ALIGN, round_up
from klotski_jax.models.modules import layer_state
from klotski_jax.models.specs import ExpertLeaf, expert_leaves, nest
from klotski_jax.planning.placement import staged_expert_bytes
from klotski_jax.planning.policy import IO_MODES
from klotski_jax.runtime.ledger import MemoryLedger

log = logging.getLogger(__name__)


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A uint8 buffer of nbytes whose data pointer is a multiple of `align`."""
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset: offset + nbytes]




def aligned_copy(a: np.ndarray, align: int = ALIGN) -> np.ndarray:
    """A copy of `a` in a buffer whose data pointer is a multiple of `align`."""
    out = aligned_empty(a.nbytes, align).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class StagingBuffer:
    """An aligned buffer holding one expert's stored arrays (`ExpertLeaf` names: its three
    parts, or their quantized arrays), each at an aligned offset."""

    def __init__(self, part_bytes: dict[str, int]) -> None:
        self.offsets: dict[str, int] = {}
        total = 0
        for part, nbytes in part_bytes.items():
            self.offsets[part] = total
            total += round_up(nbytes)
        self.part_bytes = part_bytes
        self.buf = aligned_empty(total)

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def region(self, part: str, padded: bool = False) -> memoryview:
        n = self.part_bytes[part]
        start = self.offsets[part]
        return memoryview(self.buf[start: start + (round_up(n) if padded else n)])


class ShortRead(OSError):
    """A chunk file shorter than the expert array it should hold."""

    def __init__(self, path: os.PathLike[str], got: int, want: int) -> None:
        super().__init__(f"short read of {path}: {got} of {want} bytes")
        self.got, self.want = got, want


def read_file(path: os.PathLike[str], out: memoryview, padded: memoryview, direct: bool) -> int:
    """Read a whole chunk file into `out` (O_DIRECT into the page-padded view when asked)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # e.g. tmpfs does not support O_DIRECT: fall back to buffered reads
            fd = None
        if fd is not None:
            try:
                n = os.preadv(fd, [padded], 0)
            except OSError:
                n = -1
            finally:
                os.close(fd)
            if n >= len(out):
                return len(out)
    with open(path, "rb", buffering=0) as f:
        n = f.readinto(out)
    if n != len(out):
        raise ShortRead(path, n, len(out))
    return n


class HostTier:
    """Dense weights (always in host RAM) and experts (host cache or disk) of one checkpoint."""

    def __init__(self, reader: CheckpointReader, ledger: MemoryLedger,
                 host_experts: frozenset[tuple[int, int]] | None, io_mode: str = "buffered",
                 host_memory: Callable[[dict[str, np.ndarray]], Any] | None = None,
                 verified: Verified | None = None):
        """`verified`: check files against the manifest's checksums, each expert on its first
        read from disk (and the dense files now), recording what passed in this shared
        `Verified` (an engine keeps one, so repeated calls check once); None: no checks."""
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
        self.reader = reader
        self.cfg = cfg = reader.config
        self.ledger = ledger
        self.io_mode = io_mode
        self.host_experts = host_experts
        # The arrays one expert is stored as, in read order; part_bytes by `ExpertLeaf` name.
        self.leaves: tuple[ExpertLeaf, ...] = expert_leaves(cfg)
        self.part_bytes = {leaf.name: leaf.nbytes for leaf in self.leaves}
        self._np_dtypes = {leaf.name: cfg.np_dtype if leaf.dtype == cfg.dtype
                           else np.dtype(leaf.dtype) for leaf in self.leaves}
        self.verified = verified
        self._sums: dict[str, dict[str, Any]] = {}
        if verified is not None:
            self._sums = reader.manifest.get("checksums", {}).get("files", {})
            if not self._sums and verified.note_once():
                log.info("%s has no checksums (converted before klotski-jax recorded them): "
                         "`klotski convert` again adds them", reader.path)
            self._verify_dense()
        # Dense arrays in page-aligned buffers: `jax.device_put` of an aligned buffer aliases it
        # on a CPU backend, where an unaligned one is copied (at well under 1 GB/s).
        dense = {k: aligned_copy(v) for k, v in reader.all_dense().items()}
        ledger.reserve("dense", sum(a.nbytes for a in dense.values()))
        # What a cached expert and the dense layers become: numpy by default; the engine passes a
        # move to the accelerator's pinned host memory (device transfers are DMA-fast from there)
        # or, on a CPU backend, device arrays aliasing these buffers (no copy at any load).
        self.to_host_memory: Callable[[Any], Any] = host_memory or (lambda parts: parts)
        self.globals = {k: v for k, v in dense.items() if not k.startswith("layers.")}
        self.layers = [self.to_host_memory(layer_state(dense, i)) for i in range(cfg.num_layers)]
        self._cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._making = 0  # bytes of cached experts being made, not yet in _cache
        self._free_staging: list[StagingBuffer] = []
        self._staging_ids = itertools.count()

    def cached_array_ids(self) -> set[int]:
        """ids of the jax arrays the tier holds (cached experts, dense layers): host memory,
        whatever their memory kind says (on a CPU backend they alias host buffers as "device"
        arrays)."""
        return self.host_arrays()[0]

    def host_arrays(self) -> tuple[set[int], int]:
        """(`cached_array_ids`, bytes of cached experts an I/O thread is making right now).
        One consistent view: an array the tier made before it is either among the ids or
        among the bytes still being made, never neither."""
        with self._lock:
            experts = [a for parts in self._cache.values() for a in parts.values()]
            making = self._making
        ids = {id(a) for a in [*experts, *(x for t in self.layers for x in _leaves(t))]
               if not isinstance(a, np.ndarray)}
        return ids, making

    def dense_layer_bytes(self, layer: int) -> int:
        return sum(a.nbytes for a in _leaves(self.layers[layer]))

    # ---- staging buffers (accounted in the host ledger) ---------------------------------------
    def take_staging(self) -> StagingBuffer:
        with self._lock:
            if self._free_staging:
                return self._free_staging.pop()
        buf = StagingBuffer(self.part_bytes)
        # A counter, not id(buf): ids of collected buffers are reused.
        self.ledger.reserve(("staging", next(self._staging_ids)), buf.nbytes)
        return buf

    def give_staging(self, buf: StagingBuffer) -> None:
        with self._lock:
            self._free_staging.append(buf)

    # ---- experts ----------------------------------------------------------------------------
    def cached(self, layer: int, e: int) -> dict[str, np.ndarray] | None:
        return self._cache.get((layer, e))

    def read_expert(self, layer: int, e: int, take_staging: Callable[[], StagingBuffer]
                    ) -> tuple[dict[str, np.ndarray], StagingBuffer | None, int, bool]:
        """(parts, staging buffer used, bytes read from disk, host-cache hit) for one expert.

        Host-cacheable experts are read once from disk into their own host arrays (accounted in
        the host ledger) and served from RAM afterwards; the others are read into a staging
        buffer from `take_staging` every time, which the caller gives back when done with it.
        """
        key = ("expert", layer, e)
        with self._lock:
            hit = self._cache.get((layer, e))
            if hit is not None:
                return hit, None, 0, True
            # Reserve before allocating, and under the lock: of two threads reading the same
            # expert only one caches it (a second reservation of its key would raise).
            cache_it = ((self.host_experts is None or (layer, e) in self.host_experts)
                        and not self.ledger.holds(key)
                        and self.ledger.try_reserve(key, staged_expert_bytes(self.cfg)))
            disk = sum(self.part_bytes.values())
            self._making += disk if cache_it else 0
        if cache_it:
            try:
                parts = self.to_host_memory(
                    self._read_into(layer, e, StagingBuffer(self.part_bytes)))
            except BaseException:
                with self._lock:
                    self._making -= disk
                self.ledger.release(key)
                raise
            with self._lock:
                self._cache[(layer, e)] = parts
                self._making -= disk
            return parts, None, disk, False
        staging = take_staging()
        try:
            return self._read_into(layer, e, staging), staging, disk, False
        except BaseException:
            self.give_staging(staging)  # a failed read (e.g. a short chunk) keeps no buffer
            raise

    def _read_into(self, layer: int, e: int, staging: StagingBuffer) -> dict[str, Any]:
        """Expert e of `layer` read into `staging`: its `modules.Expert` state (`views`),
        checked against the manifest's checksums on its first read (`verified`)."""
        for leaf in self.leaves:
            part = leaf.name
            region = staging.region(part)
            path = self.reader.expert_chunk_path(layer, part, e)
            try:
                if self.io_mode == "tensorstore":
                    arr = self.reader.expert(layer, part, e)
                    np.frombuffer(region, np.uint8)[:] = arr.reshape(-1).view(np.uint8)
                else:
                    read_file(path, region, staging.region(part, padded=True),
                              self.io_mode == "direct")
            except ShortRead as err:
                raise self._damaged(layer, e, part, path,
                                    f"truncated: {err.got} of {err.want} bytes") from err
            except FileNotFoundError as err:
                raise self._damaged(layer, e, part, path, "missing") from err
            except OSError as err:  # unreadable: name what is damaged
                raise self._damaged(layer, e, part, path, err.strerror or str(err)) from err
        if self._sums and not self.verified.has((layer, e)):
            self._check_expert(layer, e, staging)
        return self.views(staging)

    def _check_expert(self, layer: int, e: int, staging: StagingBuffer) -> None:
        root = self.reader.path
        for leaf in self.leaves:
            path = self.reader.expert_chunk_path(layer, leaf.name, e)
            want = self._sums.get(path.relative_to(root).as_posix())
            if want is None:
                raise self._damaged(layer, e, leaf.name, path,
                                    "not in the manifest's checksums")
            if want["size"] != leaf.nbytes:
                raise self._damaged(layer, e, leaf.name, path,
                                    f"the manifest records {want['size']} bytes for its "
                                    f"{leaf.nbytes}")
            if checksums.digest(staging.region(leaf.name)) != want[checksums.ALGORITHM]:
                raise self._damaged(layer, e, leaf.name, path, "checksum mismatch")
        self.verified.add((layer, e))

    def _damaged(self, layer: int, e: int, part: str, path: pathlib.Path,
                 why: str) -> CorruptFileError:
        return CorruptFileError(
            f"{self.reader.path}: layer {layer} expert {e} ({part}): {why} ({path}); "
            f"re-convert it with `klotski convert HF_DIR OUT_DIR --overwrite` (`klotski verify "
            f"CKPT` lists every damaged file)")

    def _verify_dense(self) -> None:
        """The dense files (orbax arrays and metadata) against their checksums, once per
        `verified` (they are read whole at start-up anyway: a small extra read)."""
        if not self._sums or self.verified.has("dense"):
            return
        root = self.reader.path
        tensors = self.reader.manifest["tensors"]
        for rel, want in self._sums.items():
            if not rel.startswith("dense/"):
                continue
            why = checksums.file_problem(root / rel, want)
            if why:
                raise CorruptFileError(
                    f"{root}: {checksums.describe(rel, tensors)}: {why}; re-convert it with "
                    f"`klotski convert HF_DIR OUT_DIR --overwrite`")
        self.verified.add("dense")

    def views(self, staging: StagingBuffer) -> dict[str, Any]:
        """The `modules.Expert` state {gate, up, down} (pure form; quantized: {gate: {q, scale,
        zero}, ...}) of arrays viewing the expert in `staging`."""
        return nest({leaf.name: np.frombuffer(staging.region(leaf.name),
                                              self._np_dtypes[leaf.name]).reshape(leaf.shape)
                     for leaf in self.leaves})

    def evict_page_cache(self) -> int:
        """Drop the store's expert files from the OS page cache (a true disk tier for benchmarks).

        Returns the number of files advised. No-op where posix_fadvise does not exist.
        """
        return evict_files(self.reader.expert_chunk_path(layer, leaf.name, e)
                           for layer in self.cfg.moe_layer_ids for leaf in self.leaves
                           for e in range(self.cfg.num_experts))


class Verified:
    """What passed its checksum check (expert keys, "dense"), shared by the host tiers of one
    engine so that repeated calls check each file once. Thread-safe (the I/O threads add)."""

    def __init__(self) -> None:
        self._done: set[Any] = set()
        self._lock = threading.Lock()
        self._noted = False

    def has(self, key: Any) -> bool:
        with self._lock:
            return key in self._done

    def add(self, key: Any) -> None:
        with self._lock:
            self._done.add(key)

    def note_once(self) -> bool:
        """True the first time only (one "no checksums" log line per engine)."""
        with self._lock:
            first, self._noted = not self._noted, True
            return first


def evict_files(paths: Iterable[os.PathLike[str]]) -> int:
    """Drop files from the OS page cache (after a sync, so dirty pages go too); returns how many
    were advised. No-op where posix_fadvise does not exist."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    os.sync()
    count = 0
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)
