"""Quantized experts (models/quant.py, `klotski convert --quantize`): error bounds, packing,
the stored format and its errors, and the engine against the reference on quantized stores.

Error bounds are stated per element against the stored float16 scale s of the element's
group: round-to-nearest puts every value within half a step, s / 2, plus the float16 rounding of
s (and of the int4 zero point), here allowed as 10% of a step. The refinement has no
per-element bound (a smaller scale may clip an outlier harder); its guarantee is per group:
never a larger squared error than round-to-nearest.
"""

from __future__ import annotations

import json
import pathlib

import contract
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import assert_generate_matches_reference, run_cli
from hf_models import save_hf_model

import klotski_jax
from klotski_jax.checkpoints import manifest as mf
from klotski_jax.checkpoints.errors import ConversionError, ManifestError
from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.config import ConfigError, Quant, quant_leaves
from klotski_jax.engine import Engine
from klotski_jax.models import quant
from klotski_jax.planning.placement import Workload, place, staged_expert_bytes
from klotski_jax.planning.policy import Policy

STEP_SLACK = 0.1  # of a step: the float16 rounding of the scale and zero point
# Below float16's resolution (subnormal step 2^-24) a scale loses its relative precision, so
# a group whose values are all under ~1e-5 comes back within this absolute floor instead.
FLOOR = 127 * 2.0 ** -24


def _groups(x: np.ndarray, g: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, g)


def _scales(stored: dict[str, np.ndarray]) -> np.ndarray:
    return stored["scale"].astype(np.float32)


def _adversarial(rng: np.random.Generator, g: int) -> np.ndarray:
    """[6, 4 g]: random rows, constant groups (positive, negative), all-zero groups, groups with
    one 100x outlier, a row of tiny values and one with huge values."""
    w = (0.02 * rng.standard_normal((6, 4 * g))).astype(np.float32)
    w[0, :g] = 0.37  # constant, positive
    w[0, g: 2 * g] = -1.25  # constant, negative
    w[1, :g] = 0.0  # all zero
    w[1, 2 * g: 3 * g] = 0.0
    w[2, ::g] = 2.0  # one outlier per group
    w[3, g + 1] = -3.0
    w[4] *= 1e-4  # tiny
    w[5] *= 1e3  # huge
    return w


@pytest.mark.parametrize("scheme,g", [("int8", 0), ("int8", 16), ("int4", 16), ("int4", 64)])
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_round_to_nearest_is_within_half_a_step(scheme: str, g: int, data: str) -> None:
    rng = np.random.default_rng(0)
    width = 4 * (g or 16)
    w = (0.02 * rng.standard_normal((32, width))).astype(np.float32) if data == "random" \
        else _adversarial(rng, g or 16)
    stored = quant.quantize(w, Quant(scheme), g, refine=False)
    group = g or w.shape[1]
    for name, shape, dtype in quant_leaves(Quant(scheme), g, *w.shape, "float32"):
        assert stored[name].shape == shape and stored[name].dtype == np.dtype(dtype), name
    deq = quant.dequantize_np(stored)
    step = _scales(stored)[..., None]
    err = np.abs(_groups(w - deq, group))
    assert np.all(err <= (0.5 + STEP_SLACK) * step + FLOOR)
    if data == "adversarial" and g:
        np.testing.assert_array_equal(deq[1, :g], 0.0)  # an all-zero group comes back exactly
        # constant groups come back within the float16 rounding of their scale
        np.testing.assert_allclose(deq[0, :g], 0.37, rtol=2e-3)
        np.testing.assert_allclose(deq[0, g: 2 * g], -1.25, rtol=2e-3)
        # an outlier widens its own group's step only
        qmax, scales = (127 if scheme == "int8" else 15), _scales(stored)
        assert np.all(scales[2] >= 0.99 * 2.0 / qmax) and scales[3, 1] >= 0.99 * 3.0 / qmax
        assert np.all(np.delete(scales[3], 1) < 0.2 / qmax) and np.all(scales[4] < 1e-5)


