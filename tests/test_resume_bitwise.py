"""A run killed (SIGKILL) and resumed, again and again, ends bitwise where the uninterrupted run ends.

The `lit` job on configs/tiny.py (packed batches, so the padded size levels matter) runs in
subprocesses: once uninterrupted, and once as a chain of processes each killed at another
point (between checkpoints, during an async save, after a save) and then finished. Every
parameter and optimizer leaf of the final checkpoints must be equal bit for bit (issue 17).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lit_jax.data.packing import PackedSizes, StepBatches
from lit_jax.lit.checkpoint import Checkpointer
from lit_jax.lit.train import data_state_of, restore_data_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 40, 5
ARGS = ["--config=configs/tiny.py", f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
        "--config.train.log_every=1", "--config.demo.num_examples=0"]
# (point, step, latest complete checkpoint after the kill); "save" dies with the async write in flight,
# so its step's checkpoint may or may not have been committed.
KILLS = [("step", 7, {5}), ("save", 10, {5, 10}), ("saved", 20, {20}), ("step", 23, {20}), ("save", 30, {25, 30})]


def _env(cache: str) -> dict:
    # One persistent compilation cache for all the processes: each compiles the same shapes.
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "XLA_FLAGS": ""}


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _final_state(workdir) -> dict:
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitwise")
    env = _env(str(root / "compilation_cache"))
    full = _run([sys.executable, "-m", "lit_jax.main", *ARGS, f"--workdir={root / 'full'}"], env)
    assert full.returncode == 0, full.stderr[-3000:]
    killed, latest = root / "killed", []
    for point, step, expected in KILLS:
        r = _run([sys.executable, os.path.join(ROOT, "tests", "kill_at.py"), point, str(step), "--", *ARGS,
                  f"--workdir={killed}"], env)
        assert r.returncode == -9, (point, step, r.returncode, r.stderr[-3000:])
        latest.append(Checkpointer.latest_step_in(str(killed / "checkpoints")))
        assert latest[-1] in expected, (point, step, latest[-1])
    last = _run([sys.executable, "-m", "lit_jax.main", *ARGS, f"--workdir={killed}"], env)
    assert last.returncode == 0, last.stderr[-3000:]
    return root / "full", killed, latest


def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_run(runs):
    full, killed, latest = runs
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == latest[-1] and summary["steps"] == STEPS
    a, b = _final_state(full), _final_state(killed)
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    assert len(leaves_a) > 10  # step, every LoRA/projection parameter and both Adam moments
    differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(leaves_a, leaves_b)
              if not np.array_equal(np.asarray(x), np.asarray(y))]
    assert not differ, f"{len(differ)} of {len(leaves_a)} leaves differ after resuming, e.g. {differ[:3]}"
    # The held-out evaluation at the end saw the same parameters through the same shapes.
    full_summary = json.loads((full / "summary.json").read_text())
    assert summary["heldout_last"] == full_summary["heldout_last"]


def test_packed_sizes_state_round_trips_through_json():
    sizes = PackedSizes(multiple=16, levels=2)
    sizes.plan((8, 4, 16, 8), [{"read": 20, "decoder": 30}, {"read": 40, "decoder": 70}])
    sizes((8, 4, 16, 8), {"read": 90, "decoder": 100})  # grows the largest level
    sizes((4, 4, 8, 8), {"read": 5, "decoder": 9})
    again = PackedSizes(multiple=16, levels=2)
    again.set_state(json.loads(json.dumps(sizes.get_state())))
    for key in [(8, 4, 16, 8), (4, 4, 8, 8)]:
        assert again.levels(key) == sizes.levels(key)
    need = {"read": 33, "decoder": 41}  # fits the second level, not the first: both pick the same
    assert again((8, 4, 16, 8), need) == sizes((8, 4, 16, 8), need) == {"read": 96, "decoder": 112}


class _Iterator:
    def __init__(self):
        self.state = None

    def get_state(self):
        return {"epoch": 1, "batch_in_epoch": 3}

    def set_state(self, state):
        self.state = state


def test_data_state_holds_iterator_and_levels_and_reads_the_older_form():
    saved = StepBatches(pack=True, num_rows=2)
    saved.sizes.plan((1, 2, 3, 4), [{"read": 10, "decoder": 20}])
    state = json.loads(json.dumps(data_state_of(_Iterator(), saved)))
    it, fresh = _Iterator(), StepBatches(pack=True, num_rows=2)
    assert restore_data_state(state, it, fresh) is True
    assert it.state == {"epoch": 1, "batch_in_epoch": 3} and fresh.sizes.levels((1, 2, 3, 4)) == [
        {"read": 16, "decoder": 32}]
    # A checkpoint from before the levels were saved holds the iterator state alone: levels are planned again.
    it, fresh = _Iterator(), StepBatches(pack=True, num_rows=2)
    assert restore_data_state({"epoch": 2, "batch_in_epoch": 0}, it, fresh) is False
    assert it.state == {"epoch": 2, "batch_in_epoch": 0} and fresh.sizes.levels((1, 2, 3, 4)) == []
