"""Sharding: logical rules, an 8-device mesh gives the single-device step, two processes act as one."""

import dataclasses
import functools
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from lit_jax import sharding as shd
from lit_jax.hf import load_params
from lit_jax.lit.config import LitConfig
from lit_jax.lit.train_state import init_state, init_trainable, trainable_axes
from lit_jax.lit.train_step import jit_train_step
from lit_jax.models import llama
from lit_jax.models.lora import LoraConfig
from tests.synthetic_batches import make_lit_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_fake_devices_are_configured():
    assert len(jax.devices()) == 8


def test_logical_rules_replicate_what_does_not_divide(caplog):
    mesh = shd.make_mesh((2, 2, 2))
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert shd.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
        assert shd.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
        assert shd.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)  # a mesh axis used once
        assert shd.logical_to_spec(("batch", "seq", "embed"), (8, 4, 64), mesh) == P(("data", "fsdp"), None, None)
    assert not caplog.records  # nothing was replicated for want of divisibility
    # 3 KV heads do not split over tensor=2: replicated, visibly
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert shd.logical_to_spec(("layers", "embed", "kv_heads", None, "head_dim"), (3, 64, 3, 4, 16), mesh,
                                   name="['layers']['qkv_bias']") == P(None, "fsdp", None, None, None)
    [record] = caplog.records
    message = record.getMessage()
    for part in ("['layers']['qkv_bias']", "'kv_heads'", "size 3", "('tensor',)", "of size 2"):
        assert part in message, (part, message)


def test_a_dimension_that_does_not_divide_frees_its_mesh_axis():
    mesh = shd.make_mesh((2, 2, 2))
    # "kv_heads" (the earlier rule) cannot take tensor, so "mlp" gets it
    assert shd.logical_to_spec(("mlp", "kv_heads"), (8, 3), mesh) == P("tensor", None)
    # a fallback rule serves a name whose first rule does not divide
    rules = (("embed", "tensor"), ("embed", "fsdp"))
    assert shd.logical_to_spec(("embed",), (6,), shd.make_mesh((1, 2, 4)), rules) == P("fsdp")
    assert shd.logical_to_spec(("embed",), (4,), shd.make_mesh((1, 2, 4)), rules) == P("tensor")


def test_sharding_keeps_whole_units():
    mesh = shd.make_mesh((2, 2, 2))
    axes = ("layers", "embed", "qkv")
    # 3 groups of 80: 240 % 2 == 0, but a shard would hold 1.5 groups
    assert shd.logical_to_spec(axes, (2, 64, 240), mesh, units={"qkv": 80}) == P(None, "fsdp", None)
    assert shd.logical_to_spec(axes, (2, 64, 240), mesh) == P(None, "fsdp", "tensor")  # unit 1
    assert shd.logical_to_spec(axes, (2, 64, 320), mesh, units={"qkv": 80}) == P(None, "fsdp", "tensor")
    assert shd.logical_to_spec(axes, (2, 64, 250), mesh, units={"qkv": 80}) == P(None, "fsdp", None)  # not whole
    assert shd.logical_to_spec(("gate_up",), (96,), mesh, units={"gate_up": 2}) == P("tensor")


def test_strict_raises_instead_of_replicating():
    mesh = shd.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"\['w'\].*'qkv' of size 240 \(unit 80\).*\('tensor',\) of size 2"):
        shd.logical_to_spec(("embed", "qkv"), (64, 240), mesh, units={"qkv": 80}, strict=True, name="['w']")
    assert shd.logical_to_spec(("embed", "qkv"), (64, 320), mesh, units={"qkv": 80}, strict=True) == \
        P("fsdp", "tensor")
    with pytest.raises(ValueError, match="do not match shape"):
        shd.logical_to_spec(("embed",), (64, 2), mesh)
    with pytest.raises(ValueError, match="does not have"):
        shd.logical_to_spec(("embed",), (64,), mesh, (("embed", "expert"),))


