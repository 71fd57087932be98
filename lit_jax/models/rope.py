"""Rotary position embeddings (HF "rotate_half" layout), with Llama-3 and linear scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lit_jax.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, scaled as the checkpoint asks."""
    dim = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / s.factor).astype(np.float32)
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, ramp, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv = jnp.asarray(inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, ..., head_dim] by the tables [B, T, head_dim].

    HF's rotate_half(x) = concat(-x2, x1) is computed as the halves swapped (a reverse over
    a [2, half] view) times a sign folded into sin: XLA:CPU fuses the reverse into its
    consumers, whereas the concatenate of half-width slices (and its transpose, pads and
    slices in the backward pass) ran as separate slow loops.
    """
    extra = x.ndim - cos.ndim
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    half = x.shape[-1] // 2
    sign = jnp.concatenate([-jnp.ones(half, jnp.float32), jnp.ones(half, jnp.float32)])
    swapped = jnp.flip(x.reshape(*x.shape[:-1], 2, half), axis=-2).reshape(x.shape)
    return (x.astype(jnp.float32) * cos + swapped.astype(jnp.float32) * (sin * sign)).astype(x.dtype)
