"""Conversion HF safetensors -> klotski-jax checkpoint, and reading it back.

Every family config of `hf_models.CONFIGS` is saved as one file and sharded, converted, and every
stored array is compared bit-exactly with the HF model's own state dict (transformers 5 keeps the
experts fused in memory, so the expected expert arrays come from a different layout than the
per-expert tensors on disk). Every converter error is exercised through the CLI.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import hf_models
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from safetensors.numpy import load_file, save_file

from klotski_jax import cli
from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints import store
from klotski_jax.checkpoints.convert import convert
from klotski_jax.checkpoints.errors import (
    ConversionError,
    CorruptFileError,
    ManifestError,
    OutputExistsError,
)
from klotski_jax.checkpoints.safetensors_io import SafetensorsFile
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import SUPPORTED_MODEL_TYPES, ModelConfig
from klotski_jax.models.families import TensorSource, hf_sources
from klotski_jax.models.specs import Kind, weight_specs

NAMES = sorted(hf_models.CONFIGS)


# ---- fixtures and helpers ---------------------------------------------------------------------

class HFCache:
    """Tiny HF models built once per module, saved single-file, sharded and fused."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._models: dict[str, object] = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = hf_models.make_hf_model(name)
        return self._models[name]

    def saved(self, name: str, layout: str) -> pathlib.Path:
        path = self.root / f"{name}-{layout}"
        if not path.exists():
            model = self.model(name)
            if layout == "single":
                model.save_pretrained(path)
            elif layout == "sharded":
                model.save_pretrained(path, max_shard_size="30KB")
            else:
                hf_models.save_fused_hf_model(model, path)
        return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFCache:
    return HFCache(tmp_path_factory.mktemp("hf"))


