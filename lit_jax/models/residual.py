"""Writing vectors into the residual stream at given positions (the decoder's input of activations).

Two modes:
- "replace": the block-K output at the slots becomes the vector (LatentQA).
- "add_norm_matched": h + ||h|| * v / ||v|| (Activation Oracles).

Positions are per example; slots whose mask is False are left untouched, so examples in
a batch may carry different numbers of activations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

WRITE_MODES = ("replace", "add_norm_matched")


class ResidualWrite(NamedTuple):
    """vectors [B, S, D]; positions [B, S] (indices into the sequence); mask [B, S] (slot in use)."""

    vectors: jax.Array
    positions: jax.Array
    mask: jax.Array


def l2_norm(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis (float32, keepdims)."""
    # sqrt(sum x^2 + tiny) keeps the gradient finite for an all-zero vector (ablations).
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + 1e-12)


def apply_write(h: jax.Array, write: ResidualWrite, mode: str) -> jax.Array:
    """Returns h [B, T, D] with `write` applied; differentiable in h and in write.vectors."""
    if mode not in WRITE_MODES:
        raise ValueError(f"write mode {mode!r}; expected one of {WRITE_MODES}")
    batch, length, _ = h.shape
    rows = jnp.arange(batch)[:, None]
    # Unused slots point past the end and are dropped by the scatter.
    pos = jnp.where(write.mask, write.positions, length)
    v = write.vectors.astype(jnp.float32)
    if mode == "replace":
        new = v
    else:
        current = h[rows, jnp.minimum(pos, length - 1)].astype(jnp.float32)
        new = current + l2_norm(current) * v / l2_norm(v)
    return h.at[rows, pos].set(new.astype(h.dtype), mode="drop")
