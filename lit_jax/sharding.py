"""Meshes and logical-axis sharding: the same code on 1 CPU, 8 fake CPUs, a GPU host or a TPU pod.

Every array carries logical axis names (`llama.param_axes`, `lora.lora_axes`, batch
fields); a rules table maps each name to a mesh axis (or None = replicated). A dimension
that a mesh axis does not divide evenly is replicated instead of failing, so one rules
table serves models of every size (SmolLM2's 3 KV heads on a tensor axis of 2, say).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("seq", None),
    ("slots", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one entry of `shape` may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape {shape} must have 3 entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes; uneven or reused mesh axes -> replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if not flat or size % _mesh_size(mesh, flat) or used & set(flat):
            spec.append(None)
            continue
        used |= set(flat)
        spec.append(axes)
    return PartitionSpec(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding per leaf, from a tree of logical axes and a matching tree of arrays/shapes."""
    axes_leaves, treedef = jax.tree.flatten(axes_tree, is_leaf=_is_axes)
    shape_leaves = treedef.flatten_up_to(shapes_tree)
    return jax.tree.unflatten(treedef, [
        NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh, rules))
        for ax, x in zip(axes_leaves, shape_leaves)
    ])


def put_consuming(tree: dict, shardings: Any = None) -> dict:
    """device_put leaf by leaf, dropping each host array as soon as it is on device.

    Host memory then peaks near one copy of the model instead of two. `tree` (nested
    dicts of numpy arrays) is emptied in place; use the returned tree.
    """
    flat_shardings = None
    if shardings is not None:
        flat_shardings = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])

    def walk(node: dict, path: tuple) -> dict:
        out = {}
        for key in list(node):
            value = node.pop(key)
            here = path + (jax.tree_util.DictKey(key),)
            if isinstance(value, dict):
                out[key] = walk(value, here)
            else:
                sharding = None if flat_shardings is None else flat_shardings[here]
                out[key] = jax.block_until_ready(jax.device_put(value, sharding))
            del value
        return out

    return walk(tree, ())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def placed_like(tree: Any, mesh: Mesh) -> Any:
    """Each leaf's NamedSharding on `mesh` if it has one, else replicated (scalars, optimizer counters)."""
    def one(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh)

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"], *([None] * (ndim - 1))))


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
        for k, v in batch.items()
    }


def maybe_initialize_distributed(enabled: bool) -> None:
    """jax.distributed.initialize() for multi-host runs (TPU pods, GPU clusters); a no-op otherwise.

    On TPU pods and SLURM/Open MPI GPU clusters JAX discovers the coordinator itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if enabled:  # must run before anything touches a JAX backend
        jax.distributed.initialize()
