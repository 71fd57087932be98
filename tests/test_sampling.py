"""SamplingConfig refuses bad values by name; top_k is clamped to the vocabulary (issue 12, fault 7)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.generate import SamplingConfig, _sample, generate


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=-3), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=3.0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="1.0"), "temperature"),
])
def test_bad_values_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingConfig\.{field}="):
        SamplingConfig(**kwargs)


def test_replace_is_validated_and_keeps_fields():
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5)
    assert hot._replace(top_k=1) == SamplingConfig(10, 1.5, 1)
    assert isinstance(hot._replace(top_k=1), SamplingConfig)
    assert SamplingConfig._fields == ("max_new_tokens", "temperature", "top_k")
    assert SamplingConfig(8) == (8, 0.0, 0) and SamplingConfig() == (64, 0.0, 0)
    with pytest.raises(ValueError, match="top_k"):
        hot._replace(top_k=-3)
    assert hash(SamplingConfig(5, 1, np.int64(3))) == hash(SamplingConfig(5, 1.0, 3))


@pytest.mark.parametrize("top_k", [128, 129, 200, 10_000])
def test_top_k_at_or_above_vocab_keeps_every_token(top_k):
    logits = jax.random.normal(jax.random.key(0), (4, 128))
    rng = jax.random.key(7)
    full = _sample(logits, rng, SamplingConfig(4, 1.0, 0))
    got = _sample(logits, rng, SamplingConfig(4, 1.0, top_k))  # raised inside lax.top_k before
    np.testing.assert_array_equal(np.asarray(got), np.asarray(full))


def test_top_k_below_vocab_still_filters():
    logits = jnp.tile(jnp.arange(128.0) / 100.0, (256, 1))  # nearly flat: unfiltered sampling spreads wide
    picks = np.asarray(_sample(logits, jax.random.key(1), SamplingConfig(1, 1.0, 3)))
    assert set(picks.tolist()) <= {125, 126, 127}
    picks = np.asarray(jax.jit(_sample, static_argnames="sampling")(logits, jax.random.key(1),
                                                                      sampling=SamplingConfig(1, 1.0, 127)))
    assert 0 not in picks.tolist()


def test_generate_with_top_k_above_vocab(tiny_checkpoint):
    from lit_jax.hf import load_params

    cfg, params = load_params(tiny_checkpoint("llama")[0])
    prompts = [[5, 17, 33], [40, 41]]
    big = generate(params, cfg, prompts, sampling=SamplingConfig(5, 1.2, cfg.vocab_size + 72), seed=3)
    full = generate(params, cfg, prompts, sampling=SamplingConfig(5, 1.2, 0), seed=3)
    assert big == full
