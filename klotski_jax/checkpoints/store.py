"""The TensorStore zarr3 store of a converted checkpoint: writing it, and `CheckpointReader`.

Expert arrays: one zarr3 array per (layer, part) shaped [E, out, in] in HF orientation, chunk
[1, out, in], codecs = only `bytes` (little endian), default chunk keys. So the chunk file
`experts/<name>/c/{e}/0/0` is exactly the raw bytes of expert e's [out, in] matrix: the pipeline
can read one expert with a single contiguous (even O_DIRECT) read, without TensorStore.
Quantized experts store each part as two or three such arrays (`<part>.q`, `.scale`, `.zero`;
`specs.expert_leaves`), so an expert is six or nine contiguous reads, all of the same kind.
Compression, sharding, zarr v2 and n5 were measured on this project's CI machine and were no faster
to read than raw chunks (an expert read is bound by the disk or the page-cache copy, not the codec).

Dense arrays (format_version 2) are one orbax checkpoint at `dense/`, written by dense_orbax.py
with OCDBT off, so each is its own zarr3 array `dense/<flat name>/` (one chunk, orbax's
`sharding_indexed` codec around the raw bytes). The reader opens it exactly like an expert array:
one array (one layer) at a time, never restoring the checkpoint. Format 1 wrote the same paths
with `create_spec(..., Kind.DENSE)` (one plain chunk); TensorStore opens both alike.

Two settings matter for safety: `store_data_equal_to_fill_value` (an all-zero expert still gets
its chunk file, so the raw-file path never finds a hole) and, on read,
`fill_missing_data_reads: false` (a missing chunk is an error, never silent zeros).

Specs are plain JSON dicts built by the small functions below (tests can pass a `memory`
kvstore). Writes run with `file_io_sync: false` (TensorStore's default fsync per chunk makes
conversion ~4x slower); the converter instead calls `fsync_tree` once before its atomic rename.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
from typing import Any

import numpy as np
import tensorstore as ts

from klotski_jax.checkpoints.errors import CorruptFileError
from klotski_jax.checkpoints.manifest import TOKENIZER_DIR, has_tokenizer, read_manifest
from klotski_jax.config import ModelConfig
from klotski_jax.models.specs import Kind, expert_leaves, expert_name, weight_specs

# ---- specs: plain JSON ------------------------------------------------------------------------

def file_kvstore(path: str | os.PathLike[str]) -> dict[str, Any]:
    # TensorStore rejects paths with ".." components: normalise.
    return {"driver": "file", "path": os.path.abspath(path)}


def chunk_shape(shape: tuple[int, ...] | list[int], kind: Kind) -> list[int]:
    """One chunk per expert for expert arrays; one chunk for the whole dense array (format 1)."""
    return [1, *shape[1:]] if kind is Kind.EXPERT else list(shape)


def create_spec(kvstore: dict[str, Any], shape: tuple[int, ...] | list[int], dtype: str,
                kind: Kind) -> dict[str, Any]:
    """Spec that creates a zarr3 array with only the little-endian `bytes` codec."""
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": chunk_shape(shape, kind)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "fill_value": 0,
        },
    }


def open_spec(kvstore: dict[str, Any]) -> dict[str, Any]:
    """Spec that opens an existing array; a missing chunk raises instead of reading zeros."""
    return {"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False}


def write_context_spec() -> dict[str, Any]:
    return {"file_io_sync": False}


def read_context_spec() -> dict[str, Any]:
    return {}


def chunk_relpath(e: int, ndim: int = 3) -> str:
    """Chunk key of expert e inside its array (default zarr3 chunk key encoding)."""
    return "/".join(["c", str(e), *["0"] * (ndim - 1)])


# ---- writing ----------------------------------------------------------------------------------

class StoreWriter:
    """Creates arrays under `root` and writes into them with a bounded number of bytes in flight.

    TensorStore writes are asynchronous: the last write runs while the next tensor is read. More
    writes in flight cost about twice their bytes in RSS (TensorStore copies the source) and were
    no faster on the 2-vCPU machines (28 MB peak growth at 0 extra bytes, 116 MB at 64 MiB, same
    speed), so by default a new write first waits for the previous one.
    """

    def __init__(self, root: pathlib.Path, max_inflight_bytes: int = 0) -> None:
        self.root = pathlib.Path(root)
        self.context = ts.Context(write_context_spec())
        self.max_inflight_bytes = max_inflight_bytes
        self._pending: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
        self._pending_bytes = 0

    def create(self, relpath: str, shape: tuple[int, ...], dtype: str,
               kind: Kind) -> ts.TensorStore:
        spec = create_spec(file_kvstore(self.root / relpath), shape, dtype, kind)
        return ts.open(spec, create=True, context=self.context).result()

    def write(self, array: ts.TensorStore, value: np.ndarray) -> None:
        """Start writing `value` into `array` (a whole array or an indexed view of one)."""
        while self._pending and self._pending_bytes + value.nbytes > self.max_inflight_bytes:
            self._wait_one()
        self._pending.append((array.write(value), value))
        self._pending_bytes += value.nbytes

    def _wait_one(self) -> None:
        future, value = self._pending.popleft()
        self._pending_bytes -= value.nbytes
        future.result()

    def flush(self) -> None:
        """Wait for every write started so far (raises the first write error)."""
        while self._pending:
            self._wait_one()

    def abandon(self) -> None:
        """Wait for writes in flight, ignoring their errors, so the caller can delete `root`."""
        while self._pending:
            with contextlib.suppress(Exception):  # the caller is handling the error that got us here
                self._wait_one()


def fsync_tree(root: pathlib.Path) -> None:
    """fsync every file, then every directory (deepest first), under `root`."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(dirpath)
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(pathlib.Path(d))


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------------

