"""Dry run: build the model abstractly, shard it, compile the full train step, report per-device memory.

Nothing is allocated or executed: the state comes from `jax.eval_shape` of its init, the step is
`jit(step, in_shardings, out_shardings).lower(abstract args).compile()`. Per-device bytes come from
two places: the shardings' shard shapes (exact for params and optimizer state of the full model) and
`compiled.memory_analysis()` (what XLA plans to allocate: arguments, outputs, temporaries). On the fake
CPU devices it compiles with XLA:CPU's memory-optimised scheduler (see `_compiler_options`).

Reduced depth: compiling 80 layers for 512 fake CPU devices is slow on a small machine, so `groups=g`
compiles g and g+1 layer groups with the exact per-layer shapes and extrapolates every compiled number
linearly to the full group count (memory grows linearly with scanned groups: stacked params, moments,
gradients, saved residuals). The table says when it did so.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from m1_jax import flops as flops_lib
from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train import step as step_lib

DEVICE_MEMORY = (("H100 80GB", 80e9), ("TPU v5p 95GB", 95e9))
_BATCH_DTYPES = {"tokens": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                 "loss_mask": jnp.float32}
_COMPILED_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")


def topology_devices(name: str):
    """The devices of a real TPU topology such as "v5p:8x8x8", for an ahead-of-time XLA:TPU compile on a host
    without TPUs (jax.experimental.topologies; needs the libtpu wheel). ValueError when that is not possible."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--dry_run_topology={name} compiles through XLA:TPU, which needs libtpu: pip install -e "
                         ".[tpu] (libtpu 0.0.42.*, the pin of jax 0.10.2's tpu extra)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server on this host
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU to lock against other processes
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # libtpu's own message names the bad field
        raise ValueError(f"TPU topology {name!r}: {str(e).splitlines()[0]} (e.g. v5p:2x2x1, v5p:8x8x8)") from None


def reduced_depth(cfg: ModelConfig, groups: int) -> ModelConfig:
    """The same model with `groups` layer groups (same per-layer shapes and layer-kind pattern)."""
    n = groups * cfg.group_period
    return cfg.replace(num_layers=n, layer_types=cfg.layer_types[:n])


def compile_step(cfg: ModelConfig, tx, schedule, mesh, batch_size: int, seq_len: int, accum: int,
                 loss_chunk_size: int = step_lib.DEFAULT_CHUNK_SIZE):
    """Lowers and compiles the sharded train step on abstract inputs; returns (compiled, seconds)."""
    shardings = state_lib.state_shardings(cfg, tx, mesh)
    state = sharding_lib.with_shardings(state_lib.abstract_state(cfg, tx), shardings)
    bsh = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=bsh) for k, dt in _BATCH_DTYPES.items()}
    step = step_lib.make_train_step(cfg, tx, schedule, grad_accum_steps=accum, mesh=mesh, state_shardings=shardings,
                                    loss_chunk_size=loss_chunk_size)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options=_compiler_options(mesh))
    return compiled, time.perf_counter() - start


