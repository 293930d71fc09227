"""HF safetensors checkpoint -> klotski-jax checkpoint (manifest, orbax dense part, expert store).

The conversion is a declarative key map (`families.hf_sources`) checked in full before a byte is
written, then a stream of single-tensor copies:

1. config.json -> ModelConfig (unsupported families and features are rejected here).
2. Every safetensors header is parsed and validated (`safetensors_io`), and a plan is built: for
   each array of `weight_specs(cfg)`, the HF key(s) and byte slices it comes from. Expert arrays
   accept, per layer and part, per-expert tensors (`experts.{e}.w1`, tried in order of the
   family's alternatives) or the fused transformers-5 tensors (`gate_up_proj` [E, 2I, D]: first
   half gate, second half up; `down_proj` [E, D, I]). Missing, mis-shaped, non-float and unmapped
   tensors are reported here, each naming the key and its file.
3. Arrays are written one tensor (one expert slice) at a time into `.{out}.tmp-*` next to the
   output, so memory stays near the size of the largest single tensor: experts into the
   TensorStore zarr3 store (`store.py`; quantized one expert slice at a time with
   `--quantize int8|int4`, models/quant.py), then the dense arrays as one orbax checkpoint at
   `dense/` (`dense_orbax.py`: lazy leaves, each read from the safetensors only when orbax writes
   it). Then everything is fsynced, the manifest is written last, and the directory is renamed
   into place. Any failure removes the temporary directory, so nothing that looks like a
   checkpoint is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
import uuid
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from klotski_jax.checkpoints import checksums, dense_orbax
from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints.errors import (
    ConversionError,
    CorruptFileError,
    MissingFileError,
    MissingTensorError,
    OutputExistsError,
    ShapeMismatchError,
    UnmappedTensorError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)
from klotski_jax.checkpoints.safetensors_io import (
    FLOAT_DTYPES,
    SafetensorsCheckpoint,
    open_checkpoint,
    slice_range,
)
from klotski_jax.checkpoints.store import StoreWriter, chunk_relpath, fsync_dir, fsync_tree
from klotski_jax.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, Quant
from klotski_jax.models import quant as qz
from klotski_jax.models.families import ExpertSource, TensorSource, hf_sources, mtp_layer
from klotski_jax.models.specs import (
    ArraySpec,
    Kind,
    expert_leaves,
    expert_name,
    expert_part_shape,
    weight_specs,
)

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = tuple(q.value for q in Quant)
DEFAULT_INT4_GROUP = 64
# Derived buffers some older checkpoints carry; recomputed from the config, so safe to skip.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Read:
    """One contiguous read: `key[lead...][rows[0]:rows[1]]` (whole tensor by default)."""

    key: str
    lead: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Planned:
    """An output array and its reads: one for a dense array, one per expert for an expert one."""

    spec: ArraySpec
    reads: tuple[Read, ...]


# ---- config -----------------------------------------------------------------------------------

def load_hf_config(hf_dir: pathlib.Path) -> tuple[dict[str, Any], ModelConfig]:
    """Parse hf_dir/config.json and map it to a ModelConfig; errors name config.json."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (is {hf_dir} an HF model directory?)")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: cannot parse: {e}") from None
    if not isinstance(hf, dict):
        raise CorruptFileError(f"{path}: not a JSON object")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"{path}: unsupported model_type {model_type!r}; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        cfg = ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    except KeyError as e:
        raise CorruptFileError(f"{path}: missing required field {e}") from None
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{path}: invalid value: {e}") from None
    return hf, cfg


def with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """The config to store: `dtype` overrides the HF config's dtype (None keeps it)."""
    if dtype is None:
        return cfg
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported output dtype {dtype!r}; choose one of {DTYPES}")
    return cfg.replace(dtype=dtype)


