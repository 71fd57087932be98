"""LIT's two compositions on the language model: read the residual stream at layers, write vectors into it.

Reading runs the target (no adapters) block by block and keeps the residual stream after
each read layer, stopping after the last one (no later block, no head). Writing puts
vectors into the decoder's residual stream after one block, at given positions:
- "replace": the block-K output at the slots becomes the vector (LatentQA, Pan et al. 2024);
- "add_norm_matched": h + ||h|| * v / ||v|| (Activation Oracles, Karvonen et al. 2025).

Positions are per example; slots whose mask is False are left untouched, so examples in
a batch may carry different numbers of activations.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lit_jax.models import llama
from lit_jax.models.config import ModelConfig

WRITE_MODES = ("replace", "add_norm_matched")


def layer_order(layers: Sequence[int]) -> tuple[int, ...]:
    """The order in which `read_residual_stream` stacks the layers it reads: sorted, without repeats."""
    return tuple(sorted({int(x) for x in layers}))


def layer_index(layer: jax.Array, layers: Sequence[int]) -> jax.Array:
    """For layer ids [...] (each one of `layers`), their index in `layer_order(layers)`."""
    return jnp.argmax(layer[..., None] == jnp.asarray(layer_order(layers)), axis=-1)


def read_residual_stream(
    params: llama.Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    layers: Sequence[int],
    *,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    subtree_end: jax.Array | None = None,
) -> jax.Array:
    """The residual stream after each of `layers` (0-based blocks; HF `hidden_states[L + 1]`).

    tokens int32 [B, T]; valid / positions / subtree_end as in `llama.forward`.
    Returns [n, B, T, D] in the params' dtype, stacked in `layer_order(layers)`. Runs
    blocks 0..max(layers) only. Raises ValueError for no layers or a layer outside the model.
    """
    order = layer_order(layers)
    if not order:
        raise ValueError("no layers to read")
    if order[0] < 0 or order[-1] >= cfg.num_layers:
        raise ValueError(f"read layer(s) {order} outside [0, {cfg.num_layers})")
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    ctx, _ = llama.attention_context(cfg, valid, positions, subtree_end)
    x, start, collected = llama.embed(params, tokens), 0, []
    for layer in order:
        x, _ = llama.run_blocks(x, params, ctx, cfg, start=start, stop=layer + 1)
        collected.append(x)
        start = layer + 1
    return jnp.stack(collected)


class ResidualWrite(NamedTuple):
    """vectors [B, S, D]; positions int32 [B, S] (indices into the sequence); mask bool [B, S] (slot in use)."""

    vectors: jax.Array
    positions: jax.Array
    mask: jax.Array


def l2_norm(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis (float32, keepdims)."""
    # sqrt(sum x^2 + tiny) keeps the gradient finite for an all-zero vector (ablations).
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + 1e-12)


def apply_write(h: jax.Array, write: ResidualWrite, mode: str) -> jax.Array:
    """h [B, T, D] with `write` applied; differentiable in h and in write.vectors.

    Raises ValueError for an unknown mode.
    """
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


def write_edit(write: ResidualWrite, layer: int, mode: str) -> llama.BlockEdit:
    """The model edit that applies `write` after decoder block `layer` (for `llama.forward` / generation).

    Raises ValueError for an unknown mode.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"write mode {mode!r}; expected one of {WRITE_MODES}")
    return llama.BlockEdit(int(layer), lambda h: apply_write(h, write, mode))
