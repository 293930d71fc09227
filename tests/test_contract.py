"""The exactness contract (tests/contract.py): its checks on synthetic data, and the bfloat16
default model through every schedule.

The float32 side runs in tests/test_pipeline.py (every family, schedule, ablation and budget,
plus a zeroed expert that must be rejected). Here: the checks accept deviations within the
tolerance and reject a small systematic error beyond it, the margin rule compares greedy tokens
up to the first near-tie and names the first confident mismatch, and the bf16 default model
(16 layers, trained) keeps the bf16 tolerance under each schedule at a quarter of its weights
while a zeroed well-used expert breaks it.
"""

from __future__ import annotations

import pathlib

import contract
import numpy as np
import pytest

import klotski_jax
from klotski_jax.engine import Engine
from klotski_jax.models.specs import total_bytes
from klotski_jax.planning.policy import Policy

TEXTS = ["The with statement is used to", "A class", "In Python, a list comprehension",
         "Exceptions are raised when an error occurs and the interpreter stops the current block",
         "A generator function returns an iterator that yields values one at a time, so",
         "import os"]


# ---- the checks on synthetic data -----------------------------------------------------------------
def test_tolerance_is_stated_per_dtype() -> None:
    assert contract.tolerance("float32") is contract.FLOAT32
    assert contract.tolerance(np.float32) is contract.FLOAT32
    assert contract.tolerance("bfloat16") is contract.BFLOAT16
    for tol in (contract.FLOAT32, contract.BFLOAT16):
        assert 0 < tol.mean <= tol.position and tol.margin == 2 * tol.mean
    with pytest.raises(ValueError, match="no measured exactness tolerance"):
        contract.tolerance("float16")


def _logits_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits [3, 6, 50] and a left-padding mask (rows of 6, 4 and 2 real tokens)."""
    rng = np.random.default_rng(seed)
    want = rng.normal(0, 3, (3, 6, 50)).astype(np.float32)
    mask = np.ones((3, 6), np.int32)
    mask[1, :2] = mask[2, :4] = 0
    return want, mask


@pytest.mark.parametrize("tol", [contract.FLOAT32, contract.BFLOAT16], ids=["float32", "bfloat16"])
def test_logits_check_accepts_the_tolerance_and_rejects_a_systematic_error(
        tol: contract.Tolerance) -> None:
    want, mask = _logits_batch()
    scale = float(np.abs(want[mask > 0]).max())
    sign = np.sign(np.random.default_rng(1).normal(size=want.shape)).astype(np.float32)
    within = want + 0.9 * tol.mean * scale * sign  # everywhere, just inside both bounds
    within[2, :4] = 1e6  # padding positions are not compared
    dev = contract.assert_logits_close(within, want, mask, tol)
    assert dev.position <= tol.position and dev.mean <= tol.mean and dev.scale == scale

    one_spot = want.copy()
    one_spot[1, 3, 7] += 1.5 * tol.position * scale  # one wrong logit at a valid position
    with pytest.raises(AssertionError, match=r"largest deviation .* at \(row, position\) \(1, 3\)"):
        contract.assert_logits_close(one_spot, want, mask, tol, what="a bug")
    everywhere = want + 1.5 * tol.mean * scale  # a small systematic shift of every logit
    with pytest.raises(AssertionError, match="mean per-position deviation"):
        contract.assert_logits_close(everywhere, want, mask, tol)
    broken = want.copy()
    broken[0, 5, 0] = np.nan
    with pytest.raises(AssertionError, match="largest deviation inf"):
        contract.assert_logits_close(broken, want, mask, tol)


def _greedy_case() -> tuple[np.ndarray, np.ndarray]:
    """Reference logits [2, 4, 10] with clear top-2 margins, except a near-tie at row 1,
    new token 2; and the reference's tokens (their argmax)."""
    logits = np.zeros((2, 4, 10), np.float32)
    winners = [[3, 5, 2, 2], [1, 4, 6, 7]]
    for r, row in enumerate(winners):
        for j, t in enumerate(row):
            logits[r, j, t] = 10.0
    logits[1, 2, 8] = 9.99999  # 6 vs 8: a margin of 1e-5, within the threshold 6e-5 (float32)
    return logits, logits.argmax(-1)


def test_greedy_tokens_are_compared_up_to_the_first_near_tie() -> None:
    logits, ref = _greedy_case()
    tol = contract.FLOAT32
    assert contract.guaranteed_lengths(logits, tol) == [4, 2]
    assert contract.guaranteed_agreement(logits, tol) == 6 / 8
    assert contract.assert_greedy_matches(ref, ref, logits, tol) == [4, 2]
    split = ref.copy()
    split[1, 2:] = [8, 0]  # took the other side of the near-tie, then continued elsewhere
    assert contract.assert_greedy_matches(split, ref, logits, tol) == [4, 2]

    wrong = ref.tolist()
    wrong[0][1] = 9
    with pytest.raises(AssertionError, match="row 0, new token 1: got 9, reference 5 under x"):
        contract.assert_greedy_matches(wrong, ref, logits, tol, what="x")
    with pytest.raises(AssertionError, match="5 new tokens, the reference has 4"):
        contract.assert_greedy_matches([[*ref[0], 1], ref[1]], ref, logits, tol)


