"""DeepSeek-V2/V3 and GLM-4.5-MoE pieces against HF's own code, beyond the end-to-end parity of
tests/test_models.py (which runs every config of hf_models.CONFIGS, these families included):

- the router variants (greedy / group-limited softmax, noaux_tc sigmoid with correction bias)
  against HF's router modules on many tokens and a finer group structure;
- the absorbed and expanded forms of multi-head latent attention agree, and the cost rule picks
  the absorbed one for decode at DeepSeek's shapes;
- the KV cache holds MLA's latent and rope key, not per-head keys and values;
- yarn's frequencies, attention factor and DeepSeek's softmax scale equal HF's;
- multi-token-prediction layers are skipped at conversion, and said so;
- unsupported variants are refused by `klotski convert`, naming the field;
- bfloat16 and FP8 releases keep the exactness contract through every schedule.
"""

from __future__ import annotations

import json
import logging

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import CONFIGS, make_hf_model, save_hf_model
from safetensors.numpy import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import klotski_jax
from klotski_jax import cli
from klotski_jax.checkpoints.errors import UnmappedTensorError
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import Attn, ConfigError, ModelConfig, TopkMethod
from klotski_jax.engine import Engine
from klotski_jax.models import layers
from klotski_jax.models.reference import KVCache
from klotski_jax.planning.policy import Policy


def _hf_config(name: str, **overrides) -> transformers.PretrainedConfig:
    return make_hf_model(name, **overrides).config


