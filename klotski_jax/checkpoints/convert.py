"""HF safetensors checkpoint -> klotski-jax checkpoint (manifest, orbax dense part, expert store).

The conversion is a declarative key map (`families.hf_sources`) checked in full before a byte is
written, then a stream of single-tensor copies:

1. config.json -> ModelConfig (unsupported families and features are rejected here).
2. Every safetensors header is parsed and validated (`safetensors_io`), and a plan is built: for
   each array of `weight_specs(cfg)`, the HF key(s) and byte slices it comes from. Expert arrays
   accept, per layer and part, per-expert tensors (`experts.{e}.w1`, tried in order of the
   family's alternatives) or the fused transformers-5 tensors (`gate_up_proj` [E, 2I, D]: first
   half gate, second half up; `down_proj` [E, D, I]). Missing, mis-shaped, non-float and unmapped
   tensors are reported here, each naming the key and its file. Block-scaled FP8 checkpoints
   (`quantization_config` with quant_method "fp8": `source_fp8`) are read too: a weight stored
   as F8_E4M3 comes with a float32 `weight_scale_inv` (transformers' name: `X.weight` ->
   `X.weight_scale_inv`, a fused `X` -> `X_scale_inv`), whose shape is checked against its block
   grid here.
3. Arrays are written one tensor (one expert slice) at a time into `.{out}.tmp-*` next to the
   output, so memory stays near the size of the largest single tensor: experts into the
   TensorStore zarr3 store (`store.py`; quantized one expert slice at a time with
   `--quantize int8|int4|fp8`, models/quant.py), then the dense arrays as one orbax checkpoint at
   `dense/` (`dense_orbax.py`: lazy leaves, each read from the safetensors only when orbax writes
   it). Then everything is fsynced, the manifest is written last, and the directory is renamed
   into place. Any failure removes the temporary directory, so nothing that looks like a
   checkpoint is left behind.

An FP8 weight is dequantized as it is read (its block scales applied in float32, then cast to
the output dtype), except the routed experts of `--quantize fp8`, whose fp8 bytes and scales
are copied as they are.
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
    UnsupportedQuantizationError,
)
from klotski_jax.checkpoints.safetensors_io import (
    FLOAT_DTYPES,
    FP8_DTYPE,
    SafetensorsCheckpoint,
    open_checkpoint,
    slice_range,
)
from klotski_jax.checkpoints.store import StoreWriter, chunk_relpath, fsync_dir, fsync_tree
from klotski_jax.config import FP8_DTYPE as FP8_NAME
from klotski_jax.config import ConfigError, ModelConfig, Quant, hf_family
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
DEFAULT_FP8_BLOCK = 128  # DeepSeek-V3's and most FP8 releases' weight_block_size
# Derived buffers some older checkpoints carry; recomputed from the config, so safe to skip.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Read:
    """One contiguous read: `key[lead...][rows[0]:rows[1]]` (whole tensor by default). `scale`:
    the `weight_scale_inv` tensor of an F8_E4M3 `key`, read with the same `lead` (its block grid
    covers all of `key[lead...]`, so `rows` of a fused half index into it from rows[0])."""

    key: str
    lead: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None
    scale: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceFP8:
    """A block-scaled FP8 source checkpoint (config.json's `quantization_config`): every F8_E4M3
    weight w [..., out, in] has a float32 `weight_scale_inv` [..., ceil(out / block[0]),
    ceil(in / block[1])], and its value is float32(w) * scale_inv over each block."""

    block: tuple[int, int]


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
    try:
        family = hf_family(hf)
    except ConfigError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    if family.value != hf.get("model_type"):
        log.info("%s: model_type %r runs as %s (its architectures: %s)", path,
                 hf.get("model_type"), family.value, hf.get("architectures"))
    try:
        cfg = ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    except KeyError as e:
        raise CorruptFileError(f"{path}: missing required field {e}") from None
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{path}: invalid value: {e}") from None
    return hf, cfg


def source_fp8(hf: dict[str, Any], path: pathlib.Path) -> SourceFP8 | None:
    """The FP8 blocks of an HF config's `quantization_config` (None without one). Anything but
    block-scaled e4m3 with float scales and dynamic activations is refused with an error naming
    config.json and the field: other methods (gptq, awq, bitsandbytes, ...) store weights this
    converter cannot dequantize, and static activation scales would be dropped."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    only = ("only fp8 block-scaled checkpoints are read (quant_method 'fp8', fmt 'e4m3', "
            "weight_block_size [B0, B1])")
    if not isinstance(qc, dict):
        raise UnsupportedQuantizationError(f"{path}: quantization_config is {qc!r}, not an "
                                           f"object; {only}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise UnsupportedQuantizationError(f"{path}: quantization_config.quant_method is "
                                           f"{method!r}; {only}")
    for field, allowed in (("fmt", ("e4m3",)), ("activation_scheme", ("dynamic",)),
                           ("scale_fmt", ("float",))):
        value = qc.get(field, allowed[0])
        if value not in allowed:
            raise UnsupportedQuantizationError(
                f"{path}: quantization_config.{field} is {value!r}; {only} (with "
                f"{field} {allowed[0]!r})")
    if "weight_block_size" not in qc:
        raise UnsupportedQuantizationError(f"{path}: quantization_config has no "
                                           f"weight_block_size; {only}")
    block = qc["weight_block_size"]
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(type(b) is int and b > 0 for b in block)):
        raise UnsupportedQuantizationError(f"{path}: quantization_config.weight_block_size is "
                                           f"{block!r}, not two positive integers [B0, B1]")
    return SourceFP8((block[0], block[1]))


