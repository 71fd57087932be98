"""LoRA adapters: parameters, their low-rank update, and merging into the base for export.

The decoder is the base model plus these adapters, so target and decoder share one copy
of the base weights. Adapters are stacked per layer like the base (`[n_layers, ...]`).

`lora_delta` has a hand-written VJP: XLA:CPU otherwise materialises transposed copies
of the large activation/gradient operands; here every large operand is used as stored
and only the rank-r operands are transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lit_jax.models.config import ModelConfig

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


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection."""
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


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a.T) @ b for x [..., in], a [r, in], b [r, out]; cast to x's dtype."""
    return lora_deltas(x, (a,), (b,))[0]


@jax.custom_vjp
def lora_deltas(x: jax.Array, a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """(x @ a_i.T) @ b_i for adapters that share the input x (q|k|v, gate|up).

    Their A matrices are stacked into one [sum r, in] operand, so the forward's x @ A.T and
    the backward's dA and dx are one matmul each for the group instead of one per adapter
    (these skinny matmuls cost far more per FLOP than the base projections).
    """
    return _lora_fwd(x, a, b)[0]


def _lora_fwd(x, a, b):
    a_cat = jnp.concatenate([t.astype(x.dtype) for t in a]) if len(a) > 1 else a[0].astype(x.dtype)
    u = checkpoint_name(jnp.einsum("...i,ri->...r", x, a_cat), "lora_u")  # kept by remat="matmuls"
    ranks = [t.shape[0] for t in a]
    us = jnp.split(u, list(np.cumsum(ranks)[:-1]), axis=-1) if len(a) > 1 else [u]
    ys = tuple(jnp.einsum("...r,ro->...o", ui, bi.astype(x.dtype)) for ui, bi in zip(us, b))
    return ys, (x, u, a_cat, a, b)


def _lora_bwd(res, dys):
    x, u, a_cat, a, b = res
    x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
    ranks = np.cumsum([0] + [t.shape[0] for t in a])
    db, du = [], []
    for i, (bi, dy) in enumerate(zip(b, dys)):
        dy2 = dy.reshape(-1, dy.shape[-1])
        db.append(jnp.einsum("nr,no->ro", u2[:, ranks[i]:ranks[i + 1]], dy2,
                             preferred_element_type=jnp.float32).astype(bi.dtype))
        du.append(jnp.einsum("no,ro->nr", dy2, bi.astype(x.dtype)))
    du = jnp.concatenate(du, axis=-1) if len(du) > 1 else du[0]
    da_cat = jnp.einsum("nr,ni->ri", du, x2, preferred_element_type=jnp.float32)
    dx = jnp.einsum("nr,ri->ni", du, a_cat).reshape(x.shape)
    da = tuple(da_cat[ranks[i]:ranks[i + 1]].astype(ai.dtype) for i, ai in enumerate(a))
    return dx.astype(x.dtype), da, tuple(db)


lora_deltas.defvjp(_lora_fwd, _lora_bwd)


def maybe_lora(x: jax.Array, lora_layer: Any, names: tuple[str, ...], scale: float) -> dict[str, jax.Array]:
    """The scaled LoRA updates {name: delta} of the adapted projections among `names`, all on input x.

    The scale is folded into B (an [r, out] multiply) rather than applied to each update.
    """
    names = tuple(n for n in names if lora_layer is not None and n in lora_layer)
    if not names:
        return {}
    a = tuple(lora_layer[n]["a"] for n in names)
    b = tuple(lora_layer[n]["b"] * jnp.asarray(scale, lora_layer[n]["b"].dtype) for n in names)
    return dict(zip(names, lora_deltas(x, a, b)))


def merged_delta(lora_layer_stack: dict, name: str, scale: float) -> jax.Array:
    """Dense update W_delta [L, in, out] = scale * A^T B, for merging into the base weights."""
    p = lora_layer_stack[name]
    return scale * jnp.einsum("lri,lro->lio", p["a"].astype(jnp.float32), p["b"].astype(jnp.float32))


def merge_lora(params: dict, lora: dict, lcfg: LoraConfig, cfg: ModelConfig) -> dict:
    """Base params with the adapters folded in (for export / adapter-free inference).

    Knows the packed layout of llama.py: q/k/v live in `qkv [L, D, Hkv*(G+2)*hd]`,
    gate/up interleaved in `gate_up [L, D, F*2]`.
    """
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    layers = dict(params["layers"])

    def add(name: str, key: str, unflat: tuple, index, shape) -> None:
        if name not in lora:
            return
        w = layers[key]
        delta = merged_delta(lora, name, lcfg.scale).reshape(shape).astype(w.dtype)
        layers[key] = w.reshape(unflat).at[index].add(delta).reshape(w.shape)

    full = slice(None)
    qkv = (L, D, H, G + 2, hd)
    add("q", "qkv", qkv, (full, full, full, slice(0, G)), (L, D, H, G, hd))
    add("k", "qkv", qkv, (full, full, full, G), (L, D, H, hd))
    add("v", "qkv", qkv, (full, full, full, G + 1), (L, D, H, hd))
    add("o", "o", (L, H * G * hd, D), (full,), (L, H * G * hd, D))
    add("gate", "gate_up", (L, D, F, 2), (full, full, full, 0), (L, D, F))
    add("up", "gate_up", (L, D, F, 2), (full, full, full, 1), (L, D, F))
    add("down", "down", (L, F, D), (full,), (L, F, D))
    return {**params, "layers": layers}