def with_quant(cfg: ModelConfig, quantize: str, group_size: int | None) -> ModelConfig:
    """The config to store with routed experts quantized as `quantize` ("none", "int8",
    "int4"); group_size None: 64 for int4, per output row for int8. Errors name the problem
    (an unknown scheme, a group size that does not divide an expert's input dimension)."""
    if quantize not in QUANTIZE:
        raise ConversionError(f"unsupported --quantize {quantize!r}; choose one of "
                              f"{', '.join(QUANTIZE)}")
    q = Quant(quantize)
    if q is Quant.NONE:
        if group_size is not None:
            raise ConversionError("--group-size needs --quantize int8 or int4")
        return cfg
    if group_size is None:
        group_size = DEFAULT_INT4_GROUP if q is Quant.INT4 else 0
    elif group_size <= 0:
        raise ConversionError(f"--group-size must be a positive number of inputs, got "
                              f"{group_size} (leave it out for int8's one scale per row)")
    try:
        return cfg.replace(expert_quant=q, expert_group_size=group_size)
    except ConfigError as e:
        raise ConversionError(f"cannot quantize the experts as {quantize}: {e}") from None


# ---- plan -------------------------------------------------------------------------------------

def _check_tensor(ckpt: SafetensorsCheckpoint, key: str, shape: tuple[int, ...],
                  name: str) -> None:
    info = ckpt.info(key)
    if info.shape != shape:
        raise ShapeMismatchError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {info.shape}, "
                                 f"but the config implies {shape} (for {name})")
    if info.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"{ckpt.file_of(key)}: tensor {key!r} has dtype {info.dtype}"
                                    f"; only {', '.join(FLOAT_DTYPES)} weights can be converted")


def _plan_dense(spec: ArraySpec, src: TensorSource, ckpt: SafetensorsCheckpoint) -> Planned:
    for key in src.keys:
        if key in ckpt:
            _check_tensor(ckpt, key, spec.shape, spec.name)
            return Planned(spec, (Read(key),))
    also = f" (or {', '.join(map(repr, src.alternatives))})" if src.alternatives else ""
    raise MissingTensorError(f"{ckpt.where}: missing tensor {src.key!r}{also}, needed for "
                             f"{spec.name}")


def _plan_expert(cfg: ModelConfig, spec: ArraySpec, src: ExpertSource,
                 ckpt: SafetensorsCheckpoint) -> Planned:
    n, part = cfg.num_experts, spec.name.rsplit(".", 1)[1]
    out_dim, in_dim = expert_part_shape(cfg, part)
    for template in src.per_expert:
        keys = [template.format(e=e) for e in range(n)]
        present = [k in ckpt for k in keys]
        if not any(present):
            continue
        if not all(present):
            raise MissingTensorError(
                f"{ckpt.where}: missing tensor {keys[present.index(False)]!r} (expert "
                f"{present.index(False)} of {n}; other experts of {spec.name} are present)")
        for k in keys:
            _check_tensor(ckpt, k, (out_dim, in_dim), spec.name)
        return Planned(spec, tuple(Read(k) for k in keys))
    for key in src.fused:
        if key not in ckpt:
            continue
        if src.fused_half is None:
            _check_tensor(ckpt, key, (n, out_dim, in_dim), spec.name)
            return Planned(spec, tuple(Read(key, lead=(e,)) for e in range(n)))
        _check_tensor(ckpt, key, (n, 2 * out_dim, in_dim), f"{spec.name}, fused with its pair")
        rows = (src.fused_half * out_dim, (src.fused_half + 1) * out_dim)
        return Planned(spec, tuple(Read(key, lead=(e,), rows=rows) for e in range(n)))
    raise MissingTensorError(f"{ckpt.where}: missing tensor {src.per_expert[0].format(e=0)!r} "
                             f"(or the fused {src.fused[0]!r}), needed for {spec.name}")


