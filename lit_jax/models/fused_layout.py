"""The fused projections' weight layouts: one owner of where q, k, v, gate and up live.

Two matmuls of a block are fused: q|k|v (one GEMM instead of three) and gate|up (one
instead of two). A fused output axis is laid out `[groups, slots, unit]`, flattened:

  qkv      groups = KV heads H, slots = G query heads + k + v, unit = head_dim
           (per KV head: its G query heads, then its key, then its value)
  gate_up  groups = MLP features F, slots = gate + up, unit = 1   (interleaved pairs)

so a contiguous shard of the axis that holds whole groups holds everything one KV head
(or one MLP feature) needs: the unit of sharding is `slots * unit` elements
(`axis_units`). A member projection in its own (HF) layout is `[groups, n, unit]`
flattened (q: query head h*G+g at [h, g]), and occupies slots [first, first + n).

Every user goes through this table: the forward pass (`parts`), LoRA (`place`,
`add_member`), checkpoint loading (`fuse`) and export (`split`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from lit_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FusedLayout:
    """One fused output axis: `members` are (projection, first slot, number of slots)."""

    param: str  # the fused parameter's name in params["layers"]
    groups: int
    unit: int
    members: tuple[tuple[str, int, int], ...]

    @property
    def slots(self) -> int:
        return sum(n for _, _, n in self.members)

    @property
    def width(self) -> int:
        """Size of the fused axis: groups * slots * unit."""
        return self.groups * self.slots * self.unit

    def _slot(self, name: str) -> tuple[int, int]:
        for member, first, n in self.members:
            if member == name:
                return first, n
        raise KeyError(f"{name!r} is not part of the fused {self.param} (members: {self.names})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m for m, _, _ in self.members)

    def member_width(self, name: str) -> int:
        """Size of a member's own output axis: groups * n * unit."""
        return self.groups * self._slot(name)[1] * self.unit

    def unflatten(self, x):
        """[..., width] -> [..., groups, slots, unit] (a view: no data moves)."""
        return x.reshape(*x.shape[:-1], self.groups, self.slots, self.unit)

    def parts(self, x) -> dict[str, object]:
        """{member: [..., groups, n, unit]} slices of a fused [..., width] array."""
        u = self.unflatten(x)
        return {name: u[..., first:first + n, :] for name, first, n in self.members}

    def split(self, x) -> dict[str, object]:
        """{member: [..., member_width]} in each member's own layout (export)."""
        return {name: p.reshape(*x.shape[:-1], -1) for name, p in self.parts(x).items()}

    def fuse(self, members: Mapping[str, object]):
        """Members [..., member_width] (numpy or jax, all of them) -> the fused [..., width] array."""
        missing = set(self.names) - set(members)
        if missing:
            raise KeyError(f"fusing {self.param} needs {sorted(missing)}")
        xp = np if all(isinstance(m, np.ndarray) for m in members.values()) else jnp
        views = []
        for name, _, n in sorted(self.members, key=lambda m: m[1]):
            m = members[name]
            views.append(m.reshape(*m.shape[:-1], self.groups, n, self.unit))
        out = xp.concatenate(views, axis=-2)
        return out.reshape(*out.shape[:-3], self.width)

    def place(self, name: str, x):
        """A member's [..., member_width] as a fused [..., width] array, zeros in the other slots (jax)."""
        first, n = self._slot(name)
        v = x.reshape(*x.shape[:-1], self.groups, n, self.unit)
        pad = [(0, 0)] * (v.ndim - 2) + [(first, self.slots - first - n), (0, 0)]
        return jnp.pad(v, pad).reshape(*x.shape[:-1], self.width)

    def add_member(self, fused, name: str, delta):
        """fused [..., width] with a member's delta [..., member_width] added in its slots (jax)."""
        first, n = self._slot(name)
        d = delta.reshape(*delta.shape[:-1], self.groups, n, self.unit).astype(fused.dtype)
        return self.unflatten(fused).at[..., first:first + n, :].add(d).reshape(fused.shape)


def qkv_layout(cfg: ModelConfig) -> FusedLayout:
    G = cfg.group_size
    return FusedLayout("qkv", cfg.num_kv_heads, cfg.head_dim, (("q", 0, G), ("k", G, 1), ("v", G + 1, 1)))


def gate_up_layout(cfg: ModelConfig) -> FusedLayout:
    return FusedLayout("gate_up", cfg.intermediate_size, 1, (("gate", 0, 1), ("up", 1, 1)))


def fused_layouts(cfg: ModelConfig) -> tuple[FusedLayout, ...]:
    return qkv_layout(cfg), gate_up_layout(cfg)


def layout_of(cfg: ModelConfig, projection: str) -> FusedLayout | None:
    """The fused layout a projection (q, k, v, o, gate, up, down) lives in; None when it is stored alone."""
    for layout in fused_layouts(cfg):
        if projection in layout.names:
            return layout
    return None


def axis_units(cfg: ModelConfig) -> dict[str, int]:
    """Logical axis -> elements in one indivisible unit (sharding keeps units whole).

    qkv: one KV head's q|k|v; gate_up: one gate/up pair; heads (query heads x head_dim):
    the G query heads of one KV head, so a shard of o's input matches a shard of q;
    kv_heads (KV heads x head_dim): one head.
    """
    qkv, gate_up = fused_layouts(cfg)
    return {"qkv": qkv.slots * qkv.unit, "gate_up": gate_up.slots * gate_up.unit,
            "heads": cfg.group_size * cfg.head_dim, "kv_heads": cfg.head_dim}
