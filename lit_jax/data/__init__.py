"""LatentQA data: records from every source kind, spans from the chat template, decoder prompts."""

from lit_jax.data.chat import TemplateError, tokenize_read
from lit_jax.data.config import (CLASSIFICATION, LATENTQA_CORPUS, RELATIONS, check_data_config,
                                 default_data_config)
from lit_jax.data.decoder import DecoderFormat, DecoderPrompt, decoder_prompt, resolve_placeholder
from lit_jax.data.errors import DataError
from lit_jax.data.records import Record, read_jsonl, write_jsonl

__all__ = [
    "CLASSIFICATION", "DataError", "DecoderFormat", "DecoderPrompt", "LATENTQA_CORPUS", "RELATIONS", "Record",
    "TemplateError", "check_data_config", "decoder_prompt", "default_data_config", "read_jsonl",
    "resolve_placeholder", "tokenize_read", "write_jsonl",
]
