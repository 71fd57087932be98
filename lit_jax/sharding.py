"""Meshes and logical-axis sharding: the same code on 1 CPU, 8 fake CPUs, a GPU host or a TPU pod.

Every array carries logical axis names (`llama.param_axes`, `lora.lora_axes`, the batch's
leading axis); a rules table maps each name to mesh axes (or None = replicated), resolved
by flax (`flax.linen.logical_to_mesh_axes`: rules in order of precedence, a mesh axis
used at most once per array). A dimension that does not split evenly over its mesh axes
(in whole units, see `logical_to_spec`) is replicated instead, with a warning, so one
rules table serves models of every size (SmolLM2's 3 KV heads on a tensor axis of 2, say);
`strict=True` makes that an error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None); earlier rules take precedence
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),  # fused q|k|v output, per KV-head group (unit: (G + 2) * head_dim)
    ("mlp", "tensor"),
    ("gate_up", "tensor"),  # interleaved gate/up output
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("seq", None),
    ("slots", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) over `devices` (default: all), via `jax.make_mesh`.

    shape: 3 sizes; one may be -1 (all remaining devices). Devices are ordered by their
    physical topology (jax.make_mesh); the axes are `AxisType.Auto` (shardings given by
    NamedSharding, as the rest of lit_jax does). Raises ValueError when shape does not have
    3 entries, has more than one -1, or does not use exactly the devices given.
    """
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
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _flat(axes: Any) -> tuple[str, ...]:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _mesh_size(mesh: Mesh, axes: Any) -> int:
    missing = [a for a in _flat(axes) if a not in mesh.shape]
    if missing:
        raise ValueError(f"rules name mesh axes {missing} that the mesh {dict(mesh.shape)} does not have")
    return int(np.prod([mesh.shape[a] for a in _flat(axes)]))


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES, *,
    units: Mapping[str, int] | None = None, strict: bool = False, name: str = "",
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have these logical axis names.

    The rules are resolved by `flax.linen.logical_to_mesh_axes` (earlier rules first; a
    mesh axis serves one dimension at most; a name repeated in `logical` is sharded at its
    first occurrence only). Then each sharded dimension must split into whole units:
    with unit u = units.get(axis, 1) and n devices on its mesh axes, a dimension of size s
    is sharded only if s % u == 0 and (s // u) % n == 0 (a fused q|k|v axis of
    H * (G + 2) * hd elements with unit (G + 2) * hd: every shard holds whole KV-head
    groups). A dimension that does not gives up its rule (its mesh axes are then free
    for a later rule) and, if no other rule fits, is replicated with one absl warning per
    array naming `name`, the axis, its size and unit, the mesh axes and their size.

    Raises ValueError when len(logical) != len(shape), a rule names a mesh axis the mesh
    lacks, or (strict=True) a dimension with a rule ends up replicated, with the message
    the warning would have had.
    """
    logical, shape = tuple(logical), tuple(int(s) for s in shape)
    if len(logical) != len(shape):
        raise ValueError(f"{name or 'array'}: logical axes {logical} do not match shape {shape}")
    units = dict(units or {})
    names = tuple(n if n is None or n not in logical[:i] else None for i, n in enumerate(logical))  # flax: once
    rules = [(k, tuple(v) if isinstance(v, list) else v) for k, v in rules]
    refused: dict[int, Any] = {}
    while True:
        spec = list(nn.logical_to_mesh_axes(names, rules))
        bad = [i for i, axes in enumerate(spec) if axes is not None
               and not _splits(shape[i], units.get(names[i], 1), _mesh_size(mesh, axes))]
        if not bad:
            break
        for i in bad:  # give the rule up and resolve again: its mesh axes may serve another dimension
            refused[i] = spec[i]
            rules.remove((names[i], spec[i]))
    replicated = [i for i in refused if spec[i] is None]
    if replicated:
        parts = [f"logical axis {names[i]!r} of size {shape[i]} (unit {units.get(names[i], 1)}) over mesh axes "
                 f"{_flat(refused[i])} of size {_mesh_size(mesh, refused[i])}" for i in replicated]
        message = f"{name or 'array'} {shape}: " + "; ".join(parts) + " does not split into whole units"
        if strict:
            raise ValueError(message + " (strict sharding: replicating it is refused)")
        logging.warning(message + "; replicated instead")
    return PartitionSpec(*spec)


def _splits(size: int, unit: int, n: int) -> bool:
    if unit < 1:
        raise ValueError(f"unit {unit} must be a positive number of elements")
    return size % unit == 0 and (size // unit) % n == 0


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules=DEFAULT_RULES, *,
                   units: Mapping[str, int] | None = None, strict: bool = False) -> Any:
    """NamedSharding per leaf, from a tree of logical-axis tuples and a matching tree of arrays/shapes.

    Each leaf goes through `logical_to_spec` with its key path (`jax.tree_util.keystr`,
    e.g. "['layers']['qkv']") as the name in warnings and errors. Raises ValueError where
    the trees do not match, or as `logical_to_spec` does.
    """
    axes_leaves, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)
    shape_leaves = treedef.flatten_up_to(shapes_tree)
    return jax.tree.unflatten(treedef, [
        NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh, rules, units=units, strict=strict,
                                            name=jax.tree_util.keystr(path)))
        for (path, ax), x in zip(axes_leaves, shape_leaves)
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


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Within: `mesh` is JAX's current mesh (jax.set_mesh) and `rules` flax's logical-axis rules, so
    the activation constraints in the model (`constrain`) take effect in whatever is traced here."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x under a sharding constraint from logical axis names (e.g. ("batch", None, None) for the
    residual stream [B, T, D]), inside `mesh_rules`; outside, or on one device, x unchanged.

    Why: with only the inputs' shardings, XLA's partitioner may multiply a batch-sharded activation
    by an fsdp-sharded weight by splitting the contraction and all-reducing the whole batch's
    activations; pinning the residual stream to the batch axes makes it gather the weights instead
    (FSDP). A dimension its mesh axes do not divide is left unconstrained (activations change
    size from call to call: a generation batch of 3 on 8 devices).
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return x
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    spec = [a if a is None or x.shape[i] % int(np.prod([mesh.shape[n] for n in _flat(a)])) == 0 else None
            for i, a in enumerate(spec)]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def placed_like(tree: Any, mesh: Mesh) -> Any:
    """Each leaf's NamedSharding on `mesh` if it has one, else replicated (scalars, optimizer counters)."""
    def one(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh)

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis of an ndim >= 1 array over the rules' "batch" mesh axes, the rest replicated."""
    if ndim < 1:
        raise ValueError("a batch array needs a leading batch axis (ndim >= 1)")
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def host_batch_to_global(batch: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Assembles each host's slice of a batch into global arrays sharded over the batch axes.

    batch: any pytree (a `LitBatch`, a dict) of host arrays whose leading axis is this
    process's rows [b, ...]; returns the same pytree type of global jax.Arrays
    [b * process_count, ...]. Raises ValueError for a 0-d leaf; JAX raises when the rows
    do not divide over the batch mesh axes.
    """
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v)),
        batch)


def distributed_init_args(environ: Mapping[str, str]) -> dict[str, int]:
    """num_processes / process_id for jax.distributed.initialize from JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    JAX reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS from the environment itself, but not
    these two; without them, processes outside a cluster JAX detects (one per GPU on one host,
    launch/local_gpu.py --per-gpu) could not be joined by their environment alone.
    """
    args = {}
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if environ.get(var, "").strip():
            try:
                args[key] = int(environ[var])
            except ValueError:
                raise ValueError(f"{var}={environ[var]!r}: must be an integer") from None
    return args


def maybe_initialize_distributed(enabled: bool) -> None:
    """jax.distributed.initialize() for multi-host runs (TPU pods, GPU clusters); a no-op otherwise.

    On TPU pods and SLURM/Open MPI GPU clusters JAX discovers the coordinator itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if enabled:  # must run before anything touches a JAX backend
        jax.distributed.initialize(**distributed_init_args(os.environ))
