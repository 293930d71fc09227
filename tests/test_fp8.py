"""Block-scaled FP8 checkpoints (DeepSeek-V3-style `weight_scale_inv`) and fp8 experts.

The FP8 checkpoints here are tiny random HF models turned FP8 the way releases look
(`hf_models.fp8_checkpoint`: every Linear of attention, dense MLPs and experts in F8_E4M3 with
float32 block scales, config.json with `quantization_config`). What is checked:

- `klotski convert` of an FP8 checkpoint dequantizes every weight in float32 (bit for bit what
  converting the dequantized float checkpoint gives), and the model's logits and greedy tokens
  match the HF torch model holding those weights;
- `--quantize fp8` keeps an FP8 source's expert bytes and scales exactly, and quantizes a float
  source per block within e4m3's rounding; the three expert I/O modes read the float8 chunks
  back bit for bit, and the engine keeps the exactness contract on an fp8 store;
- sharded and fused (transformers 5) FP8 checkpoints, blocks that do not divide the dimensions,
  byte counts for the planner, and every FP8 error through the CLI (exit 2, the message names
  the tensor or field, nothing left at the output path).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import contract
import hf_models
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from cli_helpers import assert_generate_matches_reference, run_cli
from safetensors.numpy import save_file

import klotski_jax
from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import Family, ModelConfig, Quant, quant_leaves
from klotski_jax.engine import Engine
from klotski_jax.models import quant
from klotski_jax.planning.placement import staged_expert_bytes
from klotski_jax.planning.policy import Policy

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = (16, 16)  # qwen3_moe's experts are 24 wide: a full block and a partial one
L1 = "model.layers.1.mlp."  # qwen3_moe: layer 0 is dense, layers 1 and 2 are MoE


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fp8")


@pytest.fixture(scope="module")
def fp8_src(root: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """qwen3_moe (a dense layer, 8 experts of width 24) as an FP8 checkpoint in 16x16 blocks,
    and the float32 weights it means."""
    _, src = hf_models.save_hf_model("qwen3_moe", root / "hf")
    return hf_models.fp8_checkpoint(src, root / "hf-fp8", BLOCK)


@pytest.fixture(scope="module")
def deq_src(root: pathlib.Path, fp8_src) -> pathlib.Path:
    """The same weights as an ordinary float32 HF checkpoint."""
    return hf_models.float_checkpoint(fp8_src[0], root / "hf-deq", fp8_src[1])


@pytest.fixture(scope="module")
def fp8_store(root: pathlib.Path, fp8_src) -> pathlib.Path:
    """`klotski convert --quantize fp8` of the FP8 checkpoint: experts kept as they are."""
    return klotski_jax.convert(fp8_src[0], root / "store", progress=False, quantize="fp8")


@pytest.fixture(scope="module")
def deq_ckpt(root: pathlib.Path, deq_src: pathlib.Path) -> pathlib.Path:
    return klotski_jax.convert(deq_src, root / "deq-ckpt", progress=False)


def _batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three left-padded prompts of 11, 8 and 6 tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return np.where(mask > 0, ids, 0), mask


def _assert_nothing_left(out: pathlib.Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _e4m3_bound(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round-to-nearest e4m3 of w / s, times s: within half an ulp, 2^-4 of |w| (3 mantissa
    bits), or half the subnormal step, 2^-10 s, below e4m3's normal range; plus float32's
    rounding of the division and the product."""
    return np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5) + 1e-30


# ---- the block quantizer and dequantizer ----------------------------------------------------------
@pytest.mark.parametrize("shape,block", [((40, 64), 16), ((24, 32), 16), ((37, 29), 8),
                                         ((8, 8), 128)])
