"""The reference model: every weight resident, layer by layer, with a KV cache.

This is the oracle every schedule of the pipeline is tested against, and the simplest runnable
path for users who want to check a conversion. It drives the same jitted per-layer steps
(models/layers.py) that the pipeline uses, one layer at a time, with the weights as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klotski_jax.config import ModelConfig
from klotski_jax.constants import CACHE_ROUND
from klotski_jax.models import layers
from klotski_jax.models.specs import layer_tree, weight_specs


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
    """Per-layer (K, V) device arrays [B, S_max, kv_heads, head_dim] plus slot validity [B, S_max]."""

    kv: list[tuple[Any, Any]]  # jax arrays, or numpy arrays for a host-resident cache
    valid: np.ndarray  # which slots hold real tokens (left padding is not)
    length: int = 0  # slots written so far

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, *, host: bool = False) -> KVCache:
        """Zeroed caches on the device, or in host memory (numpy) with host=True."""
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = (lambda: np.zeros(shape, cfg.np_dtype)) if host else (
            lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype)))
        kv = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        return cls(kv=kv, valid=np.zeros((batch, max_len), bool))


class Model:
    """An MoE model with all weights on the device. Built by `klotski_jax.load(ckpt_dir)`."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Any], tokenizer: Any = None):
        missing = [s.name for s in weight_specs(config) if s.name not in weights]
        if missing:
            raise ValueError(f"weights are missing {len(missing)} arrays, e.g. {missing[:3]}")
        self.config = config
        self.tokenizer = tokenizer
        dtype = jnp.dtype(config.dtype)
        dev = {name: jnp.asarray(np.asarray(w), dtype) for name, w in weights.items()}
        self.embed_w = dev["embed"]
        self.final_norm = dev["final_norm"]
        self.head_w = dev["embed"] if config.tie_word_embeddings else dev["lm_head"]
        self.layer_weights = [layer_tree(dev, i) for i in range(config.num_layers)]

    # ---- one forward step over new tokens ---------------------------------------------------
    def forward(self, token_ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> jax.Array:
        """Run new tokens [B, T] (slots cache.length..+T, validity already set) -> logits."""
        cfg, h = self.config, layers.embed(self.embed_w, jnp.asarray(token_ids))
        pos, valid = jnp.asarray(positions), jnp.asarray(cache.valid)
        write = jnp.asarray(cache.length, jnp.int32)
        for i, w in enumerate(self.layer_weights):
            h, cache.kv[i] = layers.attention_block(
                w, h, pos, cache.kv[i], write, valid, cfg=cfg, window=cfg.sliding_windows[i])
            if cfg.moe_layers[i]:
                h = layers.moe_block_reference(w, h, cfg=cfg)
            else:
                h = layers.dense_mlp_block(w, h, cfg=cfg)
        cache.length += token_ids.shape[1]
        return layers.lm_head(self.final_norm, self.head_w, h, cfg=cfg)

    def logits(self, token_ids: Any, attention_mask: Any | None = None) -> np.ndarray:
        """Float32 logits [B, S, V] for a (left-padded) batch; positions follow the mask."""
        ids, mask = prepare_batch(token_ids, attention_mask)
        cache = KVCache.create(self.config, ids.shape[0], _round_up(ids.shape[1]))
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
        cache = KVCache.create(self.config, b, _round_up(s + max_new_tokens))
        cache.valid[:, :s] = mask > 0
        pos = positions_from_mask(mask)
        out = [ids]
        logits = self.forward(ids, pos, cache)
        next_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)[:, None]
            out.append(token)
            if len(out) == max_new_tokens + 1:
                break
            cache.valid[:, cache.length] = True
            logits = self.forward(token, next_pos, cache)
            next_pos = next_pos + 1
        return np.concatenate(out, axis=1)


def _round_up(n: int) -> int:
    return -(-n // CACHE_ROUND) * CACHE_ROUND
