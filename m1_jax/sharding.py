"""Device meshes from `--mesh` strings and the one logical-axis -> mesh-axis table.

Modules only name logical axes ("embed", "experts", "batch", ...); this file says which mesh axes
shard each of them. A mesh string is either positional ("8x64") or named ("data=8,expert=64").
Positional names by rank: 1 -> data; 2 -> data x expert; 3 -> data x fsdp x expert;
4 -> data x fsdp x expert x tensor.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
_POSITIONAL = {
    1: ("data",),
    2: ("data", "expert"),
    3: ("data", "fsdp", "expert"),
    4: ("data", "fsdp", "expert", "tensor"),
}

# The one table. The batch is split over every axis that does not split the model's compute
# (the expert axis also carries batch, as in MaxText: tokens meet their experts by all-to-all).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("experts", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("layers", None),
)


def parse_mesh_shape(spec: str | None, num_devices: int) -> dict[str, int]:
    """{"axis": size} for a mesh string; None or "" means every device data-parallel."""
    if spec is None or not spec.strip():
        return {"data": num_devices}
    spec = spec.replace(" ", "")
    if "=" in spec:
        shape = {}
        for part in spec.split(","):
            name, _, size = part.partition("=")
            if name not in MESH_AXES:
                raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
            if name in shape:
                raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
            shape[name] = _size(spec, size)
    else:
        sizes = [_size(spec, s) for s in spec.split("x")]
        if len(sizes) not in _POSITIONAL:
            raise ValueError(f"mesh {spec!r} has {len(sizes)} dims; use 1-4 dims (data x fsdp x expert x "
                             "tensor) or names like 'data=8,expert=64'")
        shape = dict(zip(_POSITIONAL[len(sizes)], sizes))
    total = math.prod(shape.values())
    if total != num_devices:
        raise ValueError(f"mesh {spec!r} needs {total} devices, found {num_devices}; pass a --mesh whose "
                         f"sizes multiply to {num_devices} (e.g. --mesh={num_devices})")
    return shape


def _size(spec: str, text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"mesh {spec!r}: {text!r} is not an integer axis size") from None
    if size < 1:
        raise ValueError(f"mesh {spec!r}: axis sizes must be >= 1, got {size}")
    return size


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with Auto axes (GSPMD propagates shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(spec, len(devices))
    names = tuple(shape)
    device_array = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


def logical_rules(mesh: Mesh) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """LOGICAL_RULES restricted to the axes this mesh has (size-1 axes dropped too)."""
    present = {name for name, size in mesh.shape.items() if size > 1}
    rules = []
    for logical, axes in LOGICAL_RULES:
        kept = tuple(a for a in (axes or ()) if a in present)
        rules.append((logical, kept if kept else None))
    return tuple(rules)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return dict(logical_rules(mesh))["batch"] or ()


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Shards dimension `batch_dim` of an ndim-array over the batch axes; the rest replicated."""
    spec = [None] * ndim
    axes = batch_axes(mesh)
    spec[batch_dim] = axes if axes else None
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of flax LogicallyPartitioned boxes (e.g. abstract_params(boxed=True))."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(mesh))