@pytest.mark.parametrize("scheme,g", [("int8", 0), ("int8", 16), ("int4", 16)])
def test_refinement_never_increases_a_groups_error(scheme: str, g: int) -> None:
    rng = np.random.default_rng(1)
    w = np.concatenate([(0.02 * rng.standard_normal((64, 64))).astype(np.float32),
                        _adversarial(rng, 16)[:, :64]])
    group = g or w.shape[1]
    rtn = quant.dequantize_np(quant.quantize(w, Quant(scheme), g, refine=False))
    lsq = quant.dequantize_np(quant.quantize(w, Quant(scheme), g, refine=True))
    e_rtn = (_groups(w - rtn, group) ** 2).sum(-1)
    e_lsq = (_groups(w - lsq, group) ** 2).sum(-1)
    assert np.all(e_lsq <= e_rtn)
    if scheme == "int4":  # and it measurably helps int4 (the manifest says which was used)
        assert e_lsq.sum() < 0.95 * e_rtn.sum()


def test_int4_packing_round_trips_and_native_unpacking_agrees() -> None:
    codes = np.random.default_rng(2).integers(0, 16, (7, 48)).astype(np.uint8)
    packed = quant.pack_int4(codes, 8)
    assert packed.shape == (7, 24) and packed.dtype == np.uint8
    np.testing.assert_array_equal(quant.unpack_int4_np(packed, 8), codes)
    # per group of 8: byte j holds code j (low nibble) and code j + 4 (high nibble)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 4] << 4)
    assert packed[2, 5] == codes[2, 9] | (codes[2, 13] << 4)
    every = np.arange(256, dtype=np.uint8).reshape(4, 64)  # every byte value
    for g in (2, 8, 64):
        # with scale 1 and zero 0 the device's dequantization is the codes themselves (small
        # integers, exact in float32): unpacked by shifts and masks or by JAX's uint4 bitcast
        ones, zeros = np.ones((4, 128 // g), np.float16), np.zeros((4, 128 // g), np.float16)
        want = quant.unpack_int4_np(every, g).astype(np.float32)
        for native in (False, True):
            got = jax.jit(lambda p, s, z, n=native: quant.dequantize(p, s, z, jnp.float32,
                                                                     native=n))(every, ones, zeros)
            np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="even group size dividing"):
        quant.pack_int4(codes[:, :3], 2)
    with pytest.raises(ValueError, match="codes must lie in"):
        quant.pack_int4(np.full((1, 2), 16, np.uint8), 2)


@pytest.mark.parametrize("scheme,g", [("int8", 0), ("int4", 8)])
def test_device_dequantization_equals_numpy(scheme: str, g: int) -> None:
    w = (0.05 * np.random.default_rng(3).standard_normal((2, 24, 32))).astype(np.float32)
    stored = [quant.quantize(x, Quant(scheme), g) for x in w]
    stacked = {k: np.stack([s[k] for s in stored]) for k in stored[0]}  # [E, ...] as stored
    # The same float32 arithmetic on the device: equal within float32 rounding (a backend may
    # fuse it differently), then within one rounding step of the target dtype.
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2.0 ** -8)):
        for native in (False, True):  # int4 unpacked with shifts or the native uint4
            got = jax.jit(lambda t, dt=dtype, n=native: quant.dequantize(
                t["q"], t["scale"], t.get("zero"), dt, native=n))(stacked)
            for e in range(2):
                np.testing.assert_allclose(np.asarray(got[e]).astype(np.float32),
                                           quant.dequantize_np(stored[e], np.dtype(dtype)
                                                               ).astype(np.float32),
                                           rtol=rtol, atol=1e-7)


