"""The training loop: progress bar, periodic held-out evaluation, metrics, checkpoints, resume.

Flat and readable on purpose (big_vision style): everything heavy happens inside the
jitted step; the host only feeds batches, reads metrics every `log_every` steps (the
only host syncs), and starts async checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from lit_jax import sharding as shd
from lit_jax.cpu_tuning import CompiledPerShape
from lit_jax.data import LitBatch, StepBatches
from lit_jax.lit.checkpoint import Checkpointer, config_meta
from lit_jax.lit.config import LitConfig
from lit_jax.lit.metrics import MetricsWriter, plot_loss_curve
from lit_jax.lit.train_state import TrainState, init_state, init_trainable, make_optimizer, trainable_axes
from lit_jax.lit.train_step import jit_eval_step, jit_train_step
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train; these defaults are the only definition (configs/common.py is built from them)."""

    steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate (AdamW), after `warmup_steps` of linear warmup, then cosine to 10%
    warmup_steps: int = 10
    weight_decay: float = 0.0  # on matrices only
    clip_norm: float = 1.0  # global gradient norm
    accum_steps: int = 1  # micro-batches per step (gradient accumulation inside the compiled step)
    seed: int = 0  # trainable-parameter initialisation
    log_every: int = 10  # steps between host syncs that log train metrics
    eval_every: int = 0  # 0: held-out evaluation only at the start and the end
    eval_examples: int = 0  # held-out examples evaluated (evenly spread, fixed); 0: all
    checkpoint_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    pack: bool = True  # merge each batch's shared prefixes and drop padding (data/packing.py)
    pack_multiple: int = 16  # packed lengths are rounded up to this (fewer distinct shapes to compile)
    pack_levels: int = 3  # padded size levels per length bucket (compiled shapes per bucket)
    presize_batches: int = 64  # look-ahead train batches (and all held-out ones) that plan the levels up front


class TrainResult(dict):
    """Summary of a run: first/last held-out metrics, steps, wall time, paths."""


def device_batch(batch: LitBatch, mesh) -> LitBatch:
    """A host LitBatch as global arrays sharded over the batch axes."""
    return shd.host_batch_to_global(batch, mesh)


def packed_rows(mesh, accum_steps: int) -> int:
    """Packed rows per host: one per batch shard this host feeds, per micro-batch."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(1, shards // jax.process_count()) * accum_steps


def check_batch(batch: LitBatch, lcfg: LitConfig) -> None:
    """Host-side check of what would otherwise silently read the wrong layer: every slot's layer is trained."""
    unknown = set(np.unique(batch.slots.layer[batch.slots.mask]).tolist()) - set(lcfg.read_layers)
    if unknown:
        raise ValueError(f"batch reads layers {sorted(unknown)} not in lit.read_layers={lcfg.read_layers}")


def evaluate(eval_step, params, base, batches: Iterable[LitBatch], mesh, lcfg: LitConfig) -> dict[str, float]:
    """Held-out answer loss and token accuracy over every batch (padding rows carry no targets)."""
    sums = None
    for batch in batches:  # summed on device: one host sync at the end, not one per batch
        check_batch(batch, lcfg)
        s = eval_step(params, base, device_batch(batch, mesh))
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    if sums is None or float(sums.count) == 0:
        raise ValueError("held-out split has no target tokens")
    loss, correct, count = (float(x) for x in (sums.loss, sums.correct, sums.count))
    return {"loss": loss / count, "accuracy": correct / count, "target_tokens": count}


def data_state_of(train_batches, step_batch: StepBatches) -> dict:
    """What fixes the batches after this step, as JSON for the checkpoint: the iterator's position
    (order and shuffling) and the packed size levels (the shapes each batch is padded to)."""
    return {"iterator": train_batches.get_state(), "packed_sizes": step_batch.sizes.get_state()}


def restore_data_state(data_state: dict, train_batches, step_batch: StepBatches) -> bool:
    """Puts a checkpoint's data state back; True when it held the packed size levels.

    A checkpoint saved before the levels were recorded holds the iterator state alone; it
    resumes with levels planned afresh (close to the uninterrupted run, not bitwise).
    """
    if "iterator" not in data_state:
        train_batches.set_state(data_state)
        return False
    train_batches.set_state(data_state["iterator"])
    step_batch.sizes.set_state(data_state["packed_sizes"])
    return True


def _under_mesh_rules(fn):
    """Runs fn(mesh=..., ...) under sharding.mesh_rules(mesh): the model's activation constraints
    then shard the batch (FSDP) in every step traced inside."""
    @functools.wraps(fn)
    def wrapped(*, mesh, **kwargs):
        with shd.mesh_rules(mesh):
            return fn(mesh=mesh, **kwargs)

    return wrapped


