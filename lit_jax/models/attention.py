"""Grouped-query attention whose backward pass recomputes the probabilities (as FlashAttention does).

Autodiff of a plain softmax attention saves the [T, S] scores and probabilities of every
head of every layer for the backward pass, and its softmax backward reduces over that
[T, S] array. Here the forward saves only q, k, v, the output and the per-row
softmax max and normaliser; the backward recomputes the probabilities with one matmul and uses
delta = rowsum(dO * O) (a [T] reduction) instead of rowsum(dP * P). That frees the saved
probabilities: 30 layers x 9 heads x 320^2 floats = 110 MB for 320 packed tokens on
SmolLM2-135M.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASKED = jnp.finfo(jnp.float32).min


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled, masked scores [B, H, G, T, S] in float32."""
    s = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None], s, _MASKED)


def _forward(q, k, v, mask):
    s = _scores(q, k, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgts,bshd->bthgd", (p / denom).astype(v.dtype), v)
    return out, (m, denom)  # [B, H, G, T, 1] each (not m + log(denom): exact for fully masked rows too)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,G,hd], k/v [B,S,H,hd], mask [B,T,S] (True: may attend) -> [B,T,H,G,hd].

    A query with no visible key (padding) gets the mean of v, as a softmax over equal
    scores would; nothing depends on it.
    """
    return _forward(q, k, v, mask)[0]


def _fwd(q, k, v, mask):
    out, stats = _forward(q, k, v, mask)
    return out, (q, k, v, mask, out, stats)


def _bwd(res, d_out):
    q, k, v, mask, out, (m, denom) = res
    p = jnp.exp(_scores(q, k, mask) - m) / denom  # the forward's probabilities, recomputed
    dv = jnp.einsum("bhgts,bthgd->bshd", p.astype(v.dtype), d_out)
    dp = jnp.einsum("bthgd,bshd->bhgts", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bthgd,bthgd->bhgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    ds = jnp.where(mask[:, None, None], p * (dp - delta[..., None]) * (q.shape[-1] ** -0.5), 0.0).astype(q.dtype)
    dq = jnp.einsum("bhgts,bshd->bthgd", ds, k)
    dk = jnp.einsum("bhgts,bthgd->bshd", ds, q)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_fwd, _bwd)


QUERY_BLOCK = 64  # query rows per block; on a 2-core CPU (SmolLM2 heads, T=320) 48-96 measured alike, 32 and 128 slower


def _hm_scores(q: jax.Array, k: jax.Array, mask: jax.Array, groups: int) -> jax.Array:
    """Scaled, masked scores [B, H, T*G, S] of head-major q [B, H, T*G, hd] (row t*G+g), k [B, H, S, hd]."""
    B, H, R, hd = q.shape
    s = jnp.einsum("bhrd,bhsd->bhrs", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    s = s.reshape(B, H, R // groups, groups, -1)
    return jnp.where(mask[:, None, :, None, :], s, _MASKED).reshape(B, H, R, -1)


def _hm_forward(q, k, v, mask, groups):
    s = _hm_scores(q, k, mask, groups)
    m = jnp.max(s, axis=-1, keepdims=True)
    # A row that sees no key (padding) gets p = 0 and output 0, so the backward needs no
    # [rows, keys] mask: every masked entry of p is exactly 0 when recomputed from (m, denom).
    m = jnp.where(m > _MASKED, m, jnp.inf)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    denom = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhrs,bhsd->bhrd", (p / denom).astype(v.dtype), v)
    return out, (m, denom)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_major_attention(q, k, v, mask, groups):
    """`attention` on head-major operands: every matmul is then a plain batched GEMM over
    contiguous rows (no per-block transposes). A query that sees no key gets 0 here."""
    return _hm_forward(q, k, v, mask, groups)[0]


def _hm_fwd(q, k, v, mask, groups):
    out, stats = _hm_forward(q, k, v, mask, groups)
    # named for remat policies (models/llama.py): keeping these saves recomputing the attention
    out, stats = checkpoint_name(out, "attn"), checkpoint_name(stats, "attn_stats")
    return out, (q, k, v, mask, out, stats)


def _hm_bwd(groups, res, d_out):
    q, k, v, mask, out, (m, denom) = res
    p = jnp.exp(_hm_scores(q, k, mask, groups) - m) / denom  # exactly 0 where masked
    dv = jnp.einsum("bhrs,bhrd->bhsd", p.astype(v.dtype), d_out)
    dp = jnp.einsum("bhrd,bhsd->bhrs", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta) * (q.shape[-1] ** -0.5)).astype(q.dtype)
    dq = jnp.einsum("bhrs,bhsd->bhrd", ds, k)
    dk = jnp.einsum("bhrs,bhrd->bhsd", ds, q)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_head_major_attention.defvjp(_hm_fwd, _hm_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = QUERY_BLOCK
                     ) -> jax.Array:
    """`attention` for self-attention in which query t sees no key after t (causal rows, packed trees).

    q, k, v are moved to head-major layout once (q rows ordered t*G+g, so a block of
    queries is a contiguous row range of every head). The queries are split into blocks of
    about `block` rows; block [a, b) attends only keys [0, b), so key blocks above the
    diagonal are never computed (about half the work for long rows). Autodiff of the
    slices sums the blocks' key gradients.
    """
    B, T, H, G, hd = q.shape
    if k.shape[1] != T:
        return attention(q, k, v, mask)
    qh = q.transpose(0, 2, 1, 3, 4).reshape(B, H, T * G, hd)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = max(1, round(T / block))
    bounds = [round(i * T / blocks) for i in range(blocks + 1)]
    outs = [_head_major_attention(qh[:, :, a * G:b * G], kh[:, :, :b], vh[:, :, :b], mask[:, a:b, :b], G)
            for a, b in zip(bounds, bounds[1:])]
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, T, G, hd).transpose(0, 2, 1, 3, 4)
