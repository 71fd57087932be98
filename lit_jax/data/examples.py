"""Records -> tokenized examples (variable-length numpy arrays + what they came from).

An example:
  read_tokens int32 [R], read_positions int32 [S]   the target's input and the read span
  decoder_tokens int32 [T], write_positions int32 [S], loss_mask bool [T]
  read_layer int32; label, source, record_index, question, answer, read (JSON)
Tokenizer calls are batched (one per read kind; two for all decoder sequences, see DecoderFormat.examples).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from lit_jax.data.chat import TemplateError, read_text, tokenize_reads
from lit_jax.data.decoder import DecoderFormat
from lit_jax.data.errors import BadRecords
from lit_jax.data.records import Record

ARRAY_FIELDS = ("read_tokens", "read_positions", "decoder_tokens", "write_positions", "loss_mask")


def pick_layers(n: int, layers: Sequence[int], seed: int) -> np.ndarray:
    """One read layer per example: the fixed layer, or a seeded draw from `layers`."""
    layers = np.asarray(layers, np.int32)
    if len(layers) == 1:
        return np.full(n, layers[0], np.int32)
    return layers[np.random.default_rng([seed, 1]).integers(0, len(layers), n)]


def read_key(r: Record) -> tuple:
    """Records with the same key read the same tokens (e.g. the QA pairs of one LatentQA record)."""
    return r.dialog, r.read_from_turn, r.generation_prompt, r.text, r.read_chars


def tokenize_records(records: Sequence[Record], tokenizer: Any, fmt: DecoderFormat, read_layers: Sequence[int],
                     bad: BadRecords, seed: int = 0, all_layers: bool = False) -> list[dict[str, Any]]:
    """Examples for the records that tokenize cleanly (bad ones are reported to `bad`).

    One read layer per example (sampled from read_layers), or with all_layers every layer,
    one placeholder run each: read_positions then repeat per layer and slot_layers [runs * S]
    says which layer each slot reads.

    Each distinct read is rendered and tokenized once and its arrays shared (never mutated).
    """
    reads: dict[tuple, Any] = {}
    kept = []
    for r in records:
        key = read_key(r)
        if key not in reads:
            try:
                reads[key] = read_text(tokenizer, r)
            except TemplateError as e:
                reads[key] = e
        if isinstance(reads[key], TemplateError):
            bad.report(r.source, r.index, str(reads[key]))
        else:
            kept.append(r)
    keys = [k for k, v in reads.items() if not isinstance(v, TemplateError)]
    tokenized = dict(zip(keys, tokenize_reads(tokenizer, [reads[k] for k in keys])))
    if all_layers:
        kept = [(r, tuple(int(x) for x in read_layers)) for r in kept]
    else:
        kept = [(r, int(layer)) for r, layer in zip(kept, pick_layers(len(kept), read_layers, seed))]
    empty = [(r, layer) for r, layer in kept if tokenized[read_key(r)][1].size == 0]
    for r, _ in empty:
        bad.report(r.source, r.index, "the read span holds no tokens")
    kept = [(r, layer) for r, layer in kept if tokenized[read_key(r)][1].size > 0]
    built = fmt.examples([(len(tokenized[read_key(r)][1]), r.question, r.answer, layer) for r, layer in kept])
    out = []
    for (r, layer), ex in zip(kept, built):
        if isinstance(ex, str):
            bad.report(r.source, r.index, ex)
            continue
        read_tokens, read_positions = tokenized[read_key(r)]
        decoder_tokens, write_positions, loss_mask = ex
        layers = np.asarray(layer if all_layers else (layer,), np.int32)
        read_positions = np.tile(read_positions, len(layers))
        assert len(write_positions) == len(read_positions), "decoder slots != read activations"
        out.append({
            "read_tokens": read_tokens, "read_positions": read_positions, "decoder_tokens": decoder_tokens,
            "write_positions": write_positions, "loss_mask": loss_mask, "read_layer": layers[0],
            "slot_layers": np.repeat(layers, len(read_positions) // len(layers)),
            "label": r.label, "source": r.source, "record_index": np.int32(r.index), "question": r.question,
            "answer": r.answer, "read": json.dumps(r.read_description(), ensure_ascii=False),
        })
    return out


def example_lengths(examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """[N, 3] int64 (R, S, T) per example."""
    return np.asarray([(len(e["read_tokens"]), len(e["read_positions"]), len(e["decoder_tokens"])) for e in examples],
                      np.int64).reshape(-1, 3)


def read_groups(examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """[N] int64: per example, the index of the first example that reads the same tokens at the same positions.

    The QA pairs of one dialog form a group; the iterator can keep a group in one batch,
    where packing computes the shared read and decoder prefix once.
    """
    first: dict[bytes, int] = {}
    return np.asarray([first.setdefault(e["read_tokens"].tobytes() + b"|" + e["read_positions"].tobytes(), i)
                       for i, e in enumerate(examples)], np.int64)
