"""The embedded default model: a small Mixtral-architecture HF checkpoint built offline.

`klotski demo` must work on a fresh machine with no download, so the default model is *built*
rather than fetched: a deterministic recipe (fixed seeds, no torch, no network) writes an HF
Mixtral checkpoint (`config.json`, `model.safetensors`, `generation_config.json`) and a byte-level
BPE tokenizer trained on text that ships with CPython (`pydoc_data.topics`). The weights are random
(HF-style init); a later issue replaces them with a trained model.

The shape is chosen to behave like Mixtral-8x7B on a 24 GB GPU where it matters for offloading:
8 experts, top-2, experts are 87% of the bytes, and 12 layers so that a device budget of 25% of
the weight bytes holds a few whole layers but not the model.

`default_checkpoint()` caches the HF checkpoint under `<cache>/default-hf/` and its conversion
under `<cache>/default/` (cache: `KLOTSKI_JAX_CACHE`, else `$XDG_CACHE_HOME/klotski-jax`, else
`~/.cache/klotski-jax`). A stamp file records the recipe's fingerprint, so changing the recipe
rebuilds the cache instead of silently serving stale files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from klotski_jax.config import ModelConfig
from klotski_jax.models.families import ExpertSource, TensorSource, hf_sources
from klotski_jax.models.specs import expert_part_shape, weight_specs

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the fingerprint below cannot see (e.g. the init code).
RECIPE_VERSION = 1
SEED = 20250211  # Klotski's arXiv date; any fixed value works
INIT_STD = 0.02  # HF `initializer_range`

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama/Mixtral order
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
VOCAB_SIZE = 2048

# transformers-5 style Mixtral config.json (vocab_size is added from the trained tokenizer).
HF_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "attention_dropout": 0.0,
    "bos_token_id": SPECIAL_TOKENS.index(BOS),
    "eos_token_id": SPECIAL_TOKENS.index(EOS),
    "pad_token_id": SPECIAL_TOKENS.index(PAD),
    "dtype": "bfloat16",
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": INIT_STD,
    "intermediate_size": 320,
    "max_position_embeddings": 4096,
    "num_attention_heads": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 12,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
}

STAMP_NAME = "klotski-default-recipe.json"


# ---- tokenizer ---------------------------------------------------------------------------------

def _corpus() -> list[str]:
    """Training text for the tokenizer: CPython's pydoc topic pages (offline, ~0.5 MB).

    The text differs between Python minor versions, so its hash is part of the recipe fingerprint.
    """
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _corpus_sha256() -> str:
    h = hashlib.sha256()
    for doc in _corpus():
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_tokenizer(out_dir: pathlib.Path) -> int:
    """Train the byte-level BPE tokenizer and save it in HF format; returns its vocabulary size.

    Byte-level BPE never produces <unk>, so any text round-trips. `tokenizer_config.json` makes
    `transformers.AutoTokenizer.from_pretrained(out_dir)` load it offline, left-padding by default
    (what batched greedy generation needs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos_id = SPECIAL_TOKENS.index(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))

    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": HF_CONFIG["max_position_embeddings"],
        "padding_side": "left",
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", specials)
    return tok.get_vocab_size()


# ---- weights -----------------------------------------------------------------------------------

def _init(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF-style init for one tensor, seeded by its name so the result does not depend on order."""
    if key.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([SEED, zlib.crc32(key.encode())])
    return rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)


def hf_tensors(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of every tensor of an HF checkpoint of `cfg`, per-expert layout.

    Derived from `weight_specs` and the family's `hf_sources`, so the default model always has
    exactly the tensors the converter expects.
    """
    sources = hf_sources(cfg)
    for spec in weight_specs(cfg):
        src = sources[spec.name]
        if isinstance(src, TensorSource):
            yield src.key, spec.shape
        else:
            assert isinstance(src, ExpertSource)
            part = spec.name.rsplit(".", 1)[1]
            for e in range(cfg.num_experts):
                yield src.per_expert[0].format(e=e), expert_part_shape(cfg, part)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_default_hf_checkpoint(out_dir: pathlib.Path) -> pathlib.Path:
    """Write the default HF Mixtral checkpoint (weights, configs, tokenizer) to `out_dir`.

    Deterministic (same bytes on every run with the same Python and library versions), offline
    and torch-free. Written into a temporary sibling directory and renamed at the end, so an
    interrupted build never leaves a directory that looks complete. Refuses an existing `out_dir`.
    """
    from safetensors.numpy import save_file

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        vocab = build_tokenizer(tmp)
        hf_config = {**HF_CONFIG, "vocab_size": vocab}
        cfg = ModelConfig.from_hf_config(hf_config)
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"],
            "pad_token_id": hf_config["pad_token_id"], "do_sample": False})
        tensors = {key: _init(key, shape).astype(ml_dtypes.bfloat16)
                   for key, shape in hf_tensors(cfg)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        nbytes = sum(t.nbytes for t in tensors.values())
        del tensors
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built default HF checkpoint at %s (%d layers, %.1f MB of bf16 weights)",
             out_dir, cfg.num_layers, nbytes / 1e6)
    return out_dir


# ---- cache -------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Where the default model lives: `cache_dir`, else $KLOTSKI_JAX_CACHE, else the XDG cache."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if env := os.environ.get("KLOTSKI_JAX_CACHE"):
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(xdg).expanduser() / "klotski-jax"


def recipe() -> dict[str, Any]:
    """Everything that determines the default model's bytes; stored as the cache stamp."""
    import tokenizers

    from klotski_jax import __version__

    return {"recipe_version": RECIPE_VERSION, "klotski_jax": __version__, "seed": SEED,
            "tokenizers": tokenizers.__version__,
            "hf_config": HF_CONFIG, "special_tokens": list(SPECIAL_TOKENS),
            "vocab_size": VOCAB_SIZE, "corpus_sha256": _corpus_sha256(),
            "numpy": np.__version__.split(".")[0]}


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


def default_checkpoint(cache_dir: str | os.PathLike[str] | None = None,
                       rebuild: bool = False) -> pathlib.Path:
    """The converted klotski-jax checkpoint of the default model, built on first use.

    Returns `<cache>/default`. Builds `<cache>/default-hf` (the HF checkpoint) and converts it when
    either is missing, was built by a different recipe, or `rebuild` is set. Takes a few seconds.
    """
    from klotski_jax.checkpoints.convert import convert

    root = cache_root(cache_dir)
    hf_dir, ckpt_dir = root / "default-hf", root / "default"
    want = recipe()
    with _locked(root):
        if rebuild or not _stamp_ok(hf_dir, want):
            log.info("building the default HF checkpoint in %s", hf_dir)
            shutil.rmtree(hf_dir, ignore_errors=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            build_default_hf_checkpoint(hf_dir)
            _write_json(hf_dir / STAMP_NAME, want)
        if rebuild or not _stamp_ok(ckpt_dir, want):
            log.info("converting %s -> %s", hf_dir, ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # whatever is there is stale or partial
            convert(hf_dir, ckpt_dir, progress=False)
            _write_json(ckpt_dir / STAMP_NAME, want)
    return ckpt_dir
