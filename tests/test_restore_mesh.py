"""A checkpoint saved on one mesh restores onto another (issue 15, item 2): the train state, a resumed
run, and a trained decoder; on 8 fake CPU devices and in a 1-device process."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import load_decoder
from lit_jax import sharding as shd
from lit_jax.lit.checkpoint import Checkpointer
from lit_jax.lit.config import LitConfig
from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer, trainable_axes
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV1 = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a 1-device process
ENV8 = {**ENV1, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
LCFG = LitConfig(read_layers=(1,), write_layer=0, lora=LoraConfig(rank=4, alpha=8.0))


def _state_on(mesh):
    """A train state laid out over `mesh` as train() lays it out, every leaf (moments, counts) non-trivial."""
    params = init_trainable(jax.random.key(0), CFG, LCFG)
    params = jax.device_put(params, shd.tree_shardings(trainable_axes(CFG, LCFG), params, mesh,
                                                       units=llama.param_units(CFG)))
    state = init_state(params, make_optimizer(1e-3, 1, 10))
    values = jax.tree.map(lambda x: np.asarray(x) + (np.arange(x.size).reshape(x.shape) % 7 + 1).astype(x.dtype),
                          state)
    return jax.device_put(values, shd.placed_like(state, mesh))


@pytest.mark.parametrize("shape,devices", [((2, 2, 2), 8), ((1, 4, 2), 8), ((1, 1, 1), 1)])
def test_train_state_restores_onto_another_mesh(tmp_path, shape, devices):
    saved = _state_on(shd.make_mesh((8, 1, 1)))
    assert saved.params["lora"]["q"]["a"].sharding.spec != jax.sharding.PartitionSpec()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(7, saved, {"iterator": "x"})
    ckpt.close()

    mesh = shd.make_mesh(shape, devices=jax.devices()[:devices])
    like = _state_on(mesh)  # the fresh state of a run on the new mesh: restore targets its layout
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    restored, data_state, _ = ckpt.restore(7, like)
    ckpt.close()
    assert data_state == {"iterator": "x"} and int(restored.step) == int(saved.step) == 1
    for (path, a), b, want in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(restored),
                                  jax.tree.leaves(like)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
        assert b.sharding == want.sharding, jax.tree_util.keystr(path)
        assert {d for d in b.sharding.device_set} <= set(mesh.devices.flat)


def _lit(workdir, shape, steps, env):
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
                        "--config.demo.num_examples=0", "--config.train.eval_examples=8",
                        "--config.data.batch_size=8", f"--config.mesh.shape={shape}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run trained 2 steps on (8, 1, 1), then resumed on (2, 2, 2) to step 4."""
    workdir = tmp_path_factory.mktemp("mesh_run")
    _lit(workdir, "(8,1,1)", 2, ENV8)
    _lit(workdir, "(2,2,2)", 4, ENV8)
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    return workdir


LOAD_ONE_DEVICE = r"""
import sys, numpy as np, jax
sys.path.insert(0, {root!r})
assert jax.device_count() == 1
from lit_jax import load_decoder
d = load_decoder({workdir!r}, step={step})
for path, x in jax.tree_util.tree_leaves_with_path(d.trainable):
    print(jax.tree_util.keystr(path), repr(np.asarray(x, np.float64).sum()), flush=True)
"""


def test_decoder_restores_onto_other_meshes_and_one_device(workdir):
    for step in (2, 4):
        plain = load_decoder(str(workdir), step=step)  # numpy restore, then one device
        mesh = shd.make_mesh((2, 2, 2))
        laid = load_decoder(str(workdir), step=step, mesh=mesh)
        assert laid.step == step
        spec = laid.base["layers"]["gate_up"].sharding.spec
        assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # the target, read into shards
        assert laid.trainable["lora"]["q"]["a"].sharding.mesh == mesh
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain.trainable), jax.tree.leaves(laid.trainable)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
        for a, b in zip(jax.tree.leaves(plain.base), jax.tree.leaves(laid.base)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        r = subprocess.run([sys.executable, "-c", LOAD_ONE_DEVICE.format(root=ROOT, workdir=str(workdir), step=step)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV1)
        assert r.returncode == 0, r.stderr[-4000:]
        sums = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines())
        want = {jax.tree_util.keystr(p): repr(np.asarray(x, np.float64).sum())
                for p, x in jax.tree_util.tree_leaves_with_path(plain.trainable)}
        assert sums == want
    assert float(jnp.abs(plain.trainable["lora"]["q"]["b"]).max()) > 0  # trained across both meshes
