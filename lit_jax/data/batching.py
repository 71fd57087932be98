"""Examples -> one fixed-shape batch (right padding; dummy rows for a padded last batch).

Fields (the training step's contract):
  read_tokens int32 [B, R], read_valid bool [B, R], read_positions int32 [B, S],
  slot_mask bool [B, S], decoder_tokens int32 [B, T], decoder_valid bool [B, T],
  write_positions int32 [B, S], loss_mask bool [B, T],
  target_positions int32 [B, P], target_mask bool [B, P]   (the loss_mask positions, ascending;
      P is fixed per bucket so the step computes logits only there, with static shapes)
  read_layer int32 [B], example_id int32 [B]
Unused slots and dummy rows have position 0 and all masks False; dummy rows have
example_id -1 and the default read layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

BATCH_FIELDS = ("read_tokens", "read_valid", "read_positions", "slot_mask", "decoder_tokens", "decoder_valid",
                "write_positions", "loss_mask", "target_positions", "target_mask", "read_layer", "example_id")


def target_positions(loss_mask: np.ndarray, num_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [B, P], mask [B, P]) of each row's loss_mask entries, in order, padded with 0/False."""
    counts = loss_mask.sum(axis=1)
    if counts.max(initial=0) > num_targets:
        raise ValueError(f"a row has {int(counts.max())} target tokens > the bucket's {num_targets}")
    positions = np.zeros((loss_mask.shape[0], num_targets), np.int32)
    mask = np.arange(num_targets)[None, :] < counts[:, None]
    positions[mask] = np.nonzero(loss_mask)[1]
    return positions, mask


def empty_batch(batch_size: int, bucket: tuple[int, int, int, int], pad_id: int, default_layer: int
                ) -> dict[str, np.ndarray]:
    b, (r, s, t, p) = batch_size, bucket
    return {
        "read_tokens": np.full((b, r), pad_id, np.int32), "read_valid": np.zeros((b, r), bool),
        "read_positions": np.zeros((b, s), np.int32), "slot_mask": np.zeros((b, s), bool),
        "decoder_tokens": np.full((b, t), pad_id, np.int32), "decoder_valid": np.zeros((b, t), bool),
        "write_positions": np.zeros((b, s), np.int32), "loss_mask": np.zeros((b, t), bool),
        "target_positions": np.zeros((b, p), np.int32), "target_mask": np.zeros((b, p), bool),
        "read_layer": np.full((b,), default_layer, np.int32), "example_id": np.full((b,), -1, np.int32),
    }


def collate(examples: Sequence[dict[str, Any] | None], example_ids: Sequence[int], bucket: tuple[int, int, int],
            pad_id: int, default_layer: int, num_targets: int) -> dict[str, np.ndarray]:
    """A [len(examples), ...] batch in `bucket`'s shape (P = num_targets); None entries become dummy rows."""
    batch = empty_batch(len(examples), (*bucket, num_targets), pad_id, default_layer)
    for row, (ex, eid) in enumerate(zip(examples, example_ids)):
        if ex is None:
            continue
        r, s, t = len(ex["read_tokens"]), len(ex["read_positions"]), len(ex["decoder_tokens"])
        if r > bucket[0] or s > bucket[1] or t > bucket[2]:
            raise ValueError(f"example {eid} with (R, S, T)=({r}, {s}, {t}) does not fit bucket {bucket}")
        batch["read_tokens"][row, :r] = ex["read_tokens"]
        batch["read_valid"][row, :r] = True
        batch["read_positions"][row, :s] = ex["read_positions"]
        batch["slot_mask"][row, :s] = True
        batch["decoder_tokens"][row, :t] = ex["decoder_tokens"]
        batch["decoder_valid"][row, :t] = True
        batch["write_positions"][row, :s] = ex["write_positions"]
        batch["loss_mask"][row, :t] = ex["loss_mask"]
        batch["read_layer"][row] = ex["read_layer"]
        batch["example_id"][row] = eid
    batch["target_positions"], batch["target_mask"] = target_positions(batch["loss_mask"], num_targets)
    return batch
