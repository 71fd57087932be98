"""Custom VJPs equal autodiff of the plain computation: recomputing attention, fused token cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.models.attention import attention, causal_attention


def plain_attention(q, k, v, mask):
    s = jnp.einsum("bthgd,bshd->bhgts", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhgts,bshd->bthgd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_value_and_grads_match_autodiff(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (2, 7, 3, 2, 8))
    k, v = jax.random.normal(ks[1], (2, 9, 3, 8)), jax.random.normal(ks[2], (2, 9, 3, 8))
    mask = jax.random.bernoulli(ks[3], 0.6, (2, 7, 9)).at[0, 0].set(False)  # row (0, 0): no visible key
    w = jax.random.normal(ks[4], q.shape)
    np.testing.assert_allclose(attention(q, k, v, mask), plain_attention(q, k, v, mask), atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a, mask) * w)  # noqa: E731
    ours = jax.grad(loss(attention), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(plain_attention), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("block", [64, 16, 5])
def test_blocked_causal_attention_equals_dense(block):
    ks = jax.random.split(jax.random.key(0), 4)
    T = 37
    q, k, v = (jax.random.normal(ks[0], (2, T, 3, 2, 8)), jax.random.normal(ks[1], (2, T, 3, 8)),
               jax.random.normal(ks[2], (2, T, 3, 8)))
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & jax.random.bernoulli(ks[3], 0.7, (2, T, T))
    mask = mask.at[1, 20].set(False)  # a query that sees no key (padding): output 0 and no gradient
    w = jax.random.normal(jax.random.key(5), q.shape)
    out = causal_attention(q, k, v, mask, block)
    assert jnp.all(out[1, 20] == 0)
    no_grad = jax.grad(lambda *a: jnp.sum(causal_attention(*a, mask, block)[1, 20]), (0, 1, 2))(q, k, v)
    assert all(jnp.all(g == 0) for g in no_grad)
    w = w.at[1, 20].set(0.0)  # `attention` gives that row the mean of v instead
    np.testing.assert_allclose(out.at[1, 20].set(0), attention(q, k, v, mask).at[1, 20].set(0), atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
    ours = jax.grad(loss(lambda *a: causal_attention(*a, mask, block)), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda *a: attention(*a, mask)), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


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
