"""The embedded default model: the trained checkpoint shipped in the package.

It is a valid HF Mixtral checkpoint of the promised shape and size, loads in transformers and in
our engine with the same logits, has learnt its corpus (its model card's numbers are the ones in
its training log), and `default_checkpoint` caches its conversion. The exporter the training
script uses writes exactly what the converter reads back.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import ml_dtypes  # noqa: F401  (registers bfloat16 before safetensors reads bf16 as numpy)
import numpy as np
import pytest
from safetensors import safe_open

from klotski_jax.checkpoints import default_model
from klotski_jax.checkpoints.default_model import (
    hf_tensors,
    packaged_checkpoint_dir,
    write_hf_checkpoint,
)
from klotski_jax.config import ModelConfig
from klotski_jax.models.specs import Kind, layer_specs, total_bytes

MAX_BYTES = 25_000_000


@pytest.fixture(scope="module")
def hf_dir() -> pathlib.Path:
    return packaged_checkpoint_dir()


@pytest.fixture(scope="module")
def cfg(hf_dir: pathlib.Path) -> ModelConfig:
    return ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def record(hf_dir: pathlib.Path) -> dict:
    return json.loads((hf_dir / "training_log.json").read_text())


@pytest.fixture(scope="module")
def converted(hf_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    import klotski_jax

    return klotski_jax.convert(hf_dir, tmp_path_factory.mktemp("f32") / "ckpt", dtype="float32",
                               progress=False)


def test_packaged_files_and_size(hf_dir: pathlib.Path) -> None:
    names = {p.name for p in hf_dir.iterdir()}
    assert set(default_model.HF_FILES) | {"README.md", "training_log.json"} <= names
    assert sum(p.stat().st_size for p in hf_dir.iterdir()) < MAX_BYTES


def test_shape_matches_the_brief(cfg: ModelConfig) -> None:
    assert cfg.num_layers >= 8 and cfg.num_experts == 8 and cfg.top_k == 2
    assert cfg.dtype == "bfloat16" and 1000 <= cfg.vocab_size <= 8192
    # Like Mixtral-8x7B on a 24 GB GPU: 25% of the weights holds a few whole layers, not all.
    layer_bytes = sum(s.size for s in layer_specs(cfg, 0)) * cfg.itemsize
    whole_layers = (total_bytes(cfg) // 4) // layer_bytes
    assert 2 <= whole_layers < cfg.num_layers // 2
    assert total_bytes(cfg, Kind.EXPERT) > 0.8 * total_bytes(cfg)


def test_weights_follow_weight_specs(cfg: ModelConfig, hf_dir: pathlib.Path) -> None:
    expected = dict(hf_tensors(cfg))
    with safe_open(hf_dir / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(expected)
        for key, shape in expected.items():
            t = f.get_tensor(key)
            assert t.shape == shape and t.dtype == np.dtype("bfloat16"), key
            assert np.isfinite(t.astype(np.float32)).all(), key
        norm = f.get_tensor("model.norm.weight").astype(np.float32)
    assert np.abs(norm - 1).max() > 0.05  # trained, not the init


def test_loads_in_transformers(hf_dir: pathlib.Path, cfg: ModelConfig) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    model, info = transformers.MixtralForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == cfg.num_layers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tok) == cfg.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.padding_side == "left"
    text = "Mixture-of-experts: def f(x): return x ** 2  # Ünïcödé ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_converted_default_matches_hf(hf_dir: pathlib.Path, converted: pathlib.Path) -> None:
    """The shipped model in our engine is the HF model: float32 logits agree on a left-padded
    text batch (the parity tests' tolerance)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import klotski_jax

    model = klotski_jax.load(converted)
    assert model.tokenizer is not None
    batch = model.tokenizer(["Hi.", "The with statement is used to wrap the execution of a block"],
                            padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0, 0] == 0  # left-padded
    ours = model.logits(ids, attention_mask=mask)

    hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    real = mask > 0
    np.testing.assert_allclose(ours[real], ref[real], rtol=0,
                               atol=1e-4 * float(np.abs(ref[real]).max()))


def test_it_has_learnt_python_documentation(converted: pathlib.Path, record: dict) -> None:
    """Far better than chance on held-out language-reference text, and the log says so too."""
    from pydoc_data.topics import topics

    import klotski_jax

    model = klotski_jax.load(converted)
    val_topics = [d.removeprefix("topic:") for d in record["corpus"]["val_ids"]
                  if d.startswith("topic:")]
    assert val_topics, "the validation split holds some pydoc topics"
    ids = np.array([model.tokenizer(topics[val_topics[0]][:2000])["input_ids"][:129]], np.int32)
    logits = model.logits(ids[:, :-1])[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -float(np.mean(logp[np.arange(128), ids[0, 1:]]))
    chance = math.log(model.config.vocab_size)  # nats per token of a uniform guess (~8)
    assert nll < 0.8 * chance
    assert record["export"]["val_loss"] < 0.7 * chance
    assert record["evals"][-1]["val_loss"] < record["evals"][0]["val_loss"] - 2.5


def test_model_card_numbers_come_from_the_log(hf_dir: pathlib.Path, record: dict) -> None:
    card = (hf_dir / "README.md").read_text()
    e = record["export"]
    for number in (f"{e['train_loss']:.3f}", f"{e['val_loss']:.3f}", f"{e['val_ppl']:.1f}",
                   f"{e['routing']['top2_share'][0]:.1%}", str(record["steps_run"])):
        assert number in card, number
    assert record["command"] in card
    assert len(record["steps"]) == record["steps_run"] == record["options"]["steps"]
    assert e["safetensors_bytes"] == (hf_dir / "model.safetensors").stat().st_size
    assert record["reproducibility"]["max_abs_loss_diff"] < 1e-3


def test_default_checkpoint_caches_and_rebuilds_on_recipe_change(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = default_model.default_checkpoint(tmp_path)
    assert ckpt == tmp_path / "default" and (ckpt / "manifest.json").is_file()
    assert (tmp_path / "default-hf" / "model.safetensors").read_bytes() == (
        packaged_checkpoint_dir() / "model.safetensors").read_bytes()
    stamp = ckpt / default_model.STAMP_NAME
    first = stamp.stat().st_mtime_ns
    assert default_model.default_checkpoint(tmp_path) == ckpt
    assert stamp.stat().st_mtime_ns == first  # reused, not rebuilt

    monkeypatch.setattr(default_model, "RECIPE_VERSION", default_model.RECIPE_VERSION + 1)
    default_model.default_checkpoint(tmp_path)
    assert json.loads(stamp.read_text())["recipe_version"] == default_model.RECIPE_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "default", "default-hf"]

    monkeypatch.setenv("KLOTSKI_JAX_CACHE", str(tmp_path / "env"))
    assert default_model.cache_root() == tmp_path / "env"


def test_old_random_model_cache_is_rebuilt(tmp_path: pathlib.Path) -> None:
    """A cache stamped by the random-weights recipe (version 1) is replaced, not reused."""
    for name in ("default-hf", "default"):
        (tmp_path / name).mkdir()
        (tmp_path / name / default_model.STAMP_NAME).write_text(json.dumps({"recipe_version": 1}))
    ckpt = default_model.default_checkpoint(tmp_path)
    assert (ckpt / "manifest.json").is_file()
    assert json.loads((ckpt / default_model.STAMP_NAME).read_text()) == default_model.recipe()


def test_write_hf_checkpoint_round_trips(tmp_path: pathlib.Path, hf_dir: pathlib.Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What the exporter writes, the converter reads back (bf16-rounded), key for key."""
    import klotski_jax
    from klotski_jax.checkpoints.store import CheckpointReader
    from klotski_jax.models.training import init_params

    hf = {**json.loads((hf_dir / "config.json").read_text()), "num_hidden_layers": 2,
          "hidden_size": 16, "intermediate_size": 8, "head_dim": 4, "vocab_size": 64,
          "tie_word_embeddings": False}
    cfg = ModelConfig.from_hf_config(hf)
    params = {k: np.asarray(v) for k, v in init_params(cfg.replace(dtype="float32"), 0).items()}
    out = write_hf_checkpoint(tmp_path / "hf", hf, params, hf_dir)
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by all
    back = CheckpointReader(klotski_jax.convert(out, tmp_path / "ckpt", progress=False)).read_all()
    assert set(back) == set(params)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value.astype(np.dtype("bfloat16")), name)

    with pytest.raises(FileExistsError):
        write_hf_checkpoint(out, hf, params, hf_dir)
    with pytest.raises(ValueError, match="missing"):
        write_hf_checkpoint(tmp_path / "partial", hf, {"embed": params["embed"]}, hf_dir)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_checkpoint(tmp_path / "failed", hf, params, hf_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no partial or temp


def test_demo_runs(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from klotski_jax.demo import PROMPTS, run_demo

    result = run_demo(cache_dir=tmp_path, max_new_tokens=3)
    assert result["checkpoint"] == str(tmp_path / "default")
    assert len(result["continuations"]) == len(PROMPTS) == result["batch"]
    assert all(c.strip() for c in result["continuations"])
    assert result["generated_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert PROMPTS[0] in out and f"rm -rf {tmp_path}" in out and "trained" in out


def test_compare_hf_speed_script(hf_dir: pathlib.Path, tmp_path: pathlib.Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/compare_hf_speed.py runs end to end on the default model."""
    pytest.importorskip("torch")
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_hf_speed.py"
    spec = importlib.util.spec_from_file_location("compare_hf_speed", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up
    spec.loader.exec_module(script)
    assert script.main(["--hf-dir", str(hf_dir), "--dtype", "float32", "--batch", "2",
                        "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1",
                        "--out-dir", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("compare_hf_speed-*.json")
    (result,) = json.loads(report_path.read_text())["results"]
    assert result["token_agreement"] == 1.0  # float32: the same greedy tokens as HF
    assert result["ours"]["decode_tokens_per_s"] > 0 and result["hf_torch"]["decode_tokens_per_s"] > 0
    assert "| float32 |" in report_path.with_suffix(".md").read_text()