def with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """The config to store: `dtype` overrides the HF config's dtype (None keeps it)."""
    if dtype is None:
        return cfg
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported output dtype {dtype!r}; choose one of {DTYPES}")
    return cfg.replace(dtype=dtype)


def with_quant(cfg: ModelConfig, quantize: str, group_size: int | None,
               fp8: SourceFP8 | None = None, where: pathlib.Path | None = None) -> ModelConfig:
    """The config to store with routed experts quantized as `quantize` ("none", "int8",
    "int4", "fp8"); group_size None: 64 for int4, per output row for int8, for fp8 the source's
    block (`fp8`, an FP8 checkpoint) or 128. Errors name the problem (an unknown scheme, a
    group size that does not divide an expert's input dimension, fp8 blocks of an FP8 source
    (read from `where`) that cannot be kept as they are)."""
    if quantize not in QUANTIZE:
        raise ConversionError(f"unsupported --quantize {quantize!r}; choose one of "
                              f"{', '.join(QUANTIZE)}")
    q = Quant(quantize)
    if q is Quant.NONE:
        if group_size is not None:
            raise ConversionError("--group-size needs --quantize int8, int4 or fp8")
        return cfg
    if q is Quant.FP8 and fp8 is not None:
        b0, b1 = fp8.block
        keep = ("--quantize fp8 keeps the source's fp8 experts as they are, in its blocks "
                f"(weight_block_size {list(fp8.block)} in {where or 'config.json'})")
        if b0 != b1:
            raise UnsupportedQuantizationError(
                f"{keep}, but klotski-jax stores square blocks only: convert without --quantize "
                "fp8 (the experts dequantized) or with --quantize int8 / int4")
        if group_size is not None and group_size != b0:
            raise UnsupportedQuantizationError(f"{keep}: --group-size {group_size} would "
                                               f"requantize them; leave it out or pass {b0}")
        group_size = b0
    if group_size is None:
        group_size = {Quant.INT4: DEFAULT_INT4_GROUP, Quant.FP8: DEFAULT_FP8_BLOCK}.get(q, 0)
    elif group_size <= 0:
        raise ConversionError(f"--group-size must be a positive number of inputs, got "
                              f"{group_size} (leave it out for int8's one scale per row)")
    try:
        return cfg.replace(expert_quant=q, expert_group_size=group_size)
    except ConfigError as e:
        raise ConversionError(f"cannot quantize the experts as {quantize}: {e}") from None


# ---- plan -------------------------------------------------------------------------------------

def scale_key(key: str) -> str:
    """The block-scale tensor of FP8 weight `key`, named as transformers names it:
    `X.weight` -> `X.weight_scale_inv`, a fused expert tensor `X` -> `X_scale_inv`."""
    return key + "_scale_inv"


