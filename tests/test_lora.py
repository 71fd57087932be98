"""LoRA: the hand-written VJP equals autodiff, adapters equal their merged weights, B=0 is the base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.hf import load_params
from lit_jax.models import llama
from lit_jax.models.lora import LoraConfig, LoraWeights, init_lora, lora_delta, merge_lora


def test_custom_vjp_matches_autodiff():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 5, 12))
    a = jax.random.normal(k[1], (4, 12))
    b = jax.random.normal(k[2], (4, 7))
    w = jax.random.normal(k[3], (2, 5, 7))
    plain = lambda x, a, b: jnp.sum(((x @ a.T) @ b) * w)  # noqa: E731
    ours = lambda x, a, b: jnp.sum(lora_delta(x, a, b) * w)  # noqa: E731
    np.testing.assert_allclose(ours(x, a, b), plain(x, a, b), rtol=1e-5)
    for g_ours, g_ref in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    cfg, params = load_params(tiny_checkpoint("llama_bias")[0])
    return cfg, jax.device_put(params)


def _random_lora(cfg, lcfg, seed=0):
    lora = init_lora(jax.random.key(seed), cfg, lcfg)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 32))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v")])
def test_adapters_equal_merged_weights(model, targets):
    cfg, params = model
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=targets)
    lora = _random_lora(cfg, lcfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 128, size=(2, 10)))
    with_lora = llama.forward(params, tokens, cfg, lora=LoraWeights(lora, lcfg.scale)).logits
    merged = llama.forward(merge_lora(params, lora, lcfg, cfg), tokens, cfg).logits
    base = llama.forward(params, tokens, cfg).logits
    np.testing.assert_allclose(np.asarray(with_lora), np.asarray(merged), atol=1e-4, rtol=0)
    assert np.abs(np.asarray(with_lora) - np.asarray(base)).max() > 1e-3


def test_fresh_adapters_leave_the_base_unchanged(model):
    cfg, params = model
    lcfg = LoraConfig(rank=4)
    lora = init_lora(jax.random.key(0), cfg, lcfg)
    tokens = jnp.ones((1, 6), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(llama.forward(params, tokens, cfg, lora=LoraWeights(lora, lcfg.scale)).logits),
        np.asarray(llama.forward(params, tokens, cfg).logits), atol=1e-5, rtol=0,
    )


def test_gradient_flows_only_into_adapters(model):
    cfg, params = model
    lcfg = LoraConfig(rank=2, targets=("q", "down"))
    lora = _random_lora(cfg, lcfg)
    tokens = jnp.ones((1, 6), jnp.int32)
    loss = lambda lo: llama.forward(params, tokens, cfg, lora=LoraWeights(lo, lcfg.scale)).logits.sum()  # noqa: E731
    grads = jax.grad(loss)(lora)
    assert set(grads) == {"q", "down"}
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))


def test_bad_lora_config_raises():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("q", "lm_head"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
