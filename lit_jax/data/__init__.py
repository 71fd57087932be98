"""LatentQA data: records from every source kind, our JSONL format, the split by label."""

from lit_jax.data.config import (CLASSIFICATION, LATENTQA_CORPUS, RELATIONS, check_data_config,
                                 default_data_config)
from lit_jax.data.errors import DataError
from lit_jax.data.records import Record, read_jsonl, write_jsonl

__all__ = [
    "CLASSIFICATION", "DataError", "LATENTQA_CORPUS", "RELATIONS", "Record", "check_data_config",
    "default_data_config", "read_jsonl", "write_jsonl",
]
