"""HF-format checkpoints in (safetensors directories, GGUF files) and out (safetensors)."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from lit_jax.hf.convert import CheckpointError
from lit_jax.hf.export import export_hf
from lit_jax.hf.gguf_in import load_gguf, open_gguf
from lit_jax.hf.safetensors_in import load_safetensors_dir
from lit_jax.hf.smollm2 import resolve_model_path, smollm2_gguf_path
from lit_jax.hf.tokenizer import load_tokenizer, tokenizer_from_gguf
from lit_jax.models.config import ModelConfig

__all__ = [
    "CheckpointError", "Pretrained", "export_hf", "load_gguf", "load_params", "load_pretrained",
    "load_safetensors_dir", "load_tokenizer", "smollm2_gguf_path",
]


class Pretrained(NamedTuple):
    cfg: ModelConfig
    params: dict
    tokenizer: Any


def load_params(source: str, **run_options: Any) -> tuple[ModelConfig, dict]:
    """(cfg, numpy params) from a GGUF file, an HF directory, or the alias 'smollm2'."""
    path = resolve_model_path(source)
    if path.endswith(".gguf"):
        return load_gguf(path, **run_options)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected an HF directory or a .gguf file)")
    return load_safetensors_dir(path, **run_options)


def load_pretrained(source: str, shardings: Any = None, **run_options: Any) -> Pretrained:
    """Config, params (jax arrays, placed by `shardings` if given) and tokenizer of a model.

    run_options are ModelConfig run-time fields: dtype="bfloat16", scan_layers=True, remat=...
    """
    path = resolve_model_path(source)
    if path.endswith(".gguf"):
        reader = open_gguf(path)
        cfg, params = load_gguf(path, reader, **run_options)
        tokenizer = tokenizer_from_gguf(path, reader)
    else:
        cfg, params = load_params(path, **run_options)
        tokenizer = load_tokenizer(path)
    return Pretrained(cfg, jax.device_put(params, shardings), tokenizer)
