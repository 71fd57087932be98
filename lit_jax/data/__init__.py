"""LatentQA data: records -> tokenized examples -> fixed-shape rows -> the step's LitBatch.

    cfg = default_data_config()
    splits = build_splits(cfg, tokenizer)                     # {'train', 'heldout'}: ExampleSource
    it = make_batch_iterator(splits["train"], cfg, seed=0)   # collated rows; it.get_state() / it.set_state(s)
    step_batch = StepBatches(pack=True, num_rows=1)          # rows -> LitBatch (prefix trees, or plain_batch)
    batch = step_batch(next(it))
    splits["heldout"].describe(example_id)                   # read dialog, question, true answer, label
    decoder_prompt(tokenizer, cfg, "What persona?", num_slots=S)   # tokens, write_positions, generation_start
    tokenize_read(tokenizer, [{"role": "user", "content": "..."}])  # read_tokens, read_positions

Modules, in pipeline order: errors, records (Record, JSONL), readers (data files -> Records),
chat (read spans from the chat template), decoder (decoder prompt styles), examples
(Records -> tokenized examples), config, pipeline (config -> split, example sources),
storage (ExampleSource: in memory or the tfds store), batching (length buckets, collate),
iterator (epochs of collated rows), batch (the step's LitBatch), packing (prefix trees).
"""

from lit_jax.data.batch import LitBatch, Slots, Targets, TokenTree, chains, plain_batch
from lit_jax.data.batching import BATCH_FIELDS, assign_buckets, choose_buckets, collate
from lit_jax.data.chat import TemplateError, tokenize_read
from lit_jax.data.config import (CLASSIFICATION, LATENTQA_CORPUS, RELATIONS, check_data_config,
                                 default_data_config)
from lit_jax.data.decoder import DecoderFormat, DecoderPrompt, decoder_prompt, resolve_placeholder
from lit_jax.data.errors import DataError
from lit_jax.data.iterator import BatchIterator, make_batch_iterator, make_eval_iterator
from lit_jax.data.packing import PackedSizes, StepBatches, pack_batch
from lit_jax.data.pipeline import build_splits, fingerprint, prepare_examples
from lit_jax.data.records import Record, read_jsonl, write_jsonl
from lit_jax.data.storage import ExampleSource

__all__ = [
    "BATCH_FIELDS", "BatchIterator", "CLASSIFICATION", "DataError", "DecoderFormat", "DecoderPrompt", "ExampleSource",
    "LATENTQA_CORPUS", "LitBatch", "PackedSizes", "RELATIONS", "Record", "Slots", "StepBatches", "Targets",
    "TemplateError", "TokenTree", "assign_buckets", "build_splits", "chains", "check_data_config", "choose_buckets",
    "collate", "decoder_prompt", "default_data_config", "fingerprint", "make_batch_iterator", "make_eval_iterator",
    "pack_batch", "plain_batch", "prepare_examples", "read_jsonl", "resolve_placeholder", "tokenize_read",
    "write_jsonl",
]
