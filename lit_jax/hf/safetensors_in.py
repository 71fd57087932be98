"""Loading HF checkpoint directories: `config.json` + safetensors (single file or sharded index).

Only safetensors are read: pickled `*.bin` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any

import numpy as np
from safetensors import safe_open

from lit_jax.hf.convert import CheckpointError, params_from_hf
from lit_jax.models.config import ModelConfig, load_hf_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def tensor_files(model_dir: str) -> tuple[dict[str, str], str]:
    """(tensor name -> file path, the file that lists them) for an HF directory: its sharded index or
    its single model.safetensors. Raises CheckpointError for a broken index, listed files that are
    missing, or a directory with only pickled weights (refused, never unpickled) or none."""
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(model_dir, v))})
        if missing:
            raise CheckpointError(f"{index}: lists missing file(s) {missing}")
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}, index
    single = os.path.join(model_dir, SINGLE_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}, single
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(model_dir)):
        raise CheckpointError(
            f"{model_dir}: only pickled (.bin/.pt) weights found; lit_jax loads safetensors only "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}")


def load_safetensors_dir(model_dir: str, cfg: ModelConfig | None = None, **run_options: Any):
    """Returns (cfg, numpy params) for an HF directory; every shape is checked against the config."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    cfg = cfg or load_hf_config(model_dir, **run_options)
    files, listing = tensor_files(model_dir)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}

        def get(name: str) -> np.ndarray:
            if name not in files:
                raise CheckpointError(f"{listing}: missing tensor {name!r}")
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
            try:
                return handles[path].get_tensor(name)
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None

        params = params_from_hf(get, cfg, source=listing)
    return cfg, params