def test_fp8_blocks_round_to_nearest_e4m3(shape: tuple[int, int], block: int) -> None:
    """Scale = amax / 448 per block (ceil-sized grid), each value the nearest e4m3: within 2^-4
    of |w| (3 mantissa bits) or, below e4m3's normal range, half its subnormal step 2^-9 x s;
    the same bytes as the reference helper the FP8 test checkpoints are built with."""
    rng = np.random.default_rng(0)
    w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    several = shape[0] > block or shape[1] > block
    if several:
        w[:block, :block] = 0.0  # an all-zero block comes back exactly (scale 0)
    w[-1, -1] = 3.0  # an outlier widens its own block's scale only
    w[0, -1] *= 1e-6  # a value far below its block's scale: e4m3 subnormals
    stored = quant.quantize(w, Quant.FP8, block)
    for name, s, dt in quant_leaves(Quant.FP8, block, *shape, "float32"):
        assert stored[name].shape == s and stored[name].dtype == np.dtype(dt), name
    scale = stored["scale"]
    assert scale[-1, -1] == np.float32(3.0) / np.float32(448)
    deq = quant.dequantize_np(stored, block=block)
    step = quant.dequantize_fp8_np(np.ones(shape, F8), scale, (block, block))  # s per element
    assert np.all(np.abs(w - deq) <= _e4m3_bound(w, step))
    if several:
        assert scale[0, 0] == 0 and scale.min() == 0 and np.all(scale[-1] > 0)
        np.testing.assert_array_equal(deq[:block, :block], 0.0)
    q, s = hf_models.fp8_quantize_blocks(w, (block, block))
    nonzero = scale > 0
    np.testing.assert_array_equal(s[nonzero], scale[nonzero])
    assert q.tobytes() == stored["q"].tobytes()


def test_fp8_device_dequantization_is_numpys() -> None:
    """The jitted dequantization (partial blocks: the scales repeated and cut) gives what NumPy
    gives, one float32 product per element rounded once to the dtype: within that rounding, as
    a backend may flush subnormals (GPUs do) or fuse differently."""
    rng = np.random.default_rng(1)
    w = (0.05 * rng.standard_normal((2, 40, 24))).astype(np.float32)
    stored = [quant.quantize(x, Quant.FP8, 16) for x in w]
    stacked = {k: np.stack([s[k] for s in stored]) for k in stored[0]}
    for dtype in (jnp.float32, jnp.bfloat16):
        got = jax.jit(lambda t, dt=dtype: quant.dequantize(t["q"], t["scale"], None, dt,
                                                           block=16))(stacked)
        for e in range(2):
            want = quant.dequantize_np(stored[e], np.dtype(dtype), block=16)
            np.testing.assert_allclose(np.asarray(got[e], np.float32), want.astype(np.float32),
                                       rtol=float(jnp.finfo(dtype).eps), atol=1e-30)
            ref = hf_models.fp8_dequantize_blocks(stored[e]["q"], stored[e]["scale"], (16, 16))
            assert quant.dequantize_np(stored[e], block=16).tobytes() == ref.tobytes()
    with pytest.raises(ValueError, match="block size"):
        quant.dequantize(jnp.asarray(stacked["q"]), jnp.asarray(stacked["scale"]), None,
                         jnp.float32)


def test_fp8_expert_bytes_count_values_and_scales() -> None:
    """The planner's byte counts: 1 byte per value plus float32 scales per 128x128 block
    (about half of bf16 on Mixtral-8x7B's shapes), and partial blocks count whole scales."""
    bf16 = ModelConfig(family=Family.MIXTRAL, vocab_size=32000, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                       expert_intermediate_size=14336, moe_layers=(True,) * 32,
                       sliding_windows=(None,) * 32, dtype="bfloat16")
    fp8 = bf16.replace(expert_quant=Quant.FP8, expert_group_size=128)
    values = 3 * 4096 * 14336
    assert fp8.expert_bytes == values + 3 * 32 * 112 * 4
    assert 0.5 < fp8.expert_bytes / bf16.expert_bytes < 0.501
    assert fp8.expert_bytes <= staged_expert_bytes(fp8) < fp8.expert_bytes + 6 * 4096
    odd = bf16.replace(hidden_size=100, expert_intermediate_size=200, num_heads=4, num_kv_heads=4,
                       head_dim=26, expert_quant=Quant.FP8, expert_group_size=128)
    assert odd.expert_bytes == 3 * 100 * 200 + 3 * (1 * 2) * 4  # grids 2x1, 2x1 and 1x2
    with pytest.raises(ValueError, match="fp8 needs a block size"):
        bf16.replace(expert_quant=Quant.FP8)