class CheckpointReader:
    """Read access to a converted checkpoint: manifest, config, dense and expert arrays.

    Arrays are opened lazily and cached; all share one TensorStore context. Errors from the store
    (a missing or short chunk file) are raised as `CorruptFileError` naming the array.
    """

    def __init__(self, ckpt_dir: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(os.path.abspath(ckpt_dir))
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.config: ModelConfig = ModelConfig.from_dict(self.manifest["config"])
        self._tensors: dict[str, dict[str, Any]] = self.manifest["tensors"]
        self._context = ts.Context(read_context_spec())
        self._arrays: dict[str, ts.TensorStore] = {}

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {self.config.family.value})"

    def _entry(self, name: str, kind: Kind) -> dict[str, Any]:
        entry = self._tensors.get(name)
        if entry is None or entry["kind"] != kind.value:
            raise KeyError(f"{self.path}: no {kind.value} tensor {name!r}")
        return entry

    def _array(self, name: str) -> ts.TensorStore:
        arr = self._arrays.get(name)
        if arr is None:
            path = self.path / self._tensors[name]["path"]
            try:
                arr = ts.open(open_spec(file_kvstore(path)), open=True,
                              context=self._context).result()
            except ValueError as e:
                raise CorruptFileError(f"{path}: cannot open array {name!r}: {e}") from None
            entry = self._tensors[name]
            if list(arr.shape) != entry["shape"] or arr.dtype.name != entry["dtype"]:
                raise CorruptFileError(f"{path}: array {name!r} is {arr.dtype.name}"
                                       f"{list(arr.shape)}, manifest says "
                                       f"{entry['dtype']}{entry['shape']}")
            self._arrays[name] = arr
        return arr

    def _read(self, name: str, index: Any = ()) -> np.ndarray:
        try:
            return np.asarray(self._array(name)[index].read().result())
        except ValueError as e:
            raise CorruptFileError(f"{self.path / self._tensors[name]['path']}: "
                                   f"cannot read {name!r}: {e}") from None

    def dense(self, name: str) -> np.ndarray:
        """One dense array (e.g. "embed", "layers.0.attn.q")."""
        self._entry(name, Kind.DENSE)
        return self._read(name)

    def all_dense(self) -> dict[str, np.ndarray]:
        return {n: self._read(n) for n, e in self._tensors.items() if e["kind"] == "dense"}

    def expert(self, layer: int, part: str, e: int) -> np.ndarray:
        """Expert e's [out, in] matrix of `part` ("gate", "up" or "down") in layer `layer`; in a
        quantized store `part` names a stored array ("gate.q", "gate.scale", ...)."""
        name = expert_name(layer, part)
        entry = self._entry(name, Kind.EXPERT)
        if not 0 <= e < entry["shape"][0]:
            raise IndexError(f"expert {e} out of range for {name!r} of shape {entry['shape']}")
        return self._read(name, e)

    def experts(self, layer: int) -> dict[str, np.ndarray]:
        """All experts of a MoE layer: stored array (`ExpertLeaf` name) -> [E, ...]."""
        return {leaf.name: self._read(self._entry_name(layer, leaf.name))
                for leaf in expert_leaves(self.config)}

    def _entry_name(self, layer: int, part: str) -> str:
        name = expert_name(layer, part)
        self._entry(name, Kind.EXPERT)
        return name

    def expert_chunk_path(self, layer: int, part: str, e: int) -> pathlib.Path:
        """The chunk file holding exactly the raw little-endian bytes of `expert(layer, part, e)`."""
        entry = self._entry(expert_name(layer, part), Kind.EXPERT)
        if not 0 <= e < entry["shape"][0]:
            raise IndexError(f"expert {e} out of range for shape {entry['shape']}")
        return self.path / entry["path"] / chunk_relpath(e, len(entry["shape"]))

    @property
    def tokenizer_dir(self) -> pathlib.Path | None:
        """Directory with the HF tokenizer files copied at conversion, or None if there were none."""
        if not has_tokenizer(self.manifest.get("tokenizer_files", [])):
            return None
        return self.path / TOKENIZER_DIR

    def read_all(self) -> dict[str, np.ndarray]:
        """Every array of weight_specs(config) by flat name; expert arrays whole [E, out, in]."""
        return {s.name: self._read(s.name) for s in weight_specs(self.config)}
