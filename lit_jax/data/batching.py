"""Examples -> fixed-shape batches: a few length buckets, and collating examples into one bucket's rows.

Length buckets: a few fixed (R, S, T) shapes so the jitted step compiles a handful of times.
R = read length, S = read slots (activations), T = decoder length. The cost of a shape is
w * R + T, w = `read_weight`: a read token costs less than a decoder token (the target
runs only up to the read layer, forward only; the decoder runs every layer forward and
backward), so padding is traded towards the read side. An example goes to the first
bucket (ordered by cost) it fits in every dimension, i.e. the cheapest that fits.
Chosen from the data: lengths rounded up to `multiple`, sorted by cost, cut into
`num_buckets` contiguous groups by dynamic programming minimising the padded cost
sum(count * (w * R_bucket + T_bucket)); each bucket is its group's maximum shape, then
shrunk to the largest example it actually receives.

Collated rows (`collate`: right padding; dummy rows for a padded last batch). Fields, what
the iterator yields (the step takes them as a LitBatch: batch.py `plain_batch`, packing.py):
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

from lit_jax.padding import round_up

Bucket = tuple[int, int, int]


def order_buckets(buckets, read_weight: float = 1.0) -> tuple[Bucket, ...]:
    """Buckets as int triples, cheapest (read_weight * R + T) first, without repeats."""
    uniq = {tuple(int(v) for v in b) for b in buckets}
    return tuple(sorted(uniq, key=lambda b: (read_weight * b[0] + b[2], b[2], b[0], b[1])))


def assign_buckets(lengths: np.ndarray, buckets: tuple[Bucket, ...]) -> np.ndarray:
    """[N] index of the first bucket each (R, S, T) row fits in; -1 where none fits."""
    lengths = np.asarray(lengths).reshape(-1, 3)
    if not buckets:
        return np.full(len(lengths), -1, np.int64)
    fits = (lengths[:, None, :] <= np.asarray(buckets)[None, :, :]).all(-1)  # [N, K]
    return np.where(fits.any(1), fits.argmax(1), -1)


def choose_buckets(lengths: np.ndarray, num_buckets: int, multiple: int = 8,
                   cap: tuple[int, int, int] | None = None, read_weight: float = 1.0) -> tuple[Bucket, ...]:
    """At most `num_buckets` shapes covering every row of `lengths` [N, 3] (rows beyond `cap` excluded).

    Returned cheapest first (the order assign_buckets needs for cheapest-fit).
    """
    lengths = np.asarray(lengths).reshape(-1, 3)
    if cap is not None:
        lengths = lengths[(lengths <= np.asarray(cap)).all(1)]
    if len(lengths) == 0:
        return ()
    rounded = round_up(lengths, multiple)
    if cap is not None:
        rounded = np.minimum(rounded, np.asarray(cap))
    points, counts = np.unique(rounded, axis=0, return_counts=True)
    order = np.lexsort((points[:, 1], points[:, 0], points[:, 2], read_weight * points[:, 0] + points[:, 2]))
    points, counts = points[order], counts[order]
    cuts = _best_cuts(points[:, 0], points[:, 2], counts, num_buckets, read_weight)
    buckets = order_buckets((g.max(0) for g in np.split(points, cuts)), read_weight)
    for _ in range(4):  # shrink each bucket to what it receives under cheapest-fit (drops empty ones)
        ids = assign_buckets(rounded, buckets)
        shrunk = order_buckets((rounded[ids == k].max(0) for k in np.unique(ids)), read_weight)
        if shrunk == buckets:
            break
        buckets = shrunk
    return buckets


def _best_cuts(r: np.ndarray, t: np.ndarray, counts: np.ndarray, k: int, read_weight: float = 1.0
               ) -> list[int]:
    """Cut points splitting the sorted points into <= k groups with minimal padded cost (O(k n^2))."""
    n = len(r)
    k = min(k, n)
    csum = np.concatenate([[0], np.cumsum(counts)])
    cost = np.full((k + 1, n + 1), np.inf)
    back = np.zeros((k + 1, n + 1), np.int64)
    cost[0, 0] = 0
    for j in range(1, n + 1):
        # group [i, j) for every i < j: size * (max R + max T) over the group
        mr = np.maximum.accumulate(r[:j][::-1])[::-1]
        mt = np.maximum.accumulate(t[:j][::-1])[::-1]
        group = (csum[j] - csum[:j]) * (read_weight * mr + mt)
        for g in range(1, k + 1):
            total = cost[g - 1, :j] + group
            i = int(np.argmin(total))
            cost[g, j], back[g, j] = total[i], i
    g = int(np.argmin(cost[1:, n])) + 1
    cuts, j = [], n
    while g > 0:
        j = int(back[g, j])
        cuts.append(j)
        g -= 1
    return sorted(c for c in cuts if c > 0)


BATCH_FIELDS = ("read_tokens", "read_valid", "read_positions", "slot_mask", "decoder_tokens", "decoder_valid",
                "write_positions", "loss_mask", "target_positions", "target_mask", "read_layer", "slot_layers",
                "example_id")


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
        "read_layer": np.full((b,), default_layer, np.int32), "slot_layers": np.full((b, s), default_layer, np.int32),
        "example_id": np.full((b,), -1, np.int32),
    }


def collate(examples: Sequence[dict[str, Any] | None], example_ids: Sequence[int], bucket: Bucket,
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
        batch["slot_layers"][row, :s] = ex["slot_layers"] if "slot_layers" in ex else ex["read_layer"]
        batch["example_id"][row] = eid
    batch["target_positions"], batch["target_mask"] = target_positions(batch["loss_mask"], num_targets)
    return batch


def fit_bucket(examples: Sequence[dict[str, Any]], multiples: tuple[int, int, int, int] = (16, 8, 16, 8)
               ) -> tuple[int, int, int, int]:
    """The smallest (R, S, T, P) holding every example: each length rounded up to its multiple
    (bucket_length: never 0, so a row without slots or targets still has a shape).
    Raises ValueError for no examples."""
    if not examples:
        raise ValueError("no examples to fit a bucket to")
    from lit_jax.padding import bucket_length

    r, s, t, p = multiples
    return (bucket_length(max(len(e["read_tokens"]) for e in examples), r),
            bucket_length(max(len(e["read_positions"]) for e in examples), s),
            bucket_length(max(len(e["decoder_tokens"]) for e in examples), t),
            bucket_length(max(int(np.sum(e["loss_mask"])) for e in examples), p))


def fixed_rows(examples: Sequence[dict[str, Any]], rows: int, bucket: tuple[int, int, int, int], pad_id: int,
               default_layer: int) -> dict[str, np.ndarray]:
    """`examples` collated into a [rows, ...] batch of `bucket`'s (R, S, T, P) shape; rows past the
    examples are dummy rows without targets. One shape per (rows, bucket): a jitted function
    fed these compiles once per bucket. Raises ValueError for more examples than rows or one
    that does not fit."""
    if len(examples) > rows:
        raise ValueError(f"{len(examples)} examples for a batch of {rows} rows")
    padded = list(examples) + [None] * (rows - len(examples))
    return collate(padded, range(rows), tuple(bucket[:3]), pad_id, default_layer, bucket[3])
