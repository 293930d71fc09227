"""The dense part of a converted checkpoint: one orbax checkpoint at `OUT_DIR/dense`.

Every dense array (embeddings, norms, attention, routers, shared experts, dense MLPs) is a leaf of
one pytree whose paths are the flat names of models/specs.py split on "." (layer indices are
string keys): `layers.3.attn.q` is `tree["layers"]["3"]["attn"]["q"]`. So a user restores it
with `orbax.checkpoint.StandardCheckpointer().restore(OUT_DIR / "dense")` (plainly, or into a
target of `jax.ShapeDtypeStruct`s with shardings); docs/format.md shows both.

Saved with OCDBT off, zarr3 on and compression off, orbax puts each leaf in its own TensorStore
array `dense/<flat name>/` (orbax names a leaf by its path joined with "."). That is what lets
the runtime keep reading ONE array (one layer) on demand through TensorStore without restoring
the checkpoint: `CheckpointReader.dense` opens `dense/<flat name>` as a zarr3 array.

Memory: `StandardCheckpointer.save` takes a whole pytree of arrays in one call, which would hold
every dense weight in anonymous memory at once. Instead the leaves are `LazyArray`s (shape,
dtype and a function that reads the tensor from the HF safetensors), saved through orbax's own
PyTreeCheckpointHandler with a type handler that is orbax's NumpyHandler except that it
materialises one leaf, writes it (NumpyHandler's own write path and TensorStore spec), drops it
and only then reads the next. The handler reports the type "np.ndarray", so the checkpoint's
metadata is exactly what saving numpy arrays writes, and orbax's default registry restores it.

orbax asks JAX for the process index while saving, so converting initialises JAX's backends
(an accelerator's too, unless JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers

from klotski_jax.checkpoints.manifest import DENSE_OPTIONS
from klotski_jax.models.specs import nest


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """A dense leaf not yet read: `read()` returns the np.ndarray of this shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _OneLeafAtATimeHandler(type_handlers.NumpyHandler):
    """orbax's NumpyHandler for `LazyArray` leaves, writing them strictly one after another.

    NumpyHandler.serialize deep-copies every value and writes them all concurrently; here each
    leaf is read only when its turn comes and released once TensorStore has written it, so peak
    memory is one dense tensor. The write itself is NumpyHandler's (same spec, same files).
    TensorStore's per-file fsync is off (as for the expert store): the converter fsyncs the
    whole output once before its atomic rename.
    """

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)
        self._context = ts.Context({"file_io_sync": False})

    async def serialize(self, values: Sequence[LazyArray], infos: Sequence[Any],
                        args: Sequence[Any] | None = None) -> list[Any]:
        args = list(args or [ocp.SaveArgs()] * len(values))
        if not len(values) == len(infos) == len(args):
            raise ValueError(f"{len(values)} values, {len(infos)} infos, {len(args)} args")

        async def write_in_turn() -> None:
            for lazy, info, arg in zip(values, infos, args, strict=True):
                value = lazy.read()
                if value.shape != lazy.shape or value.dtype != lazy.dtype:
                    raise ValueError(f"dense array {info.name!r}: read {value.dtype}"
                                     f"{value.shape}, expected {lazy.dtype}{lazy.shape}")
                info = copy.copy(info)  # a plain class: same fields, our context
                info.ts_context = self._context
                await self._background_serialize([value], [info], [arg])
                del value

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_in_turn(),
                                                                  name="klotski_dense")]


def save_dense(path: Any, leaves: Mapping[str, LazyArray]) -> None:
    """Write `leaves` (flat name -> LazyArray) as one orbax checkpoint at `path` (must not exist).

    Synchronous; orbax writes into `<path>.orbax-checkpoint-tmp*` and renames it on success.
    """
    registry = type_handlers.create_type_handler_registry((LazyArray, _OneLeafAtATimeHandler()))
    with _quiet_orbax():
        handler = ocp.PyTreeCheckpointHandler(
            use_ocdbt=DENSE_OPTIONS["ocdbt"], use_zarr3=DENSE_OPTIONS["zarr3"],
            use_compression=DENSE_OPTIONS["compression"], type_handler_registry=registry)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path, args=ocp.args.PyTreeSave(nest(leaves)))


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """orbax logs warnings that do not apply here (no jax.Array handler in our registry, "no
    per-process OCDBT subdirs" with OCDBT off) through absl: keep them off the converter's
    output. Errors still show, and exceptions propagate as usual."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        absl.setLevel(level)


def orbax_version() -> str:
    return ocp.__version__