def _check_tensor(ckpt: SafetensorsCheckpoint, key: str, shape: tuple[int, ...],
                  name: str, fp8: SourceFP8 | None = None) -> str | None:
    """Check a weight's shape and dtype; an F8_E4M3 weight of an FP8 source must have its
    scale tensor with the block grid's shape. Returns that scale tensor's key (None: float)."""
    info = ckpt.info(key)
    if info.shape != shape:
        raise ShapeMismatchError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {info.shape}, "
                                 f"but the config implies {shape} (for {name})")
    if info.dtype in FLOAT_DTYPES:
        return None
    if info.dtype != FP8_DTYPE or fp8 is None:
        why = (" and config.json has no fp8 quantization_config (block-scaled F8_E4M3 weights "
               "need one)" if info.dtype == FP8_DTYPE else
               f" (or {FP8_DTYPE} with block scales in an fp8 checkpoint)")
        raise UnsupportedDtypeError(f"{ckpt.file_of(key)}: tensor {key!r} has dtype {info.dtype}"
                                    f"; only {', '.join(FLOAT_DTYPES)} weights can be "
                                    f"converted{why}")
    if len(shape) < 2:
        raise UnsupportedDtypeError(f"{ckpt.file_of(key)}: tensor {key!r} of shape {shape} is "
                                    f"{FP8_DTYPE}; only matrices have block scales")
    skey = scale_key(key)
    if skey not in ckpt:
        raise MissingTensorError(f"{ckpt.file_of(key)}: {FP8_DTYPE} tensor {key!r} has no "
                                 f"block scales: missing tensor {skey!r}")
    sinfo, grid = ckpt.info(skey), qz.block_grid(shape, fp8.block)
    if sinfo.shape != grid:
        raise ShapeMismatchError(
            f"{ckpt.file_of(skey)}: tensor {skey!r} has shape {sinfo.shape}, but its weight "
            f"{key!r} {shape} in blocks of {list(fp8.block)} (weight_block_size) needs {grid}")
    if sinfo.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"{ckpt.file_of(skey)}: tensor {skey!r} has dtype "
                                    f"{sinfo.dtype}; block scales must be float (F32)")
    return skey


def _plan_dense(spec: ArraySpec, src: TensorSource, ckpt: SafetensorsCheckpoint,
                fp8: SourceFP8 | None) -> Planned:
    for key in src.keys:
        if key in ckpt:
            scale = _check_tensor(ckpt, key, spec.shape, spec.name, fp8)
            return Planned(spec, (Read(key, scale=scale),))
    also = f" (or {', '.join(map(repr, src.alternatives))})" if src.alternatives else ""
    raise MissingTensorError(f"{ckpt.where}: missing tensor {src.key!r}{also}, needed for "
                             f"{spec.name}")


def _plan_expert(cfg: ModelConfig, spec: ArraySpec, src: ExpertSource,
                 ckpt: SafetensorsCheckpoint, fp8: SourceFP8 | None) -> Planned:
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
        scales = [_check_tensor(ckpt, k, (out_dim, in_dim), spec.name, fp8) for k in keys]
        return Planned(spec, tuple(Read(k, scale=s) for k, s in zip(keys, scales)))
    for key in src.fused:
        if key not in ckpt:
            continue
        if src.fused_half is None:
            scale = _check_tensor(ckpt, key, (n, out_dim, in_dim), spec.name, fp8)
            return Planned(spec, tuple(Read(key, lead=(e,), scale=scale) for e in range(n)))
        scale = _check_tensor(ckpt, key, (n, 2 * out_dim, in_dim),
                              f"{spec.name}, fused with its pair", fp8)
        rows = (src.fused_half * out_dim, (src.fused_half + 1) * out_dim)
        return Planned(spec, tuple(Read(key, lead=(e,), rows=rows, scale=scale)
                                   for e in range(n)))
    raise MissingTensorError(f"{ckpt.where}: missing tensor {src.per_expert[0].format(e=0)!r} "
                             f"(or the fused {src.fused[0]!r}), needed for {spec.name}")


def _check_unmapped(cfg: ModelConfig, ckpt: SafetensorsCheckpoint, used: set[str],
                    fp8: SourceFP8 | None) -> None:
    unmapped: list[str] = []
    mtp: dict[int, int] = {}  # multi-token-prediction layer -> tensors skipped
    tied_scale = None
    for key in ckpt:
        if key in used or key == tied_scale:
            continue
        if (layer := mtp_layer(cfg, key)) is not None:
            mtp[layer] = mtp.get(layer, 0) + 1
        elif key.endswith(IGNORED_SUFFIXES):
            log.debug("ignoring derived buffer %s", key)
        elif key == "lm_head.weight" and cfg.tie_word_embeddings:
            # HF sometimes writes the tied head; it must at least have the embedding's shape.
            tied_scale = _check_tensor(ckpt, key, (cfg.vocab_size, cfg.hidden_size),
                                       "lm_head (tied)", fp8)
            log.info("ignoring lm_head.weight: tie_word_embeddings uses the embedding")
        else:
            unmapped.append(key)
    unmapped = [k for k in unmapped if k != tied_scale]
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


