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