def test_greedy_rows_cut_at_eos() -> None:
    """The engine stops after an EOS (stop_at_eos); stopping anywhere else is a failure."""
    logits, ref = _greedy_case()
    eos = {5}  # the reference's token 1 of row 0
    cut = [ref[0, :2].tolist(), ref[1].tolist()]
    assert contract.assert_greedy_matches(cut, ref, logits, contract.FLOAT32, eos=eos) == [2, 2]
    early = [ref[0, :1].tolist(), ref[1].tolist()]
    with pytest.raises(AssertionError, match="row 0: stopped after 1 tokens without an EOS"):
        contract.assert_greedy_matches(early, ref, logits, contract.FLOAT32, eos=eos)


# ---- the bfloat16 default model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default checkpoint (bf16), TEXTS as one left-padded batch and the reference logits."""
    from klotski_jax.checkpoints.default_model import default_checkpoint

    ckpt = default_checkpoint(cache_dir=tmp_path_factory.mktemp("cache"))
    model = klotski_jax.load(ckpt)
    assert model.config.dtype == "bfloat16"
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    return dict(ckpt=ckpt, model=model, ids=ids, mask=mask, want=model.logits(ids, mask),
                budget=total_bytes(model.config) // 4)


@pytest.mark.parametrize("p", [dict(schedule="klotski"), dict(schedule="flexgen"),
                               dict(schedule="lru"), dict(schedule="sequential"),
                               dict(schedule="klotski", multi_batch=False,
                                    hot_only_prefetch=False, reorder=False)],
                         ids=["klotski", "flexgen", "lru", "sequential", "klotski-ablated"])
def test_bf16_schedules_keep_the_tolerance(bf16: dict, p: dict) -> None:
    policy = Policy(groups=2, device_budget=bf16["budget"], **p)
    got = Engine(bf16["ckpt"], policy).logits(bf16["ids"], bf16["mask"])
    contract.assert_logits_close(got, bf16["want"], bf16["mask"], contract.BFLOAT16, what=str(p))


def _most_routed_expert(model: klotski_jax.Model, ids: np.ndarray, mask: np.ndarray,
                        layer: int = 0) -> int:
    """The expert of the first layer that the reference routes the most real tokens to (its
    attention, then its router), so that zeroing it is a bug the batch really exercises."""
    import jax.numpy as jnp

    from klotski_jax.models import blocks
    from klotski_jax.models.reference import KVCache, positions_from_mask, pure_state

    assert layer == 0, "only the first layer's input is the embedding"
    cfg, s = model.config, ids.shape[1]
    cache = KVCache.create(cfg, len(ids), -(-s // 32) * 32)
    cache.valid[:, :s] = mask > 0
    w = pure_state(model.layers[layer])
    h = blocks.embed(model.embed[...], jnp.asarray(ids))
    h, _ = blocks.attention_block(w, h, jnp.asarray(positions_from_mask(mask)), cache.kv[layer],
                                  jnp.asarray(0, jnp.int32), jnp.asarray(cache.valid), cfg=cfg,
                                  window=cfg.sliding_windows[layer])
    _, _, experts = blocks.router_block(w, h.reshape(-1, cfg.hidden_size), cfg=cfg)
    routed = np.asarray(experts)[(mask > 0).reshape(-1)]
    return int(np.bincount(routed.ravel(), minlength=cfg.num_experts).argmax())


def test_bf16_wrong_expert_is_rejected(bf16: dict, tmp_path: pathlib.Path) -> None:
    """The bf16 tolerance still catches a real bug: the klotski schedule over a copy of the
    checkpoint whose most-routed layer-0 expert is zeroed (measured: 0.6-0.8 x M per position,
    against the 0.35 bound; docs/exactness.md)."""
    expert = _most_routed_expert(bf16["model"], bf16["ids"], bf16["mask"])
    bad = contract.zeroed_expert_checkpoint(bf16["ckpt"], tmp_path / "bad", layer=0, expert=expert)
    policy = Policy(groups=2, device_budget=bf16["budget"])
    got = Engine(bad, policy).logits(bf16["ids"], bf16["mask"])
    with pytest.raises(AssertionError, match="logits differ from the reference"):
        contract.assert_logits_close(got, bf16["want"], bf16["mask"], contract.BFLOAT16)
