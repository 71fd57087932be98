"""Sharding: logical rules, an 8-device mesh gives the single-device step, two processes act as one."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lit_jax import sharding as shd
from lit_jax.hf import load_params
from lit_jax.lit.config import LitConfig
from lit_jax.lit.train_state import init_state, init_trainable, trainable_axes
from lit_jax.lit.train_step import jit_train_step
from lit_jax.models import llama
from lit_jax.models.lora import LoraConfig
from tests.synthetic_batches import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_fake_devices_are_configured():
    assert len(jax.devices()) == 8


def test_logical_rules_replicate_what_does_not_divide():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("layers", "embed", "kv_heads", None, "head_dim"), (3, 64, 3, 4, 16), mesh) == \
        P(None, "fsdp", None, None, None)  # 3 KV heads do not split over tensor=2
    assert shd.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)  # a mesh axis used once


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.make_mesh((2, 2, 1), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="at most one -1"):
        shd.make_mesh((-1, -1, 1))
    assert shd.make_mesh((-1, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}


def _step_on(mesh, cfg, base_np, steps=2, process=None):
    """Losses and state after `steps` SGD steps on `mesh`; with `process=(index, count)` this
    process feeds only its rows of each global batch (multi-host)."""
    lcfg = LitConfig(read_layers=(1,), write_layer=0, projection="linear", lora=LoraConfig(rank=4))
    opt = optax.sgd(0.5)  # exact comparison: Adam would amplify float noise in near-zero gradients
    base = jax.device_put(base_np, shd.tree_shardings(llama.param_axes(cfg), base_np, mesh))
    params = init_trainable(jax.random.key(0), cfg, lcfg)
    params = jax.device_put(params, shd.tree_shardings(trainable_axes(cfg, lcfg), params, mesh))
    state = init_state(params, opt)
    state = jax.device_put(state, shd.placed_like(state, mesh))
    step = jit_train_step(cfg, lcfg, opt, out_shardings=(shd.placed_like(state, mesh), shd.replicated(mesh)))
    losses = []
    for s in range(steps):
        batch = {k: v for k, v in make_batch(batch=8, seed=s).items() if k != "example_id"}
        if process is not None:
            index, count = process
            batch = {k: np.split(v, count)[index] for k, v in batch.items()}
        state, m = step(state, base, shd.host_batch_to_global(batch, mesh))
        losses.append(float(m["loss"]))
    return state, losses, base


def test_sharded_step_equals_single_device(tiny_checkpoint):
    cfg, base_np = load_params(tiny_checkpoint("llama")[0])
    one, losses1, _ = _step_on(shd.make_mesh(devices=jax.devices()[:1]), cfg, base_np)
    eight, losses8, base8 = _step_on(shd.make_mesh((2, 2, 2)), cfg, base_np)
    assert base8["layers"]["gate_up"].sharding.spec == P(None, "fsdp", "tensor")
    assert len(base8["layers"]["gate_up"].addressable_shards) == 8
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)


MULTI = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, {root!r})
import jax
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
assert jax.process_count() == 2 and len(jax.devices()) == 4
from lit_jax import sharding as shd
from lit_jax.hf import load_params
from tests.test_sharding import _step_on
cfg, base_np = load_params({ckpt!r})
_, losses, _ = _step_on(shd.make_mesh((2, 2, 1)), cfg, base_np, process=({pid}, 2))
print("LOSSES", *losses, flush=True)
"""


def test_two_processes_train_like_one(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")[0]
    cfg, base_np = load_params(path)
    _, expected, _ = _step_on(shd.make_mesh(devices=jax.devices()[:1]), cfg, base_np)
    port = 20000 + os.getpid() % 20000
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", MULTI.format(root=ROOT, port=port, pid=i, ckpt=path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        losses = [float(x) for line in out.splitlines() if line.startswith("LOSSES") for x in line.split()[1:]]
        assert len(losses) == 2, out
        np.testing.assert_allclose(losses, expected, rtol=1e-5)
