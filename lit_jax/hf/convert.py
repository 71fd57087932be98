"""Between HF tensor names/layouts ([out, in] per projection, per layer) and our stacked params.

Used by every loader (safetensors, GGUF) and by the exporter, so the layout lives in one place.
"""

from __future__ import annotations

from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from lit_jax.models.config import ModelConfig


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
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim

    def fetch(name: str) -> np.ndarray:
        x = get(name)
        if tuple(x.shape) != shapes[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {shapes[name]} for this config"
            )
        return np.asarray(x)

    layers = {
        "attn_norm": np.empty((L, D), dt),
        "qkv": np.empty((L, D, H, G + 2, hd), dt),  # flattened to [L, D, H*(G+2)*hd] at the end
        "o": np.empty((L, H * G * hd, D), dt),
        "mlp_norm": np.empty((L, D), dt),
        "gate_up": np.empty((L, D, F, 2), dt),  # flattened to [L, D, F*2] (interleaved) at the end
        "down": np.empty((L, F, D), dt),
    }
    if cfg.qkv_bias:
        layers["qkv_bias"] = np.empty((L, H, G + 2, hd), dt)
    if cfg.o_bias:
        layers["o_bias"] = np.empty((L, D), dt)
    if cfg.qk_norm:
        layers["q_norm"] = np.empty((L, hd), dt)
        layers["k_norm"] = np.empty((L, hd), dt)

    for i in range(L):
        p = f"model.layers.{i}."
        layers["attn_norm"][i] = fetch(p + "input_layernorm.weight")
        layers["mlp_norm"][i] = fetch(p + "post_attention_layernorm.weight")
        qkv = layers["qkv"][i]
        qkv[:, :, :G] = fetch(p + "self_attn.q_proj.weight").T.reshape(D, H, G, hd)
        qkv[:, :, G] = fetch(p + "self_attn.k_proj.weight").T.reshape(D, H, hd)
        qkv[:, :, G + 1] = fetch(p + "self_attn.v_proj.weight").T.reshape(D, H, hd)
        layers["o"][i] = fetch(p + "self_attn.o_proj.weight").T
        layers["gate_up"][i, :, :, 0] = fetch(p + "mlp.gate_proj.weight").T
        layers["gate_up"][i, :, :, 1] = fetch(p + "mlp.up_proj.weight").T
        layers["down"][i] = fetch(p + "mlp.down_proj.weight").T
        if cfg.qkv_bias:
            b = layers["qkv_bias"][i]
            b[:, :G] = fetch(p + "self_attn.q_proj.bias").reshape(H, G, hd)
            b[:, G] = fetch(p + "self_attn.k_proj.bias").reshape(H, hd)
            b[:, G + 1] = fetch(p + "self_attn.v_proj.bias").reshape(H, hd)
        if cfg.o_bias:
            layers["o_bias"][i] = fetch(p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            layers["q_norm"][i] = fetch(p + "self_attn.q_norm.weight")
            layers["k_norm"][i] = fetch(p + "self_attn.k_norm.weight")

    layers["qkv"] = layers["qkv"].reshape(L, D, -1)
    layers["gate_up"] = layers["gate_up"].reshape(L, D, -1)
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
    H, G, hd, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.hidden_size
    host = lambda a: np.asarray(a)  # noqa: E731 - device -> host, one array at a time
    c = np.ascontiguousarray
    yield "model.embed_tokens.weight", host(params["embed"])
    yield "model.norm.weight", host(params["final_norm"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", c(host(params["lm_head"]).T)
    lay = params["layers"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = host(lay["qkv"][i]).reshape(D, H, G + 2, hd)
        yield p + "input_layernorm.weight", host(lay["attn_norm"][i])
        yield p + "post_attention_layernorm.weight", host(lay["mlp_norm"][i])
        yield p + "self_attn.q_proj.weight", c(qkv[:, :, :G].reshape(D, -1).T)
        yield p + "self_attn.k_proj.weight", c(qkv[:, :, G].reshape(D, -1).T)
        yield p + "self_attn.v_proj.weight", c(qkv[:, :, G + 1].reshape(D, -1).T)
        yield p + "self_attn.o_proj.weight", c(host(lay["o"][i]).T)
        gu = host(lay["gate_up"][i]).reshape(D, -1, 2)
        yield p + "mlp.gate_proj.weight", c(gu[:, :, 0].T)
        yield p + "mlp.up_proj.weight", c(gu[:, :, 1].T)
        yield p + "mlp.down_proj.weight", c(host(lay["down"][i]).T)
        if cfg.qkv_bias:
            b = host(lay["qkv_bias"][i])
            yield p + "self_attn.q_proj.bias", c(b[:, :G].reshape(-1))
            yield p + "self_attn.k_proj.bias", c(b[:, G].reshape(-1))
            yield p + "self_attn.v_proj.bias", c(b[:, G + 1].reshape(-1))
        if cfg.o_bias:
            yield p + "self_attn.o_proj.bias", host(lay["o_bias"][i])
        if cfg.qk_norm:
            yield p + "self_attn.q_norm.weight", host(lay["q_norm"][i])
            yield p + "self_attn.k_norm.weight", host(lay["k_norm"][i])
