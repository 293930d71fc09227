"""The exactness contract between the engine's schedules and the all-resident reference.

Every test that compares what a schedule computed with the reference (`Model.logits`,
`Model.generate_reference`) goes through this module, so the promise is stated once:

1. **Teacher-forced logits.** `Engine.logits(ids, mask)` (float32 [B, S, V], computed through a
   schedule) agrees with `Model.logits(ids, mask)` at every valid position (mask > 0):
   max_v |got - want| <= `position` x M at each position, and the mean of that per-position
   deviation over the valid positions <= `mean` x M, where M = max |want| over the valid
   positions. The tolerances depend on the weights' dtype (`tolerance(dtype)`).
2. **Margin-aware greedy tokens.** Where the reference's top-2 logits differ by more than
   `margin` x M (M: max |logit| of the reference over the compared positions), the argmax is
   not in doubt and a schedule must pick the reference's token. Free-running generation is
   compared row by row, position by position, until the first near-tie (margin <= threshold):
   from there the two may pick different tokens and their contexts diverge, so the rest of that
   row is not compared. The reference's logits at each generated position come from teacher
   forcing: one `Model.logits` forward over prompt + reference tokens.

Bit-identity is not promised: XLA (and cuBLAS on GPUs) chooses matmul kernels by shape and by
instruction set (AVX-512/AMX on Intel, AVX2 on AMD, tensor cores), and a schedule runs an expert
over a padded bucket of its routed tokens while the reference runs it over the whole batch, so the
float32 sums are taken in different orders. In float32 that moves logits by a few 1e-7 of M; in
bfloat16 a different rounding of one activation (one bf16 ulp, 2^-8 relative) propagates
through the layers and, rarely, flips a router's top-k choice at a near-tie.

How the numbers were measured (tests/measure_contract.py prints them; docs/exactness.md):
`Engine.logits` of every schedule and ablation, 1-3 groups, the minimum and an
unlimited device budget, on the 8 tiny families of hf_models.py in float32 and converted to
bfloat16, and on the bfloat16 default model (3 batches); against the reference computed with the
code as is and with "other kernels" emulated: projections that sum their contraction in 2, 3 or 5
blocks, projections upcast to float32, and XLA_FLAGS=--xla_allow_excess_precision=false. Largest
deviations (relative to M):

- float32: 3.7e-7 per position, 1.9e-7 mean. FLOAT32 is 8x that. Real bugs on the tiny models
  move some position by 2.7e-3 to 7e-2 (a zeroed routed expert, routing weights dropped or
  halved, a group's rows shifted by one).
- bfloat16 (default model, 16 layers): 6.9e-2 per position (isolated positions), 4.8e-3 mean;
  even the code as is on an AMD EPYC gives 2.6e-2 on random-token prompts in 2-3 groups.
  BFLOAT16 is 5x both. Real bugs: routing weights dropped 0.24 per position / 0.17 mean, a
  group's rows shifted 2.0, the most-routed layer-0 expert zeroed 0.6 / 0.2. Greedy flips
  between kernels happened only where the top-2 margin was <= 7.9e-3 x M (two bf16 ulps of M);
  the margin threshold 0.05 is 6x that (2 x the mean tolerance).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The contract's bounds for one dtype, as fractions of the reference's max |logit| M.

    position: the largest |got - want| at any valid position, over the vocabulary.
    mean: the mean over valid positions of each position's largest |got - want|.
    margin: greedy tokens must agree where the reference's top-2 margin exceeds margin x M
      (2 x the deviation a position can carry: two logits moving apart by it cannot swap).
    """

    position: float
    mean: float
    margin: float


# float32: 8x the largest measured per-position deviation (3.7e-7); the mean bound is the same.
FLOAT32 = Tolerance(position=3e-6, mean=3e-6, margin=6e-6)
# bfloat16: 5x the largest measured per-position (6.9e-2) and mean (4.8e-3) deviations; the margin
# is 2 x the mean tolerance (measured greedy flips: margins <= 7.9e-3).
BFLOAT16 = Tolerance(position=0.35, mean=0.025, margin=0.05)

_BY_DTYPE = {"float32": FLOAT32, "bfloat16": BFLOAT16}


