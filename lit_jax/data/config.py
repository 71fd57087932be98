"""The data pipeline's settings (an ml_collections.ConfigDict) and their checks."""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from lit_jax.data.errors import ON_BAD_RECORD, DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
DEFAULT_TFDS_DIR = os.path.join(REPO_ROOT, ".cache", "tfds")  # git-ignored

LATENTQA_CORPUS = (
    "latentqa/eval/control.json",
    "latentqa/eval/stimulus.json",
    "latentqa/eval/system.json",
    "latentqa/v0/stimulus.json",
    "latentqa/v0/stimulus_completion.json",
)
RELATIONS = ("relations/*/*.json",)
CLASSIFICATION = ("classification/*.csv",)
PROMPT_STYLES = ("latentqa", "oracle")
STORAGES = ("tfds", "memory")


def default_data_config() -> ConfigDict:
    """Defaults: the LatentQA corpus (eval + v0 files joined with eval/qa.json), SmolLM2-sized lengths.

    sources: files or globs relative to data_dir (or absolute): LatentQA behaviour files
      (control/stimulus/system/stimulus_completion.json), relation .json files,
      classification .csv files, or our own .jsonl records. Add RELATIONS / CLASSIFICATION
      for the relational-knowledge and classification tasks.
    buckets: () = choose `num_buckets` (R, S, T) shapes from the data, minimising padded
      cost bucket_read_weight * R + T; or explicit ((R, S, T), ...). max_read_tokens /
      max_decoder_tokens cap the chosen shapes.
    placeholder_token: "auto" = the first of PLACEHOLDER_CANDIDATES that is one special
      token for the tokenizer (SmolLM2: <empty_output>; Llama-3: <|reserved_special_token_0|>).
    batch_size: per process; the global batch is batch_size * process_count.
    group_by_read: shuffle dialogs rather than examples, so the QA pairs about one read
      (one dialog) sit in the same batch, where packing (train.pack) computes the shared
      read and decoder prefix once. Every example is still seen once per epoch.
    """
    c = ConfigDict()
    c.data_dir = DEFAULT_DATA_DIR
    c.sources = LATENTQA_CORPUS
    c.latentqa_qa = "latentqa/eval/qa.json"
    c.max_records_per_source = 0  # 0: all; else a seeded random subset of each file's records
    c.max_records_by_source = ()  # ((glob, n), ...): per-file caps overriding it, e.g. (("classification/*", 200),)
    c.relations_label = "relation"  # or "relation_subject"
    c.relation_question = "Which {range} completes the text?"
    c.classification_read = "text"  # or "user_turn": the Activation Oracles protocol (readers.py read_classification)
    c.classification_tokens = 1  # user_turn: how many of the sentence's last tokens are read
    c.heldout_fraction = 0.1
    c.split_seed = 0
    c.prompt_style = "latentqa"
    c.acknowledgement = "Sure, I've analyzed the assistant."
    c.train_on_acknowledgement = False
    c.read_layers = (15,)
    c.read_all_layers = False  # True: every example reads every read layer (oracle style), else one sampled per example
    c.placeholder_token = "auto"
    c.buckets = ()
    c.num_buckets = 4
    c.bucket_multiple = 8
    c.bucket_read_weight = 0.2  # cost of a read token relative to a decoder token (see buckets.py)
    c.max_read_tokens = 512
    c.max_decoder_tokens = 640
    c.batch_size = 4
    c.train_drop_remainder = True
    c.on_bad_record = "error"
    c.shuffle_seed = 0
    c.group_by_read = True
    c.storage = "tfds"
    c.tfds_dir = DEFAULT_TFDS_DIR
    return c


def check_data_config(c: ConfigDict) -> None:
    """Fail early on settings that would otherwise fail late or silently."""
    if c.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"data.prompt_style={c.prompt_style!r}; expected one of {PROMPT_STYLES}")
    if c.get("read_all_layers", False) and c.prompt_style != "oracle":
        raise ValueError("data.read_all_layers=True needs data.prompt_style='oracle' (a \"Layer: L\" line before "
                         "each layer's placeholders)")
    if c.train_on_acknowledgement and c.prompt_style != "latentqa":
        raise ValueError("data.train_on_acknowledgement needs prompt_style='latentqa' (the oracle style has none)")
    if c.on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record={c.on_bad_record!r}; expected one of {ON_BAD_RECORD}")
    if c.relations_label not in ("relation", "relation_subject"):
        raise ValueError(f"data.relations_label={c.relations_label!r}; expected 'relation' or 'relation_subject'")
    if c.get("classification_read", "text") not in ("text", "user_turn"):
        raise ValueError(f"data.classification_read={c.classification_read!r}; expected 'text' or 'user_turn'")
    if int(c.get("classification_tokens", 1)) < 1:
        raise ValueError(f"data.classification_tokens={c.classification_tokens} must be at least 1")
    for entry in c.get("max_records_by_source", ()):
        if len(entry) != 2 or not isinstance(entry[0], str) or int(entry[1]) < 0:
            raise ValueError(f"data.max_records_by_source entry {tuple(entry)} must be (glob, records >= 0)")
    if c.storage not in STORAGES:
        raise ValueError(f"data.storage={c.storage!r}; expected one of {STORAGES}")
    if not 0.0 <= c.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={c.heldout_fraction} must be in [0, 1)")
    if not c.read_layers or any(int(x) < 0 for x in c.read_layers):
        raise ValueError(f"data.read_layers={tuple(c.read_layers)} must be non-empty, non-negative layer indices")
    if c.batch_size <= 0 or c.num_buckets <= 0 or c.bucket_multiple <= 0 or c.bucket_read_weight <= 0:
        raise ValueError("data.batch_size, num_buckets, bucket_multiple and bucket_read_weight must be positive")
    for b in c.buckets:
        if len(b) != 3 or not all(int(x) > 0 for x in b) or b[1] > b[0] or b[1] >= b[2]:
            raise ValueError(f"data.buckets entry {tuple(b)} must be (R, S, T) with 0 < S <= R and S < T")
    if not c.sources:
        raise ValueError("data.sources is empty")


def resolve_data_dir(c: ConfigDict) -> str:
    """The absolute data directory; a clear error if it does not exist."""
    path = os.path.abspath(os.path.expanduser(c.data_dir))
    if not os.path.isdir(path):
        raise DataError(
            f"data_dir {path!r} does not exist: the data lives in ../shared/data beside the repository "
            "(see its README); set --config.data.data_dir=/path/to/data"
        )
    return path
