"""Export params to an HF directory (config.json + safetensors) that transformers loads.

Written atomically: everything goes to a temporary sibling directory which is renamed
into place at the end, so a crash never leaves a half-written export that looks complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lit_jax.atomic_dir import write_directory
from lit_jax.hf.convert import params_to_hf
from lit_jax.models.config import ModelConfig, to_hf_dict

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _write_shards(params: dict, cfg: ModelConfig, out: str, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in params_to_hf(params, cfg):
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(a.nbytes for a in shard.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def export_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> str:
    """Writes params (merge any LoRA first, see lora.merge_lora) as an HF checkpoint at `out_dir`.

    extra_files: {file name: writer(path)} called inside the temporary directory, so they land
    with the checkpoint in the same atomic rename (e.g. a LIT decoder's settings sidecar)."""
    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_dict(cfg), f, indent=2)
        _write_shards(params, cfg, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(os.path.join(tmp, name))

    return write_directory(out_dir, fill, overwrite=overwrite)
