"""The training loop: loss falls, resume reproduces an uninterrupted run, bad checkpoints are refused."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lit_jax import sharding as shd
from lit_jax.hf import load_params
from lit_jax.lit.checkpoint import Checkpointer, CheckpointMismatchError
from lit_jax.lit.config import LitConfig
from lit_jax.lit.train import TrainConfig, train
from lit_jax.models.lora import LoraConfig
from tests.synthetic_batches import SyntheticIterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    cfg, base = load_params(tiny_checkpoint("llama")[0])
    return cfg, jax.device_put(base)


def _run(tiny, workdir, *, steps=8, fail_at=None, rank=4, heldout=True, **tkw):
    cfg, base = tiny
    lcfg = LitConfig(read_layers=(1,), write_layer=0, lora=LoraConfig(rank=rank))
    # plain rows (packing's look-ahead would read past `fail_at` before the first step)
    tcfg = TrainConfig(**{**dict(steps=steps, lr=2e-2, warmup_steps=2, log_every=2, async_checkpoints=True,
                                 pack=False, checkpoint_every=0, keep_checkpoints=3), **tkw})
    held = (lambda: SyntheticIterator(n_batches=2).batches) if heldout else None
    return train(cfg=cfg, lcfg=lcfg, tcfg=tcfg, base=base, mesh=shd.make_mesh(devices=jax.devices()[:1]),
                 train_batches=SyntheticIterator(fail_at=fail_at), heldout_batches=held, workdir=str(workdir))


def test_loss_falls_and_outputs_are_written(tiny, tmp_path):
    state, result = _run(tiny, tmp_path, steps=12)
    assert int(state.step) == 12
    assert result["heldout_last"]["loss"] < result["heldout_first"]["loss"]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["split"] for r in rows} == {"train", "heldout"}
    assert len([r for r in rows if r["split"] == "train"]) == 12
    assert os.path.getsize(tmp_path / "loss_curve.png") > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert Checkpointer.latest_step_in(str(tmp_path / "checkpoints")) == 12


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    full, _ = _run(tiny, tmp_path / "full", checkpoint_every=4, heldout=False)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path / "resumed", checkpoint_every=4, fail_at=6, heldout=False)
    assert Checkpointer.latest_step_in(str(tmp_path / "resumed" / "checkpoints")) == 4
    resumed, result = _run(tiny, tmp_path / "resumed", checkpoint_every=4, heldout=False)
    assert result["resumed_from"] == 4
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_checkpoint_of_another_config_is_refused(tiny, tmp_path):
    _run(tiny, tmp_path, steps=2, heldout=False)
    # names the array and both shapes: 3 layers, the saved rank 4, the config's rank 8
    with pytest.raises(CheckpointMismatchError,
                       match=r"param \['lora'\]\['\w+'\]\['a'\] has shape \(3, 4, \d+\), the config builds \(3, 8, \d+\)"):
        _run(tiny, tmp_path, steps=4, rank=8, heldout=False)


KILL_SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
import jax
from lit_jax.lit import checkpoint as ck
from tests import test_train_loop as t
from tests.tiny_models import build
real_save = ck.Checkpointer.save
def save_then_die(self, step, *a, **k):
    real_save(self, step, *a, **k)
    if step == 4:
        os._exit(9)   # killed while the async save of step 4 is in flight
ck.Checkpointer.save = save_then_die
from lit_jax.hf import load_params
cfg, base = load_params(build("llama", {ckpt!r})[0])
t._run((cfg, jax.device_put(base)), {workdir!r}, checkpoint_every=2, heldout=False)
"""


def test_kill_during_save_leaves_previous_checkpoint_restorable(tiny, tmp_path):
    script = KILL_SCRIPT.format(root=ROOT, ckpt=str(tmp_path / "hf"), workdir=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 9, r.stderr[-3000:]
    latest = Checkpointer.latest_step_in(str(tmp_path / "run" / "checkpoints"))
    assert latest in (2, 4)  # 4 only if its commit happened to finish first
    # Resuming works from whatever is latest and finishes the run.
    state, result = _run(tiny, tmp_path / "run", checkpoint_every=2, heldout=False)
    assert result["resumed_from"] == latest and int(state.step) == 8
