"""Packs collated example rows into prefix trees (a LitBatch): shared prefixes computed once, no padding.

In a LIT batch most decoder tokens repeat: every row starts with the same chat-template
prefix (SmolLM2's default system prompt and the user header: 24 tokens), and the QA pairs
of one dialog share its placeholders and the acknowledgement turn; the target side
repeats the template and, for QA pairs of one dialog, the whole read dialog. Packing
merges the rows of a batch into a trie per packed row (read and decoder side each), laid
out in depth-first order: a `TokenTree` (batch.py) whose `subtree_end` (the last index of
each node's subtree) is the attention mask and whose `depth` is the rotary position, so
every node attends to exactly its ancestors, each original sequence is computed as it
would be alone, and a shared node's gradient is the sum over the sequences that share
it: the loss and its gradients equal the unpacked batch's (tests/test_packing.py).

Decoder nodes are keyed by (token, what is written there): a placeholder node holds the
read node and layer its activation comes from, so two placeholders merge only when the
same activation is written into them. `Slots` then has one entry per written node,
`Targets` one per answer token (its logit position is the parent node).

Sizes are padded to a few levels per bucket (`PackedSizes`) so a run compiles few shapes;
`StepBatches` turns the iterator's rows into the step's LitBatch, packed or plain.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

import jax
import numpy as np

from lit_jax.data.batch import LitBatch, Slots, Targets, TokenTree, plain_batch
from lit_jax.padding import round_up

SIDES = ("read", "slot", "decoder", "target")  # the lengths a packed batch needs


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

def _row_groups(real: list[int], num_rows: int) -> list[list[int]]:
    """Examples -> packed rows: contiguous runs (the iterator keeps a dialog's QA pairs adjacent)."""
    per = -(-len(real) // num_rows) if real else 0
    return [real[i * per:(i + 1) * per] for i in range(num_rows)]


def _pack_rows(rows: dict[str, np.ndarray], num_rows: int) -> tuple[list[dict], dict[str, int]]:
    """(each packed row's arrays, the lengths they need: the longest packed row per side)."""
    if num_rows < 1:
        raise ValueError(f"num_rows={num_rows}: pack into at least one row")
    real = [i for i in range(rows["decoder_tokens"].shape[0]) if rows["decoder_valid"][i].any()]
    packed = [_pack_row(rows, group) for group in _row_groups(real, num_rows)]
    return packed, {k: max(len(p[k][-1]) for p in packed) for k in SIDES}


def pack_batch(rows: dict[str, np.ndarray], num_rows: int = 1, multiple: int = 16,
               sizes: Callable[[dict[str, int]], dict[str, int]] | None = None) -> LitBatch:
    """Collated example rows (batching.py `collate`) -> a LitBatch of `num_rows` packed rows. Dummy rows are dropped.

    sizes: maps the needed {"read", "slot", "decoder", "target"} lengths to the padded ones
    (default: each rounded up to `multiple`, at least one multiple; in training, `PackedSizes`).
    Padding entries are 0 with every mask False.
    """
    packed, needed = _pack_rows(rows, num_rows)
    sizes = sizes(needed) if sizes is not None else {k: round_up(max(n, 1), multiple) for k, n in needed.items()}
    if any(sizes[k] < n for k, n in needed.items()):
        raise ValueError(f"padded sizes {sizes} below the packed lengths {needed}")

    def zeros(side: str, dtype=np.int32) -> np.ndarray:
        return np.zeros((num_rows, sizes[side]), dtype)

    read = TokenTree(zeros("read"), zeros("read", bool), zeros("read"), zeros("read"))
    decoder = TokenTree(zeros("decoder"), zeros("decoder", bool), zeros("decoder"), zeros("decoder"))
    slots = Slots(zeros("slot"), zeros("slot"), zeros("slot"), zeros("slot", bool))
    targets = Targets(zeros("target"), zeros("target"), zeros("target", bool))
    count = np.zeros((num_rows,), np.int32)
    for r, p in enumerate(packed):
        for tree, (tokens, depth, end) in ((read, p["read"]), (decoder, p["decoder"])):
            n = len(tokens)
            tree.tokens[r, :n], tree.depth[r, :n], tree.subtree_end[r, :n], tree.valid[r, :n] = tokens, depth, end, True
        read_at, layer, write_at = p["slot"]
        n = len(read_at)
        slots.read_positions[r, :n], slots.layer[r, :n], slots.write_positions[r, :n] = read_at, layer, write_at
        slots.mask[r, :n] = True
        logit_at, target = p["target"]
        n = len(target)
        targets.logit_positions[r, :n], targets.tokens[r, :n], targets.mask[r, :n] = logit_at, target, True
        count[r] = p["count"]
    return LitBatch(read=read, slots=slots, decoder=decoder, targets=targets, decoder_count=count)


def target_examples(rows: dict[str, np.ndarray], num_rows: int = 1) -> list[np.ndarray]:
    """Per packed row, the row index (into `rows`) of the example each packed target belongs to,
    int32 [that row's target count]: the order `pack_batch(rows, num_rows)` writes its targets
    (the row's examples in order, each one's loss_mask positions ascending), so per-example sums
    of a packed row's target values are a bincount over these indices."""
    real = [i for i in range(rows["decoder_tokens"].shape[0]) if rows["decoder_valid"][i].any()]
    counts = np.asarray(rows["loss_mask"], bool).sum(axis=1)
    return [np.repeat(np.asarray(g, np.int32), counts[g]).astype(np.int32) for g in _row_groups(real, num_rows)]


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
        return {k: round_up(max(n, 1), self.multiple) for k, n in need.items()}

    def plan(self, key: Hashable, needs: Sequence[dict[str, int]]) -> None:
        needs = sorted(needs, key=lambda n: n["decoder"])
        groups = [g for g in np.array_split(np.arange(len(needs)), min(self.max_levels, len(needs))) if len(g)]
        self._levels[key] = [self.rounded({k: max(needs[i][k] for i in g) for k in needs[0]}) for g in groups]

    def get_state(self) -> list[dict]:
        """The levels as JSON (saved with a checkpoint): a resumed run pads its batches to the shapes
        the uninterrupted run would, so XLA sums in the same order and the run is bitwise the same."""
        return [{"key": [int(k) for k in key], "levels": [{k: int(v) for k, v in lv.items()} for lv in levels]}
                for key, levels in self._levels.items()]

    def set_state(self, state: Sequence[dict]) -> None:
        """Replaces the levels with those `get_state` returned (in the saved order: growth picks among them)."""
        self._levels = {tuple(entry["key"]): [{k: int(v) for k, v in lv.items()} for lv in entry["levels"]]
                        for entry in state}

    def levels(self, key: Hashable) -> list[dict[str, int]]:
        """The padded sizes bucket `key`'s batches take so far, smallest first: the shapes they compile to."""
        return sorted((dict(lv) for lv in self._levels.get(key, [])), key=lambda lv: lv["decoder"])

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


def bucket_key(rows: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The collated rows' shape: packed batches from one bucket share their padded sizes."""
    return tuple(rows[k].shape[1] for k in ("read_tokens", "read_positions", "decoder_tokens", "target_positions"))


def agree_across_processes(need: dict[str, int]) -> dict[str, int]:
    """The most each length is needed on any process (every process must feed arrays of one shape)."""
    if jax.process_count() == 1:
        return need
    from jax.experimental import multihost_utils

    names = sorted(need)
    most = multihost_utils.process_allgather(np.asarray([need[k] for k in names])).max(axis=0)
    return dict(zip(names, (int(x) for x in most)))


class StepBatches:
    """The iterator's collated rows as the step takes them: a LitBatch, packed into prefix trees when `pack`.

    pack=False: `plain_batch` (one chain per row). pack=True: `num_rows` packed rows, padded to
    `PackedSizes` levels (`multiple`, `levels` per bucket); with several processes a batch's
    needed sizes are the maximum over processes (one small host all-gather per batch).
    """

    def __init__(self, pack: bool, num_rows: int, multiple: int = 16, levels: int = 3):
        self.pack, self.num_rows, self.multiple = bool(pack), int(num_rows), int(multiple)
        self.sizes = PackedSizes(self.multiple, levels)

    def __call__(self, rows: dict[str, np.ndarray]) -> LitBatch:
        if not self.pack:
            return plain_batch(rows)
        key = bucket_key(rows)
        return pack_batch(rows, self.num_rows, self.multiple,
                          sizes=lambda need: self.sizes(key, agree_across_processes(need)))

    def presize(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        """Plans the size levels from `batches` (a look-ahead), so the run starts with the shapes it will use."""
        if not self.pack:
            return
        needs: dict[tuple, list[dict[str, int]]] = {}
        for rows in batches:
            needs.setdefault(bucket_key(rows), []).append(agree_across_processes(_pack_rows(rows, self.num_rows)[1]))
        for key, seen in needs.items():
            self.sizes.plan(key, seen)


def _pack_row(rows: dict[str, np.ndarray], examples: list[int]) -> dict:
    """The examples (row indices of `rows`) merged into one read trie and one decoder trie."""
    read, decoder = Trie(), Trie()
    read_len = {i: int(rows["read_valid"][i].sum()) for i in examples}
    for i in examples:
        read.insert(rows["read_tokens"][i, :read_len[i]].tolist())
    read_keys, read_depth, read_end, read_paths = read.layout()

    dec_len = {i: int(rows["decoder_valid"][i].sum()) for i in examples}
    for j, i in enumerate(examples):
        keys: list[Hashable] = rows["decoder_tokens"][i, :dec_len[i]].tolist()
        slots = np.flatnonzero(rows["slot_mask"][i])
        for s in slots:  # a written position is keyed by the activation written there
            w = int(rows["write_positions"][i, s])
            layer = rows["slot_layers"][i, s] if "slot_layers" in rows else rows["read_layer"][i]
            keys[w] = (keys[w], int(read_paths[j][rows["read_positions"][i, s]]), int(layer))
        decoder.insert(keys)
    dec_keys, dec_depth, dec_end, dec_paths = decoder.layout()

    written = {}  # decoder node -> (read node, layer), in depth-first order
    for at, key in enumerate(dec_keys):
        if isinstance(key, tuple):
            written[at] = key[1:]
    dec_tokens = np.asarray([k[0] if isinstance(k, tuple) else k for k in dec_keys], np.int32)

    logit_at, target = [], []
    for j, i in enumerate(examples):
        for t in np.flatnonzero(rows["loss_mask"][i]):
            if t == 0:
                raise ValueError(f"row {i}: a target at position 0 has no preceding token to predict it")
            logit_at.append(dec_paths[j][t - 1])
            target.append(rows["decoder_tokens"][i, t])
    at = np.asarray(sorted(written), np.int32)
    return dict(  # side -> arrays of one length (the last one's length is the size before rounding)
        read=(np.asarray(read_keys, np.int32), read_depth, read_end),
        decoder=(dec_tokens, dec_depth, dec_end),
        slot=(np.asarray([written[a][0] for a in at], np.int32), np.asarray([written[a][1] for a in at], np.int32), at),
        target=(np.asarray(logit_at, np.int32), np.asarray(target, np.int32)),
        count=sum(dec_len.values()),
    )
