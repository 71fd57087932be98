"""The tfds store: built offline without TensorFlow, read back with tfds.data_source, reused by fingerprint."""

import itertools
import os
import sys

import numpy as np
import pytest

from lit_jax.data import BATCH_FIELDS, build_splits, make_batch_iterator
from lit_jax.data.config import LATENTQA_CORPUS
from tests.data.conftest import memory_config


@pytest.fixture(scope="module")
def small(smollm2_tok, tmp_path_factory):
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg = memory_config(sources=LATENTQA_CORPUS + ("relations/factual/country_language.json",),
                        max_records_per_source=15, heldout_fraction=0.2)
    mem = build_splits(cfg, smollm2_tok)
    cfg.storage, cfg.tfds_dir = "tfds", tfds_dir
    return cfg, mem, build_splits(cfg, smollm2_tok), tfds_dir


def test_tfds_store_holds_exactly_the_prepared_examples(small):
    cfg, mem, stored, tfds_dir = small
    assert "tensorflow" not in sys.modules
    assert type(stored["train"].data).__name__ == "ArrayRecordDataSource"
    files = os.listdir(os.path.dirname(os.path.dirname(stored["train"].data.dataset_info.data_dir)))
    assert len(files) == 1 and files[0].startswith("cfg_")
    for split in ("train", "heldout"):
        a, b = mem[split], stored[split]
        assert len(a) == len(b) > 0 and a.buckets == b.buckets and np.array_equal(a.lengths, b.lengths)
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert int(y["example_id"]) == i
            for k in ("read_tokens", "read_positions", "decoder_tokens", "write_positions", "loss_mask"):
                assert np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype, k
        assert b.describe(1) == a.describe(1)
        it_a = make_batch_iterator(a, cfg, seed=2, process_index=0, process_count=1)
        it_b = make_batch_iterator(b, cfg, seed=2, process_index=0, process_count=1)
        for x, y in itertools.islice(zip(it_a, it_b), 10):
            assert all(np.array_equal(x[k], y[k]) for k in BATCH_FIELDS)


def test_tfds_store_is_reused_and_keyed_by_settings(small, smollm2_tok):
    cfg, _, stored, tfds_dir = small
    path = stored["train"].data.dataset_info.data_dir
    before = os.path.getmtime(os.path.join(path, "dataset_info.json"))
    again = build_splits(cfg, smollm2_tok)
    assert again["train"].data.dataset_info.data_dir == path
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == before
    other = cfg.copy_and_resolve_references()
    other.prompt_style, other.heldout_fraction = "oracle", 0.0  # also: an empty held-out split
    changed = build_splits(other, smollm2_tok)
    assert changed["train"].data.dataset_info.data_dir != path and len(changed["heldout"]) == 0
    assert list(make_batch_iterator(changed["heldout"], other, process_index=0, process_count=1)) == []


def test_fingerprint_covers_the_whole_tokenizer_and_file_contents(smollm2_tok, tmp_path):
    """A tokenizer that differs only in one BPE merge (probe, vocabulary and template unchanged), and a
    data file edited in place to the same size and timestamp, each give another key: never stale tokens."""
    import copy
    import json
    import shutil

    from tokenizers import Tokenizer

    from lit_jax.data import fingerprint

    data_dir = tmp_path / "data"
    for rel in ("latentqa/eval/system.json", "latentqa/eval/qa.json"):
        os.makedirs(data_dir / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(memory_config().data_dir, rel), data_dir / rel)
    cfg = memory_config(sources=("latentqa/eval/system.json",), data_dir=str(data_dir))
    key = fingerprint(cfg, smollm2_tok)

    spec = json.loads(smollm2_tok.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    probe = "Hello <|im_start|> world\n\t1234 ?"
    before = smollm2_tok(probe)["input_ids"]
    for i in range(len(merges) - 1, 0, -1):  # drop a merge the probe does not use
        spec["model"]["merges"] = merges[:i] + merges[i + 1:]
        other = copy.deepcopy(smollm2_tok)
        other._tokenizer = Tokenizer.from_str(json.dumps(spec))  # the fast tokenizer's backend
        if other(probe)["input_ids"] == before:
            break
    assert other.backend_tokenizer.to_str() != smollm2_tok.backend_tokenizer.to_str()
    assert len(other) == len(smollm2_tok) and other.chat_template == smollm2_tok.chat_template
    assert fingerprint(cfg, other) != key

    path = data_dir / "latentqa/eval/system.json"
    stat = os.stat(path)
    text = path.read_text()
    i = text.index('"system"')
    edited = text[:i] + text[i:].replace("a", "e", 1)  # same size
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size and fingerprint(cfg, smollm2_tok) != key
