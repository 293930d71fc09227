"""manifest.json: the self-describing, versioned index of a converted checkpoint.

A checkpoint directory is valid exactly when its manifest is: the converter writes the manifest
last, so a directory without one is never mistaken for a finished conversion. Layout (format
version 2; docs/format.md describes it for users):

  manifest.json              this file
  dense/                     ONE orbax checkpoint (PyTree, OCDBT off, zarr3, no compression) of
                             every dense tensor; leaf `a.b.c` is the TensorStore array dense/a.b.c/
  experts/<flat name>/       one zarr3 array [E, out, in] per (layer, part); chunk c/{e}/0/0
                             (quantized: [E, ...] arrays <part>.q, <part>.scale, <part>.zero)
  tokenizer/                 tokenizer files copied from the HF directory (when it had any)

Manifest fields:
  format "klotski-jax", format_version (int; readers refuse newer versions), family,
  config (ModelConfig.to_dict(); its dtype is the stored dtype), hf_config (the original
  config.json), source (absolute HF directory, for later benchmarks), dtype,
  dense {format "orbax-checkpoint", path "dense", ocdbt false, zarr3 true, compression false,
  orbax_version} and experts {format "tensorstore-zarr3", path "experts", chunk "one per
  expert"} (version 2 on), tensors {flat name: {shape, dtype, kind, path (relative to the
  checkpoint)}}, tokenizer_files [names under tokenizer/], created_by ("klotski-jax <version>"),
  checksums {algorithm "xxh3_64", files {path: {size, xxh3_64}}} of every other file (written
  since checksums exist; optional, older checkpoints have none: checkpoints/checksums.py).

Version 3 is version 2 with quantized routed experts: the config's expert_quant and
expert_group_size say how, and experts.quantization records {scheme, group_size, scale_dtype,
method ("rtn" or "rtn+lsq"; fp8: "source" when an FP8 checkpoint's experts were kept as they
are, "rtn" when float experts were quantized, "source+rtn" for a mix), original_dtype}; fp8
adds block [G, G] (scales float32, values float8_e4m3fn). Unquantized checkpoints are still written as
version 2, so older readers keep reading them; a reader older than version 3 refuses a
quantized one as "written by a newer klotski-jax".

Version 1 had no dense/experts sections and wrote dense/<flat name>/ as plain zarr3 arrays (one
chunk, `bytes` codec) with no orbax metadata, under the names before the MoE block became its own
NNX module (`layers.i.router`, `layers.i.shared.*`, `layers.i.experts.*`; now
`layers.i.moe.router.weight`, `layers.i.moe.shared.*`, `layers.i.moe.experts.*`). Reading
renames a version 1 manifest's tensors (`upgrade_v1_names`) and keeps their paths: TensorStore
opens both kinds alike, so version 1 checkpoints are still read; only orbax cannot restore their
dense/ directory (re-convert with `klotski convert HF_DIR OUT_DIR --overwrite` for that).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from klotski_jax.checkpoints.errors import ManifestError
from klotski_jax.config import ConfigError, ModelConfig, Quant, quant_scale_dtype
from klotski_jax.models.specs import ArraySpec, Kind, weight_specs

FORMAT_NAME = "klotski-jax"
FORMAT_VERSION = 3
QUANT_FORMAT_VERSION = 3  # the first version with quantized experts
PLAIN_FORMAT_VERSION = 2  # what an unquantized checkpoint is written as (older readers read it)
DENSE_DIR = "dense"
EXPERTS_DIR = "experts"
# The dense part's save options; the reader opens dense/<flat name>/ as a zarr3 array, which
# holds only with OCDBT off and zarr3 on.
DENSE_OPTIONS: dict[str, Any] = {"format": "orbax-checkpoint", "path": DENSE_DIR, "ocdbt": False,
                                 "zarr3": True, "compression": False}
EXPERTS_SECTION: dict[str, Any] = {"format": "tensorstore-zarr3", "path": EXPERTS_DIR,
                                   "chunk": "one per expert"}
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# Files copied from the HF directory into tokenizer/ when present. The first group is what makes
# a tokenizer; the others help `AutoTokenizer` and generation (config.json picks the class).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
AUX_FILES = ("generation_config.json", "config.json")
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_REQUIRED = ("format", "format_version", "family", "config", "dtype", "tensors")


def dense_path(name: str) -> str:
    """The TensorStore array of dense tensor `name` inside the orbax checkpoint (orbax's leaf
    name with OCDBT off: the pytree path joined with ".", which is the flat name)."""
    return f"{DENSE_DIR}/{name}"


def tensor_path(spec: ArraySpec) -> str:
    """Where an array lives, relative to the checkpoint directory."""
    return f"{EXPERTS_DIR}/{spec.name}" if spec.kind is Kind.EXPERT else dense_path(spec.name)


def tensor_entry(spec: ArraySpec, dtype: str) -> dict[str, Any]:
    """The manifest entry of `spec` in a checkpoint stored in `dtype` (quantized expert arrays
    keep their own dtypes)."""
    return {"shape": list(spec.shape), "dtype": spec.dtype or dtype, "kind": spec.kind.value,
            "path": tensor_path(spec)}


def quantization_section(cfg: ModelConfig, *, method: str, original_dtype: str
                         ) -> dict[str, Any]:
    """experts.quantization of a checkpoint of `cfg` with quantized experts."""
    section = {"scheme": cfg.expert_quant.value, "group_size": cfg.expert_group_size,
               "scale_dtype": quant_scale_dtype(cfg.expert_quant), "method": method,
               "original_dtype": original_dtype}
    if cfg.expert_quant is Quant.FP8:
        section["block"] = [cfg.expert_group_size, cfg.expert_group_size]
    return section


def build_manifest(cfg: ModelConfig, *, hf_config: dict[str, Any], source: pathlib.Path,
                   tokenizer_files: list[str], orbax_version: str,
                   quantization: dict[str, Any] | None = None,
                   checksums: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint of `cfg` (stored in cfg.dtype), converted from `source`.
    `quantization`: the experts' `quantization_section` when cfg quantizes them."""
    from klotski_jax.constants import __version__

    experts = dict(EXPERTS_SECTION)
    if quantization is not None:
        experts["quantization"] = quantization
    return {
        "format": FORMAT_NAME,
        "format_version": QUANT_FORMAT_VERSION if cfg.quantized else PLAIN_FORMAT_VERSION,
        "family": cfg.family.value,
        "config": cfg.to_dict(),
        "hf_config": hf_config,
        "source": os.path.abspath(source),
        "dtype": cfg.dtype,
        "dense": {**DENSE_OPTIONS, "orbax_version": orbax_version},
        "experts": experts,
        "tensors": {s.name: tensor_entry(s, cfg.dtype) for s in weight_specs(cfg)},
        "tokenizer_files": sorted(tokenizer_files),
        "created_by": f"klotski-jax {__version__}",
        **({} if checksums is None else {"checksums": checksums}),
    }


