"""Logit parity with transformers' PyTorch models on tiny random checkpoints of every architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lit_jax.hf import load_params
from lit_jax.models import llama
from tests.tiny_models import ARCHS

B, T = 3, 20


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 128, size=(B, T)).astype(np.int32)


def _hf_logits(model, tokens, valid, positions):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(tiny_checkpoint, arch, scan_layers):
    path, model = tiny_checkpoint(arch)
    cfg, params = load_params(path, scan_layers=scan_layers)
    tokens = _inputs()
    valid = np.ones((B, T), bool)
    positions = np.broadcast_to(np.arange(T), (B, T))
    ours = llama.forward(jax.device_put(params), jnp.asarray(tokens), cfg).logits
    ref = _hf_logits(model, tokens, valid, positions)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3"])
def test_padded_batch_matches_transformers(tiny_checkpoint, arch, side):
    path, model = tiny_checkpoint(arch)
    cfg, params = load_params(path)
    tokens = _inputs(1)
    lengths = np.array([T, T - 7, 5])
    idx = np.arange(T)[None]
    valid = idx >= (T - lengths[:, None]) if side == "left" else idx < lengths[:, None]
    tokens = np.where(valid, tokens, 0)
    positions = np.asarray(llama.default_positions(jnp.asarray(valid)))
    ours = np.asarray(
        llama.forward(jax.device_put(params), jnp.asarray(tokens), cfg, valid=jnp.asarray(valid)).logits
    )
    ref = _hf_logits(model, tokens, valid, positions)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # And each padded row equals the same sequence run alone, unpadded.
    for b in range(B):
        alone = llama.forward(jax.device_put(params), jnp.asarray(tokens[b][valid[b]])[None], cfg).logits[0]
        np.testing.assert_allclose(ours[b][valid[b]], np.asarray(alone), atol=1e-4, rtol=0)


def test_config_fields_follow_architecture(tiny_checkpoint):
    from lit_jax.models.config import load_hf_config

    assert load_hf_config(tiny_checkpoint("qwen2")[0]).qkv_bias
    assert not load_hf_config(tiny_checkpoint("qwen2")[0]).o_bias
    assert load_hf_config(tiny_checkpoint("qwen3")[0]).qk_norm
    assert load_hf_config(tiny_checkpoint("smollm2")[0]).tie_embeddings
    assert load_hf_config(tiny_checkpoint("mistral")[0]).sliding_window == 12
    assert load_hf_config(tiny_checkpoint("llama3")[0]).rope_scaling.kind == "llama3"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama3", "mistral"])
def test_attention_implementations_give_the_same_model(tiny_checkpoint, arch, side):
    """blocked (CPU), fused (GPU/TPU call, run here with XLA's implementation) and dense: same logits
    and gradients on padded rows (mistral: with its sliding window; left padding: fused falls back
    to the mask, its kernels take lengths)."""
    path, _ = tiny_checkpoint(arch)
    cfg, params = load_params(path)
    params = jax.device_put(params)
    lengths = np.array([T, T - 7, 5])
    idx = np.arange(T)[None]
    valid = jnp.asarray(idx < lengths[:, None] if side == "right" else idx >= T - lengths[:, None])
    tokens = jnp.asarray(np.where(valid, _inputs(2), 0))

    def run(impl):
        c = cfg.replace(attention=impl)
        loss = lambda p: jnp.sum(llama.forward(p, tokens, c, valid=valid).logits * valid[..., None])  # noqa: E731
        logits = llama.forward(params, tokens, c, valid=valid).logits
        return np.asarray(logits)[np.asarray(valid)], jax.grad(loss)(params)

    ref_logits, ref_grads = run("blocked")
    for impl in ("fused", "dense"):
        logits, grads = run(impl)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)
