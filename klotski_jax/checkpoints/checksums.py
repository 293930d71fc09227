"""Checksums of a converted checkpoint's files, and `verify`: is every file what was written?

The converter records, in the manifest's `checksums` section, the size and the XXH3-64 digest
(xxHash; about 10 GB/s on one core, so checking costs little next to reading) of every file of
the checkpoint but the manifest itself. Expert chunks are hashed from the bytes being written
(a chunk file is exactly its expert's raw bytes), everything else is read back once before the
manifest is written.

`verify(ckpt)` (`klotski verify CKPT`) re-reads the files and reports every missing, truncated,
resized or changed one, naming the expert (layer, expert, part) or tensor it holds. Checkpoints
converted before checksums were recorded have no section: `verify` says so (re-converting adds
them) and the runtime loads them as before.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Iterable
from typing import Any

import xxhash
from tqdm.auto import tqdm

ALGORITHM = "xxh3_64"
BLOCK = 16 << 20


def digest(data: Any) -> str:
    """The XXH3-64 hex digest of a bytes-like object (a contiguous NumPy array's bytes)."""
    return xxhash.xxh3_64_hexdigest(data)


def file_digest(path: os.PathLike[str] | str, progress: Any = None) -> tuple[int, str]:
    """(size, XXH3-64 hex digest) of a file, read in 16 MiB blocks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            h.update(block)
            size += len(block)
            if progress is not None:
                progress.update(len(block))
    return size, h.hexdigest()


def entry(size: int, hexdigest: str) -> dict[str, Any]:
    return {"size": size, ALGORITHM: hexdigest}


def section(root: pathlib.Path, known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `checksums` section for every file under `root` (a checkpoint being
    written, before its manifest): entries in `known` (relative path -> entry, hashed while
    writing) are taken as they are after checking the file's size; the others are read."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(_files(root)):
        rel = path.relative_to(root).as_posix()
        have = known.get(rel)
        if have is not None and path.stat().st_size == have["size"]:
            files[rel] = have
        else:
            files[rel] = entry(*file_digest(path))
    missing = sorted(set(known) - set(files))
    if missing:
        raise FileNotFoundError(f"{root}: written files are missing: {missing[:3]}")
    return {"algorithm": ALGORITHM, "files": files}


def _files(root: pathlib.Path) -> Iterable[pathlib.Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = pathlib.Path(dirpath) / name
            if path.parent == root and name == "manifest.json":
                continue
            yield path


def file_problem(path: pathlib.Path, want: dict[str, Any], progress: Any = None) -> str | None:
    """What is wrong with a file against its manifest entry: "missing", "truncated: N of M
    bytes", a size the manifest does not record, "unreadable: ...", "checksum mismatch"; None
    when it matches."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != want["size"]:
        return (f"truncated: {size} of {want['size']} bytes" if size < want["size"]
                else f"{size} bytes, the manifest says {want['size']}")
    try:
        _, got = file_digest(path, progress)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return None if got == want[ALGORITHM] else "checksum mismatch"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One file that is not what the manifest says."""

    path: str  # relative to the checkpoint
    what: str  # "layer 3 expert 5 (up)", "tensor 'layers.0.attn.q'", or the path
    why: str  # "missing", "truncated: 1000 of 49152 bytes", "checksum mismatch", ...

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


_EXPERT_CHUNK = re.compile(r"^experts/layers\.(\d+)\.moe\.experts\.([\w.]+)/c/(\d+)/")


def describe(rel: str, tensors: dict[str, dict[str, Any]]) -> str:
    """What a checkpoint file holds, for messages: an expert's chunk, a tensor, or its path."""
    m = _EXPERT_CHUNK.match(rel)
    if m:
        return f"layer {m.group(1)} expert {m.group(3)} ({m.group(2)})"
    for name, t in tensors.items():
        if rel.startswith(t["path"] + "/"):
            return f"tensor {name!r} ({rel})"
    return rel


def verify(ckpt: os.PathLike[str] | str, manifest: dict[str, Any], experts_only: bool = False,
           progress: bool = True) -> tuple[list[Problem], int, int]:
    """Check every file the manifest's `checksums` lists (only the expert store's with
    `experts_only`): (problems, files checked, bytes read). Raises KeyError when the manifest
    has no checksums (a checkpoint converted before they were recorded)."""
    root = pathlib.Path(ckpt)
    sums = manifest["checksums"]
    if sums.get("algorithm") != ALGORITHM:
        raise ValueError(f"checksum algorithm {sums.get('algorithm')!r}: this klotski-jax "
                         f"checks {ALGORITHM}")
    files = {rel: e for rel, e in sums["files"].items()
             if not experts_only or rel.startswith("experts/")}
    tensors = manifest["tensors"]
    problems: list[Problem] = []
    total = sum(e["size"] for e in files.values())
    read = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=not progress) as bar:
        for rel, want in files.items():
            why = file_problem(root / rel, want, bar)
            if why in (None, "checksum mismatch"):  # read whole
                read += want["size"]
            else:  # not read: the bar still moves past it
                bar.update(want["size"])
            if why is not None:
                problems.append(Problem(rel, describe(rel, tensors), why))
    if not experts_only:  # files the manifest does not know (a mixed-up directory)
        listed = set(files)
        for path in _files(root):
            rel = path.relative_to(root).as_posix()
            if rel not in listed and rel.split("/")[0] in ("experts", "dense"):
                problems.append(Problem(rel, describe(rel, tensors),
                                        "not in the manifest's checksums"))
    return problems, len(files), read
