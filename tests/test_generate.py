"""Generation with a KV cache: matches transformers' generate, padding side does not matter, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lit_jax.generate import SamplingConfig, generate, generate_jit
from lit_jax.hf import load_params
from lit_jax.models import llama
from lit_jax.padding import pad_batch
from tests.trace_counter import count_traces

PROMPTS = [[5, 17, 33, 9, 60, 61, 2 + 10], [40, 41], [7, 8, 9, 10, 11]]


@pytest.fixture(scope="module", params=["llama3", "qwen2", "mistral"])
def model(request, tiny_checkpoint):
    path, hf = tiny_checkpoint(request.param)
    cfg, params = load_params(path)
    return cfg, jax.device_put(params), hf


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_matches_transformers_generate(model, side):
    cfg, params, hf = model
    ours = generate(params, cfg, PROMPTS, sampling=SamplingConfig(max_new_tokens=12), padding_side=side)
    for prompt, got in zip(PROMPTS, ours):
        ref = _hf_greedy(hf, prompt, 12)
        assert got == ref[: len(got)]
        assert len(got) == len(ref) or got[-1] == 2


def test_stops_at_end_token_and_pads_after(model):
    cfg, params, _ = model
    free = generate(params, cfg, PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=8))[0]
    # Declare the 3rd generated token an end token: generation must stop right there.
    cfg_eos = cfg.replace(eos_token_ids=(free[2],))
    tokens, valid = pad_batch(PROMPTS[:1], 0)
    out, lengths = generate_jit(params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(0),
                                cfg=cfg_eos, sampling=SamplingConfig(8), eos_ids=(free[2],), pad_id=0)
    stop = free.index(free[2]) + 1
    assert int(lengths[0]) == stop
    assert np.asarray(out)[0, :stop].tolist() == free[:stop]
    assert (np.asarray(out)[0, stop:] == 0).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    cfg, params, _ = model
    run = lambda **kw: generate(params, cfg, PROMPTS, **kw)  # noqa: E731
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5)
    assert run(sampling=hot, seed=1) == run(sampling=hot, seed=1)
    assert run(sampling=hot, seed=1) != run(sampling=hot, seed=2)
    assert run(sampling=hot._replace(top_k=1), seed=3) == run(sampling=SamplingConfig(10))


def test_second_call_does_not_recompile(model):
    cfg, params, _ = model
    sampling = SamplingConfig(max_new_tokens=6)
    with count_traces() as first:
        generate(params, cfg, PROMPTS, sampling=sampling)
    assert first["generate_tokens"] == 1
    other = [[p + 1 for p in prompt] for prompt in PROMPTS]  # same bucket, other tokens
    with count_traces() as second:
        generate(params, cfg, other, sampling=sampling)
    assert second["generate_tokens"] == 0


def test_jitted_forward_does_not_recompile(model):
    cfg, params, _ = model
    traces = []

    @jax.jit
    def f(params, tokens):
        traces.append(1)
        return llama.forward(params, tokens, cfg).logits

    f(params, jnp.ones((2, 8), jnp.int32))
    f(params, jnp.zeros((2, 8), jnp.int32))
    assert len(traces) == 1


def test_pad_batch_errors():
    with pytest.raises(ValueError, match="padding side"):
        pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="empty"):
        pad_batch([[1], []], 0)
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch([[1] * 10], 0, length=4)