def _cfg(name: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_config(_hf_config(name, **overrides).to_dict())


# ---- routers ----------------------------------------------------------------------------------

ROUTERS = {
    "greedy": ("deepseek_v2", dict(n_routed_experts=16, num_experts_per_tok=6,
                                   routed_scaling_factor=1.5)),
    "group_limited_greedy": ("deepseek_v2-group", dict(n_routed_experts=16, n_group=4,
                                                       topk_group=2, num_experts_per_tok=6)),
    "noaux_tc": ("deepseek_v3", dict(n_routed_experts=16, n_group=4, topk_group=2,
                                     num_experts_per_tok=6)),
    "noaux_tc-unnormalised": ("deepseek_v3", dict(n_routed_experts=16, n_group=8, topk_group=3,
                                                  num_experts_per_tok=5, norm_topk_prob=False)),
    "glm": ("glm4_moe", dict(n_routed_experts=16, n_group=2, topk_group=1,
                             num_experts_per_tok=4)),
}


@pytest.mark.parametrize("variant", sorted(ROUTERS))
def test_router_matches_hf(variant: str) -> None:
    name, overrides = ROUTERS[variant]
    hf = make_hf_model(name, num_hidden_layers=1, first_k_dense_replace=0, **overrides)
    gate = hf.model.layers[0].mlp.gate
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    assert cfg.topk_method is TopkMethod(getattr(hf.config, "topk_method", None) or "noaux_tc")
    x = torch.randn(200, cfg.hidden_size)
    with torch.no_grad():
        logits, want_w, want_idx = gate(x)
    bias = getattr(gate, "e_score_correction_bias", None)
    w, idx = layers.route(jnp.asarray(logits.numpy()), cfg,
                          None if bias is None else jnp.asarray(bias.numpy()))
    w, idx = np.asarray(w), np.asarray(idx)
    order, want_order = np.argsort(idx, -1), np.argsort(want_idx.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(idx, order, -1),
                                  np.take_along_axis(want_idx.numpy(), want_order, -1))
    np.testing.assert_allclose(np.take_along_axis(w, order, -1),
                               np.take_along_axis(want_w.numpy(), want_order, -1),
                               rtol=1e-6, atol=1e-7)
    if cfg.topk_method is not TopkMethod.GREEDY:  # only topk_group groups were used
        groups = idx // (cfg.num_experts // cfg.n_group)
        assert max(len(set(row)) for row in groups.tolist()) <= cfg.topk_group


# ---- multi-head latent attention --------------------------------------------------------------

def test_absorbed_and_expanded_latent_attention_agree() -> None:
    cfg = _cfg("deepseek_v3")
    b, t, s, h = 2, 3, 9, cfg.num_heads
    n, r, lat = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q_nope = jax.random.normal(keys[0], (b, t, h, n))
    q_rope = jax.random.normal(keys[1], (b, t, h, r))
    latent = jax.random.normal(keys[2], (b, s, 1, lat))
    k_rope = jax.random.normal(keys[3], (b, s, 1, r))
    w = 0.3 * jax.random.normal(keys[4], (h * (n + cfg.v_head_dim), lat))
    valid = np.ones((b, s), bool)
    valid[1, :4] = False  # left padding
    mask = layers.attention_mask(jnp.int32(s - t), t, jnp.asarray(valid), None)
    attend = jax.jit(layers.mla_attend, static_argnames=("cfg", "absorb"))
    absorbed = attend(q_nope, q_rope, latent, k_rope, w, mask, cfg, absorb=True)
    expanded = attend(q_nope, q_rope, latent, k_rope, w, mask, cfg, absorb=False)
    assert absorbed.shape == (b, t, h * cfg.v_head_dim)
    np.testing.assert_allclose(absorbed, expanded, rtol=1e-5, atol=1e-5)


def test_absorbed_form_is_chosen_for_decode_at_deepseek_shapes() -> None:
    v3 = ModelConfig.from_hf_config(transformers.DeepseekV3Config().to_dict())
    assert (v3.kv_lora_rank, v3.qk_nope_head_dim, v3.v_head_dim) == (512, 128, 128)
    assert v3.mla_absorbs(1, 4096) and v3.mla_absorbs(16, 4096)  # decode, short prompts
    assert not v3.mla_absorbs(4096, 4096)  # a long prefill expands the latents once


def test_kv_cache_holds_the_latent_and_the_rope_key() -> None:
    cfg = _cfg("deepseek_v3")
    cache = KVCache.create(cfg, batch=3, max_len=32)
    assert len(cache.kv) == cfg.num_layers
    assert [a.shape for a in cache.kv[0]] == [(3, 32, 1, cfg.kv_lora_rank),
                                              (3, 32, 1, cfg.qk_rope_head_dim)]
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.itemsize
    assert cfg.kv_token_bytes == per_token
    assert cfg.kv_cache_bytes(3, 32) == cfg.num_layers * 3 * 32 * per_token
    # DeepSeek-V3's real shapes: 576 values a token and layer, against 2 x 128 heads x 192.
    v3 = ModelConfig.from_hf_config(transformers.DeepseekV3Config().to_dict())
    assert v3.kv_token_bytes == 576 * v3.itemsize
    assert 2 * 128 * 192 * v3.itemsize / v3.kv_token_bytes > 80


# ---- RoPE and the softmax scale ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe-yarn", "glm4_moe", "deepseek_v2"])
def test_rope_frequencies_and_scales_match_hf(name: str) -> None:
    hf = _hf_config(name)
    cfg = ModelConfig.from_hf_config(hf.to_dict())
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type)
    inv_freq, factor = (init(hf) if init else
                        type(make_hf_model(name).model.rotary_emb).compute_default_rope_parameters(hf))
    np.testing.assert_allclose(layers.rope_frequencies(cfg), inv_freq.numpy(), rtol=1e-6)
    assert cfg.rope_attention_factor == pytest.approx(factor, rel=1e-7)
    assert cfg.rot_dim == 2 * len(inv_freq)
    attn = make_hf_model(name).model.layers[0].self_attn
    assert cfg.softmax_scale == pytest.approx(attn.scaling, rel=1e-7)
    if name == "deepseek_v3":  # mscale_all_dim changes the softmax scale, mscale the factor
        assert cfg.softmax_scale != pytest.approx(cfg.head_dim ** -0.5)
        assert cfg.rope_attention_factor != pytest.approx(1.0)


def test_interleaved_rope_is_a_permutation_of_hf_layout() -> None:
    """DeepSeek-V2's complex-pair RoPE output, permuted to pairs' first then second elements,
    is ours: the same permutation of queries and keys leaves every score unchanged."""
    cfg = _cfg("deepseek_v2")
    r = cfg.rot_dim
    x = np.random.default_rng(0).standard_normal((1, 5, 2, r)).astype(np.float32)
    pos = np.arange(5, dtype=np.int32)[None]
    ours = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(pos), cfg))
    freqs = pos[..., None] * layers.rope_frequencies(cfg)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * freqs)[:, :, None]
    hf_layout = np.stack([z.real, z.imag], -1).reshape(x.shape)  # interleaved pairs
    np.testing.assert_allclose(ours, np.concatenate([hf_layout[..., 0::2], hf_layout[..., 1::2]],
                                                    -1), atol=1e-5)


# ---- conversion -------------------------------------------------------------------------------

def _add_tensors(hf_dir, extra: dict[str, np.ndarray]) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})


