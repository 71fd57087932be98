"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as pure functions over a params pytree.

Parameter layout (one dict; layers stacked on a leading `[n_layers]` axis):

  embed      [V, D]                       lm_head [D, V] (absent when tied)
  final_norm [D]
  layers/attn_norm [L, D]                 layers/mlp_norm [L, D]
  layers/qkv [L, D, Hkv*(G+2)*hd]         per KV head: its G query heads, then k, then v;
                                          one GEMM for q|k|v; contiguous per KV head for sharding
  layers/qkv_bias [L, Hkv, G+2, hd]       (Qwen2; attention_bias)
  layers/q_norm, k_norm [L, hd]           (Qwen3)
  layers/o [L, Hkv*G*hd, D]               layers/o_bias [L, D] (attention_bias)
  layers/gate_up [L, D, F*2]              one GEMM for gate|up, interleaved (gate_f, up_f) so a
                                          contiguous shard holds matching pairs
  layers/down [L, F, D]

`forward` reads the residual stream after a block (and stops there), writes vectors
into it after a block, applies optional LoRA adapters, computes logits only where asked,
and fills a KV cache; the layer stack runs under `lax.scan` or unrolled (`cfg.scan_layers`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lit_jax.models import kv_cache as kvc
from lit_jax.models.attention import attention, causal_attention
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import maybe_lora
from lit_jax.models.residual import ResidualWrite, apply_write
from lit_jax.models.rope import apply_rope, rope_tables

Params = dict[str, Any]


# ----------------------------------------------------------------------------- parameters


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Shape and logical axis names of every parameter: {name: (shape, axes)} (nested for layers)."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    layers = {
        "attn_norm": ((L, D), ("layers", "norm")),
        "qkv": ((L, D, H * (G + 2) * hd), ("layers", "embed", "kv_heads")),
        "o": ((L, H * G * hd, D), ("layers", "heads", "embed")),
        "mlp_norm": ((L, D), ("layers", "norm")),
        "gate_up": ((L, D, F * 2), ("layers", "embed", "mlp")),
        "down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["qkv_bias"] = ((L, H, G + 2, hd), ("layers", "kv_heads", None, "head_dim"))
    if cfg.o_bias:
        layers["o_bias"] = ((L, D), ("layers", "norm"))
    if cfg.qk_norm:
        layers["q_norm"] = ((L, hd), ("layers", "head_dim"))
        layers["k_norm"] = ((L, hd), ("layers", "head_dim"))
    specs = {"embed": ((V, D), ("vocab", "embed")), "final_norm": ((D,), ("norm",)), "layers": layers}
    if not cfg.tie_embeddings:
        specs["lm_head"] = ((D, V), ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names per parameter, same tree structure as the params."""
    return jax.tree.map(lambda s: s[1], param_specs(cfg), is_leaf=_is_spec)


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
    """Per-call tables shared by every block: rotary tables and the attention mask."""

    cos: jax.Array  # [B, T, hd]
    sin: jax.Array  # [B, T, hd]
    mask: jax.Array  # [B, T, S] bool: query t may attend key slot s
    slots: jax.Array | None  # [B, T] cache slots of the new tokens (None without a cache)


def attention_mask(
    cfg: ModelConfig,
    query_slots: jax.Array,
    query_pos: jax.Array,
    key_filled: jax.Array,
    key_pos: jax.Array,
    key_tree_end: jax.Array | None = None,
) -> jax.Array:
    """Causal (by slot order) and padding mask [B, T, S], plus Mistral's sliding window.

    key_tree_end [B, S]: packed prefix trees (data/packing.py) in depth-first order; key s
    is then visible only to the queries s..key_tree_end[s] (its subtree): each token sees
    exactly its ancestors, as it would in its own unpacked sequence.
    """
    key_slots = jnp.arange(key_filled.shape[1])
    mask = key_filled[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])
    if key_tree_end is not None:
        mask &= query_slots[:, :, None] <= key_tree_end[:, None, :]
    if cfg.sliding_window is not None:
        mask &= (query_pos[:, :, None] - key_pos[:, None, :]) < cfg.sliding_window
    return mask


def block(
    x: jax.Array,
    p: Params,
    lora: Params | None,
    layer: Any,
    ctx: AttentionContext,
    cache: kvc.KVCache | None,
    cfg: ModelConfig,
    lora_scale: float,
) -> tuple[jax.Array, kvc.KVCache | None]:
    """One transformer block on x [B, T, D]; `p`/`lora` are this layer's slices."""
    B, T, _ = x.shape
    H, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    # Weights are 2-D and used as stored: a reshaped weight would make XLA:CPU materialise its
    # transpose for the backward pass, and under scan autodiff would save a copy per layer.
    qkv = jnp.einsum("btd,dj->btj", h, p["qkv"]).reshape(B, T, H, G + 2, hd)
    if cfg.qkv_bias:
        qkv = qkv + p["qkv_bias"]
    qkv = checkpoint_name(_plus(qkv, maybe_lora(h, lora, ("q", "k", "v"), lora_scale, _qkv_place(cfg))), "qkv")
    q, k, v = qkv[..., :G, :], qkv[..., G, :], qkv[..., G + 1, :]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, ctx.cos, ctx.sin)
    k = apply_rope(k, ctx.cos, ctx.sin)

    if cache is not None:
        cache = kvc.write_layer(cache, layer, ctx.slots, k, v)
        k, v = cache.k[layer], cache.v[layer]
    # Without a cache, query t sees no key after t (causal, or a packed tree): skip the blocks above the diagonal.
    attn = attention(q, k, v, ctx.mask) if cache is not None else causal_attention(q, k, v, ctx.mask)
    # Flattened heads, weight used as stored: XLA then transposes the (small) activation, not
    # the weight, and autodiff under scan reuses the stacked weight instead of saving a copy.
    attn = attn.reshape(B, T, H * G * hd)
    out = jnp.einsum("bti,id->btd", attn, p["o"])
    out = _plus(out, maybe_lora(attn, lora, ("o",), lora_scale))
    if cfg.o_bias:
        out = out + p["o_bias"]
    x = checkpoint_name(x + out, "mid")

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate_up = jnp.einsum("btd,dj->btj", h, p["gate_up"]).reshape(B, T, -1, 2)
    gate_up = checkpoint_name(_plus(gate_up, maybe_lora(h, lora, ("gate", "up"), lora_scale, _gate_up_place)),
                              "gate_up")
    m = jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]
    out = jnp.einsum("btf,fd->btd", m, p["down"])
    out = _plus(out, maybe_lora(m, lora, ("down",), lora_scale))
    return x + out, cache


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """y + a LoRA update (reshaped like y), or y where no projection in it is adapted."""
    return y if delta is None else y + delta.reshape(y.shape)


