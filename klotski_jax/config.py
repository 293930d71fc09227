"""Model configuration: one frozen, validated description of an MoE transformer.

Every supported HF family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) is a decoder-only transformer with
RMSNorm, RoPE attention and a top-k routed SwiGLU MoE; the families differ only in small quirks that
this dataclass names explicitly (q/k norms, biases, shared experts, dense layers, routing
normalisation). `ModelConfig.from_hf_config` is the single place where an HF `config.json` is mapped;
anything it does not understand is rejected with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np


class Family(enum.StrEnum):
    """Supported model families, valued by their HF `model_type`."""

    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"
    OLMOE = "olmoe"


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(f.value for f in Family)


class QKNorm(enum.StrEnum):
    """Where an RMSNorm is applied to queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head over head_dim (Qwen3-MoE)
    FULL = "full"  # over the whole projection (OLMoE)


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
        self._check_quant()

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
        return self.num_kv_heads * self.head_dim

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
        """Bytes of the K and V caches of all layers for `batch` sequences of `seq_len` slots."""
        return 2 * self.num_layers * batch * seq_len * self.kv_size * self.itemsize

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family.value
        d["qk_norm"] = self.qk_norm.value
        d["expert_quant"] = self.expert_quant.value
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


# ---- the one HF mapping ---------------------------------------------------------------------

_DEFAULT_THETA = {Family.MIXTRAL: 1e6}


def _rope_theta(hf: dict[str, Any], family: Family) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if isinstance(params, dict) and "rope_parameters" in hf:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"unsupported rope_type {rope_type!r} (only 'default' RoPE is "
                              "implemented)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    elif isinstance(params, dict):  # transformers 4.x `rope_scaling`
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"unsupported rope_scaling type {rope_type!r} (only 'default' RoPE "
                              "is implemented)")
    return float(hf.get("rope_theta", _DEFAULT_THETA.get(family, 10000.0)))


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


def _from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    try:
        family = Family(model_type)
    except ValueError:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}") from None
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} (only 'silu' SwiGLU is implemented)")
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
        top_k=int(hf.get("num_experts_per_tok", 2)), rope_theta=_rope_theta(hf, family),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)), dtype=_dtype(hf),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
    )
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
