"""An HF safetensors checkpoint read straight into a mesh's shards: each host reads only what its devices hold.

`jax.make_array_from_callback` asks, for every device of this process, for the block of the
global parameter that device holds; the block is read from the checkpoint with safetensors'
`get_slice` (rows and columns of the stored [out, in] tensors, one layer at a time), fused
and transposed into our layout, and copied to the device. So a host holds its own shards
plus one layer's block in flight, never the whole model: on a pod each host reads 1/hosts of
the weights. The fused q|k|v and gate|up blocks are cut at whole KV-head groups / MLP
features (models/fused_layout.py), so a block needs only its groups' rows of q, k, v.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import ExitStack
from typing import Any, Callable

import jax
import numpy as np
from safetensors import safe_open

from lit_jax import sharding as shd
from lit_jax.hf.convert import CheckpointError, hf_shapes, np_dtype
from lit_jax.hf.safetensors_in import tensor_files
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig, load_hf_config
from lit_jax.models.fused_layout import FusedLayout, gate_up_layout, qkv_layout

# read(hf_name, (start, stop) per stored dimension) -> that block of the stored tensor
ReadBlock = Callable[[str, tuple[tuple[int, int], ...]], np.ndarray]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return tuple(out)


def _fused_columns(layout: FusedLayout, member_block: Callable[[str, int, int], np.ndarray],
                   lo: int, hi: int) -> np.ndarray:
    """Columns [lo, hi) of a fused axis from its members: member_block(name, r0, r1) gives rows
    [r0, r1) of the member's output axis, as the last axis of the block."""
    group = layout.slots * layout.unit
    g0, g1 = lo // group, -(-hi // group)
    sub = dataclasses.replace(layout, groups=g1 - g0)
    members = {name: member_block(name, g0 * n * layout.unit, g1 * n * layout.unit)
               for name, _, n in layout.members}
    return sub.fuse(members)[..., lo - g0 * group:hi - g0 * group]


def read_block(read: ReadBlock, cfg: ModelConfig, key: tuple[str, ...],
               bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block `bounds` of our parameter `key` (e.g. ("layers", "qkv")), from HF tensors.

    bounds: (start, stop) per dimension of our layout (llama.param_specs); layers are the
    leading axis of every stacked parameter. Returns numpy in cfg.dtype with the block's shape.
    """
    dt = np_dtype(cfg.dtype)
    qkv, gate_up = qkv_layout(cfg), gate_up_layout(cfg)
    if key == ("embed",):
        return read("model.embed_tokens.weight", bounds).astype(dt, copy=False)
    if key == ("final_norm",):
        return read("model.norm.weight", bounds).astype(dt, copy=False)
    if key == ("lm_head",):  # ours [D, V], stored [V, D]
        (d0, d1), (v0, v1) = bounds
        return np.ascontiguousarray(read("lm_head.weight", ((v0, v1), (d0, d1))).T).astype(dt, copy=False)
    if key[0] != "layers" or len(key) != 2:
        raise KeyError(f"no HF tensor for parameter {key}")
    name, (l0, l1), rest = key[1], bounds[0], bounds[1:]
    out = np.empty(tuple(b - a for a, b in bounds), dt)
    for i in range(l0, l1):
        p = f"model.layers.{i}."

        def weight_t(hf: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
            return read(p + hf, (cols, rows)).T  # stored [out, in]; ours [in, out]

        if name in ("attn_norm", "mlp_norm", "o_bias", "q_norm", "k_norm"):
            hf = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
                  "o_bias": "self_attn.o_proj.bias", "q_norm": "self_attn.q_norm.weight",
                  "k_norm": "self_attn.k_norm.weight"}[name]
            block = read(p + hf, rest)
        elif name == "o":
            block = weight_t("self_attn.o_proj.weight", *rest)
        elif name == "down":
            block = weight_t("mlp.down_proj.weight", *rest)
        elif name == "qkv":
            (d0, d1), (w0, w1) = rest
            block = _fused_columns(qkv, lambda m, r0, r1: read(f"{p}self_attn.{m}_proj.weight", ((r0, r1), (d0, d1))).T,
                                   w0, w1)
        elif name == "gate_up":
            (d0, d1), (w0, w1) = rest
            block = _fused_columns(gate_up, lambda m, r0, r1: read(f"{p}mlp.{m}_proj.weight", ((r0, r1), (d0, d1))).T,
                                   w0, w1)
        elif name == "qkv_bias":
            ((w0, w1),) = rest
            block = _fused_columns(qkv, lambda m, r0, r1: read(f"{p}self_attn.{m}_proj.bias", ((r0, r1),)), w0, w1)
        else:
            raise KeyError(f"no HF tensor for parameter {key}")
        out[i - l0] = block
    return out


def load_safetensors_sharded(model_dir: str, mesh: jax.sharding.Mesh, cfg: ModelConfig | None = None, *,
                             rules=shd.DEFAULT_RULES, strict: bool = False, **run_options: Any
                             ) -> tuple[ModelConfig, dict]:
    """(cfg, params as global jax.Arrays laid out over `mesh`) from an HF safetensors directory.

    Each parameter gets the NamedSharding of the training rules (sharding.tree_shardings over
    llama.param_axes, units whole); this process reads from disk only the blocks its own
    devices hold (one read per distinct block, shared by devices that replicate it). The
    values equal those of `load_safetensors_dir` placed on the same mesh.

    Raises FileNotFoundError / CheckpointError as load_safetensors_dir does (every stored shape
    is checked against the config before any data is read), ValueError as tree_shardings does.
    """
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    cfg = cfg or load_hf_config(model_dir, **run_options)
    files, listing = tensor_files(model_dir)
    expected = hf_shapes(cfg)
    shardings = shd.tree_shardings(llama.param_axes(cfg), llama.param_shapes(cfg), mesh, rules,
                                   units=llama.param_units(cfg), strict=strict)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        slices: dict[str, Any] = {}

        def stored(name: str):
            if name not in slices:
                if name not in files:
                    raise CheckpointError(f"{listing}: missing tensor {name!r}")
                path = files[name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
                slices[name] = handles[path].get_slice(name)
            return slices[name]

        for name, shape in expected.items():  # every shape before any data
            got = tuple(stored(name).get_shape())
            if got != shape:
                raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {got}, expected {shape} "
                                      "for this config")

        def read(name: str, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
            try:
                return np.asarray(stored(name)[tuple(slice(a, b) for a, b in bounds)])
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{files[name]}: cannot read block {bounds} of {name!r}: {e}") from None

        def build(path, sharding, like):
            key = tuple(k.key for k in path)
            blocks: dict = {}  # devices that replicate a block share one read

            def block(index):
                b = _bounds(index, like.shape)
                if b not in blocks:
                    blocks[b] = read_block(read, cfg, key, b)
                return blocks[b]

            return jax.make_array_from_callback(like.shape, sharding, block)

        params = jax.tree_util.tree_map_with_path(build, shardings, llama.param_shapes(cfg))
    return cfg, params
