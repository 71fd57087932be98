"""The `plan` task (issue 15, item 3): Llama-3-8B's train step and reading compiled for an 8-GPU host
(8 fake devices, in this process) and a v5e-256 slice (256 fake devices, in a new process)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lit_jax import sharding as shd
from lit_jax.hf import load_params
from lit_jax.plan import collectives, report, use_fake_devices
from tests.test_sharding import _step_on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS_GB = 16.06  # Llama-3-8B's 8.03 B parameters in bf16


def test_collectives_counts_loop_bodies_by_their_trip_count():
    mesh = shd.make_mesh((8, 1, 1))
    a = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    fn = jax.jit(lambda a: jax.lax.fori_loop(0, 5, lambda i, x: x * jnp.sin(x.sum(0)), a))
    out = collectives(fn.lower(a).compile().as_text())
    # the column sums over the row-sharded carry: one all-reduce of 512 floats per iteration
    assert out == {"all-reduce": {"count": 5.0, "gb": pytest.approx(5 * 512 * 4 / 1e9)}}
    assert collectives("no module here") == {}


def _plan_in_new_process(tmp_path, *flags):
    """The plan task through the command line, in its own process: compiling an 8B program leaves
    large executables and code mappings behind, which would crowd the test process."""
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/llama3_8b.py", "--config.task=plan",
                        *flags, f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(tmp_path / "plan.json") as f:
        return r.stdout, json.load(f)


def test_llama3_8b_plan_for_an_8_gpu_host(tmp_path):
    text, result = _plan_in_new_process(tmp_path, "--config.plan.devices=8", "--config.mesh.shape=(1,8,1)",
                                        "--config.plan.device_memory_gb=80")
    train, reading = result["train"], result["reading"]
    assert result["devices"] == 8 and result["params_b"] == pytest.approx(8.03, abs=0.01)
    assert train["base_gb"] == pytest.approx(PARAMS_GB / 8, rel=0.01)  # the frozen base split 8 ways (FSDP)
    assert train["memory"]["arguments_gb"] >= train["base_gb"] + train["state_gb"]
    assert train["memory"]["aliased_gb"] == pytest.approx(train["state_gb"], rel=0.01)  # the donated state
    assert 0 < train["memory"]["peak_gb"] < 80
    # FSDP: each layer's weights are gathered (bf16 weights as XLA:CPU's f32 operands: 32 GB a pass, a few
    # passes with remat), and the batch's activations are never all-reduced: before the residual stream was
    # constrained to the batch axes, XLA split the contractions and all-reduced 89 GB per step instead
    assert 30 < train["collectives"]["all-gather"]["gb"] < 150
    assert train["collectives"]["all-reduce"]["gb"] < 2
    assert reading["memory"]["peak_gb"] < 80 and reading["collectives"]
    assert "fits in 80 GB" in text and "all-gather" in text
    assert report(result).splitlines()[0] == text.splitlines()[0]


def test_activation_constraints_keep_the_sharded_step_exact(tiny_checkpoint):
    cfg, base_np = load_params(tiny_checkpoint("llama")[0])
    one, losses1, _ = _step_on(shd.make_mesh(devices=jax.devices()[:1]), cfg, base_np)
    mesh = shd.make_mesh((2, 2, 2))
    with shd.mesh_rules(mesh):
        eight, losses8, _ = _step_on(mesh, cfg, base_np)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)


def test_fake_devices_refused_once_jax_has_started():
    with pytest.raises(RuntimeError, match="--config.plan.devices=256: this process already has 8 devices"):
        use_fake_devices(256)


def test_llama3_8b_plan_for_a_v5e_256_slice(tmp_path):
    text, result = _plan_in_new_process(tmp_path, "--config.plan.devices=256", "--config.mesh.shape=(1,256,1)",
                                        "--config.data.batch_size=256", "--config.plan.device_memory_gb=16",
                                        "--config.plan.skip_reading=True")
    assert "fits in 16 GB" in text, text
    assert result["devices"] == 256 and result["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
    assert result["train"]["base_gb"] == pytest.approx(PARAMS_GB / 256, rel=0.02)
    assert result["train"]["memory"]["peak_gb"] < 16 and result["reading"] is None
