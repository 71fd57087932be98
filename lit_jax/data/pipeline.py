"""Config + tokenizer -> train / held-out example sources (through the tfds store, or in memory).

Steps: read the configured sources into Records (readers.py) -> split by label ->
tokenize (chat template spans, decoder prompt style) -> choose or check the length
buckets (shared by both splits, so they compile the same shapes) -> example ids =
positions in each split -> an ExampleSource per split (storage.py).

The split is by label (never by example), per label family, with a fixed seed: within
each family (latentqa, relations, classification, jsonl) the sorted labels are
permuted by a generator seeded with (split_seed, family) and the first
round(fraction * n) are held out (at least one when fraction > 0 and the family has two
or more labels; never all of them). A label is held out in every file it occurs in (a
LatentQA persona appears in control, stimulus and system files alike), so no held-out
persona, goal, relation or dataset is seen in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Iterable

import numpy as np
from ml_collections import ConfigDict

from lit_jax.data.batching import assign_buckets, choose_buckets, order_buckets
from lit_jax.data.config import check_data_config, resolve_data_dir
from lit_jax.data.decoder import DecoderFormat
from lit_jax.data.errors import BadRecords, log
from lit_jax.data.examples import example_lengths, read_groups, tokenize_records
from lit_jax.data.readers import expand_sources, read_all_sources
from lit_jax.data.records import Record
from lit_jax.data.storage import SPLITS, ExampleSource, is_prepared, read_tfds, write_tfds
from lit_jax.padding import round_up

PIPELINE_VERSION = 5  # bump when the tokenization rules change: old tfds stores are then not reused
# Settings that do not change the prepared examples (batching and storage only).
NOT_CONTENT = ("batch_size", "shuffle_seed", "storage", "tfds_dir", "train_drop_remainder", "data_dir", "group_by_read")


def pad_id_of(tokenizer: Any) -> int:
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


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


def fit_buckets(examples: dict[str, list[dict]], data_cfg: ConfigDict, bad: BadRecords
                ) -> tuple[tuple[tuple[int, int, int], ...], dict[str, list[dict]]]:
    """Buckets (from the config, or chosen from both splits) and the examples that fit one."""
    cap = (int(data_cfg.max_read_tokens), int(data_cfg.max_read_tokens), int(data_cfg.max_decoder_tokens))
    if data_cfg.buckets:
        buckets = order_buckets(data_cfg.buckets, data_cfg.bucket_read_weight)
    else:
        everything = np.concatenate([example_lengths(examples[s]) for s in SPLITS])
        buckets = choose_buckets(everything, data_cfg.num_buckets, data_cfg.bucket_multiple, cap,
                                 data_cfg.bucket_read_weight)
    largest = "buckets " + str([list(b) for b in buckets]) if data_cfg.buckets else (
        f"max_read_tokens={cap[0]}, max_decoder_tokens={cap[2]}")
    kept = {}
    for split in SPLITS:
        ids = assign_buckets(example_lengths(examples[split]), buckets)
        for ex, b in zip(examples[split], ids):
            if b < 0:
                r, s, t = len(ex["read_tokens"]), len(ex["read_positions"]), len(ex["decoder_tokens"])
                bad.report(ex["source"], int(ex["record_index"]),
                           f"too long: read length R={r}, read slots S={s}, decoder length T={t} exceed the longest "
                           f"bucket ({largest})")
        kept[split] = [ex for ex, b in zip(examples[split], ids) if b >= 0]
    return buckets, kept


def bucket_targets(examples: dict[str, list[dict]], buckets, multiple: int) -> list[int]:
    """Per bucket, the most target (loss) tokens of any example in it, rounded up: the step's logits count."""
    most = [1] * len(buckets)
    for split in SPLITS:
        ids = assign_buckets(example_lengths(examples[split]), buckets)
        for ex, b in zip(examples[split], ids):
            most[b] = max(most[b], int(np.sum(ex["loss_mask"])))
    return [round_up(m, multiple) for m in most]


