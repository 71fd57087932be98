"""The prepared examples as a tfds dataset (array_record), read back with `tfds.data_source`.

Built offline from the examples in memory (no downloads, no TensorFlow: tfds serialises
with its own tf.Example protos and array_record writes the files). Each prepared variant
is a builder config named by a fingerprint of everything that changes the examples
(settings, tokenizer, data files), so a different setting never reads stale data and
the same one is built once:
  <tfds_dir>/lit_latentqa/<fingerprint>/1.0.0/lit_latentqa-{train,heldout}.array_record-*
`disable_shuffling` keeps the examples in split order, so a record's position in the
data source is its example_id. The split metadata (buckets, pad id, placeholder, lengths)
is stored in the dataset's metadata.json.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import py_utils, tqdm_utils

from lit_jax.data.source import ExampleSource

NAME = "lit_latentqa"
VERSION = "1.0.0"
SPLITS = ("train", "heldout")


def _features() -> tfds.features.FeaturesDict:
    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)  # noqa: E731
    return tfds.features.FeaturesDict({
        "read_tokens": seq(np.int32), "read_positions": seq(np.int32), "decoder_tokens": seq(np.int32),
        "write_positions": seq(np.int32), "loss_mask": seq(np.bool_), "read_layer": np.int32,
        "example_id": np.int32, "record_index": np.int32, "label": tfds.features.Text(),
        "source": tfds.features.Text(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
        "read": tfds.features.Text(),
    })


class LitLatentqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes given examples; never downloads. Not registered: reading goes through the files."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, examples: dict[str, list[dict]], meta: dict[str, Any], **kwargs: Any):
        self._examples, self._meta = examples, meta
        super().__init__(**kwargs)

    @py_utils.classproperty
    @classmethod
    def code_path(cls):  # no checksums/url files next to the code: skips tfds' lookup (which needs importlib_resources)
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict(self._meta),
                                     description="LatentQA examples tokenized by lit_jax.data")

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(exs) for split, exs in self._examples.items()}

    def _generate_examples(self, examples: list[dict]):
        for i, ex in enumerate(examples):
            yield i, {**{k: ex[k] for k in _features().keys() if k != "example_id"}, "example_id": np.int32(i)}


@contextlib.contextmanager
def _no_progress_bars():
    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was)


def dataset_dir(tfds_dir: str, fingerprint: str) -> str:
    return os.path.join(tfds_dir, NAME, fingerprint, VERSION)


def write_tfds(examples: dict[str, list[dict]], metas: dict[str, dict], tfds_dir: str, fingerprint: str) -> str:
    """Write the splits (empty splits are recorded in metadata, not written); returns the dataset dir."""
    nonempty = {s: exs for s, exs in examples.items() if exs}
    meta = {"splits": metas, "written": sorted(nonempty)}
    builder = LitLatentqa(examples=nonempty, meta=meta, data_dir=tfds_dir, file_format="array_record",
                          config=tfds.core.BuilderConfig(name=fingerprint))
    with _no_progress_bars():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return dataset_dir(tfds_dir, fingerprint)


def is_prepared(tfds_dir: str, fingerprint: str) -> bool:
    return os.path.isfile(os.path.join(dataset_dir(tfds_dir, fingerprint), "dataset_info.json"))


def read_tfds(tfds_dir: str, fingerprint: str) -> dict[str, ExampleSource]:
    """{split: ExampleSource over `tfds.data_source`} for a prepared fingerprint."""
    name = f"{NAME}/{fingerprint}:{VERSION}"
    meta = tfds.builder(name, data_dir=tfds_dir).info.metadata
    out = {}
    for split in SPLITS:
        m = dict(meta["splits"][split])
        lengths = np.asarray(m.pop("lengths"), np.int64).reshape(-1, 3)
        groups = m.pop("groups", None)
        data = tfds.data_source(name, split=split, data_dir=tfds_dir) if split in meta["written"] else []
        out[split] = ExampleSource(data, lengths, m, split, groups)
    return out