def _compiler_options(mesh) -> dict[str, str] | None:
    """XLA:CPU compiles a program with collectives under its concurrency-optimised scheduler, whose buffer
    assignment lets every mutually unordered chain be live at once: in the backward pass of a layer group
    the recomputations of all its rematerialised layers then count together (+47 GB/device at M1 scale).
    XLA:CPU also strips jax.checkpoint's optimisation barriers before scheduling; XLA:GPU keeps them until
    after. The dry run only models memory and never executes, so on CPU it asks for XLA:CPU's
    memory-optimised sequential schedule, the kind an accelerator compiles."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _memory(compiled) -> dict[str, float]:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory_analysis() for compiled programs")
    return {k: float(getattr(ma, k)) for k in _COMPILED_KEYS}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def dry_run(setup, *, groups: int | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the dry run for a validated `loop.Setup`; prints and returns the per-device memory table.

    groups: compile this many layer groups (and one more) and extrapolate; None compiles the full depth.
    """
    full, mesh = setup.model, setup.mesh
    tx = opt_lib.make_optimizer(setup.optimizer)
    schedule = opt_lib.make_schedule(setup.optimizer)
    shardings = state_lib.state_shardings(full, tx, mesh)
    shapes = state_lib.abstract_state(full, tx)
    param_bytes = sharding_lib.shard_bytes(shapes.params, shardings.params)
    opt_bytes = sharding_lib.shard_bytes(shapes.opt_state, shardings.opt_state)
    grad_bytes = sharding_lib.shard_bytes(
        jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), shapes.params), shardings.params)

    G = full.num_groups
    depths = [G] if groups is None or groups >= G else [groups, groups + 1]
    compiled_mem, compiled_flops, seconds = [], [], 0.0
    for g in depths:
        compiled, secs = compile_step(reduced_depth(full, g), tx, schedule, mesh, setup.batch_size,
                                      setup.seq_len, setup.grad_accum_steps, setup.loss_chunk_size)
        compiled_mem.append(_memory(compiled))
        compiled_flops.append(_flops(compiled))
        kernels = compiled.as_text().count("custom_call_target=\"tpu_custom_call\"")
        seconds += secs
    if len(depths) == 1:
        mem, xla_flops = compiled_mem[0], compiled_flops[0]
    else:  # linear in the number of groups: m(G) = m(g) + (G - g) * (m(g+1) - m(g))
        g = depths[0]
        mem = {k: compiled_mem[0][k] + (G - g) * (compiled_mem[1][k] - compiled_mem[0][k]) for k in _COMPILED_KEYS}
        xla_flops = compiled_flops[0] + (G - g) * (compiled_flops[1] - compiled_flops[0])
    model_flops = 3.0 * setup.batch_size * flops_lib.forward_flops(full, setup.seq_len) / mesh.devices.size
    peak = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"]
            + mem["temp_size_in_bytes"])
    activations = max(mem["temp_size_in_bytes"] - grad_bytes, 0.0)

    gb = lambda b: f"{b / 1e9:10.3f}"  # noqa: E731
    n_dev = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes.params))
    how = (f"compiled the full depth ({G} layer groups)" if len(depths) == 1 else
           f"compiled {depths[0]} and {depths[1]} of {G} layer groups (exact per-layer shapes) and extrapolated "
           "the compiled numbers linearly to the full depth")
    if _compiler_options(mesh):
        how += "; XLA:CPU memory-optimised scheduler"
    lines = [
        f"dry run: {full.num_layers} layers, {n_params / 1e9:.1f}B params ({full.param_dtype} params and "
        f"moments, {full.dtype} compute); mesh {dict(mesh.shape)} over {n_dev} {platform} devices",
        f"global batch {setup.batch_size} x {setup.seq_len} tokens, grad_accum_steps {setup.grad_accum_steps}, "
        f"loss_chunk_size {setup.loss_chunk_size}; "
        f"{how}; compile {seconds:.0f} s",
        "per-device GB (1 GB = 1e9 bytes)",
        f"  params (shard shapes)                      {gb(param_bytes)}",
        f"  optimizer state (shard shapes)             {gb(opt_bytes)}",
        f"  fp32 gradients (shard shapes)              {gb(grad_bytes)}",
        f"  compiled arguments (state + batch)         {gb(mem['argument_size_in_bytes'])}",
        f"  compiled outputs                           {gb(mem['output_size_in_bytes'])}",
        f"  compiled aliased (donated state)           {gb(mem['alias_size_in_bytes'])}",
        f"  compiled temporaries                       {gb(mem['temp_size_in_bytes'])}",
        f"  activations ~ temporaries - fp32 grads     {gb(activations)}",
        f"  peak = args + outputs - aliased + temps    {gb(peak)}",
        f"per-device TFLOP per step: model (m1_jax.flops, 3 x forward) {model_flops / 1e12:.4g}; "
        f"{platform.upper()} cost analysis {xla_flops / 1e12:.4g} (it counts each loop body once and Pallas "
        "kernels only by their declared cost)",
        f"Pallas TPU kernels (Mosaic custom calls) in the compiled step: {kernels}",
    ]
    fits = {}
    for name, limit in DEVICE_MEMORY:
        fits[name] = peak <= limit
        lines.append(f"  fits {name:<12}                          {'yes' if fits[name] else 'NO'}")
    if len(depths) == 2:
        lines.append("  compiled temporaries per compiled depth: " + ", ".join(
            f"{d} groups {gb(m['temp_size_in_bytes']).strip()}" for d, m in zip(depths, compiled_mem)))
        if compiled_mem[1]["temp_size_in_bytes"] < compiled_mem[0]["temp_size_in_bytes"]:
            # XLA's buffer scheduling differs between depths; the slope is then noise, not growth.
            lines.append("  WARNING: temporaries shrank with depth, so the linear extrapolation is unreliable; "
                         "rerun with --dry_run_groups=0 (full depth; the scanned groups compile once)")
    for line in lines:
        print_fn(line)
    return {"tpu_kernels": kernels, "model_flops": model_flops, "xla_flops": xla_flops, "param_bytes": param_bytes, "opt_bytes": opt_bytes, "grad_bytes": grad_bytes, "compiled": mem,
            "compiled_per_depth": compiled_mem, "peak_bytes": peak, "activation_bytes": activations, "fits": fits, "depths": depths,
            "compile_seconds": seconds, "lines": lines}
