"""Model configuration: one frozen, validated description of an MoE transformer.

Every supported HF family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5-MoE) is a
decoder-only transformer with RMSNorm, RoPE attention (grouped-query, or DeepSeek's multi-head
latent attention) and a top-k routed SwiGLU MoE; the families differ only in quirks that this
dataclass names explicitly (q/k norms, biases, shared experts, dense layers, the router's scores,
groups and scaling, partial or interleaved or yarn-scaled RoPE). `ModelConfig.from_hf_config` is
the single place where an HF `config.json` is mapped; anything it does not understand is
rejected with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np


class Family(enum.StrEnum):
    """Supported model families, valued by their HF `model_type`."""

    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"
    OLMOE = "olmoe"
    DEEPSEEK_V2 = "deepseek_v2"
    DEEPSEEK_V3 = "deepseek_v3"
    GLM4_MOE = "glm4_moe"


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.value for f in Family)


class QKNorm(enum.StrEnum):
    """Where an RMSNorm is applied to queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head over head_dim (Qwen3-MoE)
    FULL = "full"  # over the whole projection (OLMoE)


class Attn(enum.StrEnum):
    """The attention of every layer."""

    GQA = "gqa"  # grouped-query (MHA and MQA included): K and V cached per KV head
    MLA = "mla"  # DeepSeek's multi-head latent attention: a compressed latent and one rope key


class ScoreFunc(enum.StrEnum):
    """How router logits become expert scores."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class TopkMethod(enum.StrEnum):
    """How the router picks each token's experts from their scores (HF `topk_method`).

    greedy: the top_k scores. group_limited_greedy (DeepSeek-V2): experts form n_group groups
    of equal size, each scored by its best expert; only the topk_group best groups compete.
    noaux_tc (DeepSeek-V3, GLM-4.5): the same with groups scored by the sum of their two best
    scores, and choices made on scores plus a learned correction bias (the weights stay the
    uncorrected scores)."""

    GREEDY = "greedy"
    GROUP_LIMITED = "group_limited_greedy"
    NOAUX_TC = "noaux_tc"


class ConfigError(ValueError):
    """An HF config (or a ModelConfig) that this project cannot represent faithfully."""


class Quant(enum.StrEnum):
    """How the routed experts are stored: in the model dtype, or quantized (models/quant.py).

    int8: symmetric, q in [-127, 127], one scale per group of `expert_group_size` inputs of an
    output row (0: one per row). int4: asymmetric, q in [0, 15] packed two per byte (byte j of a
    group holds codes j and j + G/2: quant.pack_int4), a scale and a zero point per group.
    Scales and zero points are float16. fp8: float8_e4m3fn values with one float32 scale per
    block of G x G (`expert_group_size`) of the [out, in] matrix, the layout of the block-scaled
    FP8 checkpoints (DeepSeek-V3 and others: `weight_scale_inv`); a dimension G does not divide
    gets a last, partial block (the scale grid is ceil(out / G) x ceil(in / G))."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"


QUANT_SCALE_DTYPE = "float16"  # int8 and int4 scales (and int4 zero points)
FP8_DTYPE = "float8_e4m3fn"  # fp8 expert values (ml_dtypes / JAX / TensorStore name)
FP8_SCALE_DTYPE = "float32"  # fp8 block scales, as the checkpoints store them
_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "yarn")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int8": 1, FP8_DTYPE: 1}


def quant_scale_dtype(quant: Quant) -> str:
    """The dtype of a quantized expert's scales: float32 for fp8, float16 otherwise."""
    return FP8_SCALE_DTYPE if quant is Quant.FP8 else QUANT_SCALE_DTYPE


