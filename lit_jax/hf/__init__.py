"""HF-format checkpoints in (safetensors directories, GGUF files) and out (safetensors)."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax

from lit_jax.hf.convert import CheckpointError
from lit_jax.hf.export import export_hf
from lit_jax.hf.gguf_in import load_gguf, open_gguf
from lit_jax.hf.safetensors_in import load_safetensors_dir
from lit_jax.hf.sharded_load import load_safetensors_sharded
from lit_jax.hf.smollm2 import resolve_model_path, smollm2_gguf_path
from lit_jax.hf.tokenizer import load_tokenizer, tokenizer_from_gguf
from lit_jax.models.config import ModelConfig

__all__ = [
    "CheckpointError", "Pretrained", "export_hf", "generation_eos_ids", "load_gguf", "load_params", "load_pretrained",
    "load_safetensors_dir", "load_safetensors_sharded", "load_tokenizer", "place_params", "smollm2_gguf_path",
]


class Pretrained(NamedTuple):
    cfg: ModelConfig
    params: dict
    tokenizer: Any


GENERATION_CONFIG_NAME = "generation_config.json"


def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
    """`eos_token_id` (an int or a list) of an HF directory's generation_config.json; () without one.

    Raises CheckpointError for a file that is not JSON or whose eos_token_id is not an int or
    a list of ints.
    """
    path = os.path.join(model_dir, GENERATION_CONFIG_NAME)
    if not os.path.isfile(path):
        return ()
    try:
        with open(path, encoding="utf-8-sig") as f:
            eos = json.load(f).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid generation config ({e})") from None
    if eos is None:
        return ()
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: eos_token_id={eos!r}; expected an int or a list of ints")
    return tuple(values)


def with_generation_config(cfg: ModelConfig, model_dir: str) -> ModelConfig:
    """cfg whose eos_token_ids also hold generation_config.json's stop ids (config.json's come first).

    Raises CheckpointError as generation_eos_ids does.
    """
    extra = [i for i in generation_eos_ids(model_dir) if i not in cfg.eos_token_ids]
    return cfg.replace(eos_token_ids=tuple(cfg.eos_token_ids) + tuple(extra)) if extra else cfg


def load_params(source: str, mesh: Any = None, strict: bool = False, **run_options: Any) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a GGUF file, an HF directory, or the alias 'smollm2'.

    mesh: None gives numpy params. A `jax.sharding.Mesh` gives global jax.Arrays laid out by
    the training rules (sharding.tree_shardings; strict as there): an HF directory is then
    read straight into shards (hf/sharded_load.py: each host reads only its devices' blocks);
    a GGUF file is read whole on the host, then placed leaf by leaf (sharding.put_consuming).
    For an HF directory, cfg.eos_token_ids is the union of config.json's and
    generation_config.json's `eos_token_id` (generation stops at any of them).
    Raises FileNotFoundError for a missing path, CheckpointError / UnsupportedModelError for
    a checkpoint that cannot be loaded.
    """
    path = resolve_model_path(source)
    if path.endswith(".gguf"):
        cfg, params = load_gguf(path, **run_options)
        return cfg, params if mesh is None else place_params(params, cfg, mesh, strict)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected an HF directory or a .gguf file)")
    if mesh is None:
        cfg, params = load_safetensors_dir(path, **run_options)
    else:
        cfg, params = load_safetensors_sharded(path, mesh, strict=strict, **run_options)
    return with_generation_config(cfg, path), params


def place_params(params: dict, cfg: ModelConfig, mesh: Any, strict: bool = False) -> dict:
    """Host (numpy) params laid out over `mesh` by the training rules, leaf by leaf (host memory
    peaks near one copy). Raises ValueError as sharding.tree_shardings does."""
    from lit_jax import sharding as shd
    from lit_jax.models import llama

    return shd.put_consuming(params, shd.tree_shardings(llama.param_axes(cfg), params, mesh,
                                                        units=llama.param_units(cfg), strict=strict))


def load_pretrained(source: str, shardings: Any = None, **run_options: Any) -> Pretrained:
    """Config, params (jax arrays, placed by `shardings` if given) and tokenizer of a model.

    run_options are ModelConfig run-time fields: dtype="bfloat16", scan_layers=True, remat=...
    Stop ids: see load_params (generation_config.json is merged into cfg.eos_token_ids).
    Raises as load_params and load_tokenizer do.
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
