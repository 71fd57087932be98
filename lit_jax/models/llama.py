"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as pure functions over a params pytree.

Parameter layout (one dict; layers stacked on a leading `[n_layers]` axis):

  embed      [V, D]                       lm_head [D, V] (absent when tied)
  final_norm [D]
  layers/attn_norm [L, D]                 layers/mlp_norm [L, D]
  layers/qkv [L, D, Hkv*(G+2)*hd]         fused q|k|v, per KV head (models/fused_layout.py)
  layers/qkv_bias [L, Hkv*(G+2)*hd]       (Qwen2; attention_bias)
  layers/q_norm, k_norm [L, hd]           (Qwen3)
  layers/o [L, Hkv*G*hd, D]               layers/o_bias [L, D] (attention_bias)
  layers/gate_up [L, D, F*2]              fused gate|up, interleaved pairs (models/fused_layout.py)
  layers/down [L, F, D]

`forward` is the language model: tokens -> residual stream -> logits, with an optional
KV cache, LoRA adapters, and one residual edit after a chosen block (`BlockEdit`, what
LIT's activation writes use). The pieces it is made of (`attention_context`, `embed`,
`run_blocks`, `unembed`) are public so that compositions (lit/residual_stream.py: read
the residual stream at several layers) run exactly the same blocks. The layer stack runs
under `lax.scan` or unrolled (`cfg.scan_layers`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lit_jax import sharding as shd
from lit_jax.models import attention as attn_impl
from lit_jax.models import kv_cache as kvc
from lit_jax.models.config import ModelConfig
from lit_jax.models.fused_layout import axis_units, gate_up_layout, qkv_layout
from lit_jax.models.lora import LoraWeights, lora_update
from lit_jax.models.rope import apply_rope, rope_tables

Params = dict[str, Any]
# the residual stream [B, T, D]: batch over the batch mesh axes (sharding.constrain, under sharding.mesh_rules)
RESIDUAL_AXES = ("batch", None, None)


# ----------------------------------------------------------------------------- parameters


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Shape and logical axis names of every parameter: {name: (shape, axes)} (nested for layers).

    Axis names say what an axis holds: "qkv" / "gate_up" the fused outputs (their unit of
    sharding in `fused_layout.axis_units`), "heads" query heads x head_dim, "mlp" MLP
    features, "embed" the model width, "norm" a vector kept whole.
    """
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv, gate_up = qkv_layout(cfg), gate_up_layout(cfg)
    q_width = qkv.member_width("q")
    layers = {
        "attn_norm": ((L, D), ("layers", "norm")),
        "qkv": ((L, D, qkv.width), ("layers", "embed", "qkv")),
        "o": ((L, q_width, D), ("layers", "heads", "embed")),
        "mlp_norm": ((L, D), ("layers", "norm")),
        "gate_up": ((L, D, gate_up.width), ("layers", "embed", "gate_up")),
        "down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["qkv_bias"] = ((L, qkv.width), ("layers", "qkv"))
    if cfg.o_bias:
        layers["o_bias"] = ((L, D), ("layers", "norm"))
    if cfg.qk_norm:
        layers["q_norm"] = ((L, cfg.head_dim), ("layers", "head_dim"))
        layers["k_norm"] = ((L, cfg.head_dim), ("layers", "head_dim"))
    specs = {"embed": ((V, D), ("vocab", "embed")), "final_norm": ((D,), ("norm",)), "layers": layers}
    if not cfg.tie_embeddings:
        specs["lm_head"] = ((D, V), ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names per parameter, same tree structure as the params."""
    return jax.tree.map(lambda s: s[1], param_specs(cfg), is_leaf=_is_spec)


def param_units(cfg: ModelConfig) -> dict[str, int]:
    """Logical axis -> elements per indivisible unit (for `sharding.tree_shardings(units=...)`)."""
    return axis_units(cfg)


def param_shapes(cfg: ModelConfig) -> Params:
    """jax.ShapeDtypeStruct per parameter (for eval_shape / lowering without weights)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.dtype(cfg.dtype)), param_specs(cfg), is_leaf=_is_spec)


def init_params(key: jax.Array, cfg: ModelConfig, std: float = 0.02) -> Params:
    """Random weights (normal(0, std); norms = 1; biases = 0), for tests and from-scratch runs."""
    specs = param_specs(cfg)
    flat, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, (shape, _)), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append(jnp.ones(shape, cfg.dtype))
        elif "bias" in name:
            leaves.append(jnp.zeros(shape, cfg.dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by `weight` in the input dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class AttentionContext(NamedTuple):
    """Per-call tables shared by every block (built by `attention_context`)."""

    cos: jax.Array  # [B, T, hd] rotary tables
    sin: jax.Array  # [B, T, hd]
    mask: jax.Array  # [B, T, S] bool: query t may attend key slot s
    lengths: jax.Array | None  # [B] real tokens per row of plain chains (fused causal kernels), else None
    right_padded: jax.Array | None  # bool scalar: every chain is right-padded (what those kernels assume)
    slots: jax.Array | None  # [B, T] cache slots of the new tokens (None without a cache)
    implementation: str  # attention implementation for self-attention without a cache (models/attention.py)


class BlockEdit(NamedTuple):
    """x = fn(x) on the residual stream [B, T, D] right after block `layer` (0-based)."""

    layer: int
    fn: Callable[[jax.Array], jax.Array]


def attention_mask(
    cfg: ModelConfig,
    query_slots: jax.Array,
    query_pos: jax.Array,
    key_filled: jax.Array,
    key_pos: jax.Array,
    key_subtree_end: jax.Array | None = None,
) -> jax.Array:
    """Causal (by slot order) and padding mask [B, T, S], plus Mistral's sliding window.

    key_subtree_end [B, S]: prefix trees in depth-first order (data/packing.py); key s is
    then visible only to the queries s..key_subtree_end[s] (its subtree): each token sees
    exactly its ancestors, as it would in its own unpacked sequence.
    """
    key_slots = jnp.arange(key_filled.shape[1])
    mask = key_filled[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])
    if key_subtree_end is not None:
        mask &= query_slots[:, :, None] <= key_subtree_end[:, None, :]
    if cfg.sliding_window is not None:
        mask &= (query_pos[:, :, None] - key_pos[:, None, :]) < cfg.sliding_window
    return mask


def default_positions(valid: jax.Array) -> jax.Array:
    """Positions that skip padding: 0 at each row's first real token (works for left and right padding)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def attention_context(
    cfg: ModelConfig,
    valid: jax.Array,
    positions: jax.Array | None = None,
    subtree_end: jax.Array | None = None,
    cache: kvc.KVCache | None = None,
    slots: jax.Array | None = None,
) -> tuple[AttentionContext, kvc.KVCache | None]:
    """Rotary tables and attention mask for tokens [B, T] (and the cache with their slots marked).

    valid [B, T] bool: False on padding. positions [B, T]: rotary positions (default
    `default_positions(valid)`; tree depths for packed rows). subtree_end [B, T]: packed
    prefix trees (None: every row one causal chain). cache, slots: a KV
    cache and the slots [B, T] the tokens occupy (generation). Raises ValueError for a
    cache without slots, or trees with a cache.
    """
    B, T = valid.shape
    if positions is None:
        positions = default_positions(valid)
    cos, sin = rope_tables(cfg, positions)
    if cache is None:
        q_slots = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
        mask = attention_mask(cfg, q_slots, positions, valid, positions, subtree_end)
        lengths = right_padded = None
        if subtree_end is None:
            lengths = jnp.sum(valid, axis=1)
            right_padded = jnp.all(valid == (jnp.arange(T)[None] < lengths[:, None]))
        impl = attn_impl.resolve_implementation(cfg.attention)
        return AttentionContext(cos, sin, mask, lengths, right_padded, None, impl), None
    if slots is None:
        raise ValueError("a forward with a cache needs `slots`")
    if subtree_end is not None:
        raise ValueError("packed trees (subtree_end) are for training and scoring, not for a KV cache")
    cache = kvc.mark_filled(cache, slots, valid, positions)
    mask = attention_mask(cfg, slots, positions, cache.filled, cache.positions)
    return AttentionContext(cos, sin, mask, None, None, slots, "dense"), cache