def _check_header(m: Any, where: pathlib.Path) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ManifestError(f"{where}: not a klotski-jax manifest (format {found!r}, expected "
                            f"{FORMAT_NAME!r})")
    version = m.get("format_version")
    if type(version) is not int or version < 1:
        raise ManifestError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} was written by a newer "
                            f"klotski-jax (this one reads up to {FORMAT_VERSION}); upgrade it")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ManifestError(f"{where}: missing fields {missing}")
    if version >= 2:
        _check_sections(m, where)


def _check_sections(m: dict[str, Any], where: pathlib.Path) -> None:
    dense, experts = m.get("dense"), m.get("experts")
    if not isinstance(dense, dict) or any(dense.get(k) != v for k, v in DENSE_OPTIONS.items()):
        raise ManifestError(f"{where}: the 'dense' section is {dense!r}; this klotski-jax reads "
                            f"only {DENSE_OPTIONS}")
    if not isinstance(experts, dict) or any(experts.get(k) != v
                                            for k, v in EXPERTS_SECTION.items()):
        raise ManifestError(f"{where}: the 'experts' section is {experts!r}; this klotski-jax "
                            f"reads only {EXPERTS_SECTION}")
    quant = experts.get("quantization")
    if quant is None:
        return
    schemes = [q.value for q in Quant if q is not Quant.NONE]
    if m["format_version"] < QUANT_FORMAT_VERSION or not isinstance(quant, dict):
        raise ManifestError(f"{where}: invalid experts.quantization {quant!r}")
    if quant.get("scheme") not in schemes:
        raise ManifestError(f"{where}: experts are quantized as {quant.get('scheme')!r}, a "
                            f"scheme this klotski-jax does not know (it reads "
                            f"{', '.join(schemes)}); upgrade klotski-jax or re-convert")
    want = quant_scale_dtype(Quant(quant["scheme"]))
    if quant.get("scale_dtype") != want:
        raise ManifestError(f"{where}: {quant['scheme']} quantization scales in "
                            f"{quant.get('scale_dtype')!r}; this klotski-jax reads {want} "
                            f"{quant['scheme']} scales only")


def _check_quant_agrees(m: dict[str, Any], cfg: ModelConfig, where: pathlib.Path) -> None:
    """The config's expert storage and the experts.quantization section say the same."""
    quant = (m.get("experts") or {}).get("quantization")  # (version 1 has no experts section)
    said = ("none", 0) if quant is None else (quant["scheme"], quant.get("group_size"))
    if said != (cfg.expert_quant.value, cfg.expert_group_size):
        raise ManifestError(f"{where}: experts.quantization {quant!r} does not match the "
                            f"config's expert_quant={cfg.expert_quant.value!r}, "
                            f"expert_group_size={cfg.expert_group_size}")


