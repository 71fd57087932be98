"""Token cross-entropy and hits from logits, with a one-pass backward.

Autodiff of log_softmax + take_along_axis + argmax costs several passes over the
[P, V] logits (a scatter into zeros, the softmax backward, an arg-reduction). Here the
forward computes the log-sum-exp, the target logit and the max once; the backward is
one fused elementwise pass: softmax - one_hot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] (float32), targets [...] -> (negative log-likelihood [...], hit [...]).

    hit: the target's logit is the largest (argmax == target, up to exact ties).
    """
    return _fwd(logits, targets)[0]


def _fwd(logits, targets):
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    nll = (lse - picked)[..., 0]
    hit = (picked >= m)[..., 0].astype(logits.dtype)
    return (nll, hit), (logits, lse, targets)


def _bwd(res, cts):
    logits, lse, targets = res
    d_nll, _ = cts
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = (jnp.exp(logits - lse) - one_hot) * d_nll[..., None]
    return d_logits, None


token_nll.defvjp(_fwd, _bwd)