def _qkv_place(cfg: ModelConfig):
    """Places LoRA B matrices of q [r, H*G*hd], k, v [r, H*hd] in the fused q|k|v layout [H, G+2, hd]."""
    H, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    slots = {"q": (0, G), "k": (G, 1), "v": (G + 1, 1)}

    def place(bs):
        blocks = []
        for name, b in bs:
            lo, n = slots[name]
            b = b.reshape(b.shape[0], H, n, hd)
            blocks.append(jnp.pad(b, ((0, 0), (0, 0), (lo, G + 2 - lo - n), (0, 0))).reshape(b.shape[0], -1))
        return jnp.concatenate(blocks)
    return place


def _gate_up_place(bs):
    """Places LoRA B matrices of gate, up [r, F] in the interleaved gate|up layout [F, 2]."""
    slot = {"gate": (0, 1), "up": (1, 0)}
    return jnp.concatenate([jnp.pad(b[..., None], ((0, 0), (0, 0), slot[name])).reshape(b.shape[0], -1)
                            for name, b in bs])


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
    lora: Params | None,
    start: int,
    stop: int,
    ctx: AttentionContext,
    cache: kvc.KVCache | None,
    cfg: ModelConfig,
    lora_scale: float,
    write: tuple[int, Any] | None = None,
) -> tuple[jax.Array, kvc.KVCache | None]:
    """Runs blocks [start, stop) over the stacked layers, by scan or unrolled.

    write: (layer, fn) applies x = fn(x) after that block, inside the loop.

    Under scan, the whole stack is passed as the scanned-over input: autodiff then reuses
    it for the backward pass, whereas weights indexed out of a closed-over stack would be
    saved per iteration (a stacked copy of the model each step). A partial range is
    indexed inside the loop instead of sliced up front (a slice would copy); that path is
    meant for forward-only reads.
    """
    if stop <= start:
        return x, cache

    def one(x, p, lp, layer, cache):
        x, cache = block(x, p, lp, layer, ctx, cache, cfg, lora_scale)
        if write is not None:
            if isinstance(layer, int):
                x = write[1](x) if layer == write[0] else x
            else:
                x = jnp.where(layer == write[0], write[1](x), x)
        return x, cache

    if cfg.remat != "none":
        one = jax.checkpoint(one, policy=_REMAT_POLICIES[cfg.remat])

    layers = params["layers"]
    if not cfg.scan_layers:
        for i in range(start, stop):
            p, lp = jax.tree.map(lambda a: a[i], (layers, lora))
            x, cache = one(x, p, lp, i, cache)
        return x, cache

    index = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)  # noqa: E731
    if start == 0 and stop == cfg.num_layers:
        def body(carry, xs):
            (p, lp), layer = xs
            return one(carry[0], p, lp, layer, carry[1]), None

        xs = ((layers, lora), jnp.arange(stop))
    else:
        def body(carry, layer):
            p, lp = index((layers, lora), layer)
            return one(carry[0], p, lp, layer, carry[1]), None

        xs = jnp.arange(start, stop)
    (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    return x, cache


# ----------------------------------------------------------------------------- the model


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and vocabulary projection; float32 logits."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)


def default_positions(valid: jax.Array) -> jax.Array:
    """Positions that skip padding: 0 at each row's first real token (works for left and right padding)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] or [B, P, V] at `logits_at`; None when stopped early
    hidden: jax.Array  # residual after the last block run [B, T, D] (pre final norm);
    #                    with `collect_layers`: [n, B, T, D], one per collected layer
    cache: kvc.KVCache | None


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    tree_end: jax.Array | None = None,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    write: ResidualWrite | None = None,
    write_layer: int = 0,
    write_mode: str = "replace",
    stop_after_layer: int | None = None,
    collect_layers: tuple[int, ...] | None = None,
    logits_at: jax.Array | None = None,
    cache: kvc.KVCache | None = None,
    slots: jax.Array | None = None,
) -> ForwardOutput:
    """Runs the model on tokens [B, T].

    valid: [B, T] bool, False on padding (default: all True).
    positions: [B, T] rotary positions (default: `default_positions(valid)`).
    tree_end: [B, T] for rows that pack a prefix tree of sequences (data/packing.py): the
        last index of each token's subtree; pass the tree depths as `positions`.
    lora: adapter params (see lora.py), scaled by `lora_scale`.
    write: vectors written into the residual stream after block `write_layer`.
    stop_after_layer: return the residual after this block (HF `hidden_states[L+1]`),
        running no later block and no head.
    collect_layers: return the residual after each of these blocks, stacked, and stop
        after the last of them (reading several layers in one pass).
    logits_at: [B, P] indices; logits only there (saves the [B, T, V] projection).
    cache, slots: KV cache and the cache slots [B, T] the tokens occupy (generation).
    """
    B, T = tokens.shape
    if stop_after_layer is not None and collect_layers is not None:
        raise ValueError("pass stop_after_layer or collect_layers, not both")
    collect = tuple(sorted(set(collect_layers))) if collect_layers is not None else ()
    if collect_layers is not None and not collect:
        raise ValueError("collect_layers is empty")
    stops_early = stop_after_layer is not None or bool(collect)
    last = collect[-1] if collect else (cfg.num_layers - 1 if stop_after_layer is None else stop_after_layer)
    if not 0 <= last < cfg.num_layers or (collect and collect[0] < 0):
        raise ValueError(f"read layer(s) {stop_after_layer if stop_after_layer is not None else collect} "
                         f"outside [0, {cfg.num_layers})")
    if write is not None and not 0 <= write_layer <= last:
        raise ValueError(f"write_layer={write_layer} must be in [0, {last}] (the layers that run)")
    if valid is None:
        valid = jnp.ones((B, T), bool)
    if positions is None:
        positions = default_positions(valid)

    cos, sin = rope_tables(cfg, positions)
    if cache is None:
        q_slots = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
        mask = attention_mask(cfg, q_slots, positions, valid, positions, tree_end)
        ctx = AttentionContext(cos, sin, mask, None)
    else:
        if slots is None:
            raise ValueError("forward with a cache needs `slots`")
        if tree_end is not None:
            raise ValueError("packed trees (tree_end) are for training and scoring, not for a KV cache")
        cache = kvc.mark_filled(cache, slots, valid, positions)
        mask = attention_mask(cfg, slots, positions, cache.filled, cache.positions)
        ctx = AttentionContext(cos, sin, mask, slots)

    x = embed(params, tokens)
    do_write = None if write is None else (write_layer, lambda h: apply_write(h, write, write_mode))
    if not collect:
        x, cache = run_blocks(x, params, lora, 0, last + 1, ctx, cache, cfg, lora_scale, do_write)
    else:  # stop at each collected layer
        start, collected = 0, []
        for layer in collect:
            segment_write = do_write if write is not None and start <= write_layer <= layer else None
            x, cache = run_blocks(x, params, lora, start, layer + 1, ctx, cache, cfg, lora_scale, segment_write)
            collected.append(x)
            start = layer + 1

    if collect:
        return ForwardOutput(None, jnp.stack(collected), cache)
    if stops_early:
        return ForwardOutput(None, x, cache)
    h = x if logits_at is None else jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return ForwardOutput(unembed(params, h, cfg), x, cache)


def num_params(params: Params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
