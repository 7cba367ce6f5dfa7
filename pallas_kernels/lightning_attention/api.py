"""Public entry point: host-side validation, then dispatch to one implementation.

Implementations (impl=...):
  "reference"   quadratic masked-decay definition, float32 math; O(N^2) memory, for tests.
  "chunked"     blockwise pure JAX (`lax.scan` over blocks); O(N) memory, differentiable; runs everywhere.
  "pallas_tpu"  Pallas Mosaic TPU kernel (tpu.py), custom VJP. On CPU only with interpret=True.
  "pallas_gpu"  Pallas Triton GPU kernel (gpu.py), custom VJP: one program per (batch*head, value tile) walks
                the sequence with the state in registers. On CPU only with interpret=True.
  "pallas_gpu_parallel"
                chunk-parallel Pallas Triton kernels (gpu_parallel.py): a state-only pass stores the state at
                each block start, then every block's outputs run in parallel; the backward shares two state
                passes among dq, dk, dv. On CPU only with interpret=True. "auto" keeps "pallas_gpu" until
                bench_lightning has timed both on a GPU (see WORKSPACE.md).
  "auto"        by the platform the program is compiled for (`lax.platform_dependent`, so an ahead-of-time
                lowering for TPU or CUDA from a CPU host picks that platform's kernel): pallas_tpu on TPU,
                pallas_gpu on CUDA, chunked elsewhere.

Every impl takes segment_ids (packed documents: the state resets at each segment start, within and across
blocks). The Pallas kernels give decay a zero gradient (M1's decays are fixed functions of the layer index).

Sharding: XLA cannot partition a Pallas call. Under a mesh, call the Pallas impls inside `jax.shard_map` with
batch and heads sharded (decay sharded like heads, sequence unsharded) and `check_vma=False`; otherwise XLA
gathers the operands onto every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lightning_attention import chunked as chunked_lib
from pallas_kernels.lightning_attention import gpu
from pallas_kernels.lightning_attention import gpu_parallel
from pallas_kernels.lightning_attention import reference as reference_lib
from pallas_kernels.lightning_attention import tpu

IMPLS = ("auto", "reference", "chunked", "pallas_tpu", "pallas_gpu", "pallas_gpu_parallel")
_PALLAS_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "pallas_gpu_parallel": "gpu"}


def resolve_impl(impl, *, platform=None):
    """The concrete implementation "auto" stands for when compiled for `platform` (default: the running
    backend; "cuda" counts as GPU)."""
    if impl != "auto":
        return impl
    platform = jax.default_backend() if platform is None else platform
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "chunked")


def _shape(x):
    return tuple(np.shape(x))


def _concrete_or_none(x):
    """x as a numpy array when it is concrete, None when it is a tracer (inside jit/grad/vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_decay(decay, H):
    if _shape(decay) != (H,):
        raise ValueError(f"decay must have shape [H]=({H},) (one lambda per head), got {_shape(decay)}.")
    if not jnp.issubdtype(jnp.result_type(decay), jnp.floating):
        raise ValueError(f"decay must be a float array, got dtype {jnp.result_type(decay)}.")
    concrete = _concrete_or_none(decay)
    # Traced decays (computed in-graph) cannot be checked on the host; they are trusted.
    if concrete is not None and not np.all(concrete >= 0):
        raise ValueError(f"decay must be >= 0 (lambda in exp(-lambda)); got {concrete.tolist()}.")


def validate(q, k, v, decay, *, initial_state=None, segment_ids=None, impl="auto", block_size=256,
             interpret=False):
    """Raises ValueError on any inconsistent argument. Runs on the host, before tracing."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}.")
    if impl in _PALLAS_BACKEND:
        backend = jax.default_backend()
        if not interpret and backend != _PALLAS_BACKEND[impl]:
            raise ValueError(f"impl={impl!r} needs a {_PALLAS_BACKEND[impl]} backend but jax runs on {backend!r}; pass "
                             "interpret=True to run the kernel in interpret mode, or use impl='auto'/'chunked'.")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{name} must be rank 4 ([B, N, H, D]), got shape {_shape(x)}.")
    if _shape(q) != _shape(k):
        raise ValueError(f"q and k must have the same shape [B, N, H, Dk]; got q {_shape(q)}, k {_shape(k)}.")
    if _shape(v)[:3] != _shape(q)[:3]:
        raise ValueError(f"v must be [B, N, H, Dv] with q's B, N, H; got q {_shape(q)}, v {_shape(v)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}.")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}.")
    B, N, H, K = _shape(q)
    V = _shape(v)[3]
    if N == 0:
        raise ValueError("the sequence is empty (N == 0).")
    _check_decay(decay, H)
    if initial_state is not None:
        if _shape(initial_state) != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, Dk, Dv]=({B}, {H}, {K}, {V}), got {_shape(initial_state)}.")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state must be floating point (float32 preferred), got {initial_state.dtype}.")
    if segment_ids is not None:
        if _shape(segment_ids) != (B, N):
            raise ValueError(f"segment_ids must be [B, N]=({B}, {N}), got {_shape(segment_ids)}.")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got {segment_ids.dtype}.")


def lightning_attention(q, k, v, decay, *, impl="auto", initial_state=None, return_final_state=False,
                        block_size=256, segment_ids=None, interpret=False):
    """Linear attention with per-head exponential decay (MiniMax lightning attention).

    S_t = exp(-lambda) S_{t-1} + k_t^T v_t (S_{-1} = initial_state or 0), o_t = q_t S_t. No scaling, no softmax.

    Args:
      q, k: [B, N, H, Dk]; v: [B, N, H, Dv]; all the same float dtype.
      decay: [H] float, lambda >= 0 per head. Concrete decays are checked on the host; traced ones are not.
      impl: "auto" | "reference" | "chunked" | "pallas_tpu" | "pallas_gpu" | "pallas_gpu_parallel" (see the module
        docstring).
      initial_state: optional [B, H, Dk, Dv] (float32); applies to the first segment only.
      return_final_state: also return the final state [B, H, Dk, Dv] float32 (of the last segment).
      block_size: tokens per block (chunk); N need not be a multiple. pallas_tpu rounds it up to a multiple of 16,
        pallas_gpu uses a power of two in [16, 64]; pallas_gpu_parallel stores one state per block and runs
        sub-chunks of 64 inside it.
      segment_ids: optional int [B, N] of contiguous runs (packed sequences); the state resets at each segment
        start (a change of id), and initial_state applies to the first segment only.
      interpret: run a Pallas kernel in interpret mode (True, or a `pltpu.InterpretParams` for pallas_tpu);
        ignored by the JAX paths.

    Returns:
      o [B, N, H, Dv] in v's dtype, or (o, final_state) when return_final_state.
    """
    validate(q, k, v, decay, initial_state=initial_state, segment_ids=segment_ids, impl=impl, block_size=block_size,
             interpret=interpret)
    if impl == "auto":
        B, _, H, K = _shape(q)
        s0 = (jnp.zeros((B, H, K, _shape(v)[3]), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
        run = lambda name: lambda q, k, v, s0: _run(name, q, k, v, decay, s0, segment_ids, block_size,  # noqa: E731
                                                    False)
        o, state = jax.lax.platform_dependent(q, k, v, s0, tpu=run("pallas_tpu"), cuda=run("pallas_gpu"),
                                              default=run("chunked"))
    else:
        o, state = _run(impl, q, k, v, decay, initial_state, segment_ids, block_size, interpret)
    return (o, state) if return_final_state else o


def _run(impl, q, k, v, decay, initial_state, segment_ids, block_size, interpret):
    """(o, final_state) of one concrete implementation."""
    if impl == "reference":
        o, state = reference_lib.lightning_attention_reference(q, k, v, decay, initial_state, segment_ids)
    elif impl == "chunked":
        o, state = chunked_lib.lightning_attention_chunked(q, k, v, decay, initial_state, segment_ids,
                                                           block_size=int(block_size))
    elif impl == "pallas_tpu":
        o, state = tpu.lightning_attention_tpu(q, k, v, decay, initial_state, segment_ids,
                                               block_size=int(block_size), interpret=interpret)
    elif impl == "pallas_gpu_parallel":
        o, state = gpu_parallel.lightning_attention_gpu_parallel(q, k, v, decay, initial_state, segment_ids,
                                                                 block_size=int(block_size), interpret=interpret)
    else:
        o, state = gpu.lightning_attention_gpu(q, k, v, decay, initial_state, segment_ids,
                                               block_size=int(block_size), interpret=interpret)
    return o, state


def lightning_attention_step(q_BxHxK, k_BxHxK, v_BxHxV, decay_H, state_BxHxKxV):
    """One-token recurrent decode step; returns (o_BxHxV in v's dtype, new_state_BxHxKxV float32)."""
    for name, x in (("q", q_BxHxK), ("k", k_BxHxK), ("v", v_BxHxV)):
        if np.ndim(x) != 3:
            raise ValueError(f"{name} must be rank 3 ([B, H, D]) for one decode step, got shape {_shape(x)}.")
    if _shape(q_BxHxK) != _shape(k_BxHxK) or _shape(v_BxHxV)[:2] != _shape(q_BxHxK)[:2]:
        raise ValueError(f"need q, k [B, H, Dk] and v [B, H, Dv]; got q {_shape(q_BxHxK)}, k {_shape(k_BxHxK)}, "
                         f"v {_shape(v_BxHxV)}.")
    B, H, K = _shape(q_BxHxK)
    V = _shape(v_BxHxV)[2]
    _check_decay(decay_H, H)
    if _shape(state_BxHxKxV) != (B, H, K, V):
        raise ValueError(f"state must be [B, H, Dk, Dv]=({B}, {H}, {K}, {V}), got {_shape(state_BxHxKxV)}.")
    return chunked_lib.lightning_attention_step(q_BxHxK, k_BxHxK, v_BxHxV, decay_H, state_BxHxKxV)
