"""HF parity of every family through the real path: HF save -> `klotski convert` -> `load`.

Tolerances follow the foundation issue: logits within 1e-4 of the logits' max magnitude, greedy
continuations of 16 tokens identical (float32), KV-cache decode equal to a no-cache forward
(logits within 1e-4, greedy tokens by the exactness contract's margin rule, tests/contract.py).
"""

from __future__ import annotations

import json

import contract
import numpy as np
import pytest
import torch
from hf_models import CONFIGS, save_hf_model

import klotski_jax
from klotski_jax.config import ConfigError, ModelConfig

NEW_TOKENS = 16


def _batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three prompts of 11, 8 and 6 real tokens, left-padded with 0 to one length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return np.where(mask > 0, ids, 0), mask


def _hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)  # what HF generate uses
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


# Variants whose features the fast configs already cover in part (DeepSeek-V3 without q_lora or
# interleave, tied; Qwen3-MoE with yarn, which deepseek_v3 also uses) run with the slow tests.
SLOW = {"deepseek_v3-plain", "qwen3_moe-yarn"}


@pytest.fixture(scope="module", params=[
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CONFIGS)])
def case(request, tmp_path_factory):
    """(HF torch model, {layout: converted Model}) for one config, single-file and sharded."""
    name = request.param
    models = {}
    for layout, shard in (("single", None), ("sharded", "20KB")):
        root = tmp_path_factory.mktemp(f"{name}-{layout}")
        hf, hf_dir = save_hf_model(name, root / "hf", max_shard_size=shard)
        if shard:
            assert (hf_dir / "model.safetensors.index.json").exists()
        models[layout] = klotski_jax.load(klotski_jax.convert(hf_dir, root / "ckpt",
                                                              progress=False))
    return name, hf, models


def test_logits_match_hf(case):
    name, hf, models = case
    ids, mask = _batch(hf.config.vocab_size)
    ref = _hf_logits(hf, ids, mask)
    valid = mask > 0
    for layout, model in models.items():
        ours = model.logits(ids, mask)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        err = np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()
        assert err <= 1e-4, f"{name}/{layout}: relative max error {err:.2e}"


def test_greedy_generation_matches_hf(case):
    name, hf, models = case
    ids, mask = _batch(hf.config.vocab_size, seed=1)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    got = models["single"].generate_reference(ids, NEW_TOKENS, attention_mask=mask)
    assert got.shape == (3, ids.shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_kv_cache_decode_equals_full_forward(case):
    """Logits of each decoded token equal those of one no-cache forward over the whole text."""
    _, hf, models = case
    model = models["single"]
    ids, mask = _batch(hf.config.vocab_size, seed=2)
    seq = model.generate_reference(ids, 6, attention_mask=mask)
    full_mask = np.concatenate([mask, np.ones((3, 6), mask.dtype)], axis=1)
    full = model.logits(seq, full_mask)
    # Greedy decode picked argmax of the cached logits; the no-cache forward must agree wherever
    # its top-2 margin is not a near-tie (the exactness contract's rule, tests/contract.py).
    tf = full[:, ids.shape[1] - 1:-1]
    contract.assert_greedy_matches(seq[:, ids.shape[1]:], tf.argmax(-1), tf,
                                   contract.tolerance(model.config.dtype), what="KV-cache decode")
    prefix = model.logits(seq[:, :-1], full_mask[:, :-1])
    valid = full_mask[:, :-1] > 0  # padding positions hold no meaningful logits
    np.testing.assert_allclose(prefix[valid], full[:, :-1][valid], rtol=0,
                               atol=1e-4 * np.abs(full).max())


def test_left_padding_does_not_change_a_row(case):
    _, hf, models = case
    model = models["single"]
    ids, mask = _batch(hf.config.vocab_size, seed=3)
    batch = model.logits(ids, mask)
    alone = model.logits(ids[2:, 5:])  # row 2 without its 5 pad tokens
    np.testing.assert_allclose(batch[2, 5:], alone[0], atol=1e-5 * np.abs(alone).max())


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "supported: mixtral"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}, "rope_type"),
    ("dtype", "int8", "dtype"),
])
def test_unsupported_config_features_are_rejected(tmp_path, field, value, match):
    _, hf_dir = save_hf_model("mixtral", tmp_path / "hf")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    hf_config[field] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_config(hf_config)


def test_config_round_trips_through_dict(tmp_path):
    for name in ("qwen2_moe-sparse-step", "mixtral-odd", "olmoe-clip"):
        _, hf_dir = save_hf_model(name, tmp_path / name)
        cfg = ModelConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# bf16 projections round each output to 8 significant bits: a different summation order (another
# kernel, another row count) can move an output by one bf16 ulp, i.e. up to 2^-7 of its own
# magnitude, and SwiGLU carries such flips of its hidden layer into its output. Measured with
# emulated other kernels (contraction summed in 2-5 blocks, float32 upcast) on the shapes below:
# at most 4.2e-3 of the rows' largest |output|; ROW_TOL is 5x that.
ROW_TOL = 2e-2


