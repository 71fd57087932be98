"""Packs a collated batch into prefix trees: shared prefixes are computed once, padding is gone.

In a LIT batch most decoder tokens repeat: every row starts with the same chat-template
prefix (SmolLM2's default system prompt and the user header: 24 tokens), and the QA pairs
of one dialog share its placeholders and the acknowledgement turn; the target side
repeats the template and, for QA pairs of one dialog, the whole read dialog. Packing
merges the rows of a batch into a trie per packed row (decoder and target each), laid
out in depth-first order. With `tree_end` (the last index of each node's subtree) as
the attention mask and the depth as the rotary position, every node attends to exactly
its ancestors, so each original sequence is computed as it would be alone, and a
shared node's gradient is the sum over the sequences that share it: the loss and its
gradients equal the unpacked batch's (tests/test_packing.py).

Decoder nodes are keyed by (token, what is written there): a placeholder node holds the
read node and layer its activation comes from, so two placeholders merge only when the
same activation is written into them.

Packed fields ([rows, n] per field; `PACKED_KEYS` in lit/loss.py):
  read_tokens, read_valid, read_pos, read_end               the target trie
  read_positions, slot_layer, slot_mask, write_positions    one entry per written node
  decoder_tokens, decoder_valid, decoder_pos, decoder_end   the decoder trie
  logit_positions, target_tokens, target_mask               one entry per answer token
  decoder_count                                             unpacked decoder tokens (for tok/s)
Sizes are padded to a few levels per bucket (`PackedSizes`) so a run compiles few shapes.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np


class Trie:
    """Sequences of hashable keys merged on common prefixes; nodes numbered depth-first."""

    def __init__(self):
        self._children: list[dict[Hashable, int]] = [{}]  # node 0: the virtual root
        self._keys: list[Hashable] = [None]
        self._paths: list[list[int]] = []

    def insert(self, keys: Sequence[Hashable]) -> None:
        """Adds a sequence; `layout` gives its node indices, in insertion order."""
        node, path = 0, []
        for key in keys:
            nxt = self._children[node].get(key)
            if nxt is None:
                nxt = len(self._keys)
                self._children[node][key] = nxt
                self._children.append({})
                self._keys.append(key)
            path.append(nxt)
            node = nxt
        self._paths.append(path)

    def layout(self) -> tuple[list[Hashable], np.ndarray, np.ndarray, list[np.ndarray]]:
        """(keys, depth, subtree end, per-sequence indices), all in depth-first order (root excluded)."""
        n = len(self._keys) - 1
        order = np.zeros(n + 1, np.int64)  # node -> depth-first index
        depth, end = np.zeros(n, np.int32), np.zeros(n, np.int32)
        keys: list[Hashable] = [None] * n
        counter = 0
        stack = [(child, 0, False) for child in reversed(list(self._children[0].values()))]
        while stack:
            node, d, closing = stack.pop()
            if closing:
                end[order[node]] = counter - 1
                continue
            order[node] = counter
            keys[counter], depth[counter] = self._keys[node], d
            counter += 1
            stack.append((node, d, True))
            stack.extend((child, d + 1, False) for child in reversed(list(self._children[node].values())))
        paths = [order[np.asarray(p, np.int64)].astype(np.int32) for p in self._paths]
        return keys, depth, end, paths


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _row_groups(real: list[int], rows: int) -> list[list[int]]:
    """Examples -> packed rows: contiguous runs (the iterator keeps a dialog's QA pairs adjacent)."""
    per = -(-len(real) // rows) if real else 0
    return [real[i * per:(i + 1) * per] for i in range(rows)]


class PackedSizes:
    """Padded sizes for packed batches: a few size levels per batch bucket.

    Packed lengths vary from batch to batch; rounding each up would still give a new shape
    (a new compilation, seconds each) on most steps, and padding every batch of a bucket to
    its largest would waste much of what packing saves. `plan` splits a look-ahead's
    needs into `levels` groups by decoder length and gives each group the sizes that fit
    all of it; a batch then takes the smallest level it fits. One that fits none adds a
    level (up to `levels`) or grows the largest, so a run compiles a handful of shapes.
    """

    def __init__(self, multiple: int = 16, levels: int = 3):
        self.multiple, self.max_levels = multiple, levels
        self._levels: dict[Hashable, list[dict[str, int]]] = {}

    def rounded(self, need: dict[str, int]) -> dict[str, int]:
        return {k: round_up(n, self.multiple) for k, n in need.items()}

    def plan(self, key: Hashable, needs: Sequence[dict[str, int]]) -> None:
        needs = sorted(needs, key=lambda n: n["decoder"])
        groups = [g for g in np.array_split(np.arange(len(needs)), min(self.max_levels, len(needs))) if len(g)]
        self._levels[key] = [self.rounded({k: max(needs[i][k] for i in g) for k in needs[0]}) for g in groups]

    def __call__(self, key: Hashable, need: dict[str, int]) -> dict[str, int]:
        levels = self._levels.setdefault(key, [])
        fits = [lv for lv in levels if all(n <= lv[k] for k, n in need.items())]
        if fits:
            return min(fits, key=lambda lv: lv["decoder"])
        if len(levels) < self.max_levels:
            levels.append(self.rounded(need))
            return levels[-1]
        largest = max(levels, key=lambda lv: lv["decoder"])
        largest.update({k: max(largest[k], v) for k, v in self.rounded(need).items()})
        return largest

    def shapes(self) -> int:
        return sum(len(v) for v in self._levels.values())


def bucket_key(batch: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The collated batch's shape: packed batches from one bucket share their padded sizes."""
    return tuple(batch[k].shape[1] for k in ("read_tokens", "read_positions", "decoder_tokens", "target_positions"))


def pack_batch(batch: dict[str, np.ndarray], rows: int = 1, multiple: int = 16,
               sizes: Callable[[dict[str, int]], dict[str, int]] | None = None) -> dict[str, np.ndarray]:
    """A collated batch (batching.py) -> `rows` packed rows (module docstring). Dummy rows are dropped.

    sizes: maps the needed {"read", "slot", "decoder", "target"} lengths to the padded ones
    (default: each rounded up to `multiple`; in training, `PackedSizes`).
    """
    if rows < 1:
        raise ValueError(f"rows={rows}: pack into at least one row")
    real = [i for i in range(batch["decoder_tokens"].shape[0]) if batch["decoder_valid"][i].any()]
    packed = []
    for group in _row_groups(real, rows):
        packed.append(_pack_row(batch, group))
    needed = {k: max(len(p[k][-1]) for p in packed) for k in ("read", "slot", "decoder", "target")}
    sizes = sizes(needed) if sizes is not None else {k: round_up(n, multiple) for k, n in needed.items()}
    if any(sizes[k] < n for k, n in needed.items()):
        raise ValueError(f"padded sizes {sizes} below the packed lengths {needed}")
    out = {
        "read_tokens": np.zeros((rows, sizes["read"]), np.int32), "read_valid": np.zeros((rows, sizes["read"]), bool),
        "read_pos": np.zeros((rows, sizes["read"]), np.int32), "read_end": np.zeros((rows, sizes["read"]), np.int32),
        "read_positions": np.zeros((rows, sizes["slot"]), np.int32),
        "slot_layer": np.zeros((rows, sizes["slot"]), np.int32),
        "slot_mask": np.zeros((rows, sizes["slot"]), bool),
        "write_positions": np.zeros((rows, sizes["slot"]), np.int32),
        "decoder_tokens": np.zeros((rows, sizes["decoder"]), np.int32),
        "decoder_valid": np.zeros((rows, sizes["decoder"]), bool),
        "decoder_pos": np.zeros((rows, sizes["decoder"]), np.int32),
        "decoder_end": np.zeros((rows, sizes["decoder"]), np.int32),
        "logit_positions": np.zeros((rows, sizes["target"]), np.int32),
        "target_tokens": np.zeros((rows, sizes["target"]), np.int32),
        "target_mask": np.zeros((rows, sizes["target"]), bool),
        "decoder_count": np.zeros((rows,), np.int32),
    }
    for r, p in enumerate(packed):
        for side in ("read", "decoder"):
            tokens, depth, end = p[side]
            n = len(tokens)
            out[f"{side}_tokens"][r, :n], out[f"{side}_pos"][r, :n], out[f"{side}_end"][r, :n] = tokens, depth, end
            out[f"{side}_valid"][r, :n] = True
        read_at, layer, write_at = p["slot"]
        n = len(read_at)
        out["read_positions"][r, :n], out["slot_layer"][r, :n], out["write_positions"][r, :n] = read_at, layer, write_at
        out["slot_mask"][r, :n] = True
        logit_at, target = p["target"]
        n = len(target)
        out["logit_positions"][r, :n], out["target_tokens"][r, :n], out["target_mask"][r, :n] = logit_at, target, True
        out["decoder_count"][r] = p["count"]
    return out


def _pack_row(batch: dict[str, np.ndarray], examples: list[int]) -> dict:
    read, decoder = Trie(), Trie()
    read_len = {i: int(batch["read_valid"][i].sum()) for i in examples}
    for i in examples:
        read.insert(batch["read_tokens"][i, :read_len[i]].tolist())
    read_keys, read_depth, read_end, read_paths = read.layout()

    dec_len = {i: int(batch["decoder_valid"][i].sum()) for i in examples}
    for j, i in enumerate(examples):
        keys: list[Hashable] = batch["decoder_tokens"][i, :dec_len[i]].tolist()
        slots = np.flatnonzero(batch["slot_mask"][i])
        for s in slots:  # a written position is keyed by the activation written there
            w = int(batch["write_positions"][i, s])
            keys[w] = (keys[w], int(read_paths[j][batch["read_positions"][i, s]]), int(batch["read_layer"][i]))
        decoder.insert(keys)
    dec_keys, dec_depth, dec_end, dec_paths = decoder.layout()

    written = {}  # decoder node -> (read node, layer), in depth-first order
    for at, key in enumerate(dec_keys):
        if isinstance(key, tuple):
            written[at] = key[1:]
    dec_tokens = np.asarray([k[0] if isinstance(k, tuple) else k for k in dec_keys], np.int32)

    logit_at, target = [], []
    for j, i in enumerate(examples):
        for t in np.flatnonzero(batch["loss_mask"][i]):
            if t == 0:
                raise ValueError(f"row {i}: a target at position 0 has no preceding token to predict it")
            logit_at.append(dec_paths[j][t - 1])
            target.append(batch["decoder_tokens"][i, t])
    at = np.asarray(sorted(written), np.int32)
    return dict(  # side -> arrays of one length (the last one's length is the size before rounding)
        read=(np.asarray(read_keys, np.int32), read_depth, read_end),
        decoder=(dec_tokens, dec_depth, dec_end),
        slot=(np.asarray([written[a][0] for a in at], np.int32), np.asarray([written[a][1] for a in at], np.int32), at),
        target=(np.asarray(logit_at, np.int32), np.asarray(target, np.int32)),
        count=sum(dec_len.values()),
    )
