"""The LIT step: loss and gradients against an independent PyTorch computation; accumulation; recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lit_jax.hf import load_params
from lit_jax.lit.config import LitConfig
from lit_jax.lit.loss import lit_loss_sums
from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer
from lit_jax.lit.train_step import jit_train_step
from lit_jax.models.lora import LoraConfig
from lit_jax.data import plain_batch
from tests.synthetic_batches import make_batch, make_lit_batch
from tests.trace_counter import count_traces

LAYER_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, model = tiny_checkpoint("llama_bias")
    cfg, base = load_params(path)
    return cfg, jax.device_put(base), model


def _random_trainable(cfg, lcfg, seed=0):
    params = init_trainable(jax.random.key(seed), cfg, lcfg)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)


def _torch_lit_loss(model, trainable, batch, lcfg):
    """LIT loss written independently in PyTorch: HF model + forward hooks for LoRA and the write."""
    t = lambda x: torch.tensor(np.asarray(x), requires_grad=True)  # noqa: E731
    lora = {name: {k: t(v) for k, v in ab.items()} for name, ab in trainable["lora"].items()}
    w, b = t(trainable["proj"]["w"]), t(trainable["proj"]["b"])
    scale = lcfg.lora.scale
    L, K = lcfg.read_layers[0], lcfg.write_layer
    long = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)  # noqa: E731
    pos = lambda valid: long(np.maximum(np.cumsum(valid, 1) - 1, 0))  # noqa: E731

    # Target: base model, no adapters; residual after block L.
    hs = model(input_ids=long(batch["read_tokens"]), attention_mask=long(batch["read_valid"]),
               position_ids=pos(batch["read_valid"]), output_hidden_states=True).hidden_states[L + 1].detach()
    rows = torch.arange(hs.shape[0])[:, None]
    acts = hs[rows, long(batch["read_positions"])] @ w + b  # [B, S, D]

    handles = []
    for i, layer in enumerate(model.model.layers):
        for name, path in LAYER_NAMES.items():
            module = layer.get_submodule(path)
            A, Bm = lora[name]["a"][i], lora[name]["b"][i]
            handles.append(module.register_forward_hook(
                lambda m, args, out, A=A, Bm=Bm: out + scale * (args[0] @ A.T) @ Bm))
    slot_mask = np.asarray(batch["slot_mask"])
    write_pos = np.asarray(batch["write_positions"])

    def write_hook(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        for bi in range(h.shape[0]):
            for s in range(write_pos.shape[1]):
                if slot_mask[bi, s]:
                    h[bi, write_pos[bi, s]] = acts[bi, s]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handles.append(model.model.layers[K].register_forward_hook(write_hook))
    try:
        logits = model(input_ids=long(batch["decoder_tokens"]), attention_mask=long(batch["decoder_valid"]),
                       position_ids=pos(batch["decoder_valid"])).logits
    finally:
        for h in handles:
            h.remove()
    mask = torch.tensor(np.asarray(batch["loss_mask"]))[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), long(batch["decoder_tokens"])[:, 1:],
                                            reduction="none")
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    grads = {"lora": {n: {k: v.grad.numpy() for k, v in ab.items()} for n, ab in lora.items()},
             "proj": {"w": w.grad.numpy(), "b": b.grad.numpy()}}
    return float(loss.detach()), grads


def test_loss_and_gradients_match_pytorch(tiny):
    cfg, base, model = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, projection="linear", lora=LoraConfig(rank=4, alpha=8.0))
    trainable = _random_trainable(cfg, lcfg)
    batch = make_batch(read_layer=1)

    def mean_loss(p):
        s = lit_loss_sums(p, base, plain_batch(batch), cfg, lcfg)
        return s.loss / s.count

    ours_loss, ours_grads = jax.value_and_grad(mean_loss)(trainable)
    ref_loss, ref_grads = _torch_lit_loss(model, trainable, batch, lcfg)
    assert abs(float(ours_loss) - ref_loss) < 1e-5
    for (path, g), r in zip(jax.tree.leaves_with_path(ours_grads), jax.tree.leaves(ref_grads)):
        scale = np.abs(r).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-5 * max(1.0, scale), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_accumulation_equals_one_big_batch(tiny):
    cfg, base, _ = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, projection="mlp", lora=LoraConfig(rank=2))
    opt = optax.sgd(1.0)  # Adam would amplify float noise in near-zero gradients; SGD shows the gradient itself
    batch = jax.device_put(make_lit_batch(batch=4))
    results = []
    for accum in (1, 2, 4):
        state = init_state(_random_trainable(cfg, lcfg), opt)
        state, metrics = jit_train_step(cfg, lcfg, opt, accum_steps=accum)(state, base, batch)
        results.append((state.params, float(metrics["loss"])))
    for params, loss in results[1:]:
        assert abs(loss - results[0][1]) < 1e-5
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_per_example_read_layers_pick_their_layer(tiny):
    cfg, base, _ = tiny
    lcfg2 = LitConfig(read_layers=(0, 2), write_layer=0, lora=LoraConfig(rank=2))
    trainable = _random_trainable(cfg, lcfg2)
    mixed = make_batch(batch=4, read_layer=0)
    mixed["read_layer"] = np.array([0, 2, 0, 2], np.int32)
    got = lit_loss_sums(trainable, base, plain_batch(mixed), cfg, lcfg2)
    # Each half equals running that layer alone.
    total = 0.0
    for layer in (0, 2):
        rows = mixed["read_layer"] == layer
        sub = {k: v[rows] for k, v in mixed.items()}
        total += float(lit_loss_sums(trainable, base, plain_batch(sub), cfg, LitConfig(read_layers=(layer,), lora=lcfg2.lora)).loss)
    assert abs(float(got.loss) - total) < 1e-4


def test_training_lowers_the_loss_and_does_not_recompile(tiny):
    cfg, base, _ = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, lora=LoraConfig(rank=4))
    opt = make_optimizer(3e-2, 2, 40)
    state = init_state(init_trainable(jax.random.key(0), cfg, lcfg), opt)
    step = jit_train_step(cfg, lcfg, opt)
    batches = [jax.device_put(make_lit_batch(seed=s)) for s in range(2)]
    losses = []
    with count_traces() as first:
        state, m = step(state, base, batches[0])
        losses.append(float(m["loss"]))
    assert first["train_step"] == 1
    with count_traces() as later:
        for i in range(1, 40):
            state, m = step(state, base, batches[i % 2])
            losses.append(float(m["loss"]))
    assert later["train_step"] == 0
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:2])


def test_full_finetune_trains_its_own_decoder(tiny):
    cfg, base, _ = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, lora=None)
    opt = make_optimizer(1e-3, 0, 10)
    state = init_state(init_trainable(jax.random.key(0), cfg, lcfg, base), opt)
    assert set(state.params) == {"proj", "decoder"}
    base_before = jax.tree.map(np.asarray, base)
    state, m = jit_train_step(cfg, lcfg, opt)(state, base, jax.device_put(make_lit_batch()))
    assert np.isfinite(float(m["loss"]))
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(state.params["decoder"]), jax.tree.leaves(base_before))]
    assert any(changed)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):  # the target stays frozen
        np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_lit_config_raises():
    with pytest.raises(ValueError, match="write_mode"):
        LitConfig(write_mode="add")
    with pytest.raises(ValueError, match="projection"):
        LitConfig(projection="conv")
    with pytest.raises(ValueError, match="read_layers"):
        LitConfig(read_layers=())


@pytest.mark.parametrize("remat", ["full", "dots_no_batch", "gate_up", "matmuls"])
def test_remat_gives_the_same_loss_and_gradients(tiny, remat):
    cfg, base, _ = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, lora=LoraConfig(rank=4))
    trainable = _random_trainable(cfg, lcfg)
    batch = make_lit_batch()

    def grads(c):
        return jax.value_and_grad(lambda p: lit_loss_sums(p, base, batch, c, lcfg).loss)(trainable)

    (l0, g0), (l1, g1) = grads(cfg), grads(cfg.replace(remat=remat))
    assert abs(float(l0) - float(l1)) < 1e-5
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_bf16_base_with_f32_trainables(tiny):
    cfg, base, _ = tiny
    cfg16 = cfg.replace(dtype="bfloat16")
    base16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
    lcfg = LitConfig(read_layers=(1,), write_layer=0, projection="linear", lora=LoraConfig(rank=4))
    opt = make_optimizer(1e-2, 0, 10)
    state = init_state(init_trainable(jax.random.key(0), cfg16, lcfg), opt)
    losses = []
    step = jit_train_step(cfg16, lcfg, opt)
    for _ in range(3):
        state, m = step(state, base16, jax.device_put(make_lit_batch()))
        losses.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype")
               and jnp.issubdtype(x.dtype, jnp.floating))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_learning_rate_warms_up_then_decays():
    from lit_jax.lit.train_state import learning_rate_schedule

    sched = learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110, final_fraction=0.1)
    lrs = [float(sched(s)) for s in (0, 5, 10, 60, 110)]
    assert lrs[0] == 0.0 and abs(lrs[1] - 5e-4) < 1e-9 and abs(lrs[2] - 1e-3) < 1e-9
    assert 1e-4 < lrs[3] < 1e-3 and abs(lrs[4] - 1e-4) < 1e-9