def prepare_examples(data_cfg: ConfigDict, tokenizer: Any) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """({split: [example]}, meta shared by both splits). Bad records raise or are skipped per on_bad_record."""
    check_data_config(data_cfg)
    data_dir = resolve_data_dir(data_cfg)
    bad = BadRecords(data_cfg.on_bad_record)
    records = split_by_label(read_all_sources(data_cfg, data_dir, bad), data_cfg.heldout_fraction,
                             data_cfg.split_seed)
    fmt = DecoderFormat.create(tokenizer, data_cfg)
    examples = {s: tokenize_records(records[s], tokenizer, fmt, data_cfg.read_layers, bad,
                                    seed=data_cfg.split_seed + i, all_layers=data_cfg.get("read_all_layers", False))
                for i, s in enumerate(SPLITS)}
    buckets, examples = fit_buckets(examples, data_cfg, bad)
    bad.warn()
    meta = {
        "buckets": [list(b) for b in buckets],
        "bucket_targets": bucket_targets(examples, buckets, data_cfg.bucket_multiple),
        "pad_id": pad_id_of(tokenizer), "read_layers": list(data_cfg.read_layers),
        "placeholder": fmt.placeholder, "placeholder_id": fmt.placeholder_id, "end_of_turn_id": fmt.end_of_turn_id,
        "prompt_style": fmt.style, "skipped": bad.summary(),
    }
    log.info("prepared %s examples in buckets %s", {s: len(e) for s, e in examples.items()}, buckets)
    return examples, meta


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What decides how a tokenizer renders and splits text: its whole serialized pipeline
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor) where it has one, the chat
    template, the special and added tokens, and a probe's ids (for tokenizers without a backend)."""
    probe = "Hello <|im_start|> world\n\t1234 ?"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {"vocab": len(tokenizer), "template": tokenizer.chat_template, "special": tokenizer.special_tokens_map,
            "added": sorted(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()),
            "backend": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
            "probe": tokenizer(probe, add_special_tokens=True)["input_ids"], "class": type(tokenizer).__name__}


def fingerprint(data_cfg: ConfigDict, tokenizer: Any) -> str:
    """Hash of everything that changes the examples: settings, tokenizer (tokenizer_fingerprint),
    the data files' contents, the pipeline version. A prepared store is reused only under the same hash."""
    data_dir = resolve_data_dir(data_cfg)
    settings = {k: v for k, v in data_cfg.to_dict().items() if k not in NOT_CONTENT}
    paths = expand_sources(data_cfg.sources, data_dir) + [os.path.join(data_dir, data_cfg.latentqa_qa)]
    files = [(os.path.relpath(p, data_dir), _file_digest(p)) for p in paths if os.path.isfile(p)]
    blob = json.dumps({"v": PIPELINE_VERSION, "settings": settings, "files": files,
                       "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True, default=str)
    return "cfg_" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def in_memory_sources(examples: dict[str, list[dict]], meta: dict[str, Any]) -> dict[str, ExampleSource]:
    return {s: ExampleSource(examples[s], example_lengths(examples[s]), meta, s, read_groups(examples[s]))
            for s in SPLITS}


def build_splits(data_cfg: ConfigDict, tokenizer: Any) -> dict[str, ExampleSource]:
    """{'train': ExampleSource, 'heldout': ExampleSource}.

    storage="tfds": prepared once into data_cfg.tfds_dir (reused while the fingerprint
    matches) and read back with tfds.data_source; storage="memory": kept in memory.
    """
    if data_cfg.storage == "memory":
        return in_memory_sources(*prepare_examples(data_cfg, tokenizer))
    check_data_config(data_cfg)
    fp = fingerprint(data_cfg, tokenizer)
    tfds_dir = os.path.abspath(os.path.expanduser(data_cfg.tfds_dir))
    if not is_prepared(tfds_dir, fp):
        examples, meta = prepare_examples(data_cfg, tokenizer)
        metas = {s: {**meta, "fingerprint": fp, "lengths": example_lengths(examples[s]).tolist(),
                     "groups": read_groups(examples[s]).tolist()} for s in SPLITS}
        path = write_tfds(examples, metas, tfds_dir, fp)
        log.info("wrote the tfds dataset %s", path)
    return read_tfds(tfds_dir, fp)
