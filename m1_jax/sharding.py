"""Device meshes from `--mesh` strings, the one logical-axis -> mesh-axis table, and divisibility checks.

Modules only name logical axes ("embed", "experts", "batch", ...); this file says which mesh axes
shard each of them. A mesh string is either positional ("8x64") or named ("data=8,expert=64", or with
colons, "data:8,context:8").
Positional names by rank: 1 -> data; 2 -> data x expert; 3 -> data x fsdp x expert;
4 -> data x fsdp x expert x tensor.

Axes:
- data:   batch, and ZeRO-3/FSDP sharding of every parameter and optimizer moment (their "embed" dim).
- fsdp:   the same as data (a separate name so a pod can keep data across slices and fsdp within one).
- expert: the experts; it also shards the batch (tokens meet their experts by all-to-all, MaxText style)
          and, for non-expert weights, the "embed" dim (FSDP), so a 2-dim data x expert mesh keeps only
          1/(data*expert) of the attention weights, embedding and LM head per device.
- expert_ffn: internal. When the expert axis is larger than num_experts (8x64 with 32 experts),
          `make_mesh(..., num_experts=E)` factors it into expert = gcd(size, E) and expert_ffn = the rest
          (the fastest-varying, i.e. nearest, devices). Experts split over `expert`, the expert FFN width
          (logical "expert_mlp") over `expert_ffn`; the batch still spans both. We chose a factored mesh
          over a rule that splits one axis unevenly because PartitionSpecs can only name whole axes.
- tensor: attention heads / kv heads, the vocabulary and the expert FFN width (Megatron-style).
- context: the sequence (sequence / context parallelism for long contexts): activations' "length" dim, and,
          like data, the FSDP sharding of every parameter. Lightning layers combine the per-device states by
          LASP-2 and softmax layers gather keys and values over it (m1_jax/layers/context_parallel.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
from absl import logging
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "expert", "expert_ffn", "tensor")
_POSITIONAL = {
    1: ("data",),
    2: ("data", "expert"),
    3: ("data", "fsdp", "expert"),
    4: ("data", "fsdp", "expert", "tensor"),
}

# The one table: logical axis -> (mesh axes for parameters and optimizer state, mesh axes for activations).
# Parameters and activations share logical names ("embed" is the hidden dim of both), but a parameter's
# embed dim is FSDP-sharded over the batch axes while an activation's is not (its batch dim already
# uses them). A mesh axis can shard only one dim of an array: parameter dims claim axes in the order
# of _PARAM_PRIORITY, so experts/heads/vocab take their model-parallel axes before embed takes the rest.
_BATCH = ("data", "fsdp", "expert", "expert_ffn")
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None, tuple[str, ...] | None], ...] = (
    # logical       params                       activations
    ("batch",       None,                        _BATCH),
    ("length",      None,                        ("context",)),
    ("tokens",      None,                        _BATCH + ("context",)),  # batch x length flattened
    ("embed",       ("fsdp", "data", "context", "expert", "expert_ffn"), None),
    ("vocab",       ("tensor",),                 ("tensor",)),
    ("heads",       ("tensor",),                 ("tensor",)),
    ("kv_heads",    ("tensor",),                 ("tensor",)),
    ("head_dim",    None,                        None),
    ("experts",     ("expert",),                 ("expert",)),
    ("expert_mlp",  ("expert_ffn", "tensor"),    ("expert_ffn", "tensor")),
    ("layers",      None,                        None),
)
_PARAM_PRIORITY = ("experts", "expert_mlp", "heads", "kv_heads", "vocab", "embed")


def parse_mesh_shape(spec: str | None, num_devices: int | None) -> dict[str, int]:
    """{"axis": size} for a mesh string; None or "" means every device data-parallel.

    num_devices None skips the device-count check (used before jax is imported).
    """
    if spec is None or not spec.strip():
        if num_devices is None:
            raise ValueError("an empty mesh spec needs the device count")
        return {"data": num_devices}
    spec = spec.replace(" ", "").replace(":", "=")
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
    if num_devices is not None and total != num_devices:
        raise ValueError(f"mesh {spec!r} needs {total} devices, found {num_devices}; pass a --mesh whose "
                         f"sizes multiply to {num_devices} (e.g. --mesh={num_devices})")
    return shape


def mesh_device_count(spec: str | None) -> int | None:
    """Devices a mesh string needs (None for the default all-devices mesh); no jax needed."""
    if spec is None or not spec.strip():
        return None
    return math.prod(parse_mesh_shape(spec, None).values())


def _size(spec: str, text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"mesh {spec!r}: {text!r} is not an integer axis size") from None
    if size < 1:
        raise ValueError(f"mesh {spec!r}: axis sizes must be >= 1, got {size}")
    return size


def factor_expert_axis(shape: dict[str, int], num_experts: int | None) -> dict[str, int]:
    """Splits expert=X into expert=gcd(X, E) x expert_ffn=X/gcd when X exceeds the expert count E."""
    x = shape.get("expert", 1)
    if num_experts is None or x <= num_experts or "expert_ffn" in shape:
        return dict(shape)
    e = math.gcd(x, num_experts)
    out = {}
    for name, size in shape.items():
        if name == "expert":
            out["expert"], out["expert_ffn"] = e, x // e
        else:
            out[name] = size
    return out


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None, *,
              num_experts: int | None = None) -> Mesh:
    """A Mesh over `devices` (default: every device of every host) with Auto axes (GSPMD propagates).

    num_experts: factor an expert axis larger than the expert count (see the module docstring).
    """
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    shape = factor_expert_axis(parse_mesh_shape(spec, len(devices)), num_experts)
    names, sizes = tuple(shape), tuple(shape.values())
    axis_types = (AxisType.Auto,) * len(names)
    if all_devices and jax.default_backend() != "cpu":
        try:  # topology-aware order on TPU/GPU (hosts along the slowest axis, data)
            return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
        except Exception:  # odd shapes the topology helper rejects: plain order still works
            pass
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=axis_types)


def abstract_mesh(spec: str | None, num_devices: int, *, num_experts: int | None = None):
    """The AbstractMesh make_mesh would build on num_devices devices (shardings and shard shapes without
    devices, e.g. for ahead-of-time lowering or host-side planning)."""
    shape = factor_expert_axis(parse_mesh_shape(spec, num_devices), num_experts)
    return jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def _present(mesh: Mesh) -> dict[str, int]:
    return {name: size for name, size in mesh.shape.items() if size > 1}


def logical_rules(mesh: Mesh) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Activation rules (flax `logical_axis_rules` format) for the axes this mesh has (size-1 dropped)."""
    present = _present(mesh)
    rules = []
    for logical, _, axes in LOGICAL_RULES:
        kept = tuple(a for a in (axes or ()) if a in present)
        rules.append((logical, kept if kept else None))
    return tuple(rules)


