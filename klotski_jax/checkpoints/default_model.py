"""The embedded default model: a small trained Mixtral shipped inside the package.

`klotski demo` must work on a fresh machine with no download, so the default model ships as
package data: `klotski_jax/data/default_model/` is an HF Mixtral checkpoint (`config.json`,
bf16 `model.safetensors` with per-expert keys, `generation_config.json`, a byte-level BPE
tokenizer) trained by `scripts/train_default_model.py` with our own JAX model code on text that
ships with CPython (the language reference in `pydoc_data.topics` and standard-library
docstrings). Its model card (README.md in that folder) records the corpus, the command, the loss
curve and the measured routing skew.

The shape behaves like Mixtral-8x7B on a 24 GB GPU where it matters for offloading: 8 experts,
top-2, experts are most of the bytes, and 16 layers, so that a device budget of 25% of the
weight bytes holds a few whole layers (enough for every schedule's streaming minimum) but not
the model.

This module holds the pieces the training script and the cache share:
- `build_tokenizer`: train the byte-level BPE on a list of texts, save it in HF format;
- `write_hf_checkpoint`: export flat float weights (flat names of models/specs.py) as an HF
  checkpoint, through the family's declarative key map, so the converter reads it back exactly;
- `default_checkpoint`: copy the packaged checkpoint to `<cache>/default-hf/` and convert it to
  `<cache>/default/` (cache: `KLOTSKI_JAX_CACHE`, else `$XDG_CACHE_HOME/klotski-jax`, else
  `~/.cache/klotski-jax`). A stamp records the packaged files' hashes and a recipe version, so a
  retrained model (or a changed conversion) rebuilds the cache instead of serving stale files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from klotski_jax.config import ModelConfig
from klotski_jax.constants import cache_root
from klotski_jax.models.families import ExpertSource, TensorSource, hf_sources
from klotski_jax.models.specs import expert_part_shape, weight_specs

log = logging.getLogger(__name__)

# Bump when the cache's contents change in a way the packaged files' hashes cannot see
# (e.g. the conversion). 1 was the random-weights builder; 3: format_version 2 (orbax dense/).
RECIPE_VERSION = 3

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama/Mixtral order
UNK, BOS, EOS, PAD = SPECIAL_TOKENS

STAMP_NAME = "klotski-default-recipe.json"
# The packaged checkpoint's files that define the model (hashed into the cache stamp).
HF_FILES: tuple[str, ...] = ("config.json", "generation_config.json", "model.safetensors",
                             "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_FILES: tuple[str, ...] = ("special_tokens_map.json", "tokenizer.json",
                                    "tokenizer_config.json")


def packaged_checkpoint_dir() -> pathlib.Path:
    """The HF checkpoint shipped in the package (`klotski_jax/data/default_model/`)."""
    return pathlib.Path(str(importlib.resources.files("klotski_jax"))) / "data" / "default_model"


# ---- tokenizer ---------------------------------------------------------------------------------

def build_tokenizer(out_dir: pathlib.Path, texts: Iterable[str], vocab_size: int,
                    model_max_length: int) -> int:
    """Train a byte-level BPE on `texts`, save it in HF format in `out_dir`; returns its size.

    Special tokens `<unk> <s> </s> <pad>` get ids 0..3; encoding adds `<s>` in front. Byte-level
    BPE never produces <unk>, so any text round-trips. `tokenizer_config.json` makes
    `transformers.AutoTokenizer.from_pretrained(out_dir)` load it offline, left-padding by
    default (what batched greedy generation needs). Deterministic for the same texts and
    `tokenizers` version.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos_id = SPECIAL_TOKENS.index(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", specials)
    return tok.get_vocab_size()


# ---- export ------------------------------------------------------------------------------------

def hf_tensors(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of every tensor of an HF checkpoint of `cfg`, per-expert layout."""
    for key, _, _, shape in _hf_layout(cfg):
        yield key, shape


def _hf_layout(cfg: ModelConfig) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """(HF key, flat name, expert index or None, shape), from `weight_specs` and `hf_sources`,
    so an exported checkpoint has exactly the tensors the converter expects."""
    sources = hf_sources(cfg)
    for spec in weight_specs(cfg):
        src = sources[spec.name]
        if isinstance(src, TensorSource):
            yield src.key, spec.name, None, spec.shape
        else:
            assert isinstance(src, ExpertSource)
            part = spec.name.rsplit(".", 1)[1]
            for e in range(cfg.num_experts):
                yield (src.per_expert[0].format(e=e), spec.name, e,
                       expert_part_shape(cfg, part))


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def generation_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy by default, with the config's special token ids."""
    return {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"],
            "pad_token_id": hf_config["pad_token_id"], "do_sample": False}


def write_hf_checkpoint(out_dir: pathlib.Path, hf_config: Mapping[str, Any],
                        params: Mapping[str, Any], tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """Export flat weights as an HF checkpoint in `out_dir` (which must not exist).

    params: every flat name of `weight_specs(cfg)` (any float dtype, HF (out, in) orientation,
    experts [E, out, in]); stored in the config's dtype with per-expert HF keys, the layout
    transformers' `save_pretrained` writes. Copies the tokenizer files from `tokenizer_dir`.
    Written into a temporary sibling and renamed at the end, so a failed export leaves nothing
    that looks complete.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import save_file

    cfg = ModelConfig.from_hf_config(dict(hf_config))
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    missing = [s.name for s in weight_specs(cfg) if s.name not in params]
    if missing:
        raise ValueError(f"params are missing {len(missing)} arrays, e.g. {missing[:3]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", dict(hf_config))
        _write_json(tmp / "generation_config.json", generation_config(hf_config))
        tensors = {}
        for key, name, e, shape in _hf_layout(cfg):
            value = np.asarray(params[name])
            value = value if e is None else value[e]
            if value.shape != shape:
                raise ValueError(f"{name}: shape {value.shape} != expected {shape} for {key}")
            tensors[key] = np.ascontiguousarray(value.astype(cfg.np_dtype))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # save_file creates it 0600
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- cache -------------------------------------------------------------------------------------

def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe(source: pathlib.Path | None = None) -> dict[str, Any]:
    """What determines the cached files: the packaged files' hashes and the recipe version."""
    from klotski_jax.constants import __version__

    source = packaged_checkpoint_dir() if source is None else source
    return {"recipe_version": RECIPE_VERSION, "klotski_jax": __version__,
            "files": {name: _sha256(source / name) for name in HF_FILES}}


def _stamp_ok(directory: pathlib.Path, want: dict[str, Any]) -> bool:
    try:
        return json.loads((directory / STAMP_NAME).read_text()) == want
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    """Serialise builders sharing one cache (two demos or test workers at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _copy_packaged(source: pathlib.Path, hf_dir: pathlib.Path) -> None:
    """Copy the packaged checkpoint to hf_dir through a temporary sibling (atomic rename)."""
    tmp = hf_dir.parent / f".{hf_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
        os.replace(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_checkpoint(cache_dir: str | os.PathLike[str] | None = None,
                       rebuild: bool = False) -> pathlib.Path:
    """The converted klotski-jax checkpoint of the default model, made on first use.

    Returns `<cache>/default`. Copies the packaged HF checkpoint to `<cache>/default-hf` (usable
    with transformers) and converts it when either is missing, stems from other packaged files or
    recipe, or `rebuild` is set. Takes about a second.
    """
    from klotski_jax.checkpoints.convert import convert

    source = packaged_checkpoint_dir()
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"the packaged default model is missing: {source} (reinstall "
                                "klotski-jax, or run scripts/train_default_model.py)")
    root = cache_root(cache_dir)
    hf_dir, ckpt_dir = root / "default-hf", root / "default"
    want = recipe(source)
    with _locked(root):
        if rebuild or not _stamp_ok(hf_dir, want):
            log.info("copying the packaged default model to %s", hf_dir)
            shutil.rmtree(hf_dir, ignore_errors=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            _copy_packaged(source, hf_dir)
            _write_json(hf_dir / STAMP_NAME, want)
        if rebuild or not _stamp_ok(ckpt_dir, want):
            log.info("converting %s -> %s", hf_dir, ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # whatever is there is stale or partial
            convert(hf_dir, ckpt_dir, progress=False)
            _write_json(ckpt_dir / STAMP_NAME, want)
    return ckpt_dir
