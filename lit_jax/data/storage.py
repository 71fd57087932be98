"""Where prepared examples live: one split's tokenized examples with random access.

`ExampleSource` wraps either a list in memory or a tfds data source over the tfds store
below. Both hold the same example dicts (see examples.py); tfds gives text fields back as
bytes, which `describe` decodes. `lengths` ([N, 3]: R, S, T), the read groups and the
bucket shapes travel with the source so batching never has to read the examples to plan
an epoch.

The tfds store: the prepared examples as a tfds dataset (array_record), read back with
`tfds.data_source`. Built offline from the examples in memory (no downloads, no
TensorFlow: tfds serialises with its own tf.Example protos and array_record writes the
files). Each prepared variant is a builder config named by a fingerprint of everything
that changes the examples (settings, tokenizer, data files), so a different setting never
reads stale data and the same one is built once:
  <tfds_dir>/lit_latentqa/<fingerprint>/1.0.0/lit_latentqa-{train,heldout}.array_record-*
`disable_shuffling` keeps the examples in split order, so a record's position in the
data source is its example_id. The split metadata (buckets, pad id, placeholder, lengths)
is stored in the dataset's metadata.json. tensorflow_datasets is imported only when the
store is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Sequence

import numpy as np

from lit_jax.data.batching import assign_buckets

TEXT_FIELDS = ("label", "source", "question", "answer", "read")
_PARALLEL_READ = 64  # measured: 4 records via __getitems__ ~640 us each, one by one ~160 us
NAME = "lit_latentqa"
VERSION = "1.0.0"
SPLITS = ("train", "heldout")


class ExampleSource:
    """Random access to a split. meta: buckets, pad_id, read_layers, placeholder, ... (JSON-able)."""

    def __init__(self, data: Any, lengths: np.ndarray, meta: dict[str, Any], split: str,
                 groups: np.ndarray | None = None):
        self.data, self.meta, self.split = data, meta, split
        self.lengths = np.asarray(lengths, np.int64).reshape(-1, 3)
        if len(self.lengths) != len(data):
            raise ValueError(f"{split}: {len(data)} examples but {len(self.lengths)} length rows")
        # examples reading the same tokens (the QA pairs of a dialog) share a group id; default: one each
        self.groups = np.arange(len(data)) if groups is None else np.asarray(groups, np.int64).reshape(-1)
        if len(self.groups) != len(data):
            raise ValueError(f"{split}: {len(data)} examples but {len(self.groups)} group ids")
        self.buckets: tuple[tuple[int, int, int], ...] = tuple(tuple(int(v) for v in b) for b in meta["buckets"])
        self.bucket_ids = assign_buckets(self.lengths, self.buckets)
        self.bucket_targets: tuple[int, ...] = tuple(int(p) for p in meta["bucket_targets"])
        if (self.bucket_ids < 0).any():
            raise ValueError(f"{split}: example {int(np.argmin(self.bucket_ids))} fits no bucket of {self.buckets}")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data[int(i)]

    def get_many(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        # array_record's __getitems__ starts a thread pool per call: only worth it for many records
        if len(ids) >= _PARALLEL_READ and hasattr(self.data, "__getitems__"):
            return list(self.data.__getitems__(ids))
        return [self.data[i] for i in ids]

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def default_layer(self) -> int:
        return int(self.meta["read_layers"][0])

    def subset(self, count: int) -> "ExampleSource":
        """`count` examples spread evenly over the split (deterministic), held in memory.

        For periodic evaluation on a fixed sample; example ids refer to the subset."""
        if count <= 0 or count >= len(self):
            return self
        ids = np.linspace(0, len(self) - 1, count).round().astype(int)
        return ExampleSource(self.get_many(ids), self.lengths[ids], self.meta, self.split, self.groups[ids])

    def describe(self, example_id: int) -> dict[str, Any]:
        """The human-readable example: read dialog/text and span rule, question, true answer, label, origin."""
        if not 0 <= example_id < len(self):
            raise IndexError(f"{self.split}: example_id {example_id} outside [0, {len(self)})")
        ex = self[example_id]
        text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in ((k, ex[k]) for k in TEXT_FIELDS)}
        return {"example_id": int(example_id), "split": self.split, "label": text["label"],
                "question": text["question"], "answer": text["answer"], "read": json.loads(text["read"]),
                "source": text["source"], "record_index": int(ex["record_index"])}


def _features():
    import tensorflow_datasets as tfds

    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)  # noqa: E731
    return tfds.features.FeaturesDict({
        "read_tokens": seq(np.int32), "read_positions": seq(np.int32), "decoder_tokens": seq(np.int32),
        "write_positions": seq(np.int32), "loss_mask": seq(np.bool_), "read_layer": np.int32,
        "slot_layers": seq(np.int32),
        "example_id": np.int32, "record_index": np.int32, "label": tfds.features.Text(),
        "source": tfds.features.Text(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
        "read": tfds.features.Text(),
    })


@functools.cache
def _builder_class() -> type:
    """The tfds builder `lit_latentqa` (its name comes from the class name), defined on first use."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import py_utils

    class LitLatentqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Writes given examples; never downloads. Not registered: reading goes through the files."""

        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, examples: dict[str, list[dict]], meta: dict[str, Any], **kwargs: Any):
            self._examples, self._meta = examples, meta
            super().__init__(**kwargs)

        @py_utils.classproperty
        @classmethod
        def code_path(cls):  # no checksums/url files next to the code: skips tfds' lookup (needs importlib_resources)
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

    assert LitLatentqa.name == NAME, LitLatentqa.name
    return LitLatentqa


@contextlib.contextmanager
def _no_progress_bars():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

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
    import tensorflow_datasets as tfds

    nonempty = {s: exs for s, exs in examples.items() if exs}
    meta = {"splits": metas, "written": sorted(nonempty)}
    builder = _builder_class()(examples=nonempty, meta=meta, data_dir=tfds_dir, file_format="array_record",
                               config=tfds.core.BuilderConfig(name=fingerprint))
    with _no_progress_bars():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return dataset_dir(tfds_dir, fingerprint)


def is_prepared(tfds_dir: str, fingerprint: str) -> bool:
    return os.path.isfile(os.path.join(dataset_dir(tfds_dir, fingerprint), "dataset_info.json"))


def read_tfds(tfds_dir: str, fingerprint: str) -> dict[str, ExampleSource]:
    """{split: ExampleSource over `tfds.data_source`} for a prepared fingerprint."""
    import tensorflow_datasets as tfds

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