def param_rules(mesh: Mesh) -> dict[str, tuple[str, ...]]:
    present = _present(mesh)
    return {logical: tuple(a for a in (axes or ()) if a in present) for logical, axes, _ in LOGICAL_RULES}


def param_spec(logical_axes: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one parameter: each dim gets its rule's mesh axes not claimed by a dim that
    comes earlier in _PARAM_PRIORITY."""
    rules = param_rules(mesh)
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in m1_jax/sharding.py LOGICAL_RULES")
    used: set[str] = set()
    chosen: dict[int, tuple[str, ...]] = {}
    order = sorted((i for i, n in enumerate(logical_axes) if n is not None),
                   key=lambda i: _PARAM_PRIORITY.index(logical_axes[i]) if logical_axes[i] in _PARAM_PRIORITY
                   else -1)
    for i in order:
        axes = tuple(a for a in rules[logical_axes[i]] if a not in used)
        used.update(axes)
        chosen[i] = axes
    return PartitionSpec(*(_entry(chosen.get(i, ())) for i in range(len(logical_axes))))


def _entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return dict(logical_rules(mesh))["batch"] or ()


def context_axes(mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split activations' "length" dim: the context-parallel axes (none
    without a mesh)."""
    return () if mesh is None else dict(logical_rules(mesh))["length"] or ()


def token_axes(mesh, expert_axis: str = "expert") -> tuple[str, ...]:
    """The mesh axes that split the batch x length tokens (the "tokens" rule: the batch axes, then context), with
    `expert_axis` among them even at size 1 (expert parallelism exchanges tokens over it)."""
    rule = next(acts for logical, _, acts in LOGICAL_RULES if logical == "tokens")
    return tuple(a for a in rule + ((expert_axis,) if expert_axis not in rule else ())
                 if a in mesh.axis_names and (mesh.shape[a] > 1 or a == expert_axis))


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Shards dimension `batch_dim` of an ndim-array over the batch axes, and the dim after it (the length of
    [B, L] token arrays) over the context axes; the rest replicated."""
    spec = [None] * ndim
    axes = batch_axes(mesh)
    spec[batch_dim] = axes if axes else None
    context = context_axes(mesh)
    if context and batch_dim + 1 < ndim:
        spec[batch_dim + 1] = _entry(context)
    return NamedSharding(mesh, PartitionSpec(*spec))


def host_share(sharding, global_shape, process_index: int | None = None) -> tuple[int, int, slice]:
    """(index, count, length) of the part of a global [B, L] batch under `sharding` that one host loads: hosts
    whose devices hold the same rows (a context or model axis spanning hosts) load the same rows, so there are
    `count` distinct row blocks of B / count rows and this host loads block `index`; `length` is the slice of
    the sequence its devices hold (all of it unless a context axis spans hosts)."""
    me = jax.process_index() if process_index is None else process_index

    def bounds(index, dim):
        part = index[dim]
        return (part.start or 0, global_shape[dim] if part.stop is None else part.stop)

    rows, length = {}, []
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        rows.setdefault(device.process_index, []).append(bounds(index, 0))
        if device.process_index == me:
            length.append(bounds(index, 1))
    block = {p: (min(a for a, _ in r), max(b for _, b in r)) for p, r in rows.items()}
    distinct = sorted(set(block.values()))
    sizes = {b - a for a, b in distinct}
    if len(sizes) != 1 or sum(b - a for a, b in distinct) != global_shape[0]:
        raise ValueError(f"hosts hold overlapping or uneven row blocks {distinct} of {global_shape[0]} rows under "
                         f"{sharding.spec}; order the mesh so each host's devices hold whole row blocks")
    return distinct.index(block[me]), len(distinct), slice(min(a for a, _ in length), max(b for _, b in length))


def to_host(tree):
    """numpy copies of a tree of jax arrays on every process: arrays that span other processes' devices (a
    multi-host mesh) are all-gathered, the rest fetched."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs of `shapes` carrying `shardings` (the target a checkpoint restores or a lowering takes)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def activation_spec(logical_axes: Sequence[str | None], mesh) -> PartitionSpec:
    """PartitionSpec of an activation from its logical axis names (the activation column of LOGICAL_RULES)."""
    rules = dict(logical_rules(mesh))
    return PartitionSpec(*(None if name is None else _entry(rules.get(name) or ()) for name in logical_axes))