def test_tree_shardings_warns_once_per_parameter_by_path(caplog):
    mesh = shd.make_mesh((1, 2, 4))
    axes = {"a": {"b": ("kv_heads", "mlp")}, "ok": ("embed", None)}
    shapes = {"a": {"b": np.zeros((3, 6))}, "ok": np.zeros((4, 3))}
    with caplog.at_level(logging.WARNING, logger="absl"):
        out = shd.tree_shardings(axes, shapes, mesh)
    assert out["a"]["b"].spec == P(None, None) and out["ok"].spec == P("fsdp", None)
    [record] = caplog.records  # both dimensions of ['a']['b'] in one message, nothing for ['ok']
    assert "['a']['b']" in record.getMessage() and "'kv_heads'" in record.getMessage() \
        and "'mlp' of size 6" in record.getMessage() and "of size 4" in record.getMessage()
    with pytest.raises(ValueError, match=r"\['a'\]\['b'\]"):
        shd.tree_shardings(axes, shapes, mesh, strict=True)


def test_host_batch_to_global_keeps_the_pytree():
    @functools.partial(jax.tree_util.register_dataclass, data_fields=["tokens", "inner"], meta_fields=[])
    @dataclasses.dataclass(frozen=True)
    class Batch:  # the shape of lit_jax.data.batch.LitBatch: a dataclass pytree with nested parts
        tokens: np.ndarray
        inner: dict

    mesh = shd.make_mesh((2, 2, 2))
    batch = Batch(np.arange(12, dtype=np.int32).reshape(4, 3), {"mask": np.ones((4,), bool)})
    out = shd.host_batch_to_global(batch, mesh)
    assert type(out) is Batch and type(out.inner) is dict
    assert out.tokens.sharding.spec == P(("data", "fsdp"), None) and out.inner["mask"].sharding.spec == \
        P(("data", "fsdp"))
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(batch)):
        assert isinstance(got, jax.Array) and len(got.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(got), want)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.make_mesh((2, 2, 1), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="at most one -1"):
        shd.make_mesh((-1, -1, 1))
    assert shd.make_mesh((-1, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}


def test_make_mesh_shapes_devices_and_axis_types():
    for shape, devices, want in (((-1, 1, 1), None, (8, 1, 1)), ((2, 2, 2), None, (2, 2, 2)),
                                 ((1, -1, 2), None, (1, 4, 2)), ((-1, 1, 1), jax.devices()[:1], (1, 1, 1)),
                                 ((1, 1, -1), jax.devices()[4:], (1, 1, 4))):
        mesh = shd.make_mesh(shape, devices)
        assert mesh.axis_names == shd.MESH_AXES and mesh.devices.shape == want
        assert set(mesh.devices.flat) == set(devices if devices is not None else jax.devices())
        # Auto, not jax.make_mesh's default Explicit: shardings come from NamedSharding, not types
        assert mesh.axis_types == (AxisType.Auto,) * 3


def _step_on(mesh, cfg, base_np, steps=2, process=None):
    """Losses and state after `steps` SGD steps on `mesh`; with `process=(index, count)` this
    process feeds only its rows of each global batch (multi-host)."""
    lcfg = LitConfig(read_layers=(1,), write_layer=0, projection="linear", lora=LoraConfig(rank=4))
    opt = optax.sgd(0.5)  # exact comparison: Adam would amplify float noise in near-zero gradients
    units = llama.param_units(cfg)
    base = jax.device_put(base_np, shd.tree_shardings(llama.param_axes(cfg), base_np, mesh, units=units))
    params = init_trainable(jax.random.key(0), cfg, lcfg)
    params = jax.device_put(params, shd.tree_shardings(trainable_axes(cfg, lcfg), params, mesh, units=units))
    state = init_state(params, opt)
    state = jax.device_put(state, shd.placed_like(state, mesh))
    step = jit_train_step(cfg, lcfg, opt, out_shardings=(shd.placed_like(state, mesh), shd.replicated(mesh)))
    losses = []
    for s in range(steps):
        batch = make_lit_batch(batch=8, seed=s)
        if process is not None:
            index, count = process
            batch = jax.tree.map(lambda v: np.split(v, count)[index], batch)
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
