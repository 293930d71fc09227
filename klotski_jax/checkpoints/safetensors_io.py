"""A streaming safetensors reader: validated headers, one tensor (or slice) per read.

Why our own reader instead of `safetensors.safe_open`: safe_open mmaps the whole file, so every
page it touches counts towards the converter's RSS, and it cannot read one expert of a fused
`[E, 2I, D]` tensor without materialising the tensor. Here a read is one `os.preadv` of exactly the
bytes needed into a fresh numpy array; the page cache holds the file, not our process.

A safetensors file is `u64 little-endian header length N`, `N bytes of JSON header`, then a data
buffer; the header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
relative to the data buffer (plus an optional string-to-string `__metadata__`). `parse_header`
checks everything that can be checked without reading data: a sane header length, valid JSON, no
repeated names, known dtypes, offsets that tile the data buffer exactly and agree with
shape * itemsize, and a file size equal to 8 + N + data end. Any violation is a
`CorruptFileError` naming the file (and the tensor).

`open_checkpoint(hf_dir)` handles `model.safetensors` or a sharded
`model.safetensors.index.json`, building one name -> file map across shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import struct
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from klotski_jax.checkpoints.errors import (
    CorruptFileError,
    DuplicateTensorError,
    MissingFileError,
    MissingShardError,
)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit

# safetensors dtype -> (itemsize, numpy dtype or None when numpy has no equivalent we read)
DTYPES: dict[str, tuple[int, np.dtype | None]] = {
    "F64": (8, np.dtype("<f8")), "F32": (4, np.dtype("<f4")), "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype(ml_dtypes.bfloat16)), "F8_E4M3": (1, np.dtype(ml_dtypes.float8_e4m3fn)),
    "F8_E5M2": (1, None),
    "I64": (8, np.dtype("<i8")), "I32": (4, np.dtype("<i4")), "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")), "U64": (8, np.dtype("<u8")), "U32": (4, np.dtype("<u4")),
    "U16": (2, np.dtype("<u2")), "U8": (1, np.dtype("u1")), "BOOL": (1, np.dtype("?")),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPE = "F8_E4M3"  # block-scaled FP8 weights (with a `weight_scale_inv` companion)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file. `begin`/`end` are absolute byte offsets in the file."""

    key: str
    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numpy_dtype(self) -> np.dtype | None:
        return DTYPES[self.dtype][1]