@pytest.mark.parametrize("d,f", [(128, 192), (32, 24), (1024, 1792), (128, 3072)])
def test_projection_rows_agree_whatever_the_row_count(d, f):
    """The engine runs an expert over a bucket of 2, 4, ... rows, attention per group, and the
    oracle over all rows at once; a lone row is computed as two (`layers.linear`). A row's result
    must not depend on how many rows share the call beyond bf16 rounding (ROW_TOL of the largest
    output): the exactness contract's bound, not bit-identity, which XLA does not give across
    row counts on every CPU (Intel AVX-512/AMX picks other kernels) or GPU."""
    import jax
    import jax.numpy as jnp

    from klotski_jax.models import layers

    rng = np.random.default_rng(0)
    w = [jnp.asarray(rng.normal(0, 0.05, s), jnp.bfloat16) for s in ((f, d), (f, d), (d, f))]
    x = jnp.asarray(rng.normal(0, 1, (64, d)), jnp.bfloat16)
    ffn, proj = jax.jit(layers.swiglu), jax.jit(layers.linear)
    full = np.asarray(ffn(x, *w).astype(jnp.float32))
    full_proj = np.asarray(proj(x, w[0]).astype(jnp.float32))
    assert full.dtype == np.float32 and np.isfinite(full).all()
    for m in (1, 2, 3, 4, 5, 8, 13, 16, 32, 33):
        part = np.asarray(ffn(x[:m], *w).astype(jnp.float32))
        np.testing.assert_allclose(part, full[:m], rtol=0, atol=ROW_TOL * np.abs(full[:m]).max(),
                                   err_msg=f"{m} rows")
        one = np.asarray(proj(x[m - 1:m].reshape(1, 1, d), w[0]).astype(jnp.float32))
        np.testing.assert_allclose(one.reshape(1, f), full_proj[m - 1:m], rtol=0,
                                   atol=ROW_TOL * np.abs(full_proj[m - 1:m]).max(),
                                   err_msg=f"row {m - 1}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_modules_are_nnx_and_their_paths_are_the_flat_names(name):
    """Every declared array is exactly one `nnx.Param` of the NNX model, at the path its flat
    name spells; a layer's dense part (routed=False) holds all but the routed experts."""
    from flax import nnx
    from hf_models import make_hf_model

    from klotski_jax.models.modules import DecoderLayer, MoEModel
    from klotski_jax.models.specs import Kind, weight_specs

    cfg = ModelConfig.from_hf_config(make_hf_model(name).config.to_dict())
    model = nnx.eval_shape(lambda: MoEModel(cfg, rngs=nnx.Rngs(0)))
    params = {".".join(map(str, p)): v.get_value().shape
              for p, v in nnx.state(model, nnx.Param).flat_state()}
    assert params == {s.name: s.shape for s in weight_specs(cfg)}
    for i in range(cfg.num_layers):
        dense = nnx.eval_shape(lambda i=i: DecoderLayer(cfg, i, rngs=nnx.Rngs(0), routed=False))
        names = {f"layers.{i}." + ".".join(map(str, p))
                 for p, _ in nnx.state(dense, nnx.Param).flat_state()}
        assert names == {s.name for s in weight_specs(cfg)
                         if s.layer == i and s.kind is Kind.DENSE}


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe-clip"])
def test_pure_state_is_nnx_state_of_the_params(name):
    """The reference's fast `pure_state` is exactly NNX's own pure state of a layer."""
    import jax
    from flax import nnx
    from hf_models import make_hf_model

    from klotski_jax.models.reference import Model, pure_state

    cfg = ModelConfig.from_hf_config(make_hf_model(name).config.to_dict())
    model = Model(cfg, rngs=nnx.Rngs(0))
    for layer in model.layers:
        want = nnx.state(layer, nnx.Param).to_pure_dict()
        got = pure_state(layer)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(a is b for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_steps_take_an_nnx_state_or_its_pure_form():
    """The jitted steps merge a layer's state into the NNX module: an `nnx.State` and the pure
    nested dicts the runtime streams give the same result."""
    import jax.numpy as jnp
    from flax import nnx
    from hf_models import make_hf_model

    from klotski_jax.models import blocks
    from klotski_jax.models.reference import Model, pure_state

    cfg = ModelConfig.from_hf_config(make_hf_model("qwen2_moe").config.to_dict())
    layer = Model(cfg, rngs=nnx.Rngs(1)).layers[0]
    h = jnp.ones((2, 3, cfg.hidden_size)) * 0.1
    pure, wrapped = pure_state(layer), nnx.state(layer, nnx.Param)
    assert cfg.moe_layers[0]  # qwen2_moe's layer 0: router, routed and shared experts
    np.testing.assert_allclose(np.asarray(blocks.moe_block_reference(pure, h, cfg=cfg)),
                               np.asarray(blocks.moe_block_reference(wrapped, h, cfg=cfg)),
                               rtol=1e-6, atol=1e-7)
    _, _, experts = blocks.router_block(pure, h.reshape(6, -1), cfg=cfg)
    _, _, experts2 = blocks.router_block(wrapped, h.reshape(6, -1), cfg=cfg)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(experts2))