def _check_unmapped(cfg: ModelConfig, ckpt: SafetensorsCheckpoint, used: set[str]) -> None:
    unmapped: list[str] = []
    mtp: dict[int, int] = {}  # multi-token-prediction layer -> tensors skipped
    for key in ckpt:
        if key in used:
            continue
        if (layer := mtp_layer(cfg, key)) is not None:
            mtp[layer] = mtp.get(layer, 0) + 1
        elif key.endswith(IGNORED_SUFFIXES):
            log.debug("ignoring derived buffer %s", key)
        elif key == "lm_head.weight" and cfg.tie_word_embeddings:
            # HF sometimes writes the tied head; it must at least have the embedding's shape.
            _check_tensor(ckpt, key, (cfg.vocab_size, cfg.hidden_size), "lm_head (tied)")
            log.info("ignoring lm_head.weight: tie_word_embeddings uses the embedding")
        else:
            unmapped.append(key)
    if mtp:
        log.info("skipping %d tensors of the multi-token-prediction layer%s %s (used for "
                 "speculative decoding, which klotski-jax does not run)", sum(mtp.values()),
                 "s" if len(mtp) > 1 else "", ", ".join(map(str, sorted(mtp))))
    if unmapped:
        more = f" ({len(unmapped)} unmapped tensors in all: {unmapped[:5]})" if len(
            unmapped) > 1 else ""
        raise UnmappedTensorError(
            f"{ckpt.file_of(unmapped[0])}: tensor {unmapped[0]!r} is not used by any weight of "
            f"this {cfg.family.value} config{more}")


def plan_conversion(cfg: ModelConfig, ckpt: SafetensorsCheckpoint) -> list[Planned]:
    """Map every array of weight_specs(cfg) to its reads; checks shapes, dtypes, leftovers."""
    sources = hf_sources(cfg)
    plan = []
    for spec in weight_specs(cfg):
        src = sources[spec.name]
        if isinstance(src, TensorSource):
            plan.append(_plan_dense(spec, src, ckpt))
        else:
            plan.append(_plan_expert(cfg, spec, src, ckpt))
    _check_unmapped(cfg, ckpt, {r.key for p in plan for r in p.reads})
    return plan


def _read_nbytes(ckpt: SafetensorsCheckpoint, r: Read) -> int:
    begin, end, _ = slice_range(ckpt.info(r.key), r.lead, r.rows)
    return end - begin


# ---- output directory -------------------------------------------------------------------------

