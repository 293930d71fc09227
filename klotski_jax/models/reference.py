"""The reference model: the NNX `MoEModel` with every weight resident, run with a KV cache.

This is the oracle every schedule of the pipeline is tested against, and the simplest runnable
path for users who want to check a conversion. It drives the same jitted per-layer steps
(models/blocks.py) that the pipeline uses, one layer at a time, passing each layer's state (pure
form) as an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klotski_jax.config import ModelConfig
from klotski_jax.constants import cache_len
from klotski_jax.models import blocks
from klotski_jax.models.modules import MoEModel
from klotski_jax.models.specs import weight_specs


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids for a left-padded batch: 0 at each row's first real token (HF generate)."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask > 0, pos, 0).astype(np.int32)


def prepare_batch(token_ids: Any, attention_mask: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate token ids [B, S] and the 0/1 attention mask (default: all ones)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be a non-empty integer array [batch, seq], got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask).astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != token_ids shape {ids.shape}")
    return ids.astype(np.int32), mask


@dataclasses.dataclass
class KVCache:
    """Per-layer (K, V) device arrays [B, S_max, kv_heads, head_dim] (MLA: latents [.., 1, L]
    and rope keys [.., 1, rope]; `ModelConfig.kv_cache_shapes`) plus slot validity [B, S_max]."""

    kv: list[tuple[Any, Any]]  # jax arrays, or numpy arrays for a host-resident cache
    valid: np.ndarray  # which slots hold real tokens (left padding is not)
    length: int = 0  # slots written so far

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, *, host: bool = False,
               memory: Any = None) -> KVCache:
        """Zeroed caches on the device, or in host memory with host=True: NumPy arrays, or jax
        arrays in `memory` (a sharding of jax's pinned_host kind) when given."""
        def zeros(shape: tuple[int, ...]) -> Any:
            if not host:
                return jnp.zeros(shape, jnp.dtype(cfg.dtype))
            z = np.zeros(shape, cfg.np_dtype)
            return z if memory is None else jax.device_put(z, memory)

        kv = [tuple(zeros((batch, max_len, *shape)) for shape in cfg.kv_cache_shapes)
              for _ in range(cfg.num_layers)]
        return cls(kv=kv, valid=np.zeros((batch, max_len), bool))


def pure_state(module: nnx.Module) -> dict[str, Any]:
    """A module's parameters in NNX's pure form (nested dicts of arrays), the form the
    pipeline streams: the jitted steps see one pytree structure from both.

    The same tree as `nnx.state(module, nnx.Param).to_pure_dict()`, read straight from the
    attributes: NNX's general graph traversal costs about 0.3 ms per decoder layer, which the
    reference model would pay for every layer of every step."""
    return _pure_params(module)


def _pure_params(module: nnx.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param):
            out[name] = value.get_value()
        elif isinstance(value, nnx.Module):
            out[name] = _pure_params(value)
    return out


def state_from_flat(abstract: nnx.Module, flat: Mapping[str, Any]) -> nnx.State:
    """The `nnx.State` of `abstract` (a module from `nnx.eval_shape`) filled from flat names:
    each parameter's path joined with "." is its name in `flat` (models/specs.py), cast to the
    dtype `abstract` declares for it (the model's dtype; a quantized expert's own dtypes)."""
    state = nnx.state(abstract, nnx.Param)
    for path, var in state.flat_state():
        name = ".".join(str(k) for k in path)
        value = jnp.asarray(np.asarray(flat[name]), var.get_value().dtype)
        if value.shape != var.get_value().shape:
            raise ValueError(f"{name}: shape {value.shape}, the model needs "
                             f"{var.get_value().shape}")
        var.set_value(value)
    return state


class Model(MoEModel):
    """An MoE model with all weights on the device. Built by `klotski_jax.load(ckpt_dir)` (or
    `Model.from_weights`); `Model(cfg, rngs=nnx.Rngs(seed))` is a randomly initialised one."""

    tokenizer: Any = None  # the checkpoint's HF tokenizer, when it has one

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: Mapping[str, Any],
                     tokenizer: Any = None) -> Model:
        """The model with the given arrays (flat names of models/specs.py), cast to the
        config's dtype; nothing is randomly initialised on the way."""
        missing = [s.name for s in weight_specs(config) if s.name not in weights]
        if missing:
            raise ValueError(f"weights are missing {len(missing)} arrays, e.g. {missing[:3]}")
        abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
        model = nnx.merge(graphdef, state_from_flat(abstract, weights),
                          rest)
        model.tokenizer = tokenizer
        return model

    # ---- one forward step over new tokens ---------------------------------------------------
    def layer_states(self) -> list[dict[str, Any]]:
        """Every layer's `pure_state`, the arguments of the jitted steps (taken once per call of
        `logits` / `generate_reference`)."""
        return [pure_state(layer) for layer in self.layers]

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, cache: KVCache,
                states: list[dict[str, Any]] | None = None) -> jax.Array:
        """Run new tokens [B, T] (slots cache.length..+T, validity already set) -> logits.
        `states`: `layer_states()`, when the caller runs several steps."""
        cfg, h = self.cfg, blocks.embed(self.embed[...], jnp.asarray(token_ids))
        pos, valid = jnp.asarray(positions), jnp.asarray(cache.valid)
        write = jnp.asarray(cache.length, jnp.int32)
        for i, w in enumerate(self.layer_states() if states is None else states):
            h, cache.kv[i] = blocks.attention_block(
                w, h, pos, cache.kv[i], write, valid, cfg=cfg, window=cfg.sliding_windows[i])
            if cfg.moe_layers[i]:
                h = blocks.moe_block_reference(w, h, cfg=cfg)
            else:
                h = blocks.dense_mlp_block(w, h, cfg=cfg)
        cache.length += token_ids.shape[1]
        return blocks.lm_head(self.final_norm[...], self.head_weight(), h, cfg=cfg)

    def logits(self, token_ids: Any, attention_mask: Any | None = None) -> np.ndarray:
        """Float32 logits [B, S, V] for a (left-padded) batch; positions follow the mask."""
        ids, mask = prepare_batch(token_ids, attention_mask)
        cache = KVCache.create(self.cfg, ids.shape[0], cache_len(ids.shape[1]))
        cache.valid[:, : ids.shape[1]] = mask > 0
        return np.asarray(self.forward(ids, positions_from_mask(mask), cache))

    def generate_reference(self, token_ids: Any, max_new_tokens: int,
                           attention_mask: Any | None = None) -> np.ndarray:
        """Greedy generation with a KV cache: prefill the prompt, then one token per step.

        Always generates exactly max_new_tokens (no stop at EOS), so outputs of different
        schedules can be compared token for token. Returns [B, S + max_new_tokens].
        """
        ids, mask = prepare_batch(token_ids, attention_mask)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        b, s = ids.shape
        cache = KVCache.create(self.cfg, b, cache_len(s + max_new_tokens))
        cache.valid[:, :s] = mask > 0
        pos = positions_from_mask(mask)
        out = [ids]
        states = self.layer_states()
        logits = self.forward(ids, pos, cache, states)
        next_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)[:, None]
            out.append(token)
            if len(out) == max_new_tokens + 1:
                break
            cache.valid[:, cache.length] = True
            logits = self.forward(token, next_pos, cache, states)
            next_pos = next_pos + 1
        return np.concatenate(out, axis=1)