def tolerance(dtype: Any) -> Tolerance:
    """The measured tolerance for a model stored in `dtype` (a name or numpy/jax dtype)."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in _BY_DTYPE:
        raise ValueError(f"no measured exactness tolerance for dtype {name!r} "
                         f"(measured: {sorted(_BY_DTYPE)})")
    return _BY_DTYPE[name]


@dataclasses.dataclass(frozen=True)
class Deviation:
    """How far got is from want, relative to M = max |want| over the valid positions."""

    position: float  # the largest per-position deviation / M
    mean: float  # the mean per-position deviation / M
    worst: tuple[int, ...]  # the index (row, position) of the largest one
    scale: float  # M


def logit_deviation(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> Deviation:
    """Per-position deviation of float logits got vs want [B, S, V] over mask [B, S] > 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"logits shape {got.shape} != reference shape {want.shape}")
    valid = np.asarray(mask) > 0
    if not valid.any():
        raise ValueError("no valid position to compare")
    scale = float(np.abs(want[valid]).max())
    if not np.isfinite(got[valid]).all():
        return Deviation(np.inf, np.inf, tuple(int(i) for i in np.argwhere(
            ~np.isfinite(got).all(-1) & valid)[0]), scale)
    per = np.where(valid, np.abs(got - want).max(-1), 0.0) / max(scale, np.finfo(np.float32).tiny)
    worst = np.unravel_index(int(per.argmax()), per.shape)
    return Deviation(float(per.max()), float(per[valid].mean()), tuple(int(i) for i in worst),
                     scale)


def assert_logits_close(got: np.ndarray, want: np.ndarray, mask: np.ndarray, tol: Tolerance,
                        what: str = "") -> Deviation:
    """Contract 1: the schedule's teacher-forced logits agree with the reference's within tol.

    Raises AssertionError naming the worst (row, position) and both measures; returns the
    deviation (for reports)."""
    dev = logit_deviation(got, want, mask)
    bad = []
    if not dev.position <= tol.position:
        bad.append(f"largest deviation {dev.position:.3g} x M > {tol.position:g} x M at (row, "
                   f"position) {dev.worst}")
    if not dev.mean <= tol.mean:
        bad.append(f"mean per-position deviation {dev.mean:.3g} x M > {tol.mean:g} x M")
    if bad:
        raise AssertionError(f"logits differ from the reference{f' under {what}' if what else ''}:"
                             f" {'; '.join(bad)} (M = max |reference logit| = {dev.scale:.4g})")
    return dev


# ---- greedy tokens ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference's greedy continuation of a left-padded batch and, for each new token, the
    teacher-forced logits that chose it: logits[:, j] is Model.logits(prompt + tokens)[:, S-1+j]."""

    tokens: np.ndarray  # [B, N] int
    logits: np.ndarray  # [B, N, V] float32


def teacher_forced_logits(model: Any, ids: np.ndarray, mask: np.ndarray,
                          new_tokens: np.ndarray) -> np.ndarray:
    """Logits [B, N, V] that predict each of new_tokens [B, N] after the left-padded prompts
    ids/mask [B, S]: one no-cache forward of `model` (a klotski_jax Model) over prompt + new
    tokens; position S-1+j predicts new token j."""
    ids, mask, new = np.asarray(ids), np.asarray(mask), np.asarray(new_tokens)
    s, n = ids.shape[1], new.shape[1]
    seq = np.concatenate([ids, new.astype(ids.dtype)], axis=1)
    full_mask = np.concatenate([mask, np.ones((len(ids), n), mask.dtype)], axis=1)
    return np.asarray(model.logits(seq, full_mask))[:, s - 1: s - 1 + n]


def reference_greedy(model: Any, ids: np.ndarray, mask: np.ndarray, new: int,
                     tol: Tolerance | None = None) -> Reference:
    """`Model.generate_reference` of `new` tokens plus their teacher-forced logits.

    Checks the reference against itself first (its KV-cache decode and the no-cache forward are
    two computations): each row's tokens must be the argmax of the teacher-forced logits up to
    its first near-tie, or the logits would not belong to these tokens."""
    tol = tol or tolerance(model.config.dtype)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    tokens = np.asarray(model.generate_reference(ids, new, mask))[:, ids.shape[1]:]
    logits = teacher_forced_logits(model, ids, mask, tokens)
    assert_greedy_matches(tokens, logits.argmax(-1), logits, tol,
                          what="the reference's KV-cache decode vs its own no-cache forward")
    return Reference(tokens, logits)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of each position: [..., V] -> [...]."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def margin_threshold(ref_logits: np.ndarray, tol: Tolerance) -> float:
    """Absolute top-2 margin above which greedy tokens must agree: tol.margin x max |logit|."""
    return tol.margin * float(np.abs(np.asarray(ref_logits, np.float64)).max())


def guaranteed_lengths(ref_logits: np.ndarray, tol: Tolerance) -> list[int]:
    """Per row, how many leading new tokens the contract pins down: the positions before the
    row's first near-tie (margin <= threshold), i.e. those every schedule must reproduce."""
    confident = margins(ref_logits) > margin_threshold(ref_logits, tol)
    return [int(np.argmin(row)) if not row.all() else len(row) for row in confident]


def guaranteed_agreement(ref_logits: np.ndarray, tol: Tolerance) -> float:
    """The share of new tokens on which any two schedules must agree (both equal the
    reference's there): a lower bound for a measured token agreement such as the bench's
    `same_tokens_as_resident`."""
    lengths = guaranteed_lengths(ref_logits, tol)
    return sum(lengths) / (len(lengths) * np.asarray(ref_logits).shape[1])


