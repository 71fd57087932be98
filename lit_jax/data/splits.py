"""Train / held-out split by label (never by example), per label family, with a fixed seed.

Within each family (latentqa, relations, classification, jsonl) the sorted labels are
permuted by a generator seeded with (split_seed, family) and the first
round(fraction * n) are held out (at least one when fraction > 0 and the family has two
or more labels; never all of them). A label is held out in every file it occurs in (a
LatentQA persona appears in control, stimulus and system files alike), so no held-out
persona, goal, relation or dataset is seen in training.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np

from lit_jax.data.records import Record


def heldout_labels(labels: Iterable[str], fraction: float, seed: int, family: str) -> set[str]:
    labels = sorted(set(labels))
    if fraction <= 0 or len(labels) < 2:
        return set()
    n = min(max(1, round(fraction * len(labels))), len(labels) - 1)
    order = np.random.default_rng([seed, zlib.crc32(family.encode())]).permutation(len(labels))
    return {labels[i] for i in order[:n]}


def split_by_label(families: list[tuple[str, list[Record]]], fraction: float, seed: int
                   ) -> dict[str, list[Record]]:
    """{'train': [...], 'heldout': [...]} keeping the records' order within each split."""
    by_family: dict[str, set[str]] = {}
    for fam, records in families:
        by_family.setdefault(fam, set()).update(r.label for r in records)
    held = set().union(*(heldout_labels(ls, fraction, seed, fam) for fam, ls in by_family.items()))
    out: dict[str, list[Record]] = {"train": [], "heldout": []}
    for _, records in families:
        for r in records:
            out["heldout" if r.label in held else "train"].append(r)
    return out
