"""Attention implementations agree (blocked CPU path, fused kernel call, dense mask) and the custom VJPs
equal autodiff of the plain computation: recomputing attention, fused token cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.models.attention import (blocked_attention, dense_attention, fused_causal_attention,
                                      resolve_implementation)


def plain_attention(q, k, v, mask):
    s = jnp.einsum("bthgd,bshd->bhgts", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhgts,bshd->bthgd", jax.nn.softmax(s, -1), v)


def _qkv(T, S=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    S = S or T
    return (jax.random.normal(ks[0], (2, T, 3, 2, 8)), jax.random.normal(ks[1], (2, S, 3, 8)),
            jax.random.normal(ks[2], (2, S, 3, 8)))


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_attention_equals_plain(seed):
    q, k, v = _qkv(7, 9, seed)
    mask = jax.random.bernoulli(jax.random.key(seed + 10), 0.6, (2, 7, 9)).at[0, 0].set(True)
    np.testing.assert_allclose(dense_attention(q, k, v, mask), plain_attention(q, k, v, mask), atol=1e-6)


@pytest.mark.parametrize("block", [64, 16, 5])
def test_blocked_attention_values_and_grads_equal_dense(block):
    T = 37
    q, k, v = _qkv(T)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & jax.random.bernoulli(jax.random.key(3), 0.7, (2, T, T))
    mask = mask.at[:, jnp.arange(T), jnp.arange(T)].set(True)  # every real query sees itself
    mask = mask.at[1, 20].set(False)  # a query that sees no key (padding): output 0 and no gradient
    w = jax.random.normal(jax.random.key(5), q.shape).at[1, 20].set(0.0)  # dense gives that row the mean of v
    out = blocked_attention(q, k, v, mask, block)
    assert jnp.all(out[1, 20] == 0)
    no_grad = jax.grad(lambda *a: jnp.sum(blocked_attention(*a, mask, block)[1, 20]), (0, 1, 2))(q, k, v)
    assert all(jnp.all(g == 0) for g in no_grad)
    np.testing.assert_allclose(out.at[1, 20].set(0), dense_attention(q, k, v, mask).at[1, 20].set(0), atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
    ours = jax.grad(loss(lambda *a: blocked_attention(*a, mask, block)), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda *a: plain_attention(*a, mask)), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_fused_causal_call_equals_dense_mask(window):
    """The GPU path's call (causal + sequence lengths + window, no mask array), run with XLA's implementation."""
    T = 12
    q, k, v = _qkv(T)
    lengths = jnp.array([12, 7])
    idx = jnp.arange(T)
    valid = idx[None] < lengths[:, None]
    mask = valid[:, None, :] & (idx[None, None, :] <= idx[None, :, None])
    if window is not None:
        mask &= (idx[None, :, None] - idx[None, None, :]) < window
    fused = fused_causal_attention(q, k, v, lengths, window, implementation="xla")
    dense = dense_attention(q, k, v, mask)
    np.testing.assert_allclose(fused[valid], dense[valid], atol=1e-6)  # padding rows may differ
    np.testing.assert_allclose(fused[0, :, :, :, :], plain_attention(q, k, v, mask)[0], atol=1e-6)


def test_resolve_implementation():
    assert resolve_implementation("auto") == ("blocked" if jax.default_backend() == "cpu" else "fused")
    assert resolve_implementation("dense") == "dense"
    with pytest.raises(ValueError, match="attention='flash'"):
        resolve_implementation("flash")
    with pytest.raises(ValueError, match="self-attention"):
        blocked_attention(*_qkv(5, 6), jnp.ones((2, 5, 6), bool))


def test_token_nll_matches_log_softmax_and_argmax():
    from lit_jax.lit.cross_entropy import token_nll

    logits = jax.random.normal(jax.random.key(0), (3, 5, 50)) * 3
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 50).at[0, 0].set(jnp.argmax(logits[0, 0]))
    w = jax.random.normal(jax.random.key(2), (3, 5))

    def ref(lg):
        return -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), targets[..., None], -1)[..., 0]

    nll, hit = token_nll(logits, targets)
    np.testing.assert_allclose(nll, ref(logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hit, jnp.argmax(logits, -1) == targets)
    assert hit[0, 0] == 1
    ours = jax.grad(lambda lg: jnp.sum(token_nll(lg, targets)[0] * w))(logits)
    np.testing.assert_allclose(ours, jax.grad(lambda lg: jnp.sum(ref(lg) * w))(logits), atol=1e-6)
