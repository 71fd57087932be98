"""The projection layer between the target's activations and the decoder's residual stream.

Initialised as the identity (linear: W = I; mlp: x + MLP(x) with a zero output layer),
so training starts from "write the activation as it is". Optional norm matching rescales
each projected vector to the norm of the activation it came from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lit_jax.lit.config import LitConfig
from lit_jax.lit.residual_stream import l2_norm


def init_projection(key: jax.Array, dim: int, lcfg: LitConfig) -> dict:
    if lcfg.projection == "identity":
        return {}
    if lcfg.projection == "linear":
        return {"w": jnp.eye(dim, dtype=jnp.float32), "b": jnp.zeros((dim,), jnp.float32)}
    hidden = lcfg.mlp_hidden or dim
    return {
        "w1": jax.random.normal(key, (dim, hidden), jnp.float32) / jnp.sqrt(dim),
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jnp.zeros((hidden, dim), jnp.float32),
        "b2": jnp.zeros((dim,), jnp.float32),
    }


def projection_axes(lcfg: LitConfig) -> dict:
    if lcfg.projection == "identity":
        return {}
    if lcfg.projection == "linear":
        return {"w": ("embed", None), "b": (None,)}
    return {"w1": ("embed", "mlp"), "b1": ("mlp",), "w2": ("mlp", "embed"), "b2": (None,)}


def project(params: dict, a: jax.Array, lcfg: LitConfig) -> jax.Array:
    """a [..., D] -> [..., D] in float32."""
    x = a.astype(jnp.float32)
    if lcfg.projection == "identity":
        out = x
    elif lcfg.projection == "linear":
        out = x @ params["w"] + params["b"]
    else:
        out = x + jax.nn.gelu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    if lcfg.norm_match:
        out = out * (l2_norm(x) / l2_norm(out))
    return out