def _is_replaceable(out: pathlib.Path) -> bool:
    """An existing output may be replaced only if it is empty or a klotski-jax checkpoint."""
    if not out.is_dir() or out.is_symlink():
        return False
    if not any(out.iterdir()):
        return True
    try:
        m = json.loads((out / mf.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == mf.FORMAT_NAME


def _check_output(hf_dir: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    src, dst = hf_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise OutputExistsError(f"{out}: refusing to write over the HF source {hf_dir}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) "
                                    "to replace it")
        if not _is_replaceable(out):
            raise OutputExistsError(f"{out} exists and is not a klotski-jax checkpoint; refusing "
                                    "to replace it even with --overwrite (remove it yourself)")


def _install(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is removed only after the swap."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if not overwrite:  # appeared while we were converting
        raise OutputExistsError(f"{out} appeared during conversion; not replacing it")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _copy_tokenizer(hf_dir: pathlib.Path, tmp: pathlib.Path) -> list[str]:
    names = [n for n in mf.TOKENIZER_FILES if (hf_dir / n).is_file()]
    aux = [n for n in mf.AUX_FILES if (hf_dir / n).is_file()]
    if mf.has_tokenizer(names):
        names += aux  # config.json lets AutoTokenizer pick the tokenizer class
    else:
        names = [n for n in aux if n != "config.json"]
    if names:
        (tmp / mf.TOKENIZER_DIR).mkdir()
        for n in names:
            shutil.copyfile(hf_dir / n, tmp / mf.TOKENIZER_DIR / n)
    return names


# ---- writing ----------------------------------------------------------------------------------

def _write_experts(plan: list[Planned], ckpt: SafetensorsCheckpoint, root: pathlib.Path,
                   cfg: ModelConfig, bar: tqdm, refine: bool) -> dict[str, dict[str, Any]]:
    """Stream every expert array into the TensorStore store, one expert slice at a time
    (quantized on the way when cfg quantizes the experts). Returns the checksum entries of the
    chunk files written (relative path -> size and digest of the bytes written)."""
    known: dict[str, dict[str, Any]] = {}
    dtype = cfg.np_dtype
    leaves = {spec.name: spec for spec in weight_specs(cfg) if spec.kind is Kind.EXPERT}
    writer = StoreWriter(root)
    try:
        for p in plan:
            if p.spec.kind is not Kind.EXPERT:
                continue
            layer, part = p.spec.layer, p.spec.name.rsplit(".", 1)[1]
            arrays, paths = {}, {}
            for leaf in expert_leaves(cfg):
                if leaf.part == part:
                    spec = leaves[expert_name(layer, leaf.name)]
                    suffix = leaf.name.removeprefix(part).lstrip(".")
                    paths[suffix] = mf.tensor_path(spec)
                    arrays[suffix] = writer.create(paths[suffix], spec.shape, leaf.dtype,
                                                   spec.kind)
            for e, r in enumerate(p.reads):
                x = ckpt.read(r.key, lead=r.lead, rows=r.rows)
                nbytes = x.nbytes
                if cfg.quantized:
                    stored = qz.quantize(x, cfg.expert_quant, cfg.expert_group_size, refine)
                else:
                    stored = {"": x.astype(dtype, copy=False)}
                del x
                for suffix, value in stored.items():
                    value = np.ascontiguousarray(value)  # a chunk file is exactly these bytes
                    known[f"{paths[suffix]}/{chunk_relpath(e)}"] = checksums.entry(
                        value.nbytes, checksums.digest(value))
                    writer.write(arrays[suffix][e], value)
                del stored
                bar.update(nbytes)
        writer.flush()
    except BaseException:
        writer.abandon()
        raise
    return known


def _lazy_dense(p: Planned, ckpt: SafetensorsCheckpoint, cfg: ModelConfig,
                bar: tqdm) -> dense_orbax.LazyArray:
    (r,) = p.reads
    dtype = np.dtype(p.spec.stored_dtype(cfg))  # the config's; float32 for DeepSeek's router

    def read() -> np.ndarray:
        x = ckpt.read(r.key, lead=r.lead, rows=r.rows)
        bar.update(x.nbytes)
        return x.astype(dtype, copy=False)

    return dense_orbax.LazyArray(p.spec.shape, dtype, read)


def _write_dense(plan: list[Planned], ckpt: SafetensorsCheckpoint, root: pathlib.Path,
                 cfg: ModelConfig, bar: tqdm) -> None:
    """Save every dense array as one orbax checkpoint at root/dense, one tensor at a time."""
    leaves = {p.spec.name: _lazy_dense(p, ckpt, cfg, bar)
              for p in plan if p.spec.kind is Kind.DENSE}
    dense_orbax.save_dense(root / mf.DENSE_DIR, leaves)
    # The reader opens each array where orbax put it: check orbax's naming is what it expects.
    missing = [n for n in leaves if not (root / mf.dense_path(n) / "zarr.json").is_file()]
    if missing:
        raise ConversionError(f"orbax {dense_orbax.orbax_version()} did not write the dense "
                              f"arrays as dense/<flat name>/ zarr3 arrays (no {missing[:3]})")


def _convert_into(tmp: pathlib.Path, hf_dir: pathlib.Path, hf: dict[str, Any],
                  cfg: ModelConfig, ckpt: SafetensorsCheckpoint, plan: list[Planned],
                  progress: bool, refine: bool, original_dtype: str) -> None:
    total = sum(_read_nbytes(ckpt, r) for p in plan for r in p.reads)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
              disable=not progress) as bar:
        known = _write_experts(plan, ckpt, tmp, cfg, bar, refine)
        _write_dense(plan, ckpt, tmp, cfg, bar)
    tokenizer_files = _copy_tokenizer(hf_dir, tmp)
    sums = checksums.section(tmp, known)  # the other files are read back (dense: small)
    fsync_tree(tmp)
    quantization = mf.quantization_section(
        cfg, method="rtn+lsq" if refine else "rtn",
        original_dtype=original_dtype) if cfg.quantized else None
    manifest = mf.build_manifest(cfg, hf_config=hf, source=hf_dir,
                                 tokenizer_files=tokenizer_files,
                                 orbax_version=dense_orbax.orbax_version(),
                                 quantization=quantization, checksums=sums)
    mf.write_manifest(tmp, manifest)  # last: a directory with a manifest is complete
    fsync_dir(tmp)
    dt = time.perf_counter() - t0
    log.info("wrote %d arrays (%.1f MB read) in %.2f s (%.0f MB/s)", len(plan), total / 1e6, dt,
             total / max(dt, 1e-9) / 1e6)


def quantized_sibling(ckpt_dir: str | os.PathLike[str], quantize: str,
                      hf_dir: str | os.PathLike[str] | None = None,
                      progress: bool = False) -> pathlib.Path:
    """A store of the same model with `quantize`d experts (default group size, round-to-nearest)
    next to `ckpt_dir`, named `<ckpt_dir>-<quantize>`: reused when one from the same HF source
    is there, converted from the source (`hf_dir`, default: the manifest's `source`) otherwise.
    `klotski bench --quantized` runs klotski on it beside the checkpoint."""
    ckpt = pathlib.Path(os.path.abspath(ckpt_dir))
    m = mf.read_manifest(ckpt)
    source = pathlib.Path(hf_dir or m.get("source") or "")
    if not (source / "config.json").is_file():
        raise MissingFileError(f"{ckpt}: its HF source {str(source) or '(none recorded)'} is "
                               "not there to quantize from (pass the HF directory)")
    out = ckpt.parent / f"{ckpt.name}-{quantize}"
    try:
        have = mf.read_manifest(out)
        q = have["experts"].get("quantization") or {}
        if (have.get("source") == os.path.abspath(source) and q.get("scheme") == quantize
                and q.get("method") == "rtn" and have["dtype"] == m["dtype"]):
            return out
    except (ConversionError, KeyError):
        pass
    return convert(source, out, dtype=m["dtype"], quantize=quantize, overwrite=out.exists(),
                   progress=progress)


def convert(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
            dtype: str | None = None, overwrite: bool = False, progress: bool = True,
            quantize: str = "none", group_size: int | None = None,
            refine: bool = False) -> pathlib.Path:
    """Convert the HF MoE checkpoint in `hf_dir` into a klotski-jax checkpoint at `out_dir`.

    dtype: store every weight in this dtype ("float32", "bfloat16", "float16"); default: the
    config's dtype. The manifest's config records the stored dtype. quantize: "int8" or "int4"
    stores the routed experts quantized (dense weights, router and shared experts stay in
    `dtype`), in groups of `group_size` inputs (default 64 for int4, one group per output row
    for int8); refine: improve the round-to-nearest scales and zero points by least squares
    (models/quant.py; the manifest records which). It lowers the weights' squared error by
    11-14% at int4 but did not lower the default model's perplexity (README), so it is off by
    default. overwrite: replace an
    existing `out_dir` (only an empty directory or a klotski-jax checkpoint), after the new one
    is complete. Returns the absolute output path. Raises a `ConversionError` subclass naming the
    file and tensor for any bad input; nothing is left at `out_dir` (or next to it) on failure.
    """
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(os.path.abspath(out_dir))
    if not hf_dir.is_dir():
        raise MissingFileError(f"{hf_dir} is not a directory")
    hf, cfg = load_hf_config(hf_dir)
    original_dtype = cfg.dtype
    source_cfg = with_dtype(cfg, dtype)
    cfg = with_quant(source_cfg, quantize, group_size)
    _check_output(hf_dir, out, overwrite)
    with open_checkpoint(hf_dir) as ckpt:
        plan = plan_conversion(source_cfg, ckpt)
        log.info("converting %s (%s, %d layers, %d experts) -> %s as %s%s", hf_dir,
                 cfg.family.value, cfg.num_layers, cfg.num_experts, out, cfg.dtype,
                 f", experts {quantize} (group {cfg.expert_group_size or 'per row'})"
                 if cfg.quantized else "")
        out.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename.
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _convert_into(tmp, hf_dir, hf, cfg, ckpt, plan, progress, refine, original_dtype)
            _install(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
