"""The step's batch: one typed pytree, built on the host, the only form the LIT step takes.

A LIT batch has rows; each row holds token sequences laid out as a prefix tree in
depth-first order (data/packing.py merges a batch's shared prefixes that way). A plain
(unpacked) row is the same thing with one chain: depth = position, and every token's
subtree runs to the end of the row. So there is one contract and one code path.

  TokenTree    tokens / valid / depth / subtree_end          [B, n] each
  Slots        read_positions / layer / write_positions / mask   [B, S] each
  Targets      logit_positions / tokens / mask                [B, P] each
  LitBatch     read: TokenTree (the target's input), slots, decoder: TokenTree,
               targets, decoder_count [B]

Attention inside a TokenTree: query t sees key s iff valid[s] and s <= t <= subtree_end[s];
rotary position = depth. Each sequence then computes exactly what it would alone. Plain
rows carry subtree_end=None (every row one causal chain), which lets GPUs use a fused
causal kernel instead of a mask.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


def _pytree(cls):
    """A frozen dataclass whose fields are all arrays (pytree leaves)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])


@_pytree
class TokenTree:
    """Token rows laid out as prefix trees (depth-first), or plain chains.

    tokens int32 [B, n]; valid bool [B, n] (False: padding); depth int32 [B, n] (rotary
    position: the token's depth in its tree); subtree_end int32 [B, n] (the index of the
    last token in this token's subtree: key s is visible to queries s..subtree_end[s]), or
    None: each row is one right-padded causal chain.
    """

    tokens: np.ndarray
    valid: np.ndarray
    depth: np.ndarray
    subtree_end: np.ndarray


@_pytree
class Slots:
    """One entry per activation written into the decoder.

    read_positions int32 [B, S]: index into the read tree of the activation read;
    layer int32 [B, S]: the target layer it is read at; write_positions int32 [B, S]:
    index into the decoder tree where it is written; mask bool [B, S]: slot in use.
    """

    read_positions: np.ndarray
    layer: np.ndarray
    write_positions: np.ndarray
    mask: np.ndarray


@_pytree
class Targets:
    """One entry per answer (loss) token.

    logit_positions int32 [B, P]: index into the decoder tree whose logits predict the
    target (the token before it, or its parent in a tree); tokens int32 [B, P]: the
    target token ids; mask bool [B, P]: entry in use.
    """

    logit_positions: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray


@_pytree
class LitBatch:
    """What one LIT step consumes (numpy on the host, jax.Arrays on device).

    decoder_count int32 [B]: decoder tokens of the row's sequences before merging
    (shared prefixes counted once per sequence), for tokens/s.
    """

    read: TokenTree
    slots: Slots
    decoder: TokenTree
    targets: Targets
    decoder_count: np.ndarray


def chains(tokens: np.ndarray, valid: np.ndarray) -> TokenTree:
    """Plain right-padded rows as a TokenTree: one causal chain per row.

    tokens int32 [B, n], valid bool [B, n] (a prefix of each row) -> depth = position,
    subtree_end = None. Raises ValueError when a row is not right-padded.
    """
    valid = np.asarray(valid, bool)
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("plain rows must be right-padded (valid tokens first, then padding)")
    depth = np.maximum(np.cumsum(valid, axis=1, dtype=np.int32) - 1, 0).astype(np.int32)
    return TokenTree(np.asarray(tokens, np.int32), valid, depth, None)


def plain_batch(rows: dict[str, np.ndarray]) -> LitBatch:
    """Collated example rows (data/batching.py `collate`) as a LitBatch without merging: one chain per row.

    rows: read_tokens/read_valid [B, R], read_positions/slot_mask/write_positions [B, S],
    decoder_tokens/decoder_valid [B, T], target_positions/target_mask [B, P], read_layer [B]
    (and slot_layers [B, S], the layer each slot reads, when given).
    """
    targets = np.asarray(rows["target_positions"], np.int32)
    return LitBatch(
        read=chains(rows["read_tokens"], rows["read_valid"]),
        slots=Slots(
            read_positions=np.asarray(rows["read_positions"], np.int32),
            layer=(np.asarray(rows["slot_layers"], np.int32) if "slot_layers" in rows else
                   np.broadcast_to(np.asarray(rows["read_layer"], np.int32)[:, None],
                                   rows["read_positions"].shape).copy()),
            write_positions=np.asarray(rows["write_positions"], np.int32),
            mask=np.asarray(rows["slot_mask"], bool),
        ),
        decoder=chains(rows["decoder_tokens"], rows["decoder_valid"]),
        targets=Targets(
            logit_positions=np.maximum(targets - 1, 0).astype(np.int32),  # logits at t-1 predict token t
            tokens=np.take_along_axis(np.asarray(rows["decoder_tokens"], np.int32), targets, axis=1),
            mask=np.asarray(rows["target_mask"], bool),
        ),
        decoder_count=np.asarray(rows["decoder_valid"], bool).sum(axis=1).astype(np.int32),
    )
