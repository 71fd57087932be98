"""Steering the language model: vectors added to the residual stream after blocks, or target adapters.

A `Steering` changes the model everywhere it runs (every position of a prompt, and every
token generated from it): `vectors[l]` is added to the residual stream after block `l`
(a zero row leaves that block's output unchanged, bit for bit), and `lora` adapts the
blocks. lit/control.py finds both with `jax.grad` through a frozen LIT decoder;
lit_jax.generate takes one as its `steering=` argument.

`steered_stream` and `steered_forward` run the blocks in one `lax.scan` (the stacked
weights are the scanned-over input, so autodiff reuses them) with the additions inside
the loop; `steered_stream` can also return the residual stream after *every* block it
runs (the per-layer control loss reads them all from that one scan).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lit_jax.models import kv_cache as kvc
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraWeights


class Steering(NamedTuple):
    """vectors float32 [n_layers, D] added after each block (zero rows: block unsteered), or None;
    lora: adapters on the model's blocks (stacked [n_layers, ...] like the base), or None."""

    vectors: jax.Array | None = None
    lora: LoraWeights | None = None


def dense_vectors(layers: Sequence[int], vectors: jax.Array, num_layers: int) -> jax.Array:
    """Per-layer additions float32 [num_layers, D] from vectors [len(layers), D] steering `layers`.

    Differentiable in `vectors`. Raises ValueError for a count mismatch, a repeated layer, or a
    layer outside [0, num_layers).
    """
    layers = tuple(int(x) for x in layers)
    if vectors.ndim != 2 or vectors.shape[0] != len(layers):
        raise ValueError(f"steering vectors of shape {tuple(vectors.shape)} for layers {layers}: expected "
                         f"[{len(layers)}, hidden]")
    if len(set(layers)) != len(layers):
        raise ValueError(f"steering layers {layers} repeat a layer")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"steering layer(s) {bad} outside the model's blocks [0, {num_layers})")
    full = jnp.zeros((num_layers, vectors.shape[1]), jnp.float32)
    return full.at[jnp.asarray(layers, jnp.int32)].set(vectors.astype(jnp.float32)) if layers else full


def check_steering(steering: Steering, cfg: ModelConfig) -> None:
    """Raises ValueError when `steering` does not fit the model (vectors not [n_layers, D], adapters
    of another depth)."""
    if steering.vectors is not None and tuple(steering.vectors.shape) != (cfg.num_layers, cfg.hidden_size):
        raise ValueError(f"steering vectors of shape {tuple(steering.vectors.shape)}; this model needs "
                         f"[{cfg.num_layers}, {cfg.hidden_size}] (one row per block, zeros where unsteered)")
    if steering.lora is not None:
        for name, ab in steering.lora.params.items():
            if ab["a"].shape[0] != cfg.num_layers:
                raise ValueError(f"steering adapter {name!r} has {ab['a'].shape[0]} layers; the model has "
                                 f"{cfg.num_layers}")


def _scan_blocks(x, params, ctx, cfg: ModelConfig, steering: Steering, lora: LoraWeights | None, stop: int,
                 cache, edit: llama.BlockEdit | None, collect: bool):
    """Blocks [0, stop) on x [B, T, D] in one scan, adding steering.vectors[l] after block l (then `edit`).

    Returns (x, cache, stream): stream [stop, B, T, D] (every block's output) when `collect`, else None.
    """
    if steering.lora is not None and lora is not None:
        raise ValueError("both a steering adapter and `lora` were given: a forward takes one set of adapters")
    lora = steering.lora if steering.lora is not None else lora
    scale = None if lora is None else lora.scale
    take = (lambda t: t) if stop == cfg.num_layers else (lambda t: jax.tree.map(lambda a: a[:stop], t))  # noqa: E731
    xs = (take(params["layers"]), None if lora is None else take(lora.params),
          None if steering.vectors is None else steering.vectors[:stop], jnp.arange(stop))

    def body(carry, inputs):
        x, cache = carry
        p, lp, v, layer = inputs
        x, cache = llama.block(x, p, None if lp is None else LoraWeights(lp, scale), layer, ctx, cache, cfg)
        if v is not None:
            x = x + v.astype(x.dtype)
        if edit is not None:
            x = jnp.where(layer == edit.layer, edit.fn(x), x)
        return (x, cache), (x if collect else None)

    (x, cache), stream = jax.lax.scan(body, (x, cache), xs)
    return x, cache, stream


def steered_stream(
    params: llama.Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    steering: Steering,
    stop: int,
    *,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    subtree_end: jax.Array | None = None,
    collect: bool = False,
) -> jax.Array:
    """The steered model's residual stream on tokens int32 [B, T], running blocks [0, stop) only.

    collect=False: the stream after block stop-1, [B, T, D]; collect=True: after every block,
    [stop, B, T, D] (index l: after block l, HF hidden_states[l + 1]). In the params' dtype;
    differentiable in the steering. valid / positions / subtree_end as in `llama.forward`.
    Raises ValueError for stop outside [1, n_layers] or a steering of another shape.
    """
    if not 1 <= stop <= cfg.num_layers:
        raise ValueError(f"stop={stop}: must run between 1 and the model's {cfg.num_layers} blocks")
    check_steering(steering, cfg)
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    ctx, _ = llama.attention_context(cfg, valid, positions, subtree_end)
    x, _, stream = _scan_blocks(llama.embed(params, tokens), params, ctx, cfg, steering, None, stop, None, None,
                                collect)
    return stream if collect else x


def steered_forward(
    params: llama.Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    steering: Steering | None = None,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    subtree_end: jax.Array | None = None,
    lora: LoraWeights | None = None,
    edit: llama.BlockEdit | None = None,
    logits_at: jax.Array | None = None,
    cache: kvc.KVCache | None = None,
    slots: jax.Array | None = None,
) -> llama.ForwardOutput:
    """`llama.forward` with a steering applied in every block; without one (None) it *is* llama.forward.

    Arguments and result as in `llama.forward`; `lora` and `steering.lora` may not both be set.
    Raises ValueError for a steering of another shape, two sets of adapters, or an edit outside
    the model's layers.
    """
    if steering is None or (steering.vectors is None and steering.lora is None):
        return llama.forward(params, tokens, cfg, valid=valid, positions=positions, subtree_end=subtree_end,
                             lora=lora, edit=edit, logits_at=logits_at, cache=cache, slots=slots)
    check_steering(steering, cfg)
    if edit is not None and not 0 <= edit.layer < cfg.num_layers:
        raise ValueError(f"edit after block {edit.layer}: outside the model's {cfg.num_layers} layers")
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    ctx, cache = llama.attention_context(cfg, valid, positions, subtree_end, cache, slots)
    x, cache, _ = _scan_blocks(llama.embed(params, tokens), params, ctx, cfg, steering, lora, cfg.num_layers, cache,
                               edit, False)
    h = x if logits_at is None else jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return llama.ForwardOutput(llama.unembed(params, h, cfg), x, cache)