def plan_conversion(cfg: ModelConfig, ckpt: SafetensorsCheckpoint,
                    fp8: SourceFP8 | None = None) -> list[Planned]:
    """Map every array of weight_specs(cfg) to its reads; checks shapes, dtypes (F8_E4M3 with
    its block scales when `fp8` describes the source's blocks), leftovers."""
    sources = hf_sources(cfg)
    plan = []
    for spec in weight_specs(cfg):
        src = sources[spec.name]
        if isinstance(src, TensorSource):
            plan.append(_plan_dense(spec, src, ckpt, fp8))
        else:
            plan.append(_plan_expert(cfg, spec, src, ckpt, fp8))
    used = {k for p in plan for r in p.reads for k in (r.key, r.scale) if k is not None}
    _check_unmapped(cfg, ckpt, used, fp8)
    return plan


def _scale_rows(r: Read, block: int) -> tuple[int, int] | None:
    """The rows of the scale grid that cover rows r.rows of the weight (all of them: None)."""
    if r.rows is None:
        return None
    return r.rows[0] // block, -(-r.rows[1] // block)


def check_fp8_keep(cfg: ModelConfig, plan: list[Planned], fp8: SourceFP8 | None) -> str:
    """How the experts of `cfg` are quantized from this plan: "source" (every routed expert an
    fp8 one, kept byte for byte with `--quantize fp8`), "rtn" (quantized from floats) or
    "source+rtn" (some of each). Keeping needs a fused gate_up tensor's halves to start on a
    block boundary (the intermediate size a multiple of the block), or an error says so."""
    if cfg.expert_quant is not Quant.FP8:
        return "rtn"
    kept = [r for p in plan if p.spec.kind is Kind.EXPERT for r in p.reads if r.scale]
    total = sum(len(p.reads) for p in plan if p.spec.kind is Kind.EXPERT)
    assert fp8 is not None or not kept
    for r in kept:
        if r.rows is not None and r.rows[0] % cfg.expert_group_size:
            raise UnsupportedQuantizationError(
                f"{r.key!r} fuses gate and up, and its fp8 blocks of {list(fp8.block)} "
                f"straddle the two halves (the expert width {r.rows[0]} is not a multiple of "
                f"{fp8.block[0]}), so --quantize fp8 cannot keep them as they are; convert "
                "without --quantize fp8 (dequantized) or with --quantize int8 / int4")
    return "rtn" if not kept else "source" if len(kept) == total else "source+rtn"


def _read_nbytes(ckpt: SafetensorsCheckpoint, r: Read, fp8: SourceFP8 | None) -> int:
    begin, end, _ = slice_range(ckpt.info(r.key), r.lead, r.rows)
    if r.scale is not None:
        sb, se, _ = slice_range(ckpt.info(r.scale), r.lead, _scale_rows(r, fp8.block[0]))
        end += se - sb
    return end - begin


def read_float(ckpt: SafetensorsCheckpoint, r: Read, fp8: SourceFP8 | None) -> np.ndarray:
    """The values of one read: as stored (a float tensor), or an fp8 one dequantized with its
    block scales into float32."""
    x = ckpt.read(r.key, lead=r.lead, rows=r.rows)
    if r.scale is None:
        return x
    s = ckpt.read(r.scale, lead=r.lead)
    return qz.dequantize_fp8_np(x, s, fp8.block, np.float32, row0=r.rows[0] if r.rows else 0)


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
                   cfg: ModelConfig, bar: tqdm, refine: bool, fp8: SourceFP8 | None
                   ) -> dict[str, dict[str, Any]]:
    """Stream every expert array into the TensorStore store, one expert slice at a time
    (quantized on the way when cfg quantizes the experts; an fp8 source's experts dequantized,
    or with `--quantize fp8` copied as they are: codes and scales). Returns the checksum entries
    of the chunk files written (relative path -> size and digest of the bytes written)."""
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
                nbytes = _read_nbytes(ckpt, r, fp8)
                if cfg.expert_quant is Quant.FP8 and r.scale is not None:  # kept as it is
                    stored = {"q": ckpt.read(r.key, lead=r.lead, rows=r.rows),
                              "scale": ckpt.read(r.scale, lead=r.lead, rows=_scale_rows(
                                  r, cfg.expert_group_size)).astype(np.float32, copy=False)}
                else:
                    x = read_float(ckpt, r, fp8)
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
                bar: tqdm, fp8: SourceFP8 | None) -> dense_orbax.LazyArray:
    (r,) = p.reads
    dtype = np.dtype(p.spec.stored_dtype(cfg))  # the config's; float32 for DeepSeek's router

    def read() -> np.ndarray:
        x = read_float(ckpt, r, fp8)
        bar.update(_read_nbytes(ckpt, r, fp8))
        return x.astype(dtype, copy=False)

    return dense_orbax.LazyArray(p.spec.shape, dtype, read)


