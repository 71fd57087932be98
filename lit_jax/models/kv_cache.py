"""Preallocated key/value cache for generation.

Slots are written per example (`slots [B, T]`), so left- and right-padded prompts are
handled by one mechanism: a query at slot s attends the filled slots <= s of its row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lit_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, Hkv, hd]
    v: jax.Array  # [L, B, S, Hkv, hd]
    filled: jax.Array  # [B, S] bool: slot holds a real token
    positions: jax.Array  # [B, S] int32: that token's position (for sliding windows)


def init_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, cfg.dtype),
        v=jnp.zeros(shape, cfg.dtype),
        filled=jnp.zeros((batch, size), bool),
        positions=jnp.zeros((batch, size), jnp.int32),
    )


def mark_filled(cache: KVCache, slots: jax.Array, valid: jax.Array, positions: jax.Array) -> KVCache:
    """Records which slots the new tokens [B, T] occupy (padding tokens stay unfilled)."""
    rows = jnp.arange(slots.shape[0])[:, None]
    filled = cache.filled.at[rows, slots].set(valid, mode="drop")
    pos = cache.positions.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
    return cache._replace(filled=filled, positions=pos)


def write_layer(cache: KVCache, layer, slots: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Stores this layer's new keys/values [B, T, Hkv, hd] at `slots` [B, T] (in place under jit)."""
    rows = jnp.arange(slots.shape[0])[:, None]
    return cache._replace(
        k=cache.k.at[layer, rows, slots].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[layer, rows, slots].set(v.astype(cache.v.dtype), mode="drop"),
    )