def assert_greedy_matches(got_tokens: Sequence[Sequence[int]] | np.ndarray,
                          ref_tokens: Sequence[Sequence[int]] | np.ndarray,
                          ref_logits: np.ndarray, tol: Tolerance, *, eos: Collection[int] = (),
                          what: str = "") -> list[int]:
    """Contract 2 for free-running greedy generation; returns how many tokens each row compared.

    got_tokens: a schedule's new tokens per row (rows may be shorter: cut after an EOS, which is
    allowed only when the last token is in `eos`); ref_tokens [B, N] and ref_logits [B, N, V]:
    the reference's (`reference_greedy`). Each row is compared position by position up to, not
    including, its first near-tie; a mismatch before that fails with the row, position, both
    tokens and the margin.
    """
    ref_tokens = np.asarray(ref_tokens)
    ref_logits = np.asarray(ref_logits)
    if len(got_tokens) != len(ref_tokens) or ref_logits.shape[:2] != ref_tokens.shape:
        raise AssertionError(f"shapes: {len(got_tokens)} rows of tokens, reference tokens "
                             f"{ref_tokens.shape}, reference logits {ref_logits.shape}")
    thr = margin_threshold(ref_logits, tol)
    marg = margins(ref_logits)
    where = f" under {what}" if what else ""
    compared = []
    for r, (got, want) in enumerate(zip(got_tokens, ref_tokens)):
        got = [int(t) for t in got]
        if len(got) > len(want):
            raise AssertionError(f"row {r}: {len(got)} new tokens, the reference has "
                                 f"{len(want)}{where}")
        n = 0
        for j, w in enumerate(want):
            if marg[r, j] <= thr:
                break  # a near-tie: the tokens may differ here, and the contexts from here on
            if j >= len(got):
                if not got or got[-1] not in eos:
                    raise AssertionError(f"row {r}: stopped after {len(got)} tokens without an "
                                         f"EOS; reference {want.tolist()}{where}")
                break
            if got[j] != w:
                raise AssertionError(
                    f"row {r}, new token {j}: got {got[j]}, reference {int(w)}{where}; the "
                    f"reference's top-2 margin {marg[r, j]:.4g} exceeds the near-tie threshold "
                    f"{thr:.4g} ({tol.margin:g} x max |logit|), so the token is not in doubt "
                    f"(tokens so far: got {got[:j + 1]}, reference {want[:j + 1].tolist()})")
            n = j + 1
        compared.append(n)
    return compared


# ---- negative tests -----------------------------------------------------------------------------
def zeroed_expert_checkpoint(ckpt: str | os.PathLike[str], out: pathlib.Path, layer: int,
                             expert: int) -> pathlib.Path:
    """A copy of checkpoint `ckpt` at `out` whose expert `expert` of `layer` has all-zero gate,
    up and down weights: a schedule run over it computes what a schedule with a wrong (missing)
    expert would, which the contract must reject. Files are symlinked, only the three chunk
    files of that expert are written (as many zero bytes as the originals), and the manifest's
    checksums are updated to match: a consistent checkpoint of another model, so that what
    rejects it is the contract, not the engine's checksum check."""
    import json

    from klotski_jax.checkpoints import checksums
    from klotski_jax.checkpoints.manifest import MANIFEST_FILE
    from klotski_jax.checkpoints.store import CheckpointReader

    shutil.copytree(ckpt, out, copy_function=os.symlink)
    reader = CheckpointReader(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for part in ("gate", "up", "down"):
        chunk = reader.expert_chunk_path(layer, part, expert)
        size = chunk.stat().st_size
        chunk.unlink()
        chunk.write_bytes(bytes(size))
        if "checksums" in manifest:
            rel = chunk.relative_to(out).as_posix()
            manifest["checksums"]["files"][rel] = checksums.entry(*checksums.file_digest(chunk))
    (out / MANIFEST_FILE).unlink()  # a symlink to the original's: write a new file
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


# ---- budgets ------------------------------------------------------------------------------------
def smallest_budget(ckpt: str | os.PathLike[str], policy: Any, n_prompts: int, prompt_len: int,
                    new_tokens: int) -> int:
    """The tightest device budget `Engine(ckpt, policy)` accepts for `n_prompts` prompts of up
    to `prompt_len` tokens generating `new_tokens`: the placement's minimum for the layout the
    engine picks (prompts padded to their bucket, the cache to whole 32-slot blocks), where
    experts stream through a single slot. The tests that check a schedule "at a tight budget"
    run it here."""
    from klotski_jax.engine import Engine, prompt_bucket
    from klotski_jax.planning.placement import Workload, place

    engine = Engine(ckpt, policy)
    lay = engine.layout(n_prompts)
    s = prompt_bucket(prompt_len)
    cache = -(-(s + new_tokens) // 32) * 32
    return place(engine.config, policy, Workload(lay.groups, lay.batch, s, cache - s)
                 ).min_device_bytes