def _self_attention(q, k, v, ctx: AttentionContext, cfg: ModelConfig) -> jax.Array:
    if ctx.implementation == "blocked":
        return attn_impl.blocked_attention(q, k, v, ctx.mask)
    dense = lambda q, k, v: attn_impl.dense_attention(q, k, v, ctx.mask)  # noqa: E731
    if ctx.implementation == "fused" and ctx.lengths is not None:
        fused = lambda q, k, v: attn_impl.fused_causal_attention(  # noqa: E731
            q, k, v, ctx.lengths, cfg.sliding_window, attn_impl.fused_implementation(q.dtype))
        # the fused kernels take lengths, so they need right padding; other rows take the mask
        return jax.lax.cond(ctx.right_padded, fused, dense, q, k, v)
    return dense(q, k, v)  # dense, and fused over packed trees (arbitrary mask)


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """y + a LoRA update (reshaped like y), or y where no projection in it is adapted."""
    return y if delta is None else y + delta.reshape(y.shape)


def block(
    x: jax.Array,
    p: Params,
    lora: LoraWeights | None,
    layer: Any,
    ctx: AttentionContext,
    cache: kvc.KVCache | None,
    cfg: ModelConfig,
) -> tuple[jax.Array, kvc.KVCache | None]:
    """One transformer block on x [B, T, D]; `p` / `lora.params` are this layer's slices."""
    B, T, _ = x.shape
    qkv_l, gate_up_l = qkv_layout(cfg), gate_up_layout(cfg)
    adapters, scale = (None, 1.0) if lora is None else (lora.params, lora.scale)

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    # Weights are 2-D and used as stored: a reshaped weight would make XLA:CPU materialise its
    # transpose for the backward pass, and under scan autodiff would save a copy per layer.
    qkv = jnp.einsum("btd,dj->btj", h, p["qkv"])
    if cfg.qkv_bias:
        qkv = qkv + p["qkv_bias"]
    qkv = checkpoint_name(_plus(qkv, lora_update(h, adapters, scale, qkv_l)), "qkv")
    parts = qkv_l.parts(qkv)  # [B, T, H, n, hd]
    q, k, v = parts["q"], parts["k"][..., 0, :], parts["v"][..., 0, :]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, ctx.cos, ctx.sin)
    k = apply_rope(k, ctx.cos, ctx.sin)

    if cache is not None:
        cache = kvc.write_layer(cache, layer, ctx.slots, k, v)
        attn = attn_impl.dense_attention(q, cache.k[layer], cache.v[layer], ctx.mask)
    else:
        attn = _self_attention(q, k, v, ctx, cfg)
    # Flattened heads, weight used as stored: XLA then transposes the (small) activation, not
    # the weight, and autodiff under scan reuses the stacked weight instead of saving a copy.
    attn = attn.reshape(B, T, -1)
    out = jnp.einsum("bti,id->btd", attn, p["o"])
    out = _plus(out, lora_update(attn, adapters, scale, "o"))
    if cfg.o_bias:
        out = out + p["o_bias"]
    x = checkpoint_name(x + out, "mid")

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate_up = jnp.einsum("btd,dj->btj", h, p["gate_up"])
    gate_up = checkpoint_name(_plus(gate_up, lora_update(h, adapters, scale, gate_up_l)), "gate_up")
    parts = gate_up_l.parts(gate_up)  # [B, T, F, 1, 1]
    m = jax.nn.silu(parts["gate"][..., 0, 0]) * parts["up"][..., 0, 0]
    out = jnp.einsum("btf,fd->btd", m, p["down"])
    out = _plus(out, lora_update(m, adapters, scale, "down"))
    return x + out, cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # keeps the largest matmul's output (gate|up, half a block's weight FLOPs) and recomputes the rest
    "gate_up": jax.checkpoint_policies.save_only_these_names("gate_up"),
    # keeps every matmul's output that the backward needs (q|k|v and gate|up with their LoRA
    # updates, attention, LoRA's x @ A) and the residual between the attention and MLP
    # halves: the backward then recomputes only elementwise work
    "matmuls": jax.checkpoint_policies.save_only_these_names("qkv", "attn", "attn_stats", "mid", "gate_up", "lora_u"),
}