def expected_arrays(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every array of weight_specs(cfg) taken from the HF model's (fused) state dict."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    for spec in weight_specs(cfg):
        src = hf_sources(cfg)[spec.name]
        if isinstance(src, TensorSource):
            out[spec.name] = sd[next(k for k in src.keys if k in sd)]
            continue
        fused = sd[next(k for k in src.fused if k in sd)]
        if src.fused_half is not None:
            i = cfg.expert_intermediate_size
            fused = fused[:, src.fused_half * i:(src.fused_half + 1) * i]
        out[spec.name] = fused
    return out


def assert_bits_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert g.tobytes() == np.ascontiguousarray(w).tobytes(), name


def run_cli(*args: str) -> int:
    return cli.main(["convert", *map(str, args), "-q"])


def assert_nothing_left(out: pathlib.Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


# ---- conversion equals the HF weights ---------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("name", NAMES)
def test_convert_matches_hf(hf: HFCache, tmp_path, name: str, layout: str) -> None:
    src = hf.saved(name, layout)
    if layout == "sharded":
        assert (src / "model.safetensors.index.json").exists()
    out = convert(src, tmp_path / "ckpt", progress=False)
    assert out == (tmp_path / "ckpt").absolute()
    reader = CheckpointReader(out)
    hf_config = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_hf_config(hf_config)
    m = reader.manifest
    assert (m["format"], m["format_version"], m["family"]) == ("klotski-jax", 2, cfg.family.value)
    assert m["config"] == cfg.to_dict() and reader.config == cfg
    assert m["hf_config"] == hf_config and m["dtype"] == "float32"
    assert m["source"] == str(src.resolve()) and m["created_by"].startswith("klotski-jax ")
    assert list(m["tensors"]) == [s.name for s in weight_specs(cfg)]
    assert_bits_equal(reader.read_all(), expected_arrays(hf.model(name), cfg))


@pytest.mark.parametrize("name", NAMES)
def test_convert_bfloat16(hf: HFCache, tmp_path, name: str) -> None:
    out = convert(hf.saved(name, "single"), tmp_path / "ckpt", dtype="bfloat16", progress=False)
    reader = CheckpointReader(out)
    cfg = reader.config
    assert cfg.dtype == reader.manifest["dtype"] == "bfloat16"
    # Every array in bfloat16 but DeepSeek's and GLM's routers, float32 as HF keeps them.
    stored = {s.name: s.stored_dtype(cfg) for s in weight_specs(cfg)}
    assert {n: t["dtype"] for n, t in reader.manifest["tensors"].items()} == stored
    assert set(stored.values()) == ({"bfloat16", "float32"} if cfg.router_fp32 else {"bfloat16"})
    want = {k: v.astype(ml_dtypes.bfloat16 if stored[k] == "bfloat16" else np.float32)
            for k, v in expected_arrays(hf.model(name), cfg).items()}
    assert_bits_equal(reader.read_all(), want)


@pytest.mark.parametrize("name", NAMES)
def test_fused_layout_equals_per_expert(hf: HFCache, tmp_path, name: str) -> None:
    fused = hf.saved(name, "fused")
    with SafetensorsFile(fused / "model.safetensors") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.tensors)
    a = CheckpointReader(convert(fused, tmp_path / "fused", progress=False)).read_all()
    b = CheckpointReader(convert(hf.saved(name, "single"), tmp_path / "per", progress=False))
    assert_bits_equal(a, b.read_all())


def test_tied_lm_head_in_file_is_ignored(hf: HFCache, tmp_path) -> None:
    model = hf.model("mixtral-odd")
    assert model.config.tie_word_embeddings
    hf_models.save_fused_hf_model(model, tmp_path / "hf", keep_tied_head=True)
    reader = CheckpointReader(convert(tmp_path / "hf", tmp_path / "ckpt", progress=False))
    assert "lm_head" not in reader.manifest["tensors"]
    assert_bits_equal(reader.read_all(), expected_arrays(model, reader.config))


def test_expert_chunk_file_is_raw_expert_bytes(hf: HFCache, tmp_path) -> None:
    src = hf.saved("qwen3_moe", "single")
    reader = CheckpointReader(convert(src, tmp_path / "ckpt", progress=False))
    disk = load_file(str(src / "model.safetensors"))  # the reference safetensors reader
    cfg = reader.config
    for layer in cfg.moe_layer_ids:
        for part, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            for e in range(cfg.num_experts):
                raw = reader.expert_chunk_path(layer, part, e).read_bytes()
                want = disk[f"model.layers.{layer}.mlp.experts.{e}.{hf_name}.weight"]
                assert raw == want.astype("<f4").tobytes()
                assert raw == reader.expert(layer, part, e).tobytes()
    zarr = json.loads((reader.path / "experts/layers.1.moe.experts.up/zarr.json").read_text())
    assert zarr["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [
        1, cfg.expert_intermediate_size, cfg.hidden_size]


def test_reader_api_and_tokenizer(hf: HFCache, tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tmp_path / "hf"
    shutil.copytree(hf.saved("mixtral", "single"), src)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(src)
    reader = CheckpointReader(convert(src, tmp_path / "ckpt", progress=False))
    cfg = reader.config
    assert reader.tokenizer_dir == reader.path / "tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "config.json"} <= set(reader.manifest["tokenizer_files"])
    loaded = AutoTokenizer.from_pretrained(str(reader.tokenizer_dir), local_files_only=True)
    assert loaded("hello world")["input_ids"][-2:] == [3, 4]
    dense = reader.all_dense()
    assert set(dense) == {s.name for s in weight_specs(cfg) if s.kind is Kind.DENSE}
    np.testing.assert_array_equal(reader.dense("layers.1.attn.q"), dense["layers.1.attn.q"])
    experts = reader.experts(2)
    assert experts["down"].shape == (cfg.num_experts, cfg.hidden_size,
                                     cfg.expert_intermediate_size)
    np.testing.assert_array_equal(reader.expert(2, "down", 3), experts["down"][3])
    with pytest.raises(KeyError):
        reader.dense("layers.0.moe.experts.gate")
    with pytest.raises(IndexError):
        reader.expert(0, "gate", cfg.num_experts)


def test_relative_paths_with_dotdot(hf: HFCache, tmp_path, monkeypatch) -> None:
    # TensorStore rejects file paths with ".." components; the converter normalises them.
    shutil.copytree(hf.saved("olmoe", "single"), tmp_path / "hf")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    out = convert("../hf", "../sub/../ckpt", progress=False)
    assert out == tmp_path / "ckpt"
    reader = CheckpointReader("../ckpt")
    assert reader.path == tmp_path / "ckpt" and reader.manifest["source"] == str(tmp_path / "hf")
    assert reader.expert(0, "gate", 1).shape == (24, 32)


def test_no_tokenizer_dir_without_tokenizer(hf: HFCache, tmp_path) -> None:
    reader = CheckpointReader(convert(hf.saved("olmoe", "single"), tmp_path / "c", progress=False))
    assert reader.tokenizer_dir is None
    assert reader.manifest["tokenizer_files"] == ["generation_config.json"]


# ---- errors through the CLI -------------------------------------------------------------------

def _rewrite(path: pathlib.Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _patch_header(path: pathlib.Path, edit) -> None:
    """Rewrite the JSON header of a safetensors file (keeping its padded length)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n:])


L0 = "model.layers.0.block_sparse_moe."
ST = "model.safetensors"
IDX = "model.safetensors.index.json"


def _shards(src: pathlib.Path) -> list[pathlib.Path]:
    return sorted(src.glob("model-*.safetensors"))


def _add_duplicate(src: pathlib.Path) -> list[str]:
    first, second = _shards(src)[:2]
    key = sorted(load_file(str(first)))[0]
    _rewrite(second, lambda t: t.update({key: load_file(str(first))[key]}))
    return [key, first.name, second.name]


def _drop_shard(src: pathlib.Path) -> list[str]:
    shard = _shards(src)[1]
    shard.unlink()
    return [shard.name, "model.safetensors.index.json"]


def _unmapped(s: pathlib.Path) -> list[str]:
    _rewrite(s / ST, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    return ["model.layers.0.extra.weight", ST, "not used"]


def _missing_dense(s: pathlib.Path) -> list[str]:
    _rewrite(s / ST, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    return ["model.layers.1.self_attn.k_proj.weight", ST, "missing"]


def _missing_expert(s: pathlib.Path) -> list[str]:
    _rewrite(s / ST, lambda t: t.pop(L0 + "experts.2.w1.weight"))
    return [L0 + "experts.2.w1.weight", ST, "missing"]


def _missing_layer_experts(s: pathlib.Path) -> list[str]:
    _rewrite(s / ST, lambda t: [t.pop(f"{L0}experts.{e}.w3.weight") for e in range(4)])
    return [L0 + "experts.0.w3.weight", "gate_up_proj", ST, "missing"]


def _shape(s: pathlib.Path) -> list[str]:
    key = "model.layers.2.self_attn.q_proj.weight"
    _rewrite(s / ST, lambda t: t.update({key: np.zeros((32, 31), np.float32)}))
    return [key, ST, "(32, 31)", "(32, 32)"]


def _int_dtype(s: pathlib.Path) -> list[str]:
    _rewrite(s / ST, lambda t: t.update({"model.norm.weight": np.zeros(32, np.int32)}))
    return ["model.norm.weight", ST, "I32"]


def _bytes_case(edit, *words: str):
    """A case that rewrites model.safetensors' raw bytes with `edit`."""
    def mutate(s: pathlib.Path) -> list[str]:
        (s / ST).write_bytes(edit((s / ST).read_bytes()))
        return [ST, *words]
    return mutate


def _bad_offsets(s: pathlib.Path) -> list[str]:
    _patch_header(s / ST, lambda h: h["model.norm.weight"].update(shape=[33]))
    return [ST, "model.norm.weight", "data bytes"]


def _bad_index(s: pathlib.Path) -> list[str]:
    (s / IDX).write_text("{")
    return [IDX]


def _index_lies(s: pathlib.Path) -> list[str]:
    first = _shards(s)[0].name
    weight_map = json.loads((s / IDX).read_text())["weight_map"]
    (s / IDX).write_text(json.dumps({"weight_map": dict.fromkeys(weight_map, first)}))
    return [IDX, first, "does not contain"]


def _edit_config(s: pathlib.Path, **changes) -> None:
    cfg = json.loads((s / "config.json").read_text())
    cfg.update(changes)
    (s / "config.json").write_text(json.dumps(cfg))


def _model_type(s: pathlib.Path) -> list[str]:
    _edit_config(s, model_type="llama")
    return ["config.json", "llama", *SUPPORTED_MODEL_TYPES]


def _config_feature(s: pathlib.Path) -> list[str]:
    _edit_config(s, hidden_act="gelu")
    return ["config.json", "hidden_act", "gelu"]


def _rope_type(s: pathlib.Path) -> list[str]:
    _edit_config(s, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0})
    return ["config.json", "dynamic"]


def _no_config(s: pathlib.Path) -> list[str]:
    (s / "config.json").unlink()
    return ["config.json"]


def _no_weights(s: pathlib.Path) -> list[str]:
    (s / ST).unlink()
    return [ST, IDX]


# case -> (layout of the base checkpoint, mutate(src) -> words the error message must contain)
ERROR_CASES = {
    "unmapped": ("single", _unmapped), "missing-dense": ("single", _missing_dense),
    "missing-expert": ("single", _missing_expert),
    "missing-layer-experts": ("single", _missing_layer_experts), "shape": ("single", _shape),
    "int-dtype": ("single", _int_dtype), "duplicate": ("sharded", _add_duplicate),
    "missing-shard": ("sharded", _drop_shard),
    "truncated": ("single", _bytes_case(lambda b: b[:-100], "truncated")),
    "trailing-bytes": ("single", _bytes_case(lambda b: b + bytes(8), "trailing")),
    "huge-header": ("single", _bytes_case(lambda b: (10**12).to_bytes(8, "little") + b[8:],
                                          "header length")),
    "tiny-file": ("single", _bytes_case(lambda b: b"abc", "too short")),
    "bad-json": ("single", _bytes_case(lambda b: b[:8] + b"[" + b[9:], "JSON")),
    "bad-offsets": ("single", _bad_offsets), "bad-index": ("sharded", _bad_index),
    "index-lies": ("sharded", _index_lies), "model-type": ("single", _model_type),
    "config-feature": ("single", _config_feature), "rope-type": ("single", _rope_type),
    "no-config": ("single", _no_config), "no-weights": ("single", _no_weights),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors(hf: HFCache, tmp_path, capsys, case: str) -> None:
    layout, mutate = ERROR_CASES[case]
    src = tmp_path / "hf"
    shutil.copytree(hf.saved("mixtral", layout), src)
    words = mutate(src)
    out = tmp_path / "ckpt"
    capsys.readouterr()  # drop the HF save progress bars
    assert run_cli(src, out) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert_nothing_left(out)


def test_existing_output_and_overwrite(hf: HFCache, tmp_path, capsys) -> None:
    src, out = hf.saved("qwen2_moe", "single"), tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert run_cli(src, out) == cli.EXIT_USER_ERROR
    assert "already exists" in capsys.readouterr().err
    assert run_cli(src, out, "--overwrite") == cli.EXIT_USER_ERROR  # not a checkpoint
    assert "not a klotski-jax checkpoint" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    shutil.rmtree(out)
    assert run_cli(src, out) == 0
    assert CheckpointReader(out).config.dtype == "float32"
    assert run_cli(src, out) == cli.EXIT_USER_ERROR
    assert run_cli(src, out, "--overwrite", "--dtype", "bfloat16") == 0
    assert CheckpointReader(out).config.dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or backup dirs
    with pytest.raises(OutputExistsError, match="HF source"):
        convert(src, src, overwrite=True, progress=False)


def test_failure_while_writing_leaves_nothing(hf: HFCache, tmp_path, monkeypatch) -> None:
    src, out = hf.saved("olmoe", "sharded"), tmp_path / "ckpt"
    convert(src, out, progress=False)
    before = (out / mf.MANIFEST_FILE).read_text()
    calls = []

    def failing_write(self, array, value):
        calls.append(1)
        if len(calls) > 20:
            raise OSError("disk full (simulated)")
        original(self, array, value)

    original = store.StoreWriter.write
    monkeypatch.setattr(store.StoreWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        convert(src, tmp_path / "new", progress=False)
    assert_nothing_left(tmp_path / "new")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        convert(src, out, dtype="bfloat16", overwrite=True, progress=False)
    assert (out / mf.MANIFEST_FILE).read_text() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- reader errors, readers and specs in isolation --------------------------------------------

def test_reader_rejects_bad_manifests(hf: HFCache, tmp_path) -> None:
    with pytest.raises(ManifestError, match="not a klotski-jax checkpoint"):
        CheckpointReader(tmp_path)
    out = convert(hf.saved("mixtral", "single"), tmp_path / "ckpt", progress=False)
    path = out / mf.MANIFEST_FILE
    good = json.loads(path.read_text())
    for change, match in (({"format": "zarr"}, "not a klotski-jax manifest"),
                          ({"format_version": mf.FORMAT_VERSION + 1}, "newer klotski-jax"),
                          ({"dtype": "bfloat16"}, "differs from the config")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConversionError, match=match):
            CheckpointReader(out)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="cannot parse"):
        CheckpointReader(out)
    path.write_text(json.dumps(good))
    reader = CheckpointReader(out)
    reader.expert_chunk_path(1, "up", 2).unlink()
    with pytest.raises(CorruptFileError, match="layers.1.moe.experts.up"):
        reader.expert(1, "up", 2)
    with pytest.raises(CorruptFileError, match="layers.1.moe.experts.up"):
        reader.experts(1)
    assert reader.expert(1, "up", 1).shape == (48, 32)


def test_safetensors_slice_reads(tmp_path) -> None:
    rng = np.random.default_rng(0)
    fused = rng.standard_normal((3, 8, 5)).astype(np.float32)
    half = rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    save_file({"fused": fused, "half": half}, str(tmp_path / "x.safetensors"))
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        np.testing.assert_array_equal(f.read("fused"), fused)
        np.testing.assert_array_equal(f.read("fused", lead=(2,), rows=(4, 8)), fused[2, 4:])
        np.testing.assert_array_equal(f.read("fused", lead=(1,)), fused[1])
        np.testing.assert_array_equal(f.read("fused", lead=(1, 3)), fused[1, 3])
        assert f.read("half").dtype == ml_dtypes.bfloat16
        assert f.read("half").tobytes() == half.tobytes()
        with pytest.raises(IndexError):
            f.read("fused", lead=(3,))


@pytest.mark.parametrize("kind", [Kind.EXPERT, Kind.DENSE])
def test_store_specs_round_trip_in_memory(kind: Kind) -> None:
    spec = store.create_spec({"driver": "memory"}, (3, 4, 2), "bfloat16", kind)
    assert json.loads(json.dumps(spec)) == spec  # plain JSON
    assert spec["metadata"]["chunk_grid"]["configuration"]["chunk_shape"] == (
        [1, 4, 2] if kind is Kind.EXPERT else [3, 4, 2])
    x = np.arange(24, dtype=np.float32).reshape(3, 4, 2).astype(ml_dtypes.bfloat16)
    arr = ts.open(spec, create=True).result()
    arr.write(x).result()
    np.testing.assert_array_equal(arr.read().result(), x)
    assert store.chunk_relpath(2) == "c/2/0/0"