def test_quantize_refuses_bad_input() -> None:
    w = np.zeros((4, 24), np.float32)
    with pytest.raises(ValueError, match="group size 16 does not divide the input dimension 24"):
        quant.quantize(w, Quant.INT8, 16)
    with pytest.raises(ValueError, match="even group size"):
        quant.quantize(w, Quant.INT4, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quant.quantize(np.full((2, 8), np.nan, np.float32), Quant.INT8, 0)


# ---- the stored format ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    _, hf_dir = save_hf_model("qwen2_moe", tmp_path_factory.mktemp("q") / "hf")  # I 24, D 32
    return hf_dir


@pytest.fixture(scope="module")
def int4_ckpt(tiny_hf: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return klotski_jax.convert(tiny_hf, tmp_path_factory.mktemp("int4") / "ckpt", progress=False,
                               quantize="int4", group_size=8)


def test_quantized_store_layout_and_manifest(tiny_hf: pathlib.Path, int4_ckpt: pathlib.Path
                                             ) -> None:
    m = json.loads((int4_ckpt / mf.MANIFEST_FILE).read_text())
    assert m["format_version"] == 3
    assert m["experts"]["quantization"] == {"scheme": "int4", "group_size": 8,
                                            "scale_dtype": "float16", "method": "rtn",
                                            "original_dtype": "float32"}
    reader = CheckpointReader(int4_ckpt)
    cfg = reader.config
    moe = cfg.moe_layer_ids[0]
    assert m["tensors"][f"layers.{moe}.moe.experts.down.q"]["dtype"] == "uint8"
    assert m["tensors"][f"layers.{moe}.moe.experts.down.q"]["shape"] == [6, 32, 12]
    assert m["tensors"][f"layers.{moe}.moe.experts.down.scale"]["shape"] == [6, 32, 3]
    assert m["tensors"][f"layers.{moe}.moe.shared.up"]["dtype"] == "float32"  # shared stays
    # each stored array of an expert is one chunk file holding exactly its raw bytes
    for leaf in ("gate.q", "gate.scale", "gate.zero", "down.q"):
        raw = reader.expert_chunk_path(moe, leaf, 4).read_bytes()
        assert raw == reader.expert(moe, leaf, 4).tobytes()
    # bf16 bytes / int4 bytes: the store moves about a quarter (scales and zeros are the rest)
    plain = CheckpointReader(klotski_jax.convert(tiny_hf, int4_ckpt.parent / "plain",
                                                 progress=False, dtype="bfloat16")).config
    assert cfg.expert_bytes == (2 * 24 * 32 + 32 * 24) * (0.5 + 2 * 2 / 8)
    assert cfg.expert_bytes / plain.expert_bytes == 0.5 / 2 + 2 * 2 / 8 / 2
    assert staged_expert_bytes(cfg) == 9 * 4096  # nine arrays, each page-aligned in staging
    # an unquantized conversion is still format 2 (older readers keep reading it)
    assert json.loads((int4_ckpt.parent / "plain" / mf.MANIFEST_FILE).read_text())[
        "format_version"] == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), "unsupported --quantize 'int3'"),
    (dict(group_size=8), "--group-size needs --quantize int8, int4 or fp8"),
    (dict(quantize="int4", group_size=0), "--group-size must be a positive"),
    (dict(quantize="int4", group_size=7), "even group size"),
    (dict(quantize="int4"), "group size 64 does not divide the input dimension 32"),
    (dict(quantize="int8", group_size=16), "group size 16 does not divide the input dimension 24"),
])
def test_conversion_refuses_bad_quantization(tiny_hf: pathlib.Path, tmp_path: pathlib.Path,
                                             kwargs: dict, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        klotski_jax.convert(tiny_hf, tmp_path / "out", progress=False, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary directory


def test_cli_convert_quantize_error_exits_2(tiny_hf: pathlib.Path, tmp_path: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["convert", str(tiny_hf), str(tmp_path / "o"), "--quantize", "int4",
                          "--group-size", "5", "-q"], capsys)
    assert rc == 2 and "even group size > 0" in err
    assert not (tmp_path / "o").exists()


def _edit_manifest(ckpt: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    import shutil

    shutil.copytree(ckpt, dst)
    m = json.loads((dst / mf.MANIFEST_FILE).read_text())
    edit(m)
    (dst / mf.MANIFEST_FILE).write_text(json.dumps(m))
    return dst


def test_unknown_schemes_and_mixed_formats_are_refused(int4_ckpt: pathlib.Path,
                                                       tmp_path: pathlib.Path) -> None:
    def unknown(m: dict) -> None:
        m["experts"]["quantization"]["scheme"] = "nf4"
        m["config"]["expert_quant"] = "nf4"

    bad = _edit_manifest(int4_ckpt, tmp_path / "nf4", unknown)
    with pytest.raises(ManifestError, match="quantized as 'nf4', a scheme this klotski-jax does not"):
        klotski_jax.load(bad)
    with pytest.raises(ManifestError, match="'nf4'"):
        Engine(bad)

    def disagree(m: dict) -> None:  # the section says int8, the config int4
        m["experts"]["quantization"]["scheme"] = "int8"

    with pytest.raises(ManifestError, match="does not match the config's expert_quant='int4'"):
        CheckpointReader(_edit_manifest(int4_ckpt, tmp_path / "disagree", disagree))

    def mixed(m: dict) -> None:  # one layer's experts left in float: mixing formats
        moe = next(n for n in m["tensors"] if n.endswith("experts.gate.q"))
        layer = moe.removesuffix(".gate.q")
        for suffix in (".gate.scale", ".gate.zero"):
            del m["tensors"][layer + suffix]
        m["tensors"][layer + ".gate"] = m["tensors"].pop(moe)

    with pytest.raises(ManifestError, match="tensors do not match the config"):
        CheckpointReader(_edit_manifest(int4_ckpt, tmp_path / "mixed", mixed))

    def old(m: dict) -> None:  # a quantized store claiming format 2
        m["format_version"] = 2

    with pytest.raises(ManifestError, match="invalid experts.quantization"):
        CheckpointReader(_edit_manifest(int4_ckpt, tmp_path / "v2", old))
    with pytest.raises(ConfigError, match="not a scheme this klotski-jax reads"):
        from klotski_jax.config import ModelConfig

        ModelConfig.from_dict({**CheckpointReader(int4_ckpt).config.to_dict(),
                               "expert_quant": "nf4"})


def test_reference_model_uses_the_dequantized_weights(int4_ckpt: pathlib.Path) -> None:
    model = klotski_jax.load(int4_ckpt)
    reader = CheckpointReader(int4_ckpt)
    moe = model.config.moe_layer_ids[0]
    stacked = reader.experts(moe)
    want = quant.dequantize_np({k.removeprefix("up."): v for k, v in stacked.items()
                                if k.startswith("up.")})
    got = model.layers[moe].moe.experts.up.weight(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


# ---- the engine on quantized stores: every schedule against the reference ------------------------
POLICIES = [dict(schedule="klotski"), dict(schedule="klotski", multi_batch=False,
                                           hot_only_prefetch=False, reorder=False),
            dict(schedule="flexgen"), dict(schedule="lru"), dict(schedule="sequential")]


@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_every_schedule_keeps_the_contract_on_a_quantized_store(
        scheme: str, tiny_hf: pathlib.Path, int4_ckpt: pathlib.Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    ckpt = int4_ckpt if scheme == "int4" else klotski_jax.convert(
        tiny_hf, tmp_path_factory.mktemp("int8") / "ckpt", progress=False, quantize="int8")
    model = klotski_jax.load(ckpt)
    cfg = model.config
    tol = contract.tolerance(cfg.dtype)
    rng = np.random.default_rng(5)
    lengths = (7, 11, 5, 9)
    ids = np.zeros((len(lengths), 11), np.int32)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, 11 - n:] = rng.integers(3, cfg.vocab_size, n)
        mask[r, 11 - n:] = 1
    want = contract.reference_greedy(model, ids, mask, 5, tol)
    want_logits = model.logits(ids, mask)
    prompts = [ids[r, 11 - n:].tolist() for r, n in enumerate(lengths)]
    for p in POLICIES:
        policy = Policy(groups=2, verify_memory=True, **p)
        budget = contract.smallest_budget(ckpt, policy, len(prompts), 11, 5)
        engine = Engine(ckpt, policy.replace(device_budget=budget))
        out = engine.generate(prompts, max_new_tokens=5, stop_at_eos=False)
        contract.assert_greedy_matches(out.token_ids, want.tokens, want.logits, tol, what=str(p))
        contract.assert_logits_close(engine.logits(ids, mask), want_logits, mask, tol,
                                     what=str(p))
        assert 0 < out.stats.peak_device_bytes <= budget
        assert out.stats.bytes_read_disk % cfg.expert_bytes == 0  # whole quantized experts


@pytest.mark.parametrize("io_mode", ["buffered", "direct", "tensorstore"])
def test_host_tier_reads_quantized_experts_bit_identical(int4_ckpt: pathlib.Path,
                                                         io_mode: str) -> None:
    from klotski_jax.runtime.host import HostTier
    from klotski_jax.runtime.ledger import MemoryLedger

    reader = CheckpointReader(int4_ckpt)
    cfg = reader.config
    tier = HostTier(reader, MemoryLedger("host", None), frozenset(), io_mode=io_mode)
    for layer in cfg.moe_layer_ids:
        for e in range(cfg.num_experts):
            parts, staging, disk, hit = tier.read_expert(layer, e, tier.take_staging)
            assert disk == cfg.expert_bytes and not hit and staging is not None
            assert set(parts) == {"gate", "up", "down"}
            for part, arrays in parts.items():
                assert set(arrays) == {"q", "scale", "zero"}
                for name, arr in arrays.items():
                    want = reader.expert(layer, f"{part}.{name}", e)
                    assert arr.dtype == want.dtype and arr.tobytes() == want.tobytes()
                    assert arr.ctypes.data % 4096 == 0  # page-aligned: device_put may alias it
            tier.give_staging(staging)


def test_cli_generate_and_bench_run_a_quantized_store(
        int4_ckpt: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLOTSKI_JAX_PROFILES", str(tmp_path / "profiles"))
    assert_generate_matches_reference(int4_ckpt, tmp_path, capsys, "90%")
    rc, _, err = run_cli(["bench", str(int4_ckpt), "--schedules", "klotski,lru", "--json",
                          str(tmp_path / "b.jsonl"), "--prompt-len", "8", "--gen-len", "3",
                          "--num-prompts", "2", "--repeats", "1", "--device-budget", "90%", "-q"],
                         capsys)
    assert rc == 0, err
    bench_rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert {r["schedule"] for r in bench_rows} >= {"klotski", "lru"}
    assert all("experts int4 (group 8)" in r["model"] for r in bench_rows)


def test_budgets_count_quantized_bytes() -> None:
    """The same host budget caches about 3.5x more int4 experts than bf16 ones, on
    Mixtral-8x7B's shapes, and the same device budget holds more of them: placement (and the
    ledger and planner behind it) count the stored bytes."""
    from klotski_jax.config import Family, ModelConfig

    bf16 = ModelConfig(family=Family.MIXTRAL, vocab_size=32000, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                       expert_intermediate_size=14336, moe_layers=(True,) * 32,
                       sliding_windows=(None,) * 32, dtype="bfloat16")
    int4 = bf16.replace(expert_quant=Quant.INT4, expert_group_size=64)
    int8 = bf16.replace(expert_quant=Quant.INT8)
    assert int4.expert_bytes / bf16.expert_bytes == 0.28125  # 4 bits + 2 x 16 bits per 64
    assert 0.5 < int8.expert_bytes / bf16.expert_bytes < 0.501  # + one scale per row
    work = Workload(groups=2, batch_size=8, prompt_len=64, max_new_tokens=32)
    held = {}
    for cfg in (bf16, int4):
        staged = staged_expert_bytes(cfg)
        assert cfg.expert_bytes <= staged < cfg.expert_bytes + 9 * 4096
        policy = Policy(groups=2, device_budget=6 << 30, host_budget=None)
        host_min = place(cfg, policy, work).min_host_bytes
        policy = policy.replace(host_budget=host_min + 20 * staged_expert_bytes(bf16))
        pl = place(cfg, policy, work)
        held[cfg.expert_quant] = (len(pl.host_experts), len(pl.device_experts), pl.expert_slots)
    assert held[Quant.INT4][0] >= 3.5 * held[Quant.NONE][0] > 0  # host cache
    # on the device the room int4 saves goes to more experts and, here, the dense layers too
    assert held[Quant.INT4][1] + held[Quant.INT4][2] >= 1.5 * (held[Quant.NONE][1]
                                                               + held[Quant.NONE][2])


@pytest.mark.slow
def test_cli_profile_and_plan_a_quantized_store(int4_ckpt: pathlib.Path, tmp_path: pathlib.Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`klotski profile` measures the quantized expert step under its own model key (a bf16
    profile is never reused for int4) and `klotski plan` plans over it."""
    from klotski_jax.planning.costs import Profile, model_key

    monkeypatch.setenv("KLOTSKI_JAX_PROFILES", str(tmp_path / "profiles"))
    cfg = CheckpointReader(int4_ckpt).config
    assert model_key(cfg) != model_key(cfg.replace(expert_quant=Quant.NONE, expert_group_size=0))
    profile = tmp_path / "profile.json"
    rc, _, err = run_cli(["profile", str(int4_ckpt), "--quick", "--repeats", "1", "--out",
                          str(profile)], capsys)
    assert rc == 0, err
    assert Profile.from_json(profile.read_text()).model_key == model_key(cfg)
    rc, stdout, err = run_cli(["plan", str(int4_ckpt), "--device-budget", "90%", "--prompts",
                               "2", "--prompt-len", "8", "--gen-len", "4", "--json",
                               "--profile", str(profile)], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["placement"]["expert_slots"] >= 1


def test_bench_quantized_rows(tiny_hf: pathlib.Path, tmp_path: pathlib.Path,
                              capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`klotski bench --quantized int8,int4` adds klotski rows on quantized stores converted
    next to the checkpoint (reused on the next run); a store the model's shapes do not allow
    (int4's default group of 64 on 32-wide experts) skips its row with the converter's reason."""
    monkeypatch.setenv("KLOTSKI_JAX_PROFILES", str(tmp_path / "profiles"))
    ckpt = klotski_jax.convert(tiny_hf, tmp_path / "ckpt", progress=False)
    argv = ["bench", str(ckpt), "--schedules", "klotski", "--quantized", "int8,int4", "--json",
            str(tmp_path / "b.jsonl"), "--prompt-len", "8", "--gen-len", "3", "--num-prompts",
            "2", "--repeats", "1", "--device-budget", "90%", "-q"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    rows = {r["schedule"]: r for r in map(json.loads,
                                          (tmp_path / "b.jsonl").read_text().splitlines())}
    int8 = rows["klotski int8"]
    assert int8["store"] == "int8" and int8["throughput_tokens_per_s"] > 0
    assert int8["store_checkpoint"] == str(tmp_path / "ckpt-int8")
    assert int8["device_budget_bytes"] == rows["klotski"]["device_budget_bytes"]  # same bytes
    assert CheckpointReader(tmp_path / "ckpt-int8").config.expert_quant is Quant.INT8
    assert "group size 64 does not divide" in rows["klotski int4"]["skipped"]
    stamp = (tmp_path / "ckpt-int8" / mf.MANIFEST_FILE).stat().st_mtime_ns
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert (tmp_path / "ckpt-int8" / mf.MANIFEST_FILE).stat().st_mtime_ns == stamp  # reused
    rc, _, err = run_cli([*argv[:5], "int3", *argv[6:]], capsys)
    assert rc == 2 and "int8, int4" in err
