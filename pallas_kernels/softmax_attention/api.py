"""Public entry point: host-side validation, then dispatch to one implementation of causal GQA flash attention.

Implementations (impl=...):
  "auto"        by the platform the program is compiled for (`lax.platform_dependent`, so an ahead-of-time
                lowering for TPU or CUDA from a CPU host picks that platform's kernel): pallas_tpu on TPU,
                pallas_gpu on CUDA, blockwise elsewhere.
  "pallas_gpu"  jax's Pallas Triton flash attention, kv heads repeated for GQA (gpu.py). CPU: interpret=True.
  "pallas_tpu"  jax's Pallas Mosaic splash attention, one MQA kernel per kv head (tpu.py). CPU: interpret=True.
  "blockwise"   pure-JAX flash attention with a custom VJP (blockwise.py): the CPU path and the kernels' twin.
  "reference"   the full [L, L] masked softmax in float32 (reference.py), for tests.
All take segment_ids (packed documents attend within their own segment; 0 is padding, seen only by padding).

The Pallas kernels' backward passes are JAX custom VJPs traced after the caller's `jax.default_matmul_precision`
block has closed; they run at the precision in force at the call (float32 means float32 on GPU, not TF32).
A Pallas call is not partitioned by GSPMD: under a mesh call it inside `jax.shard_map` (the model does).
"""

from __future__ import annotations

import jax
import numpy as np

from pallas_kernels.softmax_attention import blockwise, gpu, reference, tpu

IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "blockwise", "reference")
_PALLAS_BACKEND = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def _backward_at_call_precision(fn):
    """fn(q, k, v, seg) whose VJP's backward runs at the default matmul precision in force now."""
    precision = jax.config.jax_default_matmul_precision
    if precision is None:
        return fn

    @jax.custom_vjp
    def run(q, k, v, seg):
        return fn(q, k, v, seg)

    def fwd(q, k, v, seg):
        return jax.vjp(fn, q, k, v, seg)

    def bwd(vjp, d_out):
        with jax.default_matmul_precision(precision):
            return vjp(d_out)

    run.defvjp(fwd, bwd)
    return run


def validate(q, k, v, segment_ids=None, *, impl="auto", interpret=False):
    """Raises ValueError on any inconsistent argument. Runs on the host, before tracing."""
    if impl not in IMPLS:
        raise ValueError(f"unknown softmax attention impl {impl!r}; choose one of {IMPLS}.")
    if np.ndim(q) != 4 or np.ndim(k) != 4 or np.shape(k) != np.shape(v):
        raise ValueError(f"need q [B, L, H, D] and k, v [B, L, K, D]; got {np.shape(q)}, {np.shape(k)}, "
                         f"{np.shape(v)}.")
    (B, L, H, D), K = np.shape(q), np.shape(k)[2]
    if np.shape(k)[:2] != (B, L) or np.shape(k)[3] != D:
        raise ValueError(f"k, v must be [B, L, K, D] with q's B, L, D; got q {np.shape(q)}, k {np.shape(k)}.")
    if H % K:
        raise ValueError(f"{H} query heads do not split into groups over {K} kv heads.")
    if segment_ids is not None and np.shape(segment_ids) != (B, L):
        raise ValueError(f"segment_ids must be [B, L]=({B}, {L}), got {np.shape(segment_ids)}.")
    if impl in _PALLAS_BACKEND and not interpret and jax.default_backend() != _PALLAS_BACKEND[impl]:
        raise ValueError(f"impl={impl!r} needs a {_PALLAS_BACKEND[impl]} backend but jax runs on "
                         f"{jax.default_backend()!r}; pass interpret=True, or use impl='auto'.")


def softmax_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale, impl="auto",
                      block_q=512, block_kv=512, interpret=False):
    """Causal GQA attention softmax(scale q k^T) v over [B, L, H, D] queries and [B, L, K, D] keys/values;
    output [B, L, H, D] in q's dtype. block_q / block_kv: the blockwise path's tiles."""
    validate(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, impl=impl, interpret=interpret)
    seg = (jax.numpy.zeros(q_BxLxHxD.shape[:2], jax.numpy.int32) if segment_ids_BxL is None
           else segment_ids_BxL.astype(jax.numpy.int32))

    def blockwise_fn(q, k, v, s):
        return blockwise.blockwise_attention(q, k, v, None if segment_ids_BxL is None else s, scale=scale,
                                             block_q=block_q, block_kv=block_kv)

    def kernel(module, interp):
        fn = getattr(module, "softmax_attention_" + ("gpu" if module is gpu else "tpu"))
        return _backward_at_call_precision(lambda q, k, v, s: fn(q, k, v, s, scale=scale, interpret=interp))

    args = (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg)
    if impl == "auto":
        return jax.lax.platform_dependent(*args, tpu=kernel(tpu, False), cuda=kernel(gpu, False),
                                          default=blockwise_fn)
    if impl == "reference":
        return reference.softmax_attention_reference(*args, scale=scale)
    if impl == "blockwise":
        return blockwise_fn(*args)
    return kernel(gpu if impl == "pallas_gpu" else tpu, interpret)(*args)
