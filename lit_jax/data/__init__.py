"""LatentQA data: records -> tokenized fixed-shape batches, spans from the chat template, tfds store.

    cfg = default_data_config()
    splits = build_splits(cfg, tokenizer)                     # {'train', 'heldout'}: ExampleSource
    it = make_batch_iterator(splits["train"], cfg, seed=0)   # batches; it.get_state() / it.set_state(s)
    describe_example(splits["heldout"], example_id)          # read dialog, question, true answer, label
    decoder_prompt(tokenizer, cfg, "What persona?", num_slots=S)   # tokens, write_positions, generation_start
    tokenize_read(tokenizer, [{"role": "user", "content": "..."}])  # read_tokens, read_positions
"""

from lit_jax.data.batching import BATCH_FIELDS, collate
from lit_jax.data.buckets import assign_buckets, choose_buckets
from lit_jax.data.chat import TemplateError, tokenize_read
from lit_jax.data.config import (CLASSIFICATION, LATENTQA_CORPUS, RELATIONS, check_data_config,
                                 default_data_config)
from lit_jax.data.decoder import DecoderFormat, DecoderPrompt, decoder_prompt, resolve_placeholder
from lit_jax.data.errors import DataError
from lit_jax.data.iterator import BatchIterator, make_batch_iterator, make_eval_iterator
from lit_jax.data.pipeline import build_splits, fingerprint, prepare_examples
from lit_jax.data.records import Record, read_jsonl, write_jsonl
from lit_jax.data.source import ExampleSource, describe_example

__all__ = [
    "BATCH_FIELDS", "BatchIterator", "CLASSIFICATION", "DataError", "DecoderFormat", "DecoderPrompt", "ExampleSource",
    "LATENTQA_CORPUS", "RELATIONS", "Record", "TemplateError", "assign_buckets", "build_splits", "check_data_config",
    "choose_buckets", "collate", "decoder_prompt", "default_data_config", "describe_example", "fingerprint",
    "make_batch_iterator", "make_eval_iterator", "prepare_examples", "read_jsonl", "resolve_placeholder",
    "tokenize_read", "write_jsonl",
]