# ---- converting an FP8 checkpoint: dequantized -------------------------------------------------------
def test_convert_fp8_checkpoint_dequantizes_like_its_float_weights(
        root: pathlib.Path, fp8_src, deq_src: pathlib.Path, deq_ckpt: pathlib.Path) -> None:
    """Every weight comes out as float32(fp8) x scale_inv: bit for bit the conversion of the
    float checkpoint holding the dequantized weights; the scale tensors are consumed."""
    src, weights = fp8_src
    assert hf_models.load_tensors(src / "model.safetensors")[L1 + "experts.3.up_proj.weight"].dtype == F8
    ckpt = klotski_jax.convert(src, root / "dequantized", progress=False)
    got, want = CheckpointReader(ckpt), CheckpointReader(deq_ckpt)
    assert got.manifest["format_version"] == 2 and got.config == want.config
    assert not got.config.quantized
    g, w = got.read_all(), want.read_all()
    assert set(g) == set(w)
    for name in w:
        assert g[name].dtype == np.float32 and g[name].tobytes() == w[name].tobytes(), name


def test_fp8_logits_and_greedy_tokens_match_hf(fp8_src, deq_src: pathlib.Path,
                                               root: pathlib.Path) -> None:
    """The converted FP8 model against the HF torch model holding the dequantized weights:
    logits within the exactness contract's float32 tolerance, greedy tokens by its margin
    rule."""
    ckpt = klotski_jax.convert(fp8_src[0], root / "hf-compare", progress=False)
    model = klotski_jax.load(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(deq_src, dtype=torch.float32).eval()
    ids, mask = _batch(model.config.vocab_size)
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    tol = contract.tolerance("float32")
    contract.assert_logits_close(model.logits(ids, mask), want.numpy(), mask, tol, what="HF")
    new = 6
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, eos_token_id=None,
                                pad_token_id=0).numpy()[:, ids.shape[1]:]
    ref = contract.reference_greedy(model, ids, mask, new, tol)
    contract.assert_greedy_matches(hf_tokens, ref.tokens, ref.logits, tol, what="HF generate")


