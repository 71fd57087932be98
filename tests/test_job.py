"""The LIT job end to end (tiny config through the CLI), and the Llama-3-8B config compiling abstractly."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import sharding as shd
from lit_jax.data import plain_batch
from lit_jax.hf import load_params
from lit_jax.lit.job import lit_config, train_config
from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer, trainable_axes
from lit_jax.lit.train_step import jit_train_step
from lit_jax.models import llama
from lit_jax.models.config import from_hf_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    export = workdir / "export"
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        f"--config.export.hf_dir={export}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir, export, r.stdout


def test_tiny_job_trains_evaluates_and_answers(tiny_run):
    workdir, _, stdout = tiny_run
    summary = json.load(open(workdir / "summary.json"))
    assert summary["heldout_first"]["step"] == 0 and summary["heldout_last"]["step"] == 30
    assert summary["heldout_last"]["loss"] < summary["heldout_first"]["loss"]
    train = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"train"' in line]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    assert len(summary["demo"]) == 2 and all(row["question"] and row["true_answer"] for row in summary["demo"])
    assert "held-out answer loss" in stdout and "decoded:" in stdout
    assert (workdir / "loss_curve.png").exists()


def test_tiny_job_resumes_instead_of_restarting(tiny_run):
    workdir, _, _ = tiny_run
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        "--config.demo.num_examples=0"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.load(open(workdir / "summary.json"))
    assert summary["resumed_from"] == 30


def test_activation_oracle_style_job_runs(tmp_path):
    """Oracle prompts, a read layer sampled per example from two, norm-matched addition after block 1."""
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                        "--config.data.prompt_style=oracle", "--config.data.read_layers=(1,2)",
                        "--config.lit.write_mode=add_norm_matched", "--config.lit.write_layer=1",
                        "--config.train.steps=12", "--config.train.checkpoint_every=0", "--config.demo.num_examples=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["heldout_last"]["loss"] < summary["heldout_first"]["loss"]
    assert summary["demo"][0]["question"]


def test_exported_decoder_is_the_merged_model(tiny_run):
    """The export is the random base (seeded) with the trained LoRA folded into the adapted weights only."""
    _, export, _ = tiny_run
    cfg, exported = load_params(str(export))
    assert cfg.vocab_size == 49152 and cfg.num_layers == 4
    assert os.path.exists(export / "tokenizer.json")
    base = jax.device_get(llama.init_params(jax.random.key(0), cfg))  # configs/tiny.py: seed 0
    np.testing.assert_array_equal(exported["embed"], base["embed"])
    np.testing.assert_array_equal(exported["layers"]["attn_norm"], base["layers"]["attn_norm"])
    for name in ("qkv", "o", "gate_up", "down"):
        delta = np.abs(exported["layers"][name] - base["layers"][name]).max()
        assert 1e-6 < delta < 1.0, name


def test_llama3_8b_config_loads_and_its_step_compiles_abstractly():
    config = _config("llama3_8b").get_config()
    cfg = from_hf_dict(config_json := _config("llama3_8b").HF_CONFIG, dtype=config.model.dtype,
                       scan_layers=config.model.scan_layers, remat=config.model.remat)
    assert config_json["num_hidden_layers"] == 32 and cfg.num_kv_heads == 8
    lcfg, tcfg = lit_config(config), train_config(config)
    assert lcfg.read_layers == (15,) and lcfg.write_layer == 0 and lcfg.lora.rank == 16
    mesh = shd.make_mesh(tuple(config.mesh.shape))  # all 8 fake devices on fsdp
    base = llama.param_shapes(cfg)
    base = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), base,
                        shd.tree_shardings(llama.param_axes(cfg), base, mesh))
    assert base["layers"]["gate_up"].sharding.spec[1] == "fsdp"
    opt = make_optimizer(tcfg.lr, tcfg.warmup_steps, tcfg.steps)
    params = jax.eval_shape(lambda: init_trainable(jax.random.key(0), cfg, lcfg))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params,
                          shd.tree_shardings(trainable_axes(cfg, lcfg), params, mesh))
    state = jax.eval_shape(lambda p: init_state(p, opt), params)
    B, R, S, T = config.data.batch_size, 256, 128, 320
    rows = {"read_tokens": (R, np.int32), "read_valid": (R, bool), "read_positions": (S, np.int32),
            "slot_mask": (S, bool), "decoder_tokens": (T, np.int32), "decoder_valid": (T, bool),
            "write_positions": (S, np.int32), "target_positions": (64, np.int32), "target_mask": (64, bool),
            "read_layer": (None, np.int32)}
    rows = {k: np.zeros((B,) + ((n,) if n else ()), dt) for k, (n, dt) in rows.items()}
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh, x.ndim)),
                         plain_batch(rows))
    lowered = jit_train_step(cfg, lcfg, opt).lower(state, base, batch)
    text = lowered.as_text()
    assert "tensor<32x4096x6144xbf16>" in text  # the stacked bf16 q|k|v weights of all 32 layers
    out_state, metrics = jax.eval_shape(jit_train_step(cfg, lcfg, opt), state, base, batch)
    assert out_state.params["lora"]["q"]["a"].shape == (32, 16, 4096)
    assert metrics["loss"].shape == ()