def _no_repeats(path: pathlib.Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise DuplicateTensorError(f"{path}: tensor {k!r} appears twice in the header")
            seen[k] = v
        return seen
    return hook


def _tensor_info(path: pathlib.Path, key: str, entry: Any, data_start: int) -> TensorInfo:
    """Validate one header entry (its own fields only) and make it absolute."""
    bad = f"{path}: tensor {key!r} has an invalid header entry"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFileError(f"{bad}: {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CorruptFileError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CorruptFileError(f"{bad}: shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CorruptFileError(f"{bad}: data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != expected:
        raise CorruptFileError(
            f"{path}: tensor {key!r} has {offsets[1] - offsets[0]} data bytes but shape "
            f"{tuple(shape)} of {dtype} needs {expected}")
    return TensorInfo(key, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(path: pathlib.Path, infos: list[TensorInfo], data_start: int,
                  file_size: int) -> None:
    """Tensors must tile the data buffer exactly, and the file must end where the data ends."""
    pos = data_start
    for info in sorted(infos, key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else "leaves a gap before it"
            raise CorruptFileError(f"{path}: tensor {info.key!r} at byte {info.begin} {what}")
        pos = info.end
    if file_size != pos:
        raise CorruptFileError(
            f"{path}: file is {file_size} bytes but its header describes {pos} "
            f"({'truncated' if file_size < pos else 'trailing bytes'})")


def parse_header(path: pathlib.Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of one .safetensors file: (tensors by name, metadata)."""
    path = pathlib.Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: {file_size} bytes is too short for a "
                                       "safetensors file (no 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise CorruptFileError(f"{path}: implausible header length {n} for a file of "
                                       f"{file_size} bytes (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptFileError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors = {k: _tensor_info(path, k, v, data_start) for k, v in header.items()}
    _check_layout(path, list(tensors.values()), data_start, file_size)
    return tensors, metadata


def slice_range(info: TensorInfo, lead: tuple[int, ...], rows: tuple[int, int] | None
                 ) -> tuple[int, int, tuple[int, ...]]:
    """Byte range and shape of `t[lead...][rows[0]:rows[1]]`: always one contiguous block."""
    shape = info.shape
    if len(lead) + (rows is not None) > len(shape):
        raise IndexError(f"{info.key!r} of shape {shape}: too many indices")
    offset = 0
    for axis, i in enumerate(lead):
        if not 0 <= i < shape[axis]:
            raise IndexError(f"{info.key!r} of shape {shape}: index {i} out of range "
                             f"on axis {axis}")
        offset = offset * shape[axis] + i
    rest = shape[len(lead):]
    stride = math.prod(rest) * info.itemsize  # bytes per step of the last fixed index
    begin = info.begin + offset * stride
    if rows is None:
        return begin, begin + stride, rest
    r0, r1 = rows
    if not 0 <= r0 <= r1 <= rest[0]:
        raise IndexError(f"{info.key!r} of shape {shape}: rows {rows} out of range")
    row_bytes = math.prod(rest[1:]) * info.itemsize
    return begin + r0 * row_bytes, begin + r1 * row_bytes, (r1 - r0, *rest[1:])


class SafetensorsFile:
    """One validated .safetensors file; reads tensors (or contiguous slices) with preadv."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.tensors, self.metadata = parse_header(self.path)
        self._fd: int | None = None

    def read(self, key: str, *, lead: tuple[int, ...] = (),
             rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `key`, or its sub-block `t[lead...][r0:r1]` (e.g. one expert of a fused
        [E, 2I, D] tensor: lead=(e,), rows=(0, I)), read without touching the other bytes."""
        info = self.tensors[key]
        dtype = info.numpy_dtype
        if dtype is None:
            raise CorruptFileError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, "
                                   "which cannot be read into numpy")
        begin, end, shape = slice_range(info, lead, rows)
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        assert len(buf) == end - begin
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], begin + done)
            if n == 0:
                raise CorruptFileError(f"{self.path}: file ended while reading tensor {key!r} "
                                       f"(truncated after it was opened?)")
            done += n
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_index(index_path: pathlib.Path) -> dict[str, str]:
    """weight_map of a model.safetensors.index.json: tensor name -> shard file name."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{index_path}: cannot parse the shard index: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptFileError(f"{index_path}: no 'weight_map' of tensor name -> shard file")
    for key, shard in weight_map.items():
        if pathlib.PurePath(shard).name != shard or shard in (".", ".."):
            raise CorruptFileError(f"{index_path}: tensor {key!r} points to {shard!r}, which is "
                                   "not a file name in the model directory")
    return weight_map


class SafetensorsCheckpoint:
    """All safetensors files of one HF model directory, with a tensor name -> file map."""

    def __init__(self, files: list[SafetensorsFile], index_path: pathlib.Path | None = None
                 ) -> None:
        self.files = files
        self.index_path = index_path
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.tensors:
                other = self._where.setdefault(key, f)
                if other is not f:
                    raise DuplicateTensorError(
                        f"tensor {key!r} is stored twice: in {other.path} and in {f.path}")

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].tensors[key]

    def file_of(self, key: str) -> pathlib.Path:
        return self._where[key].path

    def read(self, key: str, *, lead: tuple[int, ...] = (),
             rows: tuple[int, int] | None = None) -> np.ndarray:
        return self._where[key].read(key, lead=lead, rows=rows)

    @property
    def where(self) -> pathlib.Path:
        """The file that names this checkpoint's tensors: the index, or the single file."""
        return self.index_path or self.files[0].path

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_index_matches(index_path: pathlib.Path, weight_map: dict[str, str],
                         files: dict[str, SafetensorsFile]) -> None:
    for key, shard in weight_map.items():
        if key not in files[shard].tensors:
            raise CorruptFileError(f"{index_path}: lists tensor {key!r} in shard {shard}, but "
                                   f"{files[shard].path} does not contain it")
    for shard, f in files.items():
        extra = [k for k in f.tensors if weight_map.get(k) != shard]
        if extra:
            log.warning("%s holds %d tensors the index does not list there (e.g. %r)", f.path,
                        len(extra), extra[0])


def open_checkpoint(hf_dir: str | os.PathLike[str]) -> SafetensorsCheckpoint:
    """Open and validate every safetensors file of `hf_dir` (single file or sharded index)."""
    hf_dir = pathlib.Path(hf_dir)
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (hf_dir / shard).is_file():
                raise MissingShardError(f"shard {hf_dir / shard} is listed in {index_path} "
                                        "but does not exist")
        files = {s: SafetensorsFile(hf_dir / s) for s in shards}
        _check_index_matches(index_path, weight_map, files)
        return SafetensorsCheckpoint(list(files.values()), index_path)
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return SafetensorsCheckpoint([SafetensorsFile(single)])
    others = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    hint = f" (found {others}, but without {INDEX_FILE})" if others else ""
    raise MissingFileError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