def test_convert_fp8_to_bfloat16(root: pathlib.Path, fp8_src) -> None:
    """--dtype bfloat16 (and a config that says bfloat16, as DeepSeek's does): the float32
    product rounded once to bfloat16."""
    src, weights = fp8_src
    bf16_src = root / "hf-fp8-bf16"
    shutil.copytree(src, bf16_src)
    config = json.loads((bf16_src / "config.json").read_text())
    (bf16_src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    for ckpt in (klotski_jax.convert(src, root / "bf16-flag", progress=False, dtype="bfloat16"),
                 klotski_jax.convert(bf16_src, root / "bf16-config", progress=False)):
        reader = CheckpointReader(ckpt)
        assert reader.config.dtype == "bfloat16"
        up = reader.expert(1, "up", 3)
        want = weights[L1 + "experts.3.up_proj.weight"].astype(ml_dtypes.bfloat16)
        assert up.dtype == want.dtype and up.tobytes() == want.tobytes()
        q = reader.dense("layers.2.attn.q")
        want = weights["model.layers.2.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16)
        assert q.tobytes() == want.tobytes()


@pytest.mark.parametrize("name,block", [("mixtral", (5, 7)), ("qwen3_moe", (128, 128))])
def test_blocks_that_do_not_divide_and_sharded_checkpoints(
        tmp_path: pathlib.Path, name: str, block: tuple[int, int]) -> None:
    """Non-square blocks dividing no dimension (Mixtral: 48x32 experts in 5x7 blocks, a grid
    of 10x5) and blocks larger than every matrix (one scale each), sharded: the weights are
    the dequantized ones, and the sharded FP8 checkpoint (scales in their weights' shards)
    converts to the same arrays as the single-file one."""
    _, single = hf_models.save_hf_model(name, tmp_path / "hf")
    _, sharded = hf_models.save_hf_model(name, tmp_path / "hf-sharded", max_shard_size="30KB")
    one, weights = hf_models.fp8_checkpoint(single, tmp_path / "fp8", block)
    many, _ = hf_models.fp8_checkpoint(sharded, tmp_path / "fp8-sharded", block)
    assert len(list(many.glob("model-*.safetensors"))) > 1
    a = CheckpointReader(klotski_jax.convert(one, tmp_path / "a", progress=False)).read_all()
    b = CheckpointReader(klotski_jax.convert(many, tmp_path / "b", progress=False)).read_all()
    deq = hf_models.float_checkpoint(one, tmp_path / "deq", weights)
    c = CheckpointReader(klotski_jax.convert(deq, tmp_path / "c", progress=False)).read_all()
    for k in c:
        assert a[k].tobytes() == c[k].tobytes() == b[k].tobytes(), k


def test_fused_fp8_experts(tmp_path: pathlib.Path) -> None:
    """The transformers 5 fused layout in FP8 (`experts.gate_up_proj` + `gate_up_proj_scale_inv`,
    transformers' FP8 experts' names): dequantized, the same arrays as per-expert FP8 tensors;
    kept with --quantize fp8 when the expert width is a multiple of the block (gate's and up's
    scale rows are separate), refused when a block straddles the two halves."""
    model = hf_models.make_hf_model("qwen3_moe")  # experts 24 wide
    fused = hf_models.save_fused_hf_model(model, tmp_path / "fused")
    per_expert = tmp_path / "split"
    model.save_pretrained(per_expert)
    for block in (8, 16):
        f, meant = hf_models.fp8_checkpoint(fused, tmp_path / f"fused-fp8-{block}",
                                            (block, block))
        assert f"{L1}experts.gate_up_proj_scale_inv" in hf_models.load_tensors(f / "model.safetensors")
        got = CheckpointReader(klotski_jax.convert(f, tmp_path / f"a{block}",
                                                   progress=False)).read_all()
        gate_up = meant[f"{L1}experts.gate_up_proj"]  # with 16 a block spans gate and up rows
        assert got["layers.1.moe.experts.gate"].tobytes() == gate_up[:, :24].tobytes()
        assert got["layers.1.moe.experts.up"].tobytes() == gate_up[:, 24:].tobytes()
        assert got["layers.1.moe.experts.down"].tobytes() == meant[
            f"{L1}experts.down_proj"].tobytes()
        if block == 8:  # blocks within each half: the same weights as per-expert FP8 tensors
            s, _ = hf_models.fp8_checkpoint(per_expert, tmp_path / "split-fp8", (8, 8))
            want = CheckpointReader(klotski_jax.convert(s, tmp_path / "b", progress=False))
            for name, arr in want.read_all().items():
                assert got[name].tobytes() == arr.tobytes(), name
    kept = CheckpointReader(klotski_jax.convert(tmp_path / "fused-fp8-8", tmp_path / "kept",
                                                progress=False, quantize="fp8"))
    raw = hf_models.load_tensors(tmp_path / "fused-fp8-8" / "model.safetensors")
    gate_up, scale = raw[f"{L1}experts.gate_up_proj"], raw[f"{L1}experts.gate_up_proj_scale_inv"]
    assert kept.manifest["experts"]["quantization"]["method"] == "source"
    for e in (0, 5):
        assert kept.expert(1, "gate.q", e).tobytes() == gate_up[e, :24].tobytes()
        assert kept.expert(1, "up.q", e).tobytes() == gate_up[e, 24:].tobytes()
        assert kept.expert(1, "up.scale", e).tobytes() == scale[e, 3:].tobytes()
    with pytest.raises(klotski_jax.ConversionError, match="straddle the two halves"):
        klotski_jax.convert(tmp_path / "fused-fp8-16", tmp_path / "no", progress=False,
                            quantize="fp8")
    _assert_nothing_left(tmp_path / "no")


# ---- --quantize fp8 --------------------------------------------------------------------------------
def test_quantize_fp8_keeps_the_source_bytes(fp8_src, fp8_store: pathlib.Path,
                                             deq_ckpt: pathlib.Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """From an FP8 checkpoint every expert chunk holds exactly the source's fp8 bytes and its
    float32 scales (and `klotski verify` accepts their checksums); dense weights, routers and
    the dense layer are dequantized; the reference model on the store computes what the
    dequantized float checkpoint computes."""
    src, _ = fp8_src
    m = json.loads((fp8_store / mf.MANIFEST_FILE).read_text())
    assert m["format_version"] == 3
    assert m["experts"]["quantization"] == {
        "scheme": "fp8", "group_size": 16, "scale_dtype": "float32", "method": "source",
        "original_dtype": "float8_e4m3fn", "block": [16, 16]}
    reader = CheckpointReader(fp8_store)
    cfg = reader.config
    assert (cfg.expert_quant, cfg.expert_group_size) == (Quant.FP8, 16)
    assert m["tensors"]["layers.1.moe.experts.down.q"] == {
        "shape": [8, 32, 24], "dtype": "float8_e4m3fn", "kind": "expert",
        "path": "experts/layers.1.moe.experts.down.q"}
    assert m["tensors"]["layers.1.moe.experts.down.scale"]["shape"] == [8, 2, 2]
    assert m["tensors"]["layers.1.moe.router.weight"]["dtype"] == "float32"
    assert cfg.expert_bytes == 3 * 24 * 32 + 3 * 2 * 2 * 4
    raw = hf_models.load_tensors(src / "model.safetensors")
    for layer in cfg.moe_layer_ids:
        for part, hf_part in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            for e in range(cfg.num_experts):
                key = f"model.layers.{layer}.mlp.experts.{e}.{hf_part}.weight"
                q = reader.expert_chunk_path(layer, f"{part}.q", e).read_bytes()
                s = reader.expert_chunk_path(layer, f"{part}.scale", e).read_bytes()
                assert q == raw[key].tobytes() and s == raw[key + "_scale_inv"].tobytes()
    want = CheckpointReader(deq_ckpt)
    for name, arr in want.all_dense().items():
        assert reader.dense(name).tobytes() == arr.tobytes(), name
    rc, _, err = run_cli(["verify", str(fp8_store)], capsys)
    assert rc == 0, err
    ids, mask = _batch(cfg.vocab_size)
    np.testing.assert_allclose(klotski_jax.load(fp8_store).logits(ids, mask),
                               klotski_jax.load(deq_ckpt).logits(ids, mask), rtol=0, atol=1e-6)


def test_quantize_fp8_from_a_float_checkpoint(root: pathlib.Path, fp8_src) -> None:
    """From float weights: each expert quantized per block (amax / 448), method "rtn", and
    every weight back within e4m3's rounding of the HF weight; default block 128 (one scale
    per matrix here), --group-size sets it."""
    src = root / "hf"  # the float original of fp8_src
    weights = hf_models.load_tensors(src / "model.safetensors")
    for group, grid in ((None, (1, 1)), (16, (2, 2))):
        ckpt = klotski_jax.convert(src, root / f"rtn-{group}", progress=False, quantize="fp8",
                                   group_size=group)
        reader = CheckpointReader(ckpt)
        q = reader.manifest["experts"]["quantization"]
        assert (q["method"], q["original_dtype"], q["group_size"]) == ("rtn", "float32",
                                                                       group or 128)
        for e in (0, 7):
            stored = {"q": reader.expert(2, "down.q", e), "scale": reader.expert(2, "down.scale", e)}
            assert stored["scale"].shape == grid
            w = weights[f"model.layers.2.mlp.experts.{e}.down_proj.weight"]
            deq = quant.dequantize_np(stored, block=group or 128)
            step = quant.dequantize_fp8_np(np.ones(w.shape, F8), stored["scale"],
                                           (group or 128,) * 2)
            assert np.all(np.abs(w - deq) <= _e4m3_bound(w, step))


def test_int8_from_an_fp8_checkpoint_quantizes_its_dequantized_weights(
        root: pathlib.Path, fp8_src) -> None:
    """--quantize int8 (or int4) of an FP8 source: the experts are dequantized first, then
    quantized as from any float checkpoint."""
    src, weights = fp8_src
    reader = CheckpointReader(klotski_jax.convert(src, root / "int8", progress=False,
                                                  quantize="int8"))
    assert reader.manifest["experts"]["quantization"]["method"] == "rtn"
    for e in (1, 6):
        want = quant.quantize(weights[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"],
                              Quant.INT8, 0)
        for name in ("q", "scale"):
            assert reader.expert(2, f"gate.{name}", e).tobytes() == want[name].tobytes()


@pytest.mark.parametrize("io_mode", ["buffered", "direct", "tensorstore"])
def test_host_tier_reads_fp8_experts_bit_identical(fp8_store: pathlib.Path, io_mode: str) -> None:
    """The float8 dtype round-trips through the zarr3 metadata, and the raw chunk reads (with
    and without O_DIRECT) and TensorStore give the same bytes, in aligned buffers."""
    from klotski_jax.runtime.host import HostTier
    from klotski_jax.runtime.ledger import MemoryLedger

    reader = CheckpointReader(fp8_store)
    cfg = reader.config
    zarr = json.loads((fp8_store / "experts" / "layers.1.moe.experts.gate.q" / "zarr.json")
                      .read_text())
    assert zarr["data_type"] == "float8_e4m3fn"
    tier = HostTier(reader, MemoryLedger("host", None), frozenset(), io_mode=io_mode)
    for layer in cfg.moe_layer_ids:
        for e in (0, 3, 7):
            parts, staging, disk, _ = tier.read_expert(layer, e, tier.take_staging)
            assert disk == cfg.expert_bytes
            for part, arrays in parts.items():
                assert set(arrays) == {"q", "scale"}
                for name, arr in arrays.items():
                    want = reader.expert(layer, f"{part}.{name}", e)
                    assert arr.dtype == want.dtype and arr.tobytes() == want.tobytes()
                    assert arr.ctypes.data % 4096 == 0
            tier.give_staging(staging)


@pytest.mark.parametrize("schedule", ["klotski", pytest.param("lru", marks=pytest.mark.slow)])
def test_engine_keeps_the_contract_on_an_fp8_store(fp8_store: pathlib.Path,
                                                   schedule: str) -> None:
    """The engine dequantizes each streamed fp8 expert inside its jitted step, the reference
    all of them with the same function: logits and greedy tokens by the exactness contract,
    at the smallest device budget, and whole fp8 experts read from disk."""
    model = klotski_jax.load(fp8_store)
    cfg = model.config
    tol = contract.tolerance(cfg.dtype)
    ids, mask = _batch(cfg.vocab_size, seed=5)
    want = contract.reference_greedy(model, ids, mask, 4, tol)
    want_logits = model.logits(ids, mask)
    prompts = [ids[r][mask[r] > 0].tolist() for r in range(len(ids))]
    policy = Policy(schedule=schedule, groups=2, verify_memory=True)
    budget = contract.smallest_budget(fp8_store, policy, len(prompts), 11, 4)
    engine = Engine(fp8_store, policy.replace(device_budget=budget))
    out = engine.generate(prompts, max_new_tokens=4, stop_at_eos=False)
    contract.assert_greedy_matches(out.token_ids, want.tokens, want.logits, tol, what=schedule)
    contract.assert_logits_close(engine.logits(ids, mask), want_logits, mask, tol, what=schedule)
    assert 0 < out.stats.peak_device_bytes <= budget
    assert out.stats.bytes_read_disk % cfg.expert_bytes == 0 and out.stats.bytes_read_disk


@pytest.mark.slow
def test_cli_generate_on_an_fp8_store(fp8_store: pathlib.Path, tmp_path: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`klotski generate` on the fp8 store: the reference's greedy tokens. (Budget: the weights'
    size; 90% is below the minimum layout here, where float32 dense weights are most bytes.)"""
    monkeypatch.setenv("KLOTSKI_JAX_PROFILES", str(tmp_path / "profiles"))
    assert_generate_matches_reference(fp8_store, tmp_path, capsys, "100%")


# ---- errors through the CLI ------------------------------------------------------------------------
ST = "model.safetensors"
UP = L1 + "experts.2.up_proj.weight"


def _edit_tensors(src: pathlib.Path, edit) -> None:
    tensors = hf_models.load_tensors(src / ST)
    edit(tensors)
    save_file(tensors, str(src / ST), metadata={"format": "pt"})


def _edit_quant(src: pathlib.Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    qc = config["quantization_config"]
    for k, v in changes.items():
        if v is None:
            qc.pop(k, None)
        else:
            qc[k] = v
    (src / "config.json").write_text(json.dumps(config))


def _no_scale(s: pathlib.Path) -> list[str]:
    _edit_tensors(s, lambda t: t.pop(UP + "_scale_inv"))
    return [UP, UP + "_scale_inv", ST, "missing"]


def _scale_shape(s: pathlib.Path) -> list[str]:
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    _edit_tensors(s, lambda t: t.update({key: np.ones((4, 4), np.float32)}))
    return [key, ST, "(4, 4)", "(4, 2)", "[16, 16]"]


def _method(name: str):
    def mutate(s: pathlib.Path) -> list[str]:
        _edit_quant(s, quant_method=name)
        return ["config.json", "quantization_config.quant_method", repr(name),
                "only fp8 block-scaled checkpoints"]
    return mutate


def _fmt(s: pathlib.Path) -> list[str]:
    _edit_quant(s, fmt="e5m2")
    return ["config.json", "quantization_config.fmt", "'e5m2'", "e4m3"]


def _no_block(s: pathlib.Path) -> list[str]:
    _edit_quant(s, weight_block_size=None)
    return ["config.json", "no weight_block_size"]


def _bad_block(value):
    def mutate(s: pathlib.Path) -> list[str]:
        _edit_quant(s, weight_block_size=value)
        return ["config.json", "quantization_config.weight_block_size", repr(value)]
    return mutate


def _static(s: pathlib.Path) -> list[str]:
    _edit_quant(s, activation_scheme="static")
    return ["config.json", "quantization_config.activation_scheme", "'static'"]


def _no_quant_config(s: pathlib.Path) -> list[str]:
    config = json.loads((s / "config.json").read_text())
    del config["quantization_config"]
    (s / "config.json").write_text(json.dumps(config))
    return ["F8_E4M3", "has no fp8 quantization_config", ST]


def _orphan_scale(s: pathlib.Path) -> list[str]:
    key = "model.layers.0.input_layernorm.weight_scale_inv"
    _edit_tensors(s, lambda t: t.update({key: np.ones((1, 1), np.float32)}))
    return [key, ST, "not used"]


# case -> (mutate(src) -> words the message must contain, extra CLI arguments)
ERRORS = {
    "missing-scale": (_no_scale, []), "scale-shape": (_scale_shape, []),
    "gptq": (_method("gptq"), []), "awq": (_method("awq"), []),
    "bitsandbytes": (_method("bitsandbytes"), []), "fmt": (_fmt, []),
    "no-block-size": (_no_block, []), "block-one-number": (_bad_block([128]), []),
    "block-zero": (_bad_block([0, 128]), []), "block-string": (_bad_block("128x128"), []),
    "static-activations": (_static, []), "no-quantization-config": (_no_quant_config, []),
    "orphan-scale": (_orphan_scale, []),
    "keep-nonsquare": (lambda s: _edit_quant(s, weight_block_size=[16, 32]) or [
        "square blocks only", "[16, 32]"], ["--quantize", "fp8"]),
    "keep-other-group": (lambda s: ["--group-size 32", "leave it out or pass 16"],
                         ["--quantize", "fp8", "--group-size", "32"]),
    "refine": (lambda s: ["--refine", "int8 and int4"], ["--quantize", "fp8", "--refine"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_fp8_errors(fp8_src, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                        case: str) -> None:
    mutate, extra = ERRORS[case]
    src = tmp_path / "hf"
    shutil.copytree(fp8_src[0], src)
    if case == "scale-shape":  # q_proj [64, 32] in 16x16 blocks has a 4x2 grid
        assert hf_models.load_tensors(src / ST)["model.layers.0.self_attn.q_proj.weight_scale_inv"
                                        ].shape == (4, 2)
    words = mutate(src)
    out = tmp_path / "ckpt"
    rc, _, err = run_cli(["convert", str(src), str(out), "-q", *extra], capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    _assert_nothing_left(out)
