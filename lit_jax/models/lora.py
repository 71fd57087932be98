"""LoRA adapters: parameters, their low-rank update, and merging into the base for export.

The decoder is the base model plus these adapters, so target and decoder share one copy
of the base weights. Adapters are stacked per layer like the base (`[n_layers, ...]`).

`lora_delta` has a hand-written VJP: XLA:CPU otherwise materialises transposed copies
of the large activation/gradient operands; here every large operand is used as stored
and only the rank-r operands are transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def maybe_lora(x: jax.Array, lora_layer: Any, names: tuple[str, ...], scale: float,
               place: Callable[[list[tuple[str, jax.Array]]], jax.Array] | None = None) -> jax.Array | None:
    """The scaled LoRA update of the adapted projections among `names` (all on input x), or None.

    Several adapters (q|k|v, gate|up) run as one: their A matrices stacked into [sum r, in],
    their B matrices placed by `place([(name, scale * B)])` into one [sum r, out] matrix in
    the fused projection's output layout (zeros elsewhere). The update then is two matmuls
    and adds to the fused output directly, instead of 2 matmuls, a slice and an add per
    adapter: these skinny matmuls cost far more per FLOP than the base projections.
    """
    present = [n for n in names if lora_layer is not None and n in lora_layer]
    if not present:
        return None
    a = jnp.concatenate([lora_layer[n]["a"] for n in present]) if len(present) > 1 else lora_layer[present[0]]["a"]
    bs = [(n, lora_layer[n]["b"] * jnp.asarray(scale, lora_layer[n]["b"].dtype)) for n in present]
    if place is None:
        if len(bs) > 1:
            raise ValueError(f"adapters {present} share an input but no layout to place them in")
        b = bs[0][1]
    else:
        b = place(bs)
    return lora_delta(x, a, b)


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
