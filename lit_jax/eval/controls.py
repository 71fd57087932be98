"""The decoder variants every task is run with: a result counts as reading only where the
trained decoder beats all of them.

  trained    the decoder as trained, on each example's own activations
  zeros      the same decoder, every activation written replaced by 0 (LitConfig.ablate)
  shuffled   the same decoder on another example's activations (a different label), so
             it answers with real activations that carry the wrong information
  text_only  the same decoder given the read text as plain text in place of the
             placeholders, and no activations: what the question and the visible text
             alone allow (the hidden system prompt is not part of that text)
  untrained  the base model as decoder (LoRA B = 0, identity projection), on the real
             activations: what the architecture gives before any training

Activation Oracles and the LatentQA paper report zero/ablation baselines; the shuffled and
text-only controls follow the faithfulness checks of probing work (Hewitt & Liang 2019,
control tasks).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from lit_jax.lit.read import Read, Reader

CONTROLS = ("zeros", "shuffled", "text_only", "untrained")
VARIANTS = ("trained", *CONTROLS)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the decoder: which reader, whose reads, text instead of activations."""

    name: str
    reader: Reader
    shuffled: bool = False
    text_only: bool = False

    def reads(self, reads: Sequence[Read], labels: Sequence[str], seed: int = 0) -> list[Read]:
        """The reads this variant gives the decoder for examples with these reads and labels."""
        if not self.shuffled:
            return list(reads)
        return [reads[j] for j in other_label_order(labels, seed)]


def zeros_reader(reader: Reader) -> Reader:
    """The same decoder with every written activation replaced by 0."""
    return Reader(reader.base, reader.trainable, reader.cfg, dataclasses.replace(reader.lcfg, ablate="zeros"),
                  reader.tokenizer, reader.data_cfg, sampling=reader.sampling)


def untrained_reader(reader: Reader, seed: int = 0) -> Reader:
    """The decoder as training starts it: the base model (LoRA B = 0, or the base weights for
    a full fine-tune) and the projection's initial (identity) weights."""
    from lit_jax.lit.train_state import init_trainable

    init = jax.device_get(init_trainable(jax.random.key(seed), reader.cfg, reader.lcfg, reader.base))
    return Reader(reader.base, init, reader.cfg, reader.lcfg, reader.tokenizer, reader.data_cfg,
                  sampling=reader.sampling)


def variants(reader: Reader, names: Sequence[str] = VARIANTS, seed: int = 0) -> list[Variant]:
    """The requested variants of `reader`, in order. ValueError for an unknown name."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; choose from {VARIANTS}")
    make = {
        "trained": lambda: Variant("trained", reader),
        "zeros": lambda: Variant("zeros", zeros_reader(reader)),
        "shuffled": lambda: Variant("shuffled", reader, shuffled=True),
        "text_only": lambda: Variant("text_only", reader, text_only=True),
        "untrained": lambda: Variant("untrained", untrained_reader(reader, seed)),
    }
    return [make[n]() for n in names]


def other_label_order(labels: Sequence[str], seed: int = 0) -> np.ndarray:
    """A permutation p with labels[p[i]] != labels[i] for every i: example i gets the read of
    example p[i]. Labels are grouped in a seeded random order and the grouped list is rotated
    by the largest group's size, which moves every example out of its group. ValueError when
    one label holds more than half the examples (no such permutation exists)."""
    labels = list(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"shuffling needs at least 2 examples, got {n}")
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    rank = dict(zip(names, rng.permutation(len(names)).tolist()))
    tiebreak = rng.random(n)
    order = sorted(range(n), key=lambda i: (rank[labels[i]], tiebreak[i]))
    largest = max(labels.count(x) for x in names)
    if 2 * largest > n:
        raise ValueError(f"cannot give every example another label's read: {largest} of {n} examples share a label")
    perm = np.empty(n, np.int64)
    for j, i in enumerate(order):
        perm[i] = order[(j + largest) % n]
    return perm