MTP = {  # DeepSeek-V3's multi-token-prediction module as checkpoints name it
    "enorm.weight": (32,), "hnorm.weight": (32,), "eh_proj.weight": (32, 64),
    "shared_head.norm.weight": (32,), "self_attn.kv_a_proj_with_mqa.weight": (24, 32),
    "mlp.experts.0.gate_proj.weight": (12, 32), "mlp.gate.weight": (8, 32),
}


def test_mtp_layers_are_skipped_and_said(tmp_path, caplog) -> None:
    _, hf_dir = save_hf_model("deepseek_v3", tmp_path / "hf")
    n = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    _add_tensors(hf_dir, {f"model.layers.{n}.{k}": np.ones(s, np.float32)
                          for k, s in MTP.items()})
    with caplog.at_level(logging.INFO, logger="klotski_jax"):
        out = klotski_jax.convert(hf_dir, tmp_path / "ckpt", progress=False)
    assert f"skipping {len(MTP)} tensors of the multi-token-prediction layer {n}" in caplog.text
    assert not any(t.startswith(f"layers.{n}.") for t in CheckpointReader(out).manifest["tensors"])


def test_extra_layers_of_a_family_without_mtp_are_unmapped(tmp_path) -> None:
    _, hf_dir = save_hf_model("deepseek_v2", tmp_path / "hf")
    _add_tensors(hf_dir, {"model.layers.3.eh_proj.weight": np.ones((32, 64), np.float32)})
    with pytest.raises(UnmappedTensorError, match="model.layers.3.eh_proj.weight"):
        klotski_jax.convert(hf_dir, tmp_path / "ckpt", progress=False)


UNSUPPORTED = [
    ("deepseek_v2", "topk_method", "noaux_tc", "topk_method 'noaux_tc'"),
    ("deepseek_v2", "mlp_bias", True, "mlp_bias"),
    ("deepseek_v3", "n_group", 3, "n_group=3 must divide num_experts=8"),
    ("deepseek_v3", "topk_group", 5, "topk_group=5"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope_type"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                                        "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("glm4_moe", "hidden_act", "gelu", "hidden_act"),
]


@pytest.mark.parametrize("name,field,value,match", UNSUPPORTED,
                         ids=[f"{n}-{f}" for n, f, _, _ in UNSUPPORTED])
def test_unsupported_variants_are_refused_naming_the_field(tmp_path, capsys, name, field, value,
                                                           match) -> None:
    _, hf_dir = save_hf_model(name, tmp_path / "hf")
    hf = json.loads((hf_dir / "config.json").read_text())
    hf[field] = value
    (hf_dir / "config.json").write_text(json.dumps(hf))
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "ckpt"), "-q"]) == 2
    err = capsys.readouterr().err
    assert match in err and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


def test_configs_cover_every_variant_the_issue_names() -> None:
    """The tiny configs that the parity, conversion and pipeline tests run over."""
    cfgs = {n: _cfg(n) for n in CONFIGS if n.startswith(("deepseek", "glm"))}
    assert {c.family.value for c in cfgs.values()} == {"deepseek_v2", "deepseek_v3", "glm4_moe"}
    mla = [c for c in cfgs.values() if c.attention is Attn.MLA]
    assert {bool(c.q_lora_rank) for c in mla} == {True, False}
    assert {c.topk_method for c in cfgs.values()} == set(TopkMethod)
    assert {c.rope_interleave for c in mla} == {True, False}
    assert any(c.rope_type == "yarn" for c in mla) and any(not all(c.moe_layers)
                                                           for c in cfgs.values())
    glm = cfgs["glm4_moe"]
    assert glm.attention is Attn.GQA and glm.rot_dim == glm.head_dim // 2 and glm.qkv_bias


# ---- bfloat16 through the pipeline ------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepseek_v3", pytest.param("deepseek_v2", marks=pytest.mark.slow),
                                  pytest.param("glm4_moe", marks=pytest.mark.slow)])