def _check_tensors(m: dict[str, Any], cfg: ModelConfig, where: pathlib.Path) -> None:
    tensors = m["tensors"]
    if not isinstance(tensors, dict):
        raise ManifestError(f"{where}: 'tensors' must be an object")
    specs = {s.name: s for s in weight_specs(cfg)}
    if set(tensors) != set(specs):
        missing, extra = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
        raise ManifestError(f"{where}: tensors do not match the config (missing {missing[:5]}, "
                            f"unexpected {extra[:5]})")
    for name, entry in tensors.items():
        want = tensor_entry(specs[name], cfg.dtype)
        if not isinstance(entry, dict) or any(entry.get(k) != want[k]
                                              for k in ("shape", "dtype", "kind")):
            raise ManifestError(f"{where}: tensor {name!r} is {entry!r}, but the config "
                                f"implies {want}")
        path = entry.get("path")
        if (not isinstance(path, str) or pathlib.PurePosixPath(path).is_absolute()
                or ".." in pathlib.PurePosixPath(path).parts
                or (m["format_version"] >= 2 and path != want["path"])):
            raise ManifestError(f"{where}: tensor {name!r} has an invalid path {path!r}")


def _check_checksums(sums: Any, where: pathlib.Path) -> None:
    if sums is None:
        return
    files = sums.get("files") if isinstance(sums, dict) else None
    if (not isinstance(files, dict) or not isinstance(sums.get("algorithm"), str)
            or not all(isinstance(e, dict) and type(e.get("size")) is int
                       and isinstance(e.get(sums["algorithm"]), str) for e in files.values())
            or any(pathlib.PurePosixPath(p).is_absolute() or ".." in p.split("/")
                   for p in files)):
        raise ManifestError(f"{where}: invalid checksums section")


def v2_name(v1_name: str) -> str:
    """A version 1 flat name under the version 2 (NNX path) naming."""
    parts = v1_name.split(".")
    if len(parts) >= 3 and parts[0] == "layers":
        head, rest = parts[:2], parts[2:]
        if rest == ["router"]:
            return ".".join([*head, "moe", "router", "weight"])
        if rest[0] in ("shared", "experts"):
            return ".".join([*head, "moe", *rest])
    return v1_name


def upgrade_v1_names(m: dict[str, Any]) -> None:
    """Rename a version 1 manifest's tensors in place to version 2 names (paths unchanged)."""
    if m.get("format_version") == 1 and isinstance(m.get("tensors"), dict):
        m["tensors"] = {v2_name(n): e for n, e in m["tensors"].items()}


def validate_manifest(m: Any, where: pathlib.Path) -> ModelConfig:
    """Check a manifest dict (read from `where`) and return its config. A version 1 manifest's
    tensor names are upgraded in place first (`upgrade_v1_names`)."""
    _check_header(m, where)
    upgrade_v1_names(m)
    try:
        cfg = ModelConfig.from_dict(m["config"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: invalid config: {e}") from None
    if m["dtype"] != cfg.dtype:
        raise ManifestError(f"{where}: dtype {m['dtype']!r} differs from the config's "
                            f"{cfg.dtype!r}")
    if m["family"] != cfg.family.value:
        raise ManifestError(f"{where}: family {m['family']!r} differs from the config's "
                            f"{cfg.family.value!r}")
    _check_quant_agrees(m, cfg, where)
    _check_tensors(m, cfg, where)
    _check_checksums(m.get("checksums"), where)
    files = m.get("tokenizer_files", [])
    if not isinstance(files, list) or not all(
            isinstance(f, str) and pathlib.PurePath(f).name == f for f in files):
        raise ManifestError(f"{where}: invalid tokenizer_files {files!r}")
    return cfg


def read_manifest(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a converted checkpoint directory."""
    path = pathlib.Path(ckpt_dir) / MANIFEST_FILE
    if not path.is_file():
        why = "does not exist" if not pathlib.Path(ckpt_dir).exists() else "has no manifest"
        raise ManifestError(f"{path.parent} {why}: not a klotski-jax checkpoint (make one "
                               "with `klotski convert HF_DIR OUT_DIR`)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot parse: {e}") from None
    validate_manifest(m, path)
    return m


def write_manifest(ckpt_dir: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
    """Write manifest.json (after validating it) and fsync it."""
    path = pathlib.Path(ckpt_dir) / MANIFEST_FILE
    validate_manifest(manifest, path)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def has_tokenizer(tokenizer_files: list[str]) -> bool:
    """Whether the copied files make a tokenizer (not just generation_config.json)."""
    return any(f in _TOKENIZER_CORE for f in tokenizer_files)
