"""Static shapes for jitted code: lengths rounded up to a multiple, sequences padded to them.

Every jitted function compiles once per input shape, so variable lengths are rounded up
to a few sizes (a multiple, or a bucket) before they reach it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(n, multiple: int):
    """The smallest multiple of `multiple` that is >= n (0 stays 0); works on ints and integer arrays."""
    if multiple <= 0:
        raise ValueError(f"multiple={multiple} must be positive")
    return -(-n // multiple) * multiple


def bucket_length(n: int, multiple: int = 16) -> int:
    """A padded length for n tokens: round_up(n, multiple), at least one multiple (never 0)."""
    return round_up(max(int(n), 1), multiple)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left", length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, T], valid bool [B, T]): each sequence padded on `side` to `length`
    (default: `bucket_length` of the longest).

    Raises ValueError for an unknown side, no sequences, an empty sequence, or a sequence
    longer than `length`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}; expected 'left' or 'right'")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_batch needs at least one sequence, none of them empty")
    longest = max(len(s) for s in sequences)
    length = length or bucket_length(longest)
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, s in enumerate(sequences):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        tokens[i, sl] = s
        valid[i, sl] = True
    return tokens, valid
