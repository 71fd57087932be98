"""Length buckets: a few fixed (R, S, T) shapes so the jitted step compiles a handful of times.

R = read length, S = read slots (activations), T = decoder length. The cost of a shape is
w * R + T, w = `read_weight`: a read token costs less than a decoder token (the target
runs only up to the read layer, forward only; the decoder runs every layer forward and
backward), so padding is traded towards the read side. An example goes to the first
bucket (ordered by cost) it fits in every dimension, i.e. the cheapest that fits.
Chosen from the data: lengths rounded up to `multiple`, sorted by cost, cut into
`num_buckets` contiguous groups by dynamic programming minimising the padded cost
sum(count * (w * R_bucket + T_bucket)); each bucket is its group's maximum shape, then
shrunk to the largest example it actually receives.
"""

from __future__ import annotations

import numpy as np

Bucket = tuple[int, int, int]


def round_up(x: np.ndarray, multiple: int) -> np.ndarray:
    return -(-np.asarray(x) // multiple) * multiple


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
