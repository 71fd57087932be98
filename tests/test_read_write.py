"""Reading the residual stream after block L and writing into it after block K, against HF + hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lit_jax.hf import load_params
from lit_jax.lit.residual_stream import ResidualWrite, apply_write, read_residual_stream, write_edit
from lit_jax.models import llama


def _hf(model, tokens, hook_layer=None, hook=None, **kw):
    handle = None
    if hook is not None:
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = hook(h)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        handle = model.model.layers[hook_layer].register_forward_hook(fn)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor(tokens, dtype=torch.long), output_hidden_states=True, **kw)
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint):
    path, model = tiny_checkpoint("qwen3")
    cfg, params = load_params(path)
    return cfg, jax.device_put(params), model


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_read_equals_hf_hidden_state(qwen3, layer, scan_layers):
    cfg, params, model = qwen3
    tokens = np.random.default_rng(0).integers(3, 128, size=(2, 11))
    hidden = read_residual_stream(params, jnp.asarray(tokens), cfg.replace(scan_layers=scan_layers), (layer,))
    assert hidden.shape == (1, 2, 11, cfg.hidden_size)
    ref = _hf(model, tokens).hidden_states[layer + 1].numpy()
    np.testing.assert_allclose(np.asarray(hidden[0]), ref, atol=1e-5, rtol=0)


def _write(batch=2, slots=3, d=64, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(batch, slots, d)).astype(np.float32) * 3
    positions = np.array([[2, 3, 4], [5, 6, 0]])
    mask = np.array([[True, True, True], [True, True, False]])  # second row uses two slots
    return ResidualWrite(jnp.asarray(vectors), jnp.asarray(positions), jnp.asarray(mask))


def _hook_for(write, mode):
    def hook(h):
        h = h.clone()
        for b in range(h.shape[0]):
            for s in range(write.positions.shape[1]):
                if not bool(write.mask[b, s]):
                    continue
                p = int(write.positions[b, s])
                v = torch.tensor(np.asarray(write.vectors[b, s]))
                if mode == "replace":
                    h[b, p] = v
                else:
                    h[b, p] = h[b, p] + h[b, p].norm() * v / v.norm()
        return h
    return hook


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("mode", ["replace", "add_norm_matched"])
@pytest.mark.parametrize("layer", [0, 2])
def test_write_equals_hf_forward_hook(qwen3, mode, layer, scan_layers):
    cfg, params, model = qwen3
    tokens = np.random.default_rng(1).integers(3, 128, size=(2, 9))
    write = _write()
    ours = llama.forward(params, jnp.asarray(tokens), cfg.replace(scan_layers=scan_layers),
                         edit=write_edit(write, layer, mode)).logits
    ref = _hf(model, tokens, hook_layer=layer, hook=_hook_for(write, mode)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    plain = llama.forward(params, jnp.asarray(tokens), cfg).logits
    assert np.abs(np.asarray(plain) - ref).max() > 1e-2  # the write changed something


def test_write_leaves_unused_slots_and_other_positions_alone():
    h = jnp.arange(2 * 8 * 4, dtype=jnp.float32).reshape(2, 8, 4)
    write = ResidualWrite(jnp.full((2, 2, 4), -1.0), jnp.array([[1, 2], [3, 7]]), jnp.array([[True, False], [True, True]]))
    out = np.asarray(apply_write(h, write, "replace"))
    changed = np.zeros((2, 8), bool)
    changed[0, 1] = changed[1, 3] = changed[1, 7] = True
    np.testing.assert_array_equal(out[changed], -1.0)
    np.testing.assert_array_equal(out[~changed], np.asarray(h)[~changed])


def test_add_norm_matched_is_finite_for_zero_vectors_and_differentiable():
    h = jax.random.normal(jax.random.key(0), (1, 4, 8))
    write = ResidualWrite(jnp.zeros((1, 1, 8)), jnp.array([[2]]), jnp.array([[True]]))
    grad = jax.grad(lambda v: apply_write(h, write._replace(vectors=v), "add_norm_matched").sum())(write.vectors)
    assert np.isfinite(np.asarray(grad)).all()


def test_bad_write_layer_and_mode_raise(qwen3):
    cfg, params, _ = qwen3
    tokens = jnp.ones((2, 9), jnp.int32)
    with pytest.raises(ValueError, match="edit after block 3: outside the model's 3 layers"):
        llama.forward(params, tokens, cfg, edit=write_edit(_write(), cfg.num_layers, "replace"))
    with pytest.raises(ValueError, match="write mode 'add'"):
        write_edit(_write(), 0, "add")
    with pytest.raises(ValueError, match=r"read layer\(s\) \(0, 3\) outside \[0, 3\)"):
        read_residual_stream(params, tokens, cfg, (cfg.num_layers, 0))
    with pytest.raises(ValueError, match="no layers"):
        read_residual_stream(params, tokens, cfg, ())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_read_several_layers_equals_hf_hidden_states(qwen3, scan_layers):
    cfg, params, model = qwen3
    tokens = np.random.default_rng(2).integers(3, 128, size=(2, 7))
    hidden = read_residual_stream(params, jnp.asarray(tokens), cfg.replace(scan_layers=scan_layers), (1, 0, 1))
    hs = _hf(model, tokens).hidden_states
    assert hidden.shape[0] == 2  # layer_order: sorted, without repeats
    np.testing.assert_allclose(np.asarray(hidden[0]), hs[1].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden[1]), hs[2].numpy(), atol=1e-5, rtol=0)
