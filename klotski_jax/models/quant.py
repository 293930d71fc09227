"""Quantized routed experts: group-wise int8 / int4 with float16 scales (and int4 zero points),
and block-scaled fp8 (float8_e4m3fn values, one float32 scale per G x G block).

A projection w [out, in] is cut into groups of G consecutive inputs of one output row (G =
`expert_group_size`; per-row int8 uses G = in). Each group g stores float16 values and is
dequantized as

    int8 (symmetric):   w ~ q * s_g,           q in [-127, 127]
    int4 (asymmetric):  w ~ (q - z_g) * s_g,   q in [0, 15], two per uint8 (`pack_int4`)

Quantizing (NumPy, at conversion: `quantize`) is round-to-nearest (RTN); an int4 group's range
is widened to include 0, so a constant group is its top or bottom code (back within the float16
rounding of its scale), and an all-zero group gets scale 0 (back exactly). Every value comes back
within half a step (s_g / 2) plus the float16 rounding of s_g and z_g; a group whose values are
all below ~1e-5 (float16's subnormal range for its scale) within 127 * 2^-24 (< 1e-5). The
optional refinement (`refine=True`) then alternates, a few times per group, a least-squares fit
of (s, z) to the current codes and a re-rounding of the codes to the new grid, the
error-minimising idea of HQQ (half-quadratic quantization) with an L2 objective. Each group
keeps whichever of RTN and refined has the smaller squared error (measured on the float16
values actually stored), so refinement never makes a group worse.

Dequantizing (`dequantize`, JAX) runs on the device inside the jitted expert step, where XLA
fuses it with the matmul's operand; the reference model dequantizes the stacked experts with
the same function, so engine and reference see the same weights (within float rounding where a
backend fuses the stacked and the single-expert computation differently). int4 codes are unpacked
with JAX's native `uint4` bitcast where the backend supports it (`native_int4`), and with shifts
and masks where it does not; both give the same integers.

fp8 is the format of block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3 FP8, ...): w [out, in] is
cut into blocks of G x G (the last block of a dimension G does not divide is partial) and

    fp8 (symmetric):    w ~ float(q) * s_b,    q float8_e4m3fn, s_b float32 (`weight_scale_inv`)

The converter keeps an FP8 checkpoint's experts as they are (`fp8_blocks`: codes and scales
byte for byte) or quantizes float experts with `quantize` (s_b = amax / 448, e4m3's largest
value, then round-to-nearest-even to e4m3: within 2^-4 of |w| relative, and 2^-10 s_b absolute
for the subnormals). Dequantizing is one float32 product per element, rounded once to the
target dtype, so NumPy (conversion) and XLA (the jitted steps) give the same bits.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from klotski_jax.config import QUANT_SCALE_DTYPE, Quant

F32 = jnp.float32
INT8_MAX = 127
INT4_MAX = 15
REFINE_ITERS = 4
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


# ---- int4 packing -------------------------------------------------------------------------------
# Within each group of G codes, byte j holds code j in its low nibble and code j + G/2 in its
# high nibble. Unpacking a group is then two whole half-groups placed side by side, which XLA:CPU
# runs 5-9x faster than interleaving neighbouring codes (dequantizing one projection to bf16 on
# the 2-core CI machine: 0.24 vs 2.2 ms at 1792 x 1024, 0.19 vs 1.1 ms at 1792 x 512, 0.15 vs
# 1.2 ms at 512 x 1792).

def pack_int4(q: np.ndarray, group_size: int) -> np.ndarray:
    """Codes [..., n] in [0, 15] -> uint8 [..., n / 2]: per group of `group_size` codes, byte j
    holds code j (low nibble) and code j + group_size / 2 (high nibble)."""
    q = np.asarray(q, np.uint8)
    g = group_size
    if g <= 0 or g % 2 or q.shape[-1] % g:
        raise ValueError(f"int4 packing needs an even group size dividing the last dimension, "
                         f"got group {g} for shape {q.shape}")
    if q.size and q.max() > INT4_MAX:
        raise ValueError("int4 codes must lie in [0, 15]")
    grouped = q.reshape(*q.shape[:-1], -1, g)
    packed = grouped[..., : g // 2] | (grouped[..., g // 2:] << 4)
    return packed.reshape(*q.shape[:-1], q.shape[-1] // 2).astype(np.uint8)


def unpack_int4_np(packed: np.ndarray, group_size: int) -> np.ndarray:
    """The inverse of `pack_int4` (NumPy): uint8 [..., m] -> uint8 codes [..., 2m]."""
    packed = np.asarray(packed, np.uint8)
    grouped = packed.reshape(*packed.shape[:-1], -1, group_size // 2)
    codes = np.concatenate([grouped & 0xF, grouped >> 4], axis=-1)
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _halves_shift(grouped: jax.Array) -> tuple[jax.Array, jax.Array]:
    return grouped & 0xF, grouped >> 4


def _halves_native(grouped: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes = jax.lax.bitcast_convert_type(grouped, jnp.uint4)  # [..., G/2, 2]: low nibble first
    return codes[..., 0], codes[..., 1]


@functools.cache
def native_int4(platform: str) -> bool:
    """Whether unpacking on `platform` uses JAX's native uint4 (a bitcast of the packed bytes)
    rather than shifts and masks: wherever the bitcast works and gives the expected codes
    (probed once on a known pattern). Both give the same codes; on XLA:CPU they also run at the
    same speed (within 20% either way on the three shapes above)."""
    pattern = np.arange(256, dtype=np.uint8).reshape(2, 4, 32)
    try:
        # Called while a jitted step is traced: run the probe now, outside that trace.
        with jax.ensure_compile_time_eval():
            x = jax.device_put(pattern, jax.devices(platform)[0])
            got = jax.jit(lambda p: [h.astype(jnp.int32) for h in _halves_native(p)])(x)
        return all(np.array_equal(np.asarray(a), b)
                   for a, b in zip(got, (pattern & 0xF, pattern >> 4), strict=True))
    except Exception:  # noqa: BLE001 - any failure (unsupported type, compile error) = no
        return False


# ---- fp8 blocks ---------------------------------------------------------------------------------

def block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight [..., out, in] in blocks of (rows, cols): ceil-sized, so a
    dimension the block does not divide ends in a partial block (what FP8 checkpoints store)."""
    *lead, out, inp = shape
    return (*lead, -(-out // block[0]), -(-inp // block[1]))


def dequantize_fp8_np(q: np.ndarray, scale: np.ndarray, block: tuple[int, int],
                      dtype: Any = np.float32, row0: int = 0) -> np.ndarray:
    """NumPy dequantization of fp8 values q [..., out, in] (float8_e4m3fn) with their block
    scales (`weight_scale_inv` [..., R, C] of the matrix whose rows q starts at: `row0` > 0 for
    the second half of a fused gate_up tensor): the float32 product, rounded once to `dtype`.
    Used at conversion, so it works one band of rows (one block high) at a time and never holds
    more than the float32 result and one row of scales."""
    *_, out, inp = q.shape
    s = np.asarray(scale, np.float32)
    cols = np.arange(inp) // block[1]
    w = q.astype(np.float32)
    r = 0
    while r < out:
        b = (row0 + r) // block[0]
        end = min(out, (b + 1) * block[0] - row0)
        w[..., r:end, :] *= s[..., b, :][..., cols][..., None, :]
        r = end
    return w.astype(dtype, copy=False)


def fp8_blocks(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """w [out, in] (any float dtype) quantized to e4m3 in `block` x `block` blocks:
    {q: float8_e4m3fn [out, in], scale: float32 [ceil(out / block), ceil(in / block)]}, with
    scale = amax / 448 per block (0 for an all-zero block, which comes back exactly) and each
    value rounded to the nearest e4m3 (ties to even)."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    padded = np.zeros((rows * block, cols * block), np.float32)
    padded[:out, :inp] = w
    blocks = padded.reshape(rows, block, cols, block)
    scale = (np.abs(blocks).max(axis=(1, 3)) / np.float32(FP8_MAX)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)[:, None, :, None]
    q = np.clip(blocks / safe, -FP8_MAX, FP8_MAX).reshape(padded.shape)[:out, :inp]
    return {"q": q.astype(FP8), "scale": scale}


# ---- dequantizing (JAX, inside the jitted steps) ------------------------------------------------

def dequantize_fp8(q: jax.Array, scale: jax.Array, block: int, dtype: Any) -> jax.Array:
    """The weights [..., out, in] of fp8 values q (float8_e4m3fn) and their float32 scale grid
    [..., ceil(out / block), ceil(in / block)], in `dtype`: each scale repeated over its block
    (the last, partial block cut to the matrix), one float32 product, rounded once."""
    *_, out, inp = q.shape
    s = jnp.repeat(jnp.repeat(scale.astype(F32), block, axis=-2)[..., :out, :], block,
                   axis=-1)[..., :inp]
    return (q.astype(F32) * s).astype(dtype)


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array | None, dtype: Any,
               native: bool | None = None, block: int = 0) -> jax.Array:
    """The weights [..., out, in] of one stored projection (or a stack of them), in `dtype`.

    q: int8 [..., out, in] (int8), packed uint8 [..., out, in / 2] (int4) or float8_e4m3fn
    [..., out, in] (fp8); scale, zero: [..., out, in / G] (fp8: the block grid, and `block`, the
    block side G, which the shapes alone do not determine when G does not divide them).
    Computed in float32, then rounded once to `dtype`. An int4 group is dequantized as its two
    half-groups (the packing's nibbles), side by side. native: unpack int4 with the uint4
    bitcast (default: `native_int4` of the default backend)."""
    if q.dtype == FP8:
        if block <= 0:
            raise ValueError("dequantizing fp8 needs its block size")
        return dequantize_fp8(q, scale, block, dtype)
    *lead, out, m = q.shape
    groups = scale.shape[-1]
    grouped = q.reshape(*lead, out, groups, m // groups)
    s = scale.astype(F32)[..., None]
    if q.dtype != jnp.uint8:  # int8: symmetric, no zero point
        return (grouped.astype(F32) * s).reshape(*lead, out, m).astype(dtype)
    if native is None:
        native = native_int4(jax.default_backend())
    lo, hi = (_halves_native if native else _halves_shift)(grouped)
    z = zero.astype(F32)[..., None]
    w = jnp.concatenate([(lo.astype(F32) - z) * s, (hi.astype(F32) - z) * s], axis=-1)
    return w.reshape(*lead, out, 2 * m).astype(dtype)


# ---- quantizing (NumPy, at conversion) ----------------------------------------------------------

def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    out_dim, in_dim = w.shape
    g = group_size or in_dim
    if in_dim % g:
        raise ValueError(f"group size {g} does not divide the input dimension {in_dim}")
    return np.asarray(w, np.float32).reshape(out_dim, in_dim // g, g)


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to the stored scale dtype (float16), saturating: a scale past its range would be
    inf (a group with |w| above ~8e6, which no trained model has)."""
    dt = np.dtype(QUANT_SCALE_DTYPE)
    info = np.finfo(dt)
    return np.clip(x, -info.max, info.max).astype(dt)


def _codes_int8(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    safe = np.where(s == 0, 1.0, s)
    return np.clip(np.rint(w / safe), -INT8_MAX, INT8_MAX)


def _codes_int4(w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    safe = np.where(s == 0, 1.0, s)
    return np.clip(np.rint(w / safe + z), 0, INT4_MAX)


def _err(w: np.ndarray, deq: np.ndarray) -> np.ndarray:
    return np.sum((w - deq) ** 2, axis=-1)  # per group


def _int8(w: np.ndarray, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    s = _f16(np.max(np.abs(w), axis=-1) / INT8_MAX)[..., None].astype(np.float32)
    q = _codes_int8(w, s)
    if refine:
        best = _err(w, q * s)
        for _ in range(REFINE_ITERS):
            qq = np.sum(q * q, axis=-1, keepdims=True)
            s_new = _f16(np.where(qq > 0, np.sum(q * w, axis=-1, keepdims=True)
                                  / np.maximum(qq, 1), s)).astype(np.float32)
            q_new = _codes_int8(w, s_new)
            err = _err(w, q_new * s_new)
            better = (err < best)[..., None]
            s, q, best = np.where(better, s_new, s), np.where(better, q_new, q), np.minimum(err, best)
    return q.astype(np.int8), s[..., 0].astype(np.float16)


def _int4(w: np.ndarray, refine: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.minimum(np.min(w, axis=-1), 0.0)
    hi = np.maximum(np.max(w, axis=-1), 0.0)
    s = _f16((hi - lo) / INT4_MAX)[..., None].astype(np.float32)
    z = _f16(np.where(s[..., 0] > 0, -lo / np.where(s[..., 0] == 0, 1, s[..., 0]), 0.0)
             )[..., None].astype(np.float32)
    q = _codes_int4(w, s, z)
    if refine:
        best = _err(w, (q - z) * s)
        for _ in range(REFINE_ITERS):
            # least squares of w ~ a * q + b over the group, then s = a, z = -b / a
            mq, mw = q.mean(-1, keepdims=True), w.mean(-1, keepdims=True)
            var = np.sum((q - mq) ** 2, -1, keepdims=True)
            a = np.where(var > 0, np.sum((q - mq) * (w - mw), -1, keepdims=True)
                         / np.maximum(var, 1e-30), s)
            ok = (var > 0) & (a > 0)
            b = mw - a * mq
            s_new = np.where(ok, _f16(a).astype(np.float32), s)
            z_new = np.where(ok, _f16(np.clip(-b / np.where(ok, s_new, 1), -INT4_MAX, 2 * INT4_MAX)
                                      ).astype(np.float32), z)
            q_new = _codes_int4(w, s_new, z_new)
            err = _err(w, (q_new - z_new) * s_new)
            better = (err < best)[..., None]
            s, z = np.where(better, s_new, s), np.where(better, z_new, z)
            q, best = np.where(better, q_new, q), np.minimum(err, best)
    return q.astype(np.uint8), s[..., 0].astype(np.float16), z[..., 0].astype(np.float16)


def quantize(w: np.ndarray, quant: Quant, group_size: int, refine: bool = False
             ) -> dict[str, np.ndarray]:
    """One projection w [out, in] (any float dtype) as its stored arrays {q, scale[, zero]}
    (the shapes and dtypes of `config.quant_leaves`)."""
    quant = Quant(quant)
    if quant is Quant.NONE:
        raise ValueError("quantize() needs int8, int4 or fp8")
    if w.ndim != 2:
        raise ValueError(f"quantize() takes one [out, in] matrix, got shape {w.shape}")
    if quant is Quant.FP8:
        if group_size <= 0:
            raise ValueError(f"fp8 needs a block size > 0, got {group_size}")
        if not np.all(np.isfinite(w)):
            raise ValueError("cannot quantize a matrix with NaN or infinite values")
        return fp8_blocks(w, group_size)
    if quant is Quant.INT4 and (group_size <= 0 or group_size % 2):
        raise ValueError(f"int4 needs an even group size > 0, got {group_size}")
    g = _groups(w, group_size)
    if not np.all(np.isfinite(g)):
        raise ValueError("cannot quantize a matrix with NaN or infinite values")
    out_dim, in_dim = w.shape
    if quant is Quant.INT8:
        q, s = _int8(g, refine)
        return {"q": q.reshape(out_dim, in_dim), "scale": s}
    q, s, z = _int4(g, refine)
    return {"q": pack_int4(q.reshape(out_dim, in_dim), group_size), "scale": s, "zero": z}


def dequantize_np(leaves: dict[str, np.ndarray], dtype: Any = np.float32, block: int = 0
                  ) -> np.ndarray:
    """NumPy dequantization of stored arrays (tests and measurements; the device uses
    `dequantize`): the same float32 arithmetic, rounded to `dtype` (fp8: `block` is its side)."""
    q = leaves["q"]
    if q.dtype == FP8:
        return dequantize_fp8_np(q, leaves["scale"], (block, block), dtype)
    s = leaves["scale"].astype(np.float32)
    codes = unpack_int4_np(q, 2 * q.shape[-1] // s.shape[-1]) if q.dtype == np.uint8 else q
    out_dim, n = codes.shape[-2:]
    g = codes.reshape(*codes.shape[:-1], s.shape[-1], n // s.shape[-1]).astype(np.float32)
    if "zero" in leaves:
        g = g - leaves["zero"].astype(np.float32)[..., None]
    return (g * s[..., None]).reshape(*codes.shape[:-2], out_dim, n).astype(dtype)