def _write_dense(plan: list[Planned], ckpt: SafetensorsCheckpoint, root: pathlib.Path,
                 cfg: ModelConfig, bar: tqdm, fp8: SourceFP8 | None) -> None:
    """Save every dense array as one orbax checkpoint at root/dense, one tensor at a time (an
    fp8 one dequantized)."""
    leaves = {p.spec.name: _lazy_dense(p, ckpt, cfg, bar, fp8)
              for p in plan if p.spec.kind is Kind.DENSE}
    dense_orbax.save_dense(root / mf.DENSE_DIR, leaves)
    # The reader opens each array where orbax put it: check orbax's naming is what it expects.
    missing = [n for n in leaves if not (root / mf.dense_path(n) / "zarr.json").is_file()]
    if missing:
        raise ConversionError(f"orbax {dense_orbax.orbax_version()} did not write the dense "
                              f"arrays as dense/<flat name>/ zarr3 arrays (no {missing[:3]})")


def _convert_into(tmp: pathlib.Path, hf_dir: pathlib.Path, hf: dict[str, Any],
                  cfg: ModelConfig, ckpt: SafetensorsCheckpoint, plan: list[Planned],
                  progress: bool, refine: bool, original_dtype: str,
                  fp8: SourceFP8 | None, method: str) -> None:
    total = sum(_read_nbytes(ckpt, r, fp8) for p in plan for r in p.reads)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
              disable=not progress) as bar:
        known = _write_experts(plan, ckpt, tmp, cfg, bar, refine, fp8)
        _write_dense(plan, ckpt, tmp, cfg, bar, fp8)
    tokenizer_files = _copy_tokenizer(hf_dir, tmp)
    sums = checksums.section(tmp, known)  # the other files are read back (dense: small)
    fsync_tree(tmp)
    if method == "rtn" and refine:
        method = "rtn+lsq"
    quantization = mf.quantization_section(
        cfg, method=method, original_dtype=FP8_NAME if method.startswith("source")
        else original_dtype) if cfg.quantized else None
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
                and q.get("method") in ("rtn", "source") and have["dtype"] == m["dtype"]):
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
    config's dtype. The manifest's config records the stored dtype. A block-scaled FP8 source
    (DeepSeek-V3 and other FP8 releases) is dequantized into `dtype`. quantize: "int8", "int4"
    or "fp8" stores the routed experts quantized (dense weights, router and shared experts stay
    in `dtype`), in groups of `group_size` inputs (default 64 for int4, one group per output
    row for int8; fp8: blocks of group_size x group_size, default the FP8 source's block, whose
    experts are then kept byte for byte, or 128 from a float source); refine: improve the
    round-to-nearest int8 / int4 scales and zero points by least squares
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
    fp8 = source_fp8(hf, hf_dir / "config.json")
    original_dtype = cfg.dtype
    source_cfg = with_dtype(cfg, dtype)
    if refine and quantize == Quant.FP8.value:
        raise ConversionError("--refine applies to --quantize int8 and int4, not fp8 (whose "
                              "scales are each block's largest value / 448)")
    cfg = with_quant(source_cfg, quantize, group_size, fp8, hf_dir / "config.json")
    _check_output(hf_dir, out, overwrite)
    with open_checkpoint(hf_dir) as ckpt:
        plan = plan_conversion(source_cfg, ckpt, fp8)
        method = check_fp8_keep(cfg, plan, fp8)
        log.info("converting %s (%s, %d layers, %d experts) -> %s as %s%s", hf_dir,
                 cfg.family.value, cfg.num_layers, cfg.num_experts, out, cfg.dtype,
                 f", experts {quantize} (group {cfg.expert_group_size or 'per row'})"
                 if cfg.quantized else "")
        out.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename.
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _convert_into(tmp, hf_dir, hf, cfg, ckpt, plan, progress, refine, original_dtype,
                          fp8, method)
            _install(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
