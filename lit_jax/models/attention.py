"""Grouped-query attention, one implementation per platform, all giving the same outputs.

  blocked  the CPU path (default on CPU): query blocks of ~64 rows that skip the key blocks
           above the diagonal, head-major operands (every matmul a plain batched GEMM), and
           a backward that recomputes the probabilities from saved row statistics (as
           FlashAttention does) instead of saving [T, S] probabilities per head and layer.
  fused    the GPU/TPU path (default there): `jax.nn.dot_product_attention`. Plain causal
           rows (right-padded chains) go to cuDNN's fused flash attention on a GPU in
           bf16/f16 (causal + sequence lengths + sliding window, no mask materialised);
           packed prefix trees need an arbitrary mask and take its XLA implementation.
  dense    `jax.nn.dot_product_attention`'s XLA implementation with the full [T, S] mask:
           the reference, and the KV-cache (generation) path everywhere.

Shapes: q [B, T, H, G, hd] (H KV heads, G query heads each), k/v [B, S, H, hd],
mask [B, T, S] bool (True: may attend) -> [B, T, H, G, hd]. A query row that sees no key
(padding) gets 0 from `blocked` and the mean of v from `dense`; nothing depends on it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

ATTENTION_IMPLEMENTATIONS = ("auto", "blocked", "fused", "dense")
_MASKED = jnp.finfo(jnp.float32).min
QUERY_BLOCK = 64  # query rows per block; on a 2-core CPU (SmolLM2 heads, T=320) 48-96 measured alike, 32 and 128 slower


def resolve_implementation(name: str) -> str:
    """'auto' -> 'blocked' on the CPU backend, 'fused' on GPU/TPU; other names pass through.

    Raises ValueError for an unknown name.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    if name != "auto":
        return name
    return "blocked" if jax.default_backend() == "cpu" else "fused"


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked attention with the [B, T, S] mask materialised (XLA); shapes as in the module docstring."""
    B, T, H, G, hd = q.shape
    out = jax.nn.dot_product_attention(q.reshape(B, T, H * G, hd), k, v, mask=mask[:, None],
                                       implementation="xla")
    return out.reshape(B, T, H, G, hd)


def fused_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                           sliding_window: int | None, implementation: str | None) -> jax.Array:
    """Causal attention over right-padded rows of `lengths` [B] real tokens, without a mask array.

    implementation: "cudnn" (GPU, bf16/f16: fused flash attention), or "xla"/None (the same
    call's XLA implementation: what the tests compare on CPU). sliding_window: Mistral's
    window w (query i sees keys i-w+1..i).
    """
    B, T, H, G, hd = q.shape
    window = None if sliding_window is None else (sliding_window - 1, 0)
    lengths = lengths.astype(jnp.int32)
    out = jax.nn.dot_product_attention(q.reshape(B, T, H * G, hd), k, v, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       local_window_size=window, implementation=implementation)
    return out.reshape(B, T, H, G, hd)


def fused_implementation(dtype) -> str | None:
    """cuDNN where it runs (a GPU backend, half-precision operands), else XLA's implementation."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else None


# ----------------------------------------------------------------------------- the CPU path


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
    """Attention on head-major operands; the backward recomputes the probabilities."""
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
    # delta = rowsum(dO * O) (a [rows] reduction) replaces rowsum(dP * P) over [rows, keys]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta) * (q.shape[-1] ** -0.5)).astype(q.dtype)
    dq = jnp.einsum("bhrs,bhsd->bhrd", ds, k)
    dk = jnp.einsum("bhrs,bhrd->bhsd", ds, q)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_head_major_attention.defvjp(_hm_fwd, _hm_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = QUERY_BLOCK
                      ) -> jax.Array:
    """Self-attention in which query t sees no key after t (causal rows, packed trees); S must equal T.

    q, k, v are moved to head-major layout once (q rows ordered t*G+g, so a block of
    queries is a contiguous row range of every head). The queries are split into blocks of
    about `block` rows; block [a, b) attends only keys [0, b), so key blocks above the
    diagonal are never computed (about half the work for long rows). Autodiff of the
    slices sums the blocks' key gradients. Raises ValueError when S != T.
    """
    B, T, H, G, hd = q.shape
    if k.shape[1] != T:
        raise ValueError(f"blocked attention is self-attention: {T} queries but {k.shape[1]} keys")
    qh = q.transpose(0, 2, 1, 3, 4).reshape(B, H, T * G, hd)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = max(1, round(T / block))
    bounds = [round(i * T / blocks) for i in range(blocks + 1)]
    outs = [_head_major_attention(qh[:, :, a * G:b * G], kh[:, :, :b], vh[:, :, :b], mask[:, a:b, :b], G)
            for a, b in zip(bounds, bounds[1:])]
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, T, G, hd).transpose(0, 2, 1, 3, 4)