def run_blocks(
    x: jax.Array,
    params: Params,
    ctx: AttentionContext,
    cfg: ModelConfig,
    *,
    start: int = 0,
    stop: int | None = None,
    lora: LoraWeights | None = None,
    cache: kvc.KVCache | None = None,
    edit: BlockEdit | None = None,
) -> tuple[jax.Array, kvc.KVCache | None]:
    """Runs blocks [start, stop) (default: all) on the residual stream x [B, T, D], by scan or unrolled.

    edit: applied after its block when that block is in [start, stop), inside the loop.

    Under scan, the whole stack is passed as the scanned-over input: autodiff then reuses
    it for the backward pass, whereas weights indexed out of a closed-over stack would be
    saved per iteration (a stacked copy of the model each step). A partial range is
    indexed inside the loop instead of sliced up front (a slice would copy); that path is
    meant for forward-only reads.
    """
    stop = cfg.num_layers if stop is None else stop
    if not 0 <= start <= stop <= cfg.num_layers:
        raise ValueError(f"blocks [{start}, {stop}) outside the model's {cfg.num_layers} layers")
    if stop == start:
        return x, cache
    scale = None if lora is None else lora.scale

    # Training and scoring pin the residual stream to the batch axes (weights gathered: FSDP); generation
    # (a KV cache) does not: for a few tokens per row, XLA's split contractions move less than the weights.
    pin = (lambda x: x) if cache is not None else (lambda x: shd.constrain(x, RESIDUAL_AXES))

    def one(x, p, lp, layer, cache):
        x = pin(x)
        x, cache = block(x, p, None if lp is None else LoraWeights(lp, scale), layer, ctx, cache, cfg)
        x = pin(x)
        if edit is not None:
            if isinstance(layer, int):
                x = edit.fn(x) if layer == edit.layer else x
            else:
                x = jnp.where(layer == edit.layer, edit.fn(x), x)
        return x, cache

    if cfg.remat != "none":
        one = jax.checkpoint(one, policy=_REMAT_POLICIES[cfg.remat])

    layers, adapters = params["layers"], None if lora is None else lora.params
    if not cfg.scan_layers:
        for i in range(start, stop):
            p, lp = jax.tree.map(lambda a: a[i], (layers, adapters))
            x, cache = one(x, p, lp, i, cache)
        return x, cache

    index = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)  # noqa: E731
    if start == 0 and stop == cfg.num_layers:
        def body(carry, xs):
            (p, lp), layer = xs
            return one(carry[0], p, lp, layer, carry[1]), None

        xs = ((layers, adapters), jnp.arange(stop))
    else:
        def body(carry, layer):
            p, lp = index((layers, adapters), layer)
            return one(carry[0], p, lp, layer, carry[1]), None

        xs = jnp.arange(start, stop)
    (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    return x, cache


# ----------------------------------------------------------------------------- the model


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens int32 [B, T] -> residual stream [B, T, D] in the params' dtype."""
    return jnp.take(params["embed"], tokens, axis=0)


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and vocabulary projection of h [..., D]; float32 logits [..., V]."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)
    return shd.constrain(logits, ("batch",) + (None,) * (logits.ndim - 1)) if logits.ndim > 1 else logits


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, T, V], or [B, P, V] at `logits_at`; float32
    hidden: jax.Array  # residual stream after the last block [B, T, D] (before the final norm)
    cache: kvc.KVCache | None


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    subtree_end: jax.Array | None = None,
    lora: LoraWeights | None = None,
    edit: BlockEdit | None = None,
    logits_at: jax.Array | None = None,
    cache: kvc.KVCache | None = None,
    slots: jax.Array | None = None,
) -> ForwardOutput:
    """The language model on tokens int32 [B, T]: logits and the final residual stream.

    valid [B, T] bool: False on padding (default all True). positions / subtree_end: see
    `attention_context` (packed prefix trees pass their depths and subtree ends).
    lora: adapters applied to every block. edit: one residual-stream edit after a block.
    logits_at [B, P] int32: logits only at these indices (saves the [B, T, V] projection).
    cache, slots: KV cache and the cache slots [B, T] of the tokens (generation).
    Raises ValueError for an edit outside the model's layers or a cache without slots.
    """
    if edit is not None and not 0 <= edit.layer < cfg.num_layers:
        raise ValueError(f"edit after block {edit.layer}: outside the model's {cfg.num_layers} layers")
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    ctx, cache = attention_context(cfg, valid, positions, subtree_end, cache, slots)
    x, cache = run_blocks(embed(params, tokens), params, ctx, cfg, lora=lora, cache=cache, edit=edit)
    h = x if logits_at is None else jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return ForwardOutput(unembed(params, h, cfg), x, cache)


def num_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
