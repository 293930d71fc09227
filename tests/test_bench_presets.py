"""scripts/make_bench_model.py: every preset maps to the ModelConfig its docstring promises, and a
shrunken DeepSeek preset is written, converted and run end to end.

The presets are benchmark-sized (up to 12 GB), so the shape test only maps their config.json
through `ModelConfig.from_hf_config` and counts bytes; the end-to-end test keeps deepseek-mini's
architecture (MLA with q_lora, yarn, V3's router) at toy sizes.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

from klotski_jax.config import Attn, Family, ModelConfig, ScoreFunc, TopkMethod
from klotski_jax.models.specs import total_bytes

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_bench_model.py"


@pytest.fixture(scope="module")
def mbm() -> ModuleType:
    """The script, imported as a module."""
    spec = importlib.util.spec_from_file_location("make_bench_model", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# preset -> (family, hidden, experts, top_k, expert MB, GB in bf16 at the default layers)
EXPECTED = {
    "mixtral-8x7b": (Family.MIXTRAL, 4096, 8, 2, 352.3, 12.13),
    "cpu-mid": (Family.MIXTRAL, 1024, 8, 2, 11.0, 1.15),
    "mid16": (Family.MIXTRAL, 512, 8, 2, 5.5, 0.74),
    "tiny": (Family.MIXTRAL, 256, 8, 2, 0.7, 0.03),
    "deepseek-v2-lite": (Family.DEEPSEEK_V2, 2048, 64, 6, 17.3, 4.51),
    "deepseek-mini": (Family.DEEPSEEK_V3, 512, 64, 8, 1.4, 0.94),
}


def test_every_preset_is_listed(mbm: ModuleType) -> None:
    assert set(mbm.PRESETS) == set(EXPECTED)
    for preset in EXPECTED:
        assert f"  {preset} " in mbm.__doc__, f"{preset} has no line in the docstring"


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_shapes(mbm: ModuleType, preset: str) -> None:
    family, hidden, experts, top_k, expert_mb, gb = EXPECTED[preset]
    hf = mbm.hf_config(preset)
    cfg = ModelConfig.from_hf_config(hf)
    assert (cfg.family, cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.dtype) == (
        family, hidden, experts, top_k, "bfloat16")
    assert cfg.expert_bytes / 1e6 == pytest.approx(expert_mb, abs=0.1)
    assert mbm.weight_bytes(hf) == total_bytes(cfg)  # the shards hold exactly the specs' bytes
    assert mbm.weight_bytes(hf) / 1e9 == pytest.approx(gb, abs=0.01)
    assert ModelConfig.from_hf_config(mbm.hf_config(preset, layers=2)).num_layers == 2
    routers = [(k, dt) for t in mbm.shards(mbm.hf_config(preset, layers=2)).values()
               for k, _, dt in t if ".gate.weight" in k or "correction_bias" in k]
    want = "float32" if cfg.router_fp32 else "bfloat16"
    assert routers and all(dt == want for _, dt in routers), routers


def test_deepseek_presets_are_their_models(mbm: ModuleType) -> None:
    """DeepSeek-V2-Lite's real layer shapes; deepseek-mini with V3's router, q_lora, yarn."""
    lite = ModelConfig.from_hf_config(mbm.hf_config("deepseek-v2-lite"))
    assert lite.attention is Attn.MLA and lite.q_lora_rank == 0
    assert (lite.num_heads, lite.kv_lora_rank, lite.qk_nope_head_dim, lite.qk_rope_head_dim,
            lite.v_head_dim) == (16, 512, 128, 64, 128)
    assert (lite.expert_intermediate_size, lite.shared_expert_intermediate_size,
            lite.dense_intermediate_size, lite.vocab_size) == (1408, 2 * 1408, 10944, 102400)
    assert lite.moe_layers == (False, True, True, True)
    assert (lite.score_func, lite.topk_method, lite.routed_scaling_factor,
            lite.norm_topk_prob) == (ScoreFunc.SOFTMAX, TopkMethod.GREEDY, 1.0, False)
    mini = ModelConfig.from_hf_config(mbm.hf_config("deepseek-mini"))
    assert mini.attention is Attn.MLA and mini.q_lora_rank > 0
    assert (mini.score_func, mini.topk_method, mini.router_bias, mini.norm_topk_prob,
            mini.routed_scaling_factor) == (ScoreFunc.SIGMOID, TopkMethod.NOAUX_TC, True, True,
                                            2.5)
    assert (mini.n_group, mini.topk_group) == (8, 4)
    assert mini.rope_type == "yarn" and mini.rope_factor == 40
    assert mini.moe_layers[0] is False and all(mini.moe_layers[1:])
    assert mini.shared_expert_intermediate_size == mini.expert_intermediate_size


def _tiny_deepseek_mini(mbm: ModuleType) -> dict:
    """deepseek-mini's config.json (MLA with q_lora, yarn, V3's router) at toy sizes."""
    return {**mbm.hf_config("deepseek-mini", layers=2), "hidden_size": 64,
          "intermediate_size": 96, "moe_intermediate_size": 32, "num_attention_heads": 2,
          "num_key_value_heads": 2, "n_routed_experts": 16, "num_experts_per_tok": 4,
          "n_group": 4, "topk_group": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
          "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "vocab_size": 128}


def test_deepseek_mini_writes_and_converts(mbm: ModuleType, tmp_path: pathlib.Path) -> None:
    """Written in shards (router and correction bias float32, the bias small and not zero,
    norms one), accepted by the converter, and loaded as a model with finite logits."""
    import klotski_jax
    from klotski_jax.checkpoints.manifest import read_manifest

    hf = _tiny_deepseek_mini(mbm)
    total = mbm.write_checkpoint(tmp_path / "hf", hf, seed=1)
    assert total == mbm.weight_bytes(hf)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # globals + one shard per layer
    ckpt = klotski_jax.convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    tensors = read_manifest(ckpt)["tensors"]
    assert tensors["layers.1.moe.router.weight"]["dtype"] == "float32"
    assert tensors["layers.1.moe.router.bias"]["dtype"] == "float32"
    from safetensors.numpy import load_file

    layer1 = load_file(tmp_path / "hf" / index["weight_map"]["model.layers.1.mlp.gate.weight"])
    bias = layer1["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == np.float32 and 0 < bias.std() < 0.05
    assert layer1["model.layers.1.mlp.gate.weight"].dtype == np.float32
    norm = layer1["model.layers.1.self_attn.kv_a_layernorm.weight"].astype(np.float32)
    assert (norm == 1).all()
    ids = np.array([[5, 6, 7, 8]], np.int32)
    logits = np.asarray(klotski_jax.load(ckpt).logits(ids, np.ones_like(ids)))
    assert logits.shape == (1, 4, 128) and np.isfinite(logits).all()


@pytest.mark.slow
def test_deepseek_mini_generates_under_a_budget(mbm: ModuleType, tmp_path: pathlib.Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The converted toy deepseek-mini streams through `klotski generate` at a 60% budget
    (its minimum: the toy sizes make the embedding and dense layer a large share)."""
    from cli_helpers import run_cli

    import klotski_jax

    mbm.write_checkpoint(tmp_path / "hf", _tiny_deepseek_mini(mbm))
    ckpt = klotski_jax.convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_token_ids": [5, 6, 7]}\n{"prompt_token_ids": [9, 10]}\n')
    out = tmp_path / "out.jsonl"
    rc, _, err = run_cli(["generate", str(ckpt), "--input", str(prompts), "--output", str(out),
                          "--max-new-tokens", "3", "--device-budget", "60%", "-q"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [3, 3]
