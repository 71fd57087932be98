"""LoRA adapters: parameters, their low-rank update, and merging into the base for export.

The decoder is the base model plus these adapters, so target and decoder share one copy
of the base weights. Adapters are stacked per layer like the base (`[n_layers, ...]`).

`lora_delta` has a hand-written VJP: XLA:CPU otherwise materialises transposed copies
of the large activation/gradient operands; here every large operand is used as stored
and only the rank-r operands are transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lit_jax.models.config import ModelConfig
from lit_jax.models.fused_layout import FusedLayout, layout_of

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {LORA_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraWeights(NamedTuple):
    """Adapters as the model takes them: params {projection: {"a": [L, r, in], "b": [L, r, out]}}
    (or one layer's slices), applied as scale * (x @ A^T) @ B."""

    params: dict
    scale: float


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection (HF layout)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


_IN_AXIS = {"q": "embed", "k": "embed", "v": "embed", "o": "heads", "gate": "embed", "up": "embed", "down": "mlp"}
_OUT_AXIS = {"q": "heads", "k": "kv_heads", "v": "kv_heads", "o": "embed", "gate": "mlp", "up": "mlp", "down": "embed"}


def init_lora(key: jax.Array, cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, dict[str, jax.Array]]:
    """A: [L, r, in] ~ U(±1/sqrt(in)) (kaiming-uniform, as PEFT), B: [L, r, out] = 0 (so decoder == base at init)."""
    dims = projection_dims(cfg)
    out = {}
    for name, key_t in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets))):
        fan_in, fan_out = dims[name]
        bound = 1.0 / (fan_in**0.5)
        a = jax.random.uniform(key_t, (cfg.num_layers, lcfg.rank, fan_in), jnp.float32, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros((cfg.num_layers, lcfg.rank, fan_out), jnp.float32)}
    return out


def lora_axes(lcfg: LoraConfig) -> dict[str, dict[str, tuple]]:
    """Logical axis names for each LoRA array (rank is never sharded)."""
    return {
        t: {"a": ("layers", None, _IN_AXIS[t]), "b": ("layers", None, _OUT_AXIS[t])} for t in lcfg.targets
    }


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a.T) @ b for x [..., in], a [r, in], b [r, out]; cast to x's dtype."""
    return _lora_fwd(x, a, b)[0]


def _lora_fwd(x, a, b):
    a_c, b_c = a.astype(x.dtype), b.astype(x.dtype)
    u = checkpoint_name(jnp.einsum("...i,ri->...r", x, a_c), "lora_u")  # kept by remat="matmuls"
    y = jnp.einsum("...r,ro->...o", u, b_c)
    return y, (x, u, a, b)


def _lora_bwd(res, dy):
    x, u, a, b = res
    a_c, b_c = a.astype(x.dtype), b.astype(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    u2 = u.reshape(-1, u.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    db = jnp.einsum("nr,no->ro", u2, dy2, preferred_element_type=jnp.float32)
    du = jnp.einsum("no,ro->nr", dy2, b_c)
    da = jnp.einsum("nr,ni->ri", du, x2, preferred_element_type=jnp.float32)
    dx = jnp.einsum("nr,ri->ni", du, a_c).reshape(*lead, x.shape[-1])
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_fwd, _lora_bwd)


def lora_update(x: jax.Array, lora_layer: Any, scale: float, projections: FusedLayout | str) -> jax.Array | None:
    """The scaled LoRA update of the adapted projections reading x [..., in], or None if none is adapted.

    projections: one projection's name ("o", "down"), or a fused layout (q|k|v, gate|up).
    Adapters of a fused projection run as one: their A matrices stacked into [sum r, in],
    their B matrices placed by the layout into one [sum r, width] matrix (zeros in the
    other members' slots), so the update is two matmuls that add to the fused output
    directly, instead of two matmuls, a slice and an add per adapter: these skinny
    matmuls cost far more per FLOP than the base projections.
    """
    names = projections.names if isinstance(projections, FusedLayout) else (projections,)
    present = [n for n in names if lora_layer is not None and n in lora_layer]
    if not present:
        return None
    a = jnp.concatenate([lora_layer[n]["a"] for n in present]) if len(present) > 1 else lora_layer[present[0]]["a"]
    bs = [lora_layer[n]["b"] * jnp.asarray(scale, lora_layer[n]["b"].dtype) for n in present]
    if isinstance(projections, FusedLayout):
        b = jnp.concatenate([projections.place(n, b) for n, b in zip(present, bs)])
    else:
        b = bs[0]
    return lora_delta(x, a, b)


def merged_delta(lora_layer_stack: dict, name: str, scale: float) -> jax.Array:
    """Dense update W_delta [L, in, out] = scale * A^T B, for merging into the base weights."""
    p = lora_layer_stack[name]
    return scale * jnp.einsum("lri,lro->lio", p["a"].astype(jnp.float32), p["b"].astype(jnp.float32))


def merge_lora(params: dict, lora: dict, lcfg: LoraConfig, cfg: ModelConfig) -> dict:
    """Base params with the adapters folded in (for export / adapter-free inference).

    A fused projection's delta goes into its members' slots (models/fused_layout.py).
    """
    layers = dict(params["layers"])
    for name in lora:
        delta = merged_delta(lora, name, lcfg.scale)
        layout = layout_of(cfg, name)
        if layout is None:
            layers[name] = layers[name] + delta.astype(layers[name].dtype)
        else:
            layers[layout.param] = layout.add_member(layers[layout.param], name, delta)
    return {**params, "layers": layers}
