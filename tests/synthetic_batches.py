"""Synthetic LIT batches in the data pipeline's format, for step-level tests on tiny models."""

import numpy as np

from lit_jax.data import plain_batch
from lit_jax.data.batching import target_positions


def make_batch(batch=4, read_len=12, slots=3, dec_len=16, vocab=128, read_layer=1, seed=0):
    """Read spans of 2..slots tokens, written at decoder positions 1..; answers of 2..4 tokens at the end."""
    rng = np.random.default_rng(seed)
    b = {
        "read_tokens": rng.integers(3, vocab, (batch, read_len)).astype(np.int32),
        "read_valid": np.ones((batch, read_len), bool),
        "read_positions": np.zeros((batch, slots), np.int32),
        "slot_mask": np.zeros((batch, slots), bool),
        "decoder_tokens": rng.integers(3, vocab, (batch, dec_len)).astype(np.int32),
        "decoder_valid": np.ones((batch, dec_len), bool),
        "write_positions": np.zeros((batch, slots), np.int32),
        "loss_mask": np.zeros((batch, dec_len), bool),
        "read_layer": np.full((batch,), read_layer, np.int32),
        "example_id": np.arange(batch, dtype=np.int32),
    }
    for i in range(batch):
        r_len = read_len - i % 3
        b["read_valid"][i, r_len:] = False
        b["read_tokens"][i, r_len:] = 0
        n = 2 + i % (slots - 1)
        b["read_positions"][i, :n] = np.sort(rng.choice(r_len, n, replace=False))
        b["slot_mask"][i, :n] = True
        b["write_positions"][i, :n] = np.arange(1, n + 1)
        d_len = dec_len - i % 2
        b["decoder_valid"][i, d_len:] = False
        b["decoder_tokens"][i, d_len:] = 0
        ans = 2 + i % 3
        b["loss_mask"][i, d_len - ans:d_len] = True
    b["target_positions"], b["target_mask"] = target_positions(b["loss_mask"], 8)
    return b


class SyntheticIterator:
    """Cycles over fixed synthetic batches; resumable like the real iterator. Optional failure after n batches."""

    def __init__(self, n_batches=3, fail_at=None, **kw):
        self.batches = [make_batch(seed=i, **kw) for i in range(n_batches)]
        self.pos = 0
        self.fail_at = fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_at is not None and self.pos == self.fail_at:
            raise KeyboardInterrupt(f"simulated stop before batch {self.pos}")
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = int(state["pos"])


def make_lit_batch(**kw):
    """`make_batch` rows as the step's LitBatch (plain rows: one chain each)."""
    return plain_batch(make_batch(**kw))