def test_bf16_keeps_the_contract_through_every_schedule(tmp_path, name: str) -> None:
    """A bfloat16 conversion (float32 router and correction bias, as HF keeps them) through
    every schedule at its smallest budget, against the bf16 reference."""
    _, hf_dir = save_hf_model(name, tmp_path / "hf")
    ckpt = klotski_jax.convert(hf_dir, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    model = klotski_jax.load(ckpt)
    router = model.layers[1].moe.router
    assert router.weight[...].dtype == jnp.float32
    assert router.bias is None or router.bias[...].dtype == jnp.float32
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    want = model.logits(ids, mask)
    for schedule in ("klotski", "flexgen", "lru", "sequential"):
        policy = Policy(schedule=schedule, groups=2, verify_memory=True)
        budget = contract.smallest_budget(ckpt, policy, len(ids), ids.shape[1], 0)
        got = Engine(ckpt, policy.replace(device_budget=budget)).logits(ids, mask)
        contract.assert_logits_close(got, want, mask, contract.BFLOAT16, what=schedule)


# ---- FP8 releases (DeepSeek-V3 / R1 ship block-scaled FP8) ------------------------------------

@pytest.mark.parametrize("name", ["deepseek_v3", pytest.param("deepseek_v2", marks=pytest.mark.slow),
                                  pytest.param("glm4_moe", marks=pytest.mark.slow)])
def test_fp8_release_converts_matches_hf_and_streams_fp8_experts(tmp_path, name: str) -> None:
    """A tiny FP8 release of the family (every Linear in F8_E4M3 with 8 x 8 block scales, the
    MLA projections included; routers, norms, embeddings in float): converted by default
    (dequantized) it matches the HF model holding the dequantized weights; with
    --quantize fp8 its experts stay fp8 and the engine streams them at the smallest budget
    within the exactness contract, through every schedule."""
    _, src = save_hf_model(name, tmp_path / "hf")
    fp8_dir, weights = hf_models.fp8_checkpoint(src, tmp_path / "hf-fp8", block=(8, 8))
    assert any(k.endswith("kv_b_proj.weight_scale_inv") or k.endswith("q_proj.weight_scale_inv")
               for k in hf_models.load_tensors(fp8_dir / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_models.float_checkpoint(fp8_dir, tmp_path / "hf-deq", weights),
        dtype=torch.float32).eval()
    model = klotski_jax.load(klotski_jax.convert(fp8_dir, tmp_path / "deq", progress=False))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, model.config.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()
    contract.assert_logits_close(model.logits(ids, mask), want, mask, contract.FLOAT32, what="HF")

    store = klotski_jax.convert(fp8_dir, tmp_path / "fp8", quantize="fp8", progress=False)
    fp8_model = klotski_jax.load(store)
    assert fp8_model.config.expert_quant.value == "fp8" and fp8_model.config.expert_group_size == 8
    ref = contract.reference_greedy(fp8_model, ids, mask, 4, contract.FLOAT32)
    prompts = [ids[r][mask[r] > 0].tolist() for r in range(len(ids))]
    for schedule in ("klotski", "flexgen", "lru", "sequential"):
        policy = Policy(schedule=schedule, groups=2, verify_memory=True)
        budget = contract.smallest_budget(store, policy, len(ids), ids.shape[1], 4)
        out = Engine(store, policy.replace(device_budget=budget)).generate(
            prompts, max_new_tokens=4, stop_at_eos=False)
        contract.assert_greedy_matches(out.token_ids, ref.tokens, ref.logits, contract.FLOAT32,
                                       what=f"{schedule} on fp8 experts")
        assert 0 < out.stats.peak_device_bytes <= budget
        assert out.stats.bytes_read_disk % fp8_model.config.expert_bytes == 0


def test_kimi_k2_style_config_runs_as_deepseek_v3(tmp_path, caplog) -> None:
    """Kimi-K2's config.json says model_type "kimi_k2", names its remote code (auto_map) and
    lists DeepseekV3ForCausalLM: it converts as deepseek_v3 (said in the log) to the same weights. A
    model_type and architectures that are both unknown are refused, naming both."""
    hf, hf_dir = save_hf_model("deepseek_v3", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(
        {**config, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
         "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                      "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}))
    with caplog.at_level(logging.INFO, logger="klotski_jax"):
        model = klotski_jax.load(klotski_jax.convert(hf_dir, tmp_path / "ckpt", progress=False))
    assert model.config.family.value == "deepseek_v3"
    assert "model_type 'kimi_k2' runs as deepseek_v3" in caplog.text
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    contract.assert_logits_close(model.logits(ids), want, np.ones_like(ids), contract.FLOAT32)
    (hf_dir / "config.json").write_text(json.dumps(
        {**config, "model_type": "kimi_k9", "architectures": ["KimiForCausalLM"],
         "auto_map": {"AutoConfig": "configuration_kimi.KimiConfig"}}))
    with pytest.raises(ConfigError, match="'kimi_k9' .*KimiForCausalLM"):
        ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