def quant_leaves(quant: Quant, group_size: int, out_dim: int, in_dim: int, dtype: str
                 ) -> tuple[tuple[str, tuple[int, int], str], ...]:
    """The stored arrays of one [out, in] expert projection: (suffix, shape, dtype) each.

    Unquantized: one array ("", (out, in), dtype). int8: "q" int8 [out, in] and "scale"
    [out, in / G]; int4: "q" uint8 [out, in / 2] (two values a byte), "scale" and "zero"
    [out, in / G]. G = group_size, or in_dim for per-row int8 (group_size 0). fp8: "q"
    float8_e4m3fn [out, in] and "scale" float32 [ceil(out / G), ceil(in / G)] (G x G blocks)."""
    if quant is Quant.NONE:
        return (("", (out_dim, in_dim), dtype),)
    if quant is Quant.FP8:
        g = group_size
        return (("q", (out_dim, in_dim), FP8_DTYPE),
                ("scale", (-(-out_dim // g), -(-in_dim // g)), FP8_SCALE_DTYPE))
    groups = in_dim // (group_size or in_dim)
    scale = ("scale", (out_dim, groups), QUANT_SCALE_DTYPE)
    if quant is Quant.INT8:
        return (("q", (out_dim, in_dim), "int8"), scale)
    return (("q", (out_dim, in_dim // 2), "uint8"), scale, ("zero", (out_dim, groups),
                                                            QUANT_SCALE_DTYPE))


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a stored dtype name."""
    return _ITEMSIZE[dtype]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one MoE model. Hashable, so it can be a static argument of jitted steps."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP (False)
    sliding_windows: tuple[int | None, ...]  # per layer: attention window, None = full causal
    dense_intermediate_size: int = 0  # MLP width of the non-MoE layers
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    norm_topk_prob: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    clip_qkv: float | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    expert_quant: Quant = Quant.NONE  # how routed experts are stored (dense weights: `dtype`)
    expert_group_size: int = 0  # inputs per quantization group (fp8: block side); 0: per row
    # ---- attention variants (defaults: plain GQA with full-width RoPE) ---------------------
    attention: Attn = Attn.GQA
    # MLA (attention=mla): head_dim is the query/key head (qk_nope + qk_rope_head_dim)
    q_lora_rank: int = 0  # 0: queries projected directly (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0  # the cached latent's width
    qk_rope_head_dim: int = 0  # the rotary part of each query/key head (one shared rope key)
    v_head_dim: int = 0
    mla_bias: bool = False  # biases on q_a, kv_a and o (HF attention_bias)
    rotary_dim: int = 0  # dims of each head that RoPE rotates; 0: all (GQA) / qk_rope (MLA)
    rope_interleave: bool = False  # rotate adjacent pairs (DeepSeek) instead of halves
    rope_type: str = "default"  # or "yarn"
    rope_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_position: int = 0  # yarn: the pretraining context length
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0  # yarn: multiplies cos and sin
    attention_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    # ---- router variants (defaults: softmax, greedy top-k) ----------------------------------
    score_func: ScoreFunc = ScoreFunc.SOFTMAX
    topk_method: TopkMethod = TopkMethod.GREEDY
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # e_score_correction_bias, added to the scores for the choice
    router_fp32: bool = False  # router weight (and bias) stored and applied in float32
    shared_expert_gate: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "num_experts", "top_k", "expert_intermediate_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise ConfigError("moe_layers and sliding_windows need one entry per layer")
        if not all(self.moe_layers) and self.dense_intermediate_size <= 0:
            raise ConfigError("dense (non-MoE) layers need dense_intermediate_size > 0")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {_DTYPES}")
        if any(w is not None and w <= 0 for w in self.sliding_windows):
            raise ConfigError(f"sliding windows must be positive: {self.sliding_windows}")
        self._check_variants()
        self._check_quant()

    def _check_variants(self) -> None:
        for name, enum_type in (("attention", Attn), ("score_func", ScoreFunc),
                                ("topk_method", TopkMethod)):
            if not isinstance(getattr(self, name), enum_type):
                raise ConfigError(f"{name} must be a {enum_type.__name__}, got "
                                  f"{getattr(self, name)!r}")
        if self.attention is Attn.MLA:
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if int(getattr(self, name)) <= 0:
                    raise ConfigError(f"multi-head latent attention needs {name} > 0")
            if self.q_lora_rank < 0 or self.qk_rope_head_dim >= self.head_dim:
                raise ConfigError(f"MLA head_dim={self.head_dim} must exceed qk_rope_head_dim="
                                  f"{self.qk_rope_head_dim} (head_dim = nope + rope)")
            if self.qk_norm is not QKNorm.NONE or self.qkv_bias or self.clip_qkv is not None:
                raise ConfigError("q/k norms, q/k/v biases and clip_qkv are GQA options")
        if self.rot_dim % 2 or not 0 < self.rot_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim={self.rot_dim} must be even and within head_dim="
                              f"{self.head_dim}")
        if self.rope_type not in _ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not one of {_ROPE_TYPES}")
        if self.rope_type == "yarn" and (self.rope_factor <= 0
                                         or self.rope_original_max_position <= 0):
            raise ConfigError("yarn RoPE needs factor > 0 and original_max_position_embeddings > 0")
        if self.topk_method is not TopkMethod.GREEDY:
            if self.n_group <= 0 or self.num_experts % self.n_group:
                raise ConfigError(f"n_group={self.n_group} must divide num_experts="
                                  f"{self.num_experts} ({self.topk_method.value} routing)")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be within 1..n_group="
                                  f"{self.n_group}")
            per_group = self.num_experts // self.n_group
            if self.topk_group * per_group < self.top_k:
                raise ConfigError(f"topk_group={self.topk_group} groups of {per_group} experts "
                                  f"cannot hold top_k={self.top_k} experts")
            if self.topk_method is TopkMethod.NOAUX_TC and per_group < 2:
                raise ConfigError("noaux_tc routing scores groups by their two best experts: "
                                  f"n_group={self.n_group} leaves {per_group} per group")

    def _check_quant(self) -> None:
        q, g = self.expert_quant, self.expert_group_size
        if not isinstance(q, Quant):
            raise ConfigError(f"expert_quant must be a Quant, got {q!r}")
        if type(g) is not int or g < 0:
            raise ConfigError(f"expert_group_size must be an integer >= 0, got {g!r}")
        if q is Quant.NONE:
            if g:
                raise ConfigError(f"expert_group_size={g} needs a quantized expert_quant")
            return
        if q is Quant.INT4 and (g == 0 or g % 2):
            raise ConfigError(f"int4 needs an even group size > 0 (two values per byte), got {g}")
        if q is Quant.FP8:  # blocks need not divide: the last block of a dimension is partial
            if g == 0:
                raise ConfigError("fp8 needs a block size > 0 (expert_group_size)")
            return
        for dim, what in ((self.hidden_size, "hidden_size: the input of gate and up"),
                          (self.expert_intermediate_size,
                           "expert_intermediate_size: the input of down")):
            if g and dim % g:
                raise ConfigError(f"group size {g} does not divide the input dimension {dim} "
                                  f"of the experts ({what}); pick a divisor of both "
                                  f"{self.hidden_size} and {self.expert_intermediate_size}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one token's cached keys (or values) in a GQA layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def rot_dim(self) -> int:
        """Dims of each query/key head that RoPE rotates (its last `rot_dim` under MLA, its
        first ones under GQA's partial rotary)."""
        if self.rotary_dim:
            return self.rotary_dim
        return self.qk_rope_head_dim if self.attention is Attn.MLA else self.head_dim

    @property
    def qk_nope_head_dim(self) -> int:
        """MLA: the part of each query/key head without position (head_dim - qk_rope)."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def o_size(self) -> int:
        """Width of the attention output before o: heads x their value width."""
        return self.num_heads * (self.v_head_dim if self.attention is Attn.MLA
                                 else self.head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale or self.head_dim ** -0.5

    @property
    def kv_cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per token and layer, the (heads, width) of the two cached arrays: K and V for GQA;
        for MLA the normed latent (1, kv_lora_rank) and the rotated rope key (1, qk_rope), what
        its key and value heads are expanded from (so the cache stays small)."""
        if self.attention is Attn.MLA:
            return (1, self.kv_lora_rank), (1, self.qk_rope_head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def mla_absorbs(self, t: int, s: int) -> bool:
        """Whether MLA attends in the absorbed form (layers.mla_attend) for t new tokens over s
        cache slots: when it takes fewer multiply-adds per head than expanding every cached
        latent into keys and values. Decode and short prompts absorb; long prefills expand."""
        n, v, r = self.qk_nope_head_dim, self.v_head_dim, self.qk_rope_head_dim
        lat = self.kv_lora_rank
        expanded = s * lat * (n + v) + t * s * (n + r + v)
        absorbed = t * lat * (n + v) + t * s * (2 * lat + r)
        return absorbed <= expanded

    @property
    def kv_token_bytes(self) -> int:
        """Cached bytes per token and layer."""
        return sum(h * w for h, w in self.kv_cache_shapes) * self.itemsize

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def np_dtype(self) -> np.dtype:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        return np.dtype(self.dtype)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (gate, up and down projections) as stored and moved: quantized
        experts count their packed values, scales and zero points."""
        d, i = self.hidden_size, self.expert_intermediate_size
        return sum(dtype_itemsize(dt) * a * b
                   for out_dim, in_dim in ((i, d), (i, d), (d, i))
                   for _, (a, b), dt in quant_leaves(self.expert_quant, self.expert_group_size,
                                                      out_dim, in_dim, self.dtype))

    @property
    def quantized(self) -> bool:
        return self.expert_quant is not Quant.NONE

    def kv_cache_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes of the KV caches of all layers for `batch` sequences of `seq_len` slots (MLA:
        its latent and rope key)."""
        return self.num_layers * batch * seq_len * self.kv_token_bytes

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family.value
        d["qk_norm"] = self.qk_norm.value
        d["expert_quant"] = self.expert_quant.value
        for name in _ENUM_FIELDS:
            d[name] = getattr(self, name).value
        d["moe_layers"] = list(self.moe_layers)
        d["sliding_windows"] = list(self.sliding_windows)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        d["family"] = Family(d["family"])
        d["qk_norm"] = QKNorm(d.get("qk_norm", "none"))
        quant = d.get("expert_quant", "none")
        if quant not in {q.value for q in Quant}:
            raise ConfigError(f"expert quantization {quant!r} is not a scheme this klotski-jax "
                              f"reads ({', '.join(q.value for q in Quant)}); upgrade it")
        d["expert_quant"] = Quant(quant)
        for name, enum_type in _ENUM_FIELDS.items():
            if name in d:
                try:
                    d[name] = enum_type(d[name])
                except ValueError:
                    raise ConfigError(f"{name} {d[name]!r} is not one this klotski-jax knows "
                                      f"({', '.join(v.value for v in enum_type)})") from None
        d["moe_layers"] = tuple(bool(x) for x in d["moe_layers"])
        d["sliding_windows"] = tuple(None if w is None else int(w) for w in d["sliding_windows"])
        d["eos_token_ids"] = tuple(int(x) for x in d.get("eos_token_ids", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map an HF `config.json` dict (transformers 4.x or 5.x style) to a ModelConfig."""
        return _from_hf_config(hf)


_ENUM_FIELDS: dict[str, type[enum.StrEnum]] = {"attention": Attn, "score_func": ScoreFunc,
                                               "topk_method": TopkMethod}


# ---- the one HF mapping ---------------------------------------------------------------------

_DEFAULT_THETA = {Family.MIXTRAL: 1e6}
_DEFAULT_PARTIAL_ROTARY = {Family.GLM4_MOE: 0.5}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """Yarn's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(hf: dict[str, Any], family: Family, head_dim: int) -> dict[str, Any]:
    """The RoPE fields of a ModelConfig: theta, the rotated width and yarn's parameters.

    Reads transformers 5's `rope_parameters` or 4.x's `rope_scaling` with a top-level
    `rope_theta` / `partial_rotary_factor`. `head_dim` is the width rotary frequencies are
    computed over before the partial factor (MLA: qk_rope_head_dim)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"unsupported rope_type {rope_type!r} in "
                          f"{'rope_parameters' if 'rope_parameters' in hf else 'rope_scaling'} "
                          f"(implemented: {', '.join(_ROPE_TYPES)})")
    theta = params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(family, 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                         _DEFAULT_PARTIAL_ROTARY.get(family, 1.0)))
    rot = int(head_dim * float(partial))
    out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
    if rot != head_dim:
        out["rotary_dim"] = rot
    if rope_type == "yarn":
        max_pos = int(hf.get("max_position_embeddings", 4096))
        original = int(hf.get("original_max_position_embeddings")
                       or params.get("original_max_position_embeddings") or max_pos)
        factor = params.get("factor")
        factor = max_pos / original if factor is None else float(factor)
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                                if mscale and mscale_all else yarn_mscale(factor))
        out.update(rope_factor=factor, rope_original_max_position=original,
                   rope_beta_fast=float(params.get("beta_fast") or 32),
                   rope_beta_slow=float(params.get("beta_slow") or 1),
                   rope_truncate=bool(params.get("truncate", True)),
                   rope_attention_factor=float(attention_factor))
    return out


def _softmax_scale_mla(hf: dict[str, Any], qk_head_dim: int) -> float:
    """DeepSeek's softmax scale: qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)
    squared when the RoPE is scaled and mscale_all_dim is set."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scale = qk_head_dim ** -0.5
    if params.get("rope_type", params.get("type", "default")) != "default":
        mscale_all = params.get("mscale_all_dim", 0)
        if mscale_all:
            m = yarn_mscale(float(params["factor"]), mscale_all)
            scale *= m * m
    return scale


def _dtype(hf: dict[str, Any]) -> str:
    dt = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dt = str(dt).removeprefix("torch.")
    if dt not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dt!r} in config (supported: {_DTYPES})")
    return dt


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def _num_experts(hf: dict[str, Any], default: int | None = None) -> int:
    # HF aliases the two names per family (attribute_map), and either may be what is on disk.
    n = hf.get("num_experts", hf.get("num_local_experts", default))
    if n is None:
        raise ConfigError("config has neither num_experts nor num_local_experts")
    return int(n)


# HF architecture classes: a checkpoint whose own model_type names a remote-code variant (e.g.
# Kimi-K2's "kimi_k2", whose config.json lists DeepseekV3ForCausalLM) is run as that class.
_ARCHITECTURES = {"MixtralForCausalLM": Family.MIXTRAL, "Qwen2MoeForCausalLM": Family.QWEN2_MOE,
                  "Qwen3MoeForCausalLM": Family.QWEN3_MOE, "OlmoeForCausalLM": Family.OLMOE,
                  "DeepseekV2ForCausalLM": Family.DEEPSEEK_V2,
                  "DeepseekV3ForCausalLM": Family.DEEPSEEK_V3,
                  "Glm4MoeForCausalLM": Family.GLM4_MOE}


def hf_family(hf: dict[str, Any]) -> Family:
    """The family of an HF config: its `model_type`, or, for a remote-code variant (a config
    with an `auto_map`), the first of its `architectures` that is a supported
    class (so Kimi-K2, model_type "kimi_k2" with DeepSeek-V3's architecture, runs as
    deepseek_v3). Anything else is refused, naming both fields."""
    model_type = hf.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return Family(model_type)
    archs = hf.get("architectures") or []
    # Only a remote-code config (its `auto_map` names the code) defers to the architectures:
    # another built-in model_type (e.g. llama) is another model, whatever its architectures say.
    if hf.get("auto_map") and isinstance(archs, list):
        for arch in archs:
            if arch in _ARCHITECTURES:
                return _ARCHITECTURES[arch]
    raise ConfigError(f"unsupported model_type {model_type!r} (architectures {archs}); "
                      f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}, or a config whose "
                      f"architectures lists one of {', '.join(_ARCHITECTURES)}")


def _from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    family = hf_family(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} (only 'silu' SwiGLU is implemented)")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported (no released MoE checkpoint uses it)")
    n_layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    if family is Family.OLMOE:
        head_dim = hidden // heads  # OLMoE sizes its k_norm from hidden_size / heads
    window = hf.get("sliding_window") or None

    common: dict[str, Any] = dict(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        top_k=int(hf.get("num_experts_per_tok", 2)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)), dtype=_dtype(hf),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
    )
    if family in (Family.DEEPSEEK_V2, Family.DEEPSEEK_V3, Family.GLM4_MOE):
        return _deepseek_like(hf, family, common)
    common.update(_rope(hf, family, int(head_dim)))
    if family is Family.MIXTRAL:
        return ModelConfig(
            **common, num_experts=_num_experts(hf, default=8),
            expert_intermediate_size=int(hf["intermediate_size"]),
            moe_layers=(True,) * n_layers, sliding_windows=(window,) * n_layers,
            norm_topk_prob=True)
    if family is Family.OLMOE:
        clip = hf.get("clip_qkv")
        return ModelConfig(
            **common, num_experts=_num_experts(hf),
            expert_intermediate_size=int(hf["intermediate_size"]),
            moe_layers=(True,) * n_layers, sliding_windows=(None,) * n_layers,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)), qk_norm=QKNorm.FULL,
            clip_qkv=None if clip is None else float(clip))
    # Qwen2-MoE and Qwen3-MoE: dense layers via decoder_sparse_step / mlp_only_layers.
    n_exp = _num_experts(hf)
    step = int(hf.get("decoder_sparse_step", 1))
    mlp_only = set(hf.get("mlp_only_layers") or [])
    moe_layers = tuple(i not in mlp_only and n_exp > 0 and (i + 1) % step == 0
                       for i in range(n_layers))
    use_window = bool(hf.get("use_sliding_window", False))
    if family is Family.QWEN2_MOE:
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < int(hf.get("max_window_layers", 28))
            and use_window else "full_attention" for i in range(n_layers)]
        windows = tuple(window if use_window and t == "sliding_attention" else None
                        for t in layer_types)
        return ModelConfig(
            **common, num_experts=n_exp, expert_intermediate_size=int(hf["moe_intermediate_size"]),
            moe_layers=moe_layers, sliding_windows=windows,
            dense_intermediate_size=int(hf.get("intermediate_size", 0)),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size", 0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bool(hf.get("qkv_bias", True)))
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common, num_experts=n_exp, expert_intermediate_size=int(hf["moe_intermediate_size"]),
        moe_layers=moe_layers, sliding_windows=((window if use_window else None),) * n_layers,
        dense_intermediate_size=int(hf.get("intermediate_size", 0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias,
        qk_norm=QKNorm.HEAD)


def _deepseek_like(hf: dict[str, Any], family: Family, common: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V2, DeepSeek-V3 (and Kimi-K2, its architecture) and GLM-4.5-MoE, as
    transformers 5 runs them: the first `first_k_dense_replace` layers dense, shared experts
    without a gate (moe_intermediate_size x n_shared_experts wide), a float32 router.

    DeepSeek: multi-head latent attention; V2 scores with a softmax and picks greedily or
    group-limited (`topk_method`), never renormalising; V3 scores with a sigmoid, picks by
    noaux_tc with the correction bias, renormalises if norm_topk_prob. GLM-4.5: GQA with
    partial rotary, optional q/k norm and q/k/v biases, and V3's router."""
    n_layers = common["num_layers"]
    n_exp = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
    if n_exp <= 0:
        raise ConfigError("config has no routed experts (n_routed_experts)")
    k_dense = int(hf.get("first_k_dense_replace") or 0)
    freq = int(hf.get("moe_layer_freq") or 1)
    moe_layers = tuple(i >= k_dense and i % freq == 0 for i in range(n_layers))
    shared = int(hf["moe_intermediate_size"]) * int(hf.get("n_shared_experts") or 0)
    routing: dict[str, Any] = dict(
        num_experts=n_exp, expert_intermediate_size=int(hf["moe_intermediate_size"]),
        moe_layers=moe_layers, sliding_windows=(None,) * n_layers,
        dense_intermediate_size=int(hf.get("intermediate_size", 0)),
        shared_expert_intermediate_size=shared, shared_expert_gate=False,
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0), router_fp32=True)
    if family is Family.DEEPSEEK_V2:
        method = hf.get("topk_method") or "greedy"
        if method not in (TopkMethod.GREEDY.value, TopkMethod.GROUP_LIMITED.value):
            raise ConfigError(f"topk_method {method!r} is not one DeepSeek-V2 uses (greedy, "
                              "group_limited_greedy)")
        routing.update(score_func=ScoreFunc.SOFTMAX, topk_method=TopkMethod(method),
                       norm_topk_prob=False)
    else:
        routing.update(score_func=ScoreFunc.SIGMOID, topk_method=TopkMethod.NOAUX_TC,
                       router_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
    if routing["topk_method"] is not TopkMethod.GREEDY:
        for name in ("n_group", "topk_group"):
            if hf.get(name) is None:
                raise ConfigError(f"{routing['topk_method'].value} routing needs {name}")
        routing.update(n_group=int(hf["n_group"]), topk_group=int(hf["topk_group"]))
    if family is Family.GLM4_MOE:
        head_dim = common["head_dim"]
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(**common, **routing, **_rope(hf, family, head_dim), qkv_bias=bias,
                           qk_norm=QKNorm.HEAD if hf.get("use_qk_norm") else QKNorm.NONE)
    rope_dim, nope = int(hf["qk_rope_head_dim"]), int(hf["qk_nope_head_dim"])
    rope = _rope(hf, family, rope_dim)
    if rope.pop("rotary_dim", rope_dim) != rope_dim:
        raise ConfigError("partial_rotary_factor is not supported with multi-head latent "
                          "attention (its rope part is qk_rope_head_dim)")
    common.update(head_dim=nope + rope_dim, num_kv_heads=common["num_heads"])
    return ModelConfig(
        **common, **routing, **rope, attention=Attn.MLA,
        q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_rope_head_dim=rope_dim, v_head_dim=int(hf["v_head_dim"]),
        mla_bias=bool(hf.get("attention_bias", False)),
        rope_interleave=family is Family.DEEPSEEK_V2 or bool(hf.get("rope_interleave", True)),
        attention_scale=_softmax_scale_mla(hf, nope + rope_dim))
