"""The embedded default model: deterministic, a valid HF Mixtral checkpoint, shaped by the specs.

The checkpoint is built once per module (about a second); transformers loads it offline.
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_dtypes  # noqa: F401  (registers bfloat16 before safetensors reads bf16 as numpy)
import numpy as np
import pytest
from safetensors import safe_open

from klotski_jax.checkpoints import default_model
from klotski_jax.checkpoints.default_model import build_default_hf_checkpoint, hf_tensors
from klotski_jax.config import ModelConfig
from klotski_jax.models.specs import Kind, layer_specs, total_bytes


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_default_hf_checkpoint(tmp_path_factory.mktemp("default") / "hf")


@pytest.fixture(scope="module")
def cfg(hf_dir: pathlib.Path) -> ModelConfig:
    return ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))


def test_build_is_deterministic(hf_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = build_default_hf_checkpoint(tmp_path / "again")
    names = sorted(p.name for p in hf_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (hf_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_shape_matches_the_brief(cfg: ModelConfig, hf_dir: pathlib.Path) -> None:
    assert cfg.num_layers >= 8 and cfg.num_experts == 8 and cfg.top_k == 2
    assert cfg.dtype == "bfloat16"
    assert 30e6 <= (hf_dir / "model.safetensors").stat().st_size <= 60e6
    # Like Mixtral-8x7B on a 24 GB GPU: 25% of the weights holds a few whole layers, not all.
    layer_bytes = sum(s.size for s in layer_specs(cfg, 0)) * cfg.itemsize
    whole_layers = (total_bytes(cfg) // 4) // layer_bytes
    assert 2 <= whole_layers < cfg.num_layers // 2
    assert total_bytes(cfg, Kind.EXPERT) > 0.85 * total_bytes(cfg)


def test_weights_follow_weight_specs(cfg: ModelConfig, hf_dir: pathlib.Path) -> None:
    expected = dict(hf_tensors(cfg))
    with safe_open(hf_dir / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(expected)
        for key, shape in expected.items():
            t = f.get_tensor(key)
            assert t.shape == shape, key
            assert t.dtype == np.dtype("bfloat16"), key
        norm = f.get_tensor("model.norm.weight").astype(np.float32)
        w1 = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    np.testing.assert_array_equal(norm, 1.0)
    assert abs(float(w1.astype(np.float32).std()) - 0.02) < 0.002


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


def test_build_refuses_existing_dir_and_cleans_up_on_failure(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        build_default_hf_checkpoint(tmp_path / "exists")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_default_hf_checkpoint(tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no partial or temp dirs


def test_default_checkpoint_caches_and_rebuilds_on_recipe_change(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = default_model.default_checkpoint(tmp_path)
    assert ckpt == tmp_path / "default" and (ckpt / "manifest.json").is_file()
    stamp = ckpt / default_model.STAMP_NAME
    first = stamp.stat().st_mtime_ns
    assert default_model.default_checkpoint(tmp_path) == ckpt
    assert stamp.stat().st_mtime_ns == first  # reused, not rebuilt

    monkeypatch.setattr(default_model, "RECIPE_VERSION", default_model.RECIPE_VERSION + 1)
    default_model.default_checkpoint(tmp_path)
    assert json.loads(stamp.read_text())["recipe_version"] == default_model.RECIPE_VERSION

    monkeypatch.setenv("KLOTSKI_JAX_CACHE", str(tmp_path / "env"))
    assert default_model.cache_root() == tmp_path / "env"


def test_converted_default_matches_hf(hf_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The demo's model is the HF model: float32 logits agree on a left-padded text batch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import klotski_jax

    model = klotski_jax.load(klotski_jax.convert(hf_dir, tmp_path / "ckpt", dtype="float32",
                                                 progress=False))
    assert model.tokenizer is not None
    batch = model.tokenizer(["Hi.", "The with statement is used to wrap a block"],
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


def test_demo_runs(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from klotski_jax.demo import PROMPTS, run_demo

    result = run_demo(cache_dir=tmp_path, max_new_tokens=3)
    assert result["checkpoint"] == str(tmp_path / "default")
    assert len(result["continuations"]) == len(PROMPTS) == result["batch"]
    assert result["generated_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert PROMPTS[0] in out and f"rm -rf {tmp_path}" in out


def test_compare_hf_speed_script(hf_dir: pathlib.Path, tmp_path: pathlib.Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/compare_hf_speed.py runs end to end and writes its JSON and markdown."""
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
