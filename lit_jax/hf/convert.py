"""Between HF tensor names/layouts ([out, in] per projection, per layer) and our stacked params.

Used by every loader (safetensors, GGUF) and by the exporter; the fused q|k|v and gate|up
layouts come from models/fused_layout.py.
"""

from __future__ import annotations

from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from lit_jax.models.config import ModelConfig
from lit_jax.models.fused_layout import gate_up_layout, qkv_layout


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor or holds one of the wrong shape."""


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its shape."""
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return out


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, source: str) -> dict:
    """Builds our (numpy) params from `get(hf_name)`; checks every shape, names `source` in errors.

    Layers are written into preallocated stacked arrays one at a time, so host memory
    peaks near one model copy in the target dtype.
    """
    dt = np_dtype(cfg.dtype)
    shapes = hf_shapes(cfg)
    L, D, F, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv, gate_up = qkv_layout(cfg), gate_up_layout(cfg)

    def fetch(name: str) -> np.ndarray:
        x = get(name)
        if tuple(x.shape) != shapes[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {shapes[name]} for this config"
            )
        return np.asarray(x)

    def fetch_t(name: str) -> np.ndarray:  # HF stores [out, in]; we use [in, out]
        return fetch(name).T

    layers = {
        "attn_norm": np.empty((L, D), dt),
        "qkv": np.empty((L, D, qkv.width), dt),
        "o": np.empty((L, qkv.member_width("q"), D), dt),
        "mlp_norm": np.empty((L, D), dt),
        "gate_up": np.empty((L, D, gate_up.width), dt),
        "down": np.empty((L, F, D), dt),
    }
    if cfg.qkv_bias:
        layers["qkv_bias"] = np.empty((L, qkv.width), dt)
    if cfg.o_bias:
        layers["o_bias"] = np.empty((L, D), dt)
    if cfg.qk_norm:
        layers["q_norm"] = np.empty((L, hd), dt)
        layers["k_norm"] = np.empty((L, hd), dt)

    for i in range(L):  # one layer at a time into the preallocated stacks
        p = f"model.layers.{i}."
        layers["attn_norm"][i] = fetch(p + "input_layernorm.weight")
        layers["mlp_norm"][i] = fetch(p + "post_attention_layernorm.weight")
        layers["qkv"][i] = qkv.fuse({m: fetch_t(f"{p}self_attn.{m}_proj.weight") for m in qkv.names})
        layers["o"][i] = fetch_t(p + "self_attn.o_proj.weight")
        layers["gate_up"][i] = gate_up.fuse({m: fetch_t(f"{p}mlp.{m}_proj.weight") for m in gate_up.names})
        layers["down"][i] = fetch_t(p + "mlp.down_proj.weight")
        if cfg.qkv_bias:
            layers["qkv_bias"][i] = qkv.fuse({m: fetch(f"{p}self_attn.{m}_proj.bias") for m in qkv.names})
        if cfg.o_bias:
            layers["o_bias"][i] = fetch(p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            layers["q_norm"][i] = fetch(p + "self_attn.q_norm.weight")
            layers["k_norm"][i] = fetch(p + "self_attn.k_norm.weight")

    params = {
        "embed": fetch("model.embed_tokens.weight").astype(dt, copy=False),
        "final_norm": fetch("model.norm.weight").astype(dt, copy=False),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(fetch("lm_head.weight").T.astype(dt))
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, array) for every tensor, in the checkpoint dtype; one tensor at a time."""
    qkv, gate_up = qkv_layout(cfg), gate_up_layout(cfg)
    host = lambda a: np.asarray(a)  # noqa: E731 - device -> host, one array at a time
    c = np.ascontiguousarray
    yield "model.embed_tokens.weight", host(params["embed"])
    yield "model.norm.weight", host(params["final_norm"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", c(host(params["lm_head"]).T)
    lay = params["layers"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", host(lay["attn_norm"][i])
        yield p + "post_attention_layernorm.weight", host(lay["mlp_norm"][i])
        for m, w in qkv.split(host(lay["qkv"][i])).items():
            yield f"{p}self_attn.{m}_proj.weight", c(w.T)
        yield p + "self_attn.o_proj.weight", c(host(lay["o"][i]).T)
        for m, w in gate_up.split(host(lay["gate_up"][i])).items():
            yield f"{p}mlp.{m}_proj.weight", c(w.T)
        yield p + "mlp.down_proj.weight", c(host(lay["down"][i]).T)
        if cfg.qkv_bias:
            for m, b in qkv.split(host(lay["qkv_bias"][i])).items():
                yield f"{p}self_attn.{m}_proj.bias", c(b)
        if cfg.o_bias:
            yield p + "self_attn.o_proj.bias", host(lay["o_bias"][i])
        if cfg.qk_norm:
            yield p + "self_attn.q_norm.weight", host(lay["q_norm"][i])
            yield p + "self_attn.k_norm.weight", host(lay["k_norm"][i])
