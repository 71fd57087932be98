"""The input pipeline: deterministic epochs of fixed-shape batches, per-host shards, resumable.

An epoch's plan is a pure function of (seed, epoch, bucket of each example, global batch):
each bucket's examples are permuted, cut into global batches of batch_size * process_count
rows, and the batches of all buckets are permuted together. Every process computes the
same plan and takes its own block of batch_size rows from each global batch, so all
processes see the same bucket (shape) at the same step and disjoint examples. This is
the bucketed equivalent of `tfds.split_for_jax_process` (which splits the file range and
would let processes disagree on shapes).

State = (epoch, next batch in epoch) plus the settings that fix the plan; restoring it
recomputes the plan and continues where the saved run would have. The global batch, not
the process count, fixes the plan: the same state resumes on another number of hosts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lit_jax.data.batching import collate
from lit_jax.data.storage import ExampleSource

STATE_VERSION = 1


class EpochPlan(NamedTuple):
    buckets: np.ndarray  # [n_batches] bucket index per global batch
    rows: np.ndarray  # [n_batches, global_batch] example ids, -1 = dummy row


def epoch_plan(bucket_ids: np.ndarray, num_buckets: int, global_batch: int, seed: int, epoch: int, shuffle: bool,
               drop_remainder: bool, groups: np.ndarray | None = None) -> EpochPlan:
    """groups: per example a group id; shuffling then permutes groups and keeps each group's
    examples (of one bucket) adjacent, so they mostly share a batch."""
    rng = np.random.default_rng([seed, epoch])
    buckets, rows = [], []
    for k in range(num_buckets):
        ids = np.flatnonzero(bucket_ids == k)
        if shuffle and groups is not None:
            unique, which = np.unique(groups[ids], return_inverse=True)
            rank = rng.permutation(len(unique))
            ids = ids[np.lexsort((ids, rank[which]))]
        elif shuffle:
            ids = rng.permutation(ids)
        full = len(ids) // global_batch
        chunk = ids[: full * global_batch].reshape(full, global_batch)
        if not drop_remainder and len(ids) > full * global_batch:
            last = np.full((1, global_batch), -1, np.int64)
            last[0, : len(ids) - full * global_batch] = ids[full * global_batch:]
            chunk = np.concatenate([chunk, last])
        rows.append(chunk)
        buckets.append(np.full(len(chunk), k, np.int64))
    plan = EpochPlan(np.concatenate(buckets), np.concatenate(rows).reshape(-1, global_batch))
    if shuffle:
        order = rng.permutation(len(plan.buckets))
        plan = EpochPlan(plan.buckets[order], plan.rows[order])
    return plan


class BatchIterator:
    """Iterator of batch dicts (see batching.py) with get_state() / set_state(state)."""

    def __init__(self, source: ExampleSource, *, batch_size: int, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True, process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, group_by_read: bool = False):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.shuffle, self.drop_remainder, self.num_epochs = bool(shuffle), bool(drop_remainder), num_epochs
        self.group_by_read = bool(group_by_read)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch = self.batch_size * self.process_count
        self.epoch, self.batch_in_epoch = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None
        if len(source) and self.batches_per_epoch == 0:
            raise ValueError(
                f"{source.split}: {len(source)} examples in buckets {np.bincount(source.bucket_ids).tolist()} give "
                f"no full global batch of {self.global_batch}; lower batch_size or use drop_remainder=False"
            )

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.source.bucket_ids, len(self.source.buckets), self.global_batch,
                                            self.seed, epoch, self.shuffle, self.drop_remainder,
                                            self.source.groups if self.group_by_read else None))
        return self._plan[1]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.plan(self.epoch).buckets)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            plan = self.plan(self.epoch)
            if self.batch_in_epoch < len(plan.buckets):
                break
            if not len(plan.buckets):
                raise StopIteration  # an empty split
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        k = self.batch_in_epoch
        self.batch_in_epoch += 1
        lo = self.process_index * self.batch_size
        ids = plan.rows[k, lo: lo + self.batch_size]
        real = [int(i) for i in ids if i >= 0]
        fetched = iter(self.source.get_many(real))
        examples = [next(fetched) if i >= 0 else None for i in ids]
        b = int(plan.buckets[k])
        return collate(examples, ids, self.source.buckets[b], self.source.pad_id, self.source.default_layer,
                       self.source.bucket_targets[b])

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable; the same state is valid on every process."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if state.get("version") != STATE_VERSION or mismatched:
            raise ValueError(f"iterator state does not match this iterator (saved, current): {mismatched or 'version'}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def _identity(self) -> dict[str, Any]:
        """What fixes the sequence of batches: a state only resumes an iterator with the same."""
        return {"seed": self.seed, "shuffle": self.shuffle, "drop_remainder": self.drop_remainder,
                "group_by_read": self.group_by_read,
                "global_batch": self.global_batch, "num_examples": len(self.source), "split": self.source.split,
                "buckets": [list(b) for b in self.source.buckets]}


def make_batch_iterator(source: ExampleSource, data_cfg: Any, *, seed: int | None = None, shuffle: bool = True,
                        drop_remainder: bool | None = None, process_index: int | None = None,
                        process_count: int | None = None, num_epochs: int | None = None) -> BatchIterator:
    """Batches of `data_cfg.batch_size` rows per process; repeats forever unless num_epochs is set.

    seed / drop_remainder default to data_cfg.shuffle_seed / data_cfg.train_drop_remainder;
    process_index / process_count to jax.process_index() / jax.process_count().
    """
    return BatchIterator(source, batch_size=data_cfg.batch_size,
                         seed=data_cfg.shuffle_seed if seed is None else seed, shuffle=shuffle,
                         drop_remainder=data_cfg.train_drop_remainder if drop_remainder is None else drop_remainder,
                         process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                         group_by_read=bool(data_cfg.get("group_by_read", False)) and shuffle)


def make_eval_iterator(source: ExampleSource, data_cfg: Any, *, process_index: int | None = None,
                       process_count: int | None = None) -> BatchIterator:
    """One pass in order, last batch per bucket padded: every example seen exactly once."""
    return make_batch_iterator(source, data_cfg, shuffle=False, drop_remainder=False, process_index=process_index,
                               process_count=process_count, num_epochs=1)