def context_mesh():
    """The mesh set with `jax.set_mesh` (mesh_context) while tracing, or None when there is none or every axis
    has size 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return None
    return mesh


def _divides(shape, spec, mesh) -> bool:
    return all(size % math.prod(mesh.shape[a] for a in _spec_axes(entry)) == 0
               for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))))


def shard_map_by_logical_axes(fn, in_axes, out_axes, *, what: str, fallback=None):
    """fn run per device under the context mesh, each operand split by the activation rules of its logical
    axes (one tuple of names per positional operand, None = the whole array on every device); fn itself when no
    mesh is set. For Pallas and FFI kernels, which GSPMD cannot partition: without this, XLA gathers their
    operands onto every device (GPU) or refuses to compile (Mosaic on TPU).

    It applies only where every mesh axis splits some operand and the mesh divides every operand's dims: the
    backward pass sums a replicated operand's gradient over every mesh axis, which is right only when each
    device holds distinct work. Elsewhere `fallback` (default fn; give one when fn uses collectives) runs under
    GSPMD, with a warning naming `what`.
    """
    mesh = context_mesh()
    fallback = fn if fallback is None else fallback
    if mesh is None:
        return fallback

    def spec(axes):
        return PartitionSpec() if axes is None else activation_spec(axes, mesh)

    def run(*args):
        in_specs = tuple(spec(axes) for axes in in_axes)
        used = {a for s in in_specs for entry in s for a in _spec_axes(entry)}
        present = {name for name, size in mesh.shape.items() if size > 1}
        fits = all(arg is None or _divides(np.shape(arg), s, mesh) for arg, s in zip(args, in_specs))
        if not fits or not present <= used:
            logging.warning("%s runs under GSPMD, not per device: its operands (shapes %s) do not split over every "
                            "axis of mesh %s as %s", what, [np.shape(a) for a in args], dict(mesh.shape), in_specs)
            return fallback(*args)
        is_axes = lambda x: x is None or (isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))
        out_specs = jax.tree.map(spec, out_axes, is_leaf=is_axes)
        # check_vma=False: Pallas and FFI calls declare outputs without varying-manual-axes types.
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return run


def mesh_context(mesh: Mesh | None):
    """Mesh + logical rules active while tracing, so with_logical_constraint inside the model applies.

    None: no mesh, no rules (single-device tracing, the constraints are no-ops).
    """
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(logical_rules(mesh)))
    return stack


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def check_param_divisibility(boxed_tree, mesh: Mesh) -> None:
    """Raises ValueError naming the parameter, dim and mesh axes when a sharded dim does not divide."""
    problems = []
    for path, box in jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=_is_box)[0]:
        if not _is_box(box):
            continue
        names, shape = box.names, box.value.shape
        spec = param_spec(names, mesh)
        for d, (size, entry) in enumerate(zip(shape, spec)):
            axes = _spec_axes(entry)
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                problems.append(f"parameter {_path_str(path)} {tuple(shape)}: dim {d} ({names[d]!r}, size {size})"
                                f" is not divisible by mesh axes {axes} (size {ways})")
    if problems:
        raise ValueError("sharding does not divide the model:\n  " + "\n  ".join(problems[:20]) +
                         ("\n  ..." if len(problems) > 20 else "") +
                         f"\nmesh {dict(mesh.shape)}; change --mesh or the model config")


def check_activation_divisibility(cfg, mesh: Mesh, micro_batch: int | None = None,
                                  seq_len: int | None = None) -> None:
    """Host-side check of the activation dims the model constrains (batch, length, heads, kv heads, vocab)."""
    rules = dict(logical_rules(mesh))
    dims = [("heads", "num_heads", cfg.num_heads), ("kv_heads", "num_kv_heads", cfg.num_kv_heads),
            ("vocab", "vocab_size", cfg.vocab_size), ("experts", "num_experts", cfg.num_experts)]
    if micro_batch is not None:
        dims.insert(0, ("batch", "micro-batch size (data.batch_size / train.grad_accum_steps)", micro_batch))
    if seq_len is not None:
        dims.insert(1, ("length", "sequence length (data.seq_len)", seq_len))
    problems = []
    for logical, what, size in dims:
        axes = rules[logical] or ()
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            problems.append(f"activation dim {logical!r} ({what} = {size}) is not divisible by mesh axes "
                            f"{axes} (size {ways})")
    if problems:
        raise ValueError("sharding does not divide the activations:\n  " + "\n  ".join(problems) +
                         f"\nmesh {dict(mesh.shape)}; change --mesh, the batch size or the model config")


def logical_shardings(boxed_tree, mesh: Mesh, *, check: bool = True):
    """NamedShardings for a tree of flax LogicallyPartitioned boxes (e.g. abstract_params(boxed=True)).

    Parameters are FSDP/ZeRO-3 sharded (see LOGICAL_RULES); with check, a dim that does not divide
    raises a ValueError naming it.
    """
    if check:
        check_param_divisibility(boxed_tree, mesh)
    return jax.tree.map(lambda b: NamedSharding(mesh, param_spec(b.names, mesh)) if _is_box(b) else replicated(mesh),
                        boxed_tree, is_leaf=_is_box)


def shard_bytes(shape_tree, sharding_tree) -> int:
    """Bytes one device holds of a tree of arrays/ShapeDtypeStructs under the given shardings."""
    sizes = jax.tree.map(lambda leaf, sh: math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize,
                         shape_tree, sharding_tree)
    return int(sum(jax.tree.leaves(sizes)))