@_under_mesh_rules
def train(
    *,
    cfg: ModelConfig,
    lcfg: LitConfig,
    tcfg: TrainConfig,
    base: llama.Params,
    mesh,
    train_batches: Iterator[dict],  # collated example rows (data.make_batch_iterator), resumable
    heldout_batches: Callable[[], Iterable[dict]] | None,
    workdir: str,
    meta: dict[str, Any] | None = None,
    strict_sharding: bool = False,
) -> tuple[TrainState, TrainResult]:
    """Trains (resuming from the latest checkpoint in `workdir/checkpoints` if any).

    meta: saved with every checkpoint. Its "config" is always config_meta(cfg, lcfg, data) (the
    model architecture and shape, the whole LitConfig) with the caller's meta["config"]["data"]
    (decoder prompt style, placeholder, ...; see lit/job.py); on resume the saved one must match.
    strict_sharding: a trainable dimension the mesh does not divide is an error instead of
    replicated with a warning (sharding.tree_shardings).
    Raises CheckpointMismatchError when the latest checkpoint was trained with a different
    configuration (naming each differing field with its saved and current values) or has
    parameters of other shapes; ValueError for a batch that reads an untrained layer.
    """
    t_start = time.time()
    meta = dict(meta or {})
    meta["config"] = config_meta(cfg, lcfg, data=(meta.get("config") or {}).get("data"))
    is_main = jax.process_index() == 0
    optimizer = make_optimizer(tcfg.lr, tcfg.warmup_steps, tcfg.steps, weight_decay=tcfg.weight_decay,
                               clip_norm=tcfg.clip_norm)
    params = init_trainable(jax.random.key(tcfg.seed), cfg, lcfg, base)
    params = jax.device_put(params, shd.tree_shardings(trainable_axes(cfg, lcfg), params, mesh,
                                                       units=llama.param_units(cfg), strict=strict_sharding))
    state = init_state(params, optimizer)
    state_sharding = shd.placed_like(state, mesh)
    state = jax.device_put(state, state_sharding)
    # Fixed output shardings: the donated state comes back laid out as it went in (no re-layout, no recompiles).
    # Compiled per batch shape ahead of its first call, handing the compiler's freed host memory back.
    step_fn = CompiledPerShape(jit_train_step(cfg, lcfg, optimizer, tcfg.accum_steps,
                                              out_shardings=(state_sharding, shd.replicated(mesh))))
    eval_step = CompiledPerShape(jit_eval_step(cfg, lcfg))
    step_batch = StepBatches(tcfg.pack, packed_rows(mesh, tcfg.accum_steps), tcfg.pack_multiple, tcfg.pack_levels)
    writer = MetricsWriter(workdir, enabled=is_main)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tcfg.keep_checkpoints,
                        async_save=tcfg.async_checkpoints)
    result = TrainResult(workdir=workdir)

    start, restored_sizes = 0, False
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, state, expected_config=meta["config"])
        restored_sizes = restore_data_state(data_state, train_batches, step_batch)
        start = int(state.step)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
        result["resumed_from"] = start

    def run_eval(step: int, params: dict) -> None:
        if heldout_batches is None:
            return
        m = evaluate(eval_step, params, base, (step_batch(b) for b in heldout_batches()), mesh, lcfg)
        writer.write(step, "heldout", m)
        result.setdefault("heldout_first", {"step": step, **m})
        result["heldout_last"] = {"step": step, **m}
        logging.info("step %d held-out: %s", step, m)

    # padded sizes from a look-ahead: fewer compilations later (a resumed run has the saved ones)
    if tcfg.pack and tcfg.presize_batches and not restored_sizes:
        saved = train_batches.get_state()
        ahead = list(itertools.islice(train_batches, tcfg.presize_batches))
        train_batches.set_state(saved)
        step_batch.presize(itertools.chain(ahead, heldout_batches() if heldout_batches is not None else ()))

    try:
        if start == 0:
            run_eval(0, state.params)
        pending: list[tuple[int, dict]] = []
        window_t, window_tokens = time.time(), 0.0
        bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc="train", disable=not is_main,
                   dynamic_ncols=True)
        for step in bar:
            batch = step_batch(next(train_batches))
            check_batch(batch, lcfg)
            state, metrics = step_fn(state, base, device_batch(batch, mesh))
            pending.append((step + 1, metrics))
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                host = [(s, {k: float(v) for k, v in m.items()}) for s, m in pending]  # the host sync
                pending.clear()
                for s, m in host:
                    writer.write(s, "train", m)
                window_tokens += sum(m["decoder_tokens"] for _, m in host)
                last = host[-1][1]
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}",
                                tok_s=f"{window_tokens / max(time.time() - window_t, 1e-9):.0f}")
                window_t, window_tokens = time.time(), 0.0
                result["train_last"] = {"step": done, **last}
            if done == tcfg.steps:
                break
            if tcfg.eval_every and done % tcfg.eval_every == 0:
                run_eval(done, state.params)
            if tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0:
                ckpt.save(done, state, data_state_of(train_batches, step_batch), meta)
        bar.close()
        run_eval(tcfg.steps, state.params)
        if start < tcfg.steps:
            ckpt.save(tcfg.steps, state, data_state_of(train_batches, step_batch), meta)
    finally:  # also on interrupt: let an in-flight async save finish, flush metrics
        ckpt.close()
        writer.close()
    if is_main:
        result["loss_curve"] = plot_loss_curve(writer.jsonl_path, os.path.join(workdir, "loss_curve.png"))
    result["steps"] = tcfg.steps
    result["wall_s"] = time.time() - t_start
    return state, result
