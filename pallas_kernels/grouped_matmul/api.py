"""Public entry point: host-side validation, then one custom VJP around the chosen implementation.

`grouped_matmul(lhs [M, K], rhs [E, K, N], group_sizes [E])` is `lax.ragged_dot`: row block g of lhs (the
group_sizes[g] rows after the rows of groups < g) times rhs[g]; rows after the last group are zero. Every
implementation except "reference" and "ragged_dot" runs the forward, the lhs gradient (the same grouped matmul
against rhs transposed) and the rhs gradient (tgmm: per group lhs^T @ d) at the routed FLOPs, 2 M K N each.

Implementations (impl=...):
  "auto"        by the platform the program is compiled for (`lax.platform_dependent`, so an ahead-of-time
                lowering for TPU or CUDA from a CPU host picks that platform's kernel): pallas_tpu on TPU,
                pallas_gpu on CUDA, bucketed on CPU, ragged_dot elsewhere.
  "pallas_gpu"  Pallas Triton kernels (gpu.py). On CPU only with interpret=True.
  "pallas_tpu"  jax's Pallas Mosaic megablox gmm/tgmm (tpu.py). On CPU only with interpret=True.
  "bucketed"    pure JAX for XLA:CPU: capacity-batched slots plus overflow tiles (bucketed.py).
  "blas"        CPU, opt-in: an XLA FFI custom call over BLAS sgemm (blas.py); float32; needs a C++ compiler.
  "ragged_dot"  `lax.ragged_dot` and its autodiff. XLA:CPU and XLA's GPU rewriter expand it to a dense product
                over all E groups (E x the FLOPs); XLA:TPU has a native grouped matmul.
  "reference"   the definition over all E groups in float32 (reference.py), for tests.

Precision: the implementations pick products by dtype (float32 operands in float32, bf16 on tensor cores /
the MXU, float32 accumulation). The default matmul precision in force at the call (`jax.default_matmul_precision`)
is re-entered for the backward pass, which JAX traces later, outside the caller's context.

Sharding: a Pallas or FFI call is not partitioned by GSPMD; under a mesh call it inside `jax.shard_map`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.grouped_matmul import blas, bucketed, gpu, tpu
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "bucketed", "blas", "ragged_dot", "reference")
_PALLAS_BACKEND = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def _ragged_dot_gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False):
    return lax.ragged_dot(lhs_MxK, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes_E)


def _ragged_dot_tgmm(lhs_MxK, d_MxN, group_sizes_E, *, out_dtype=None):
    E, K, N = group_sizes_E.shape[0], lhs_MxK.shape[1], d_MxN.shape[1]
    _, vjp = jax.vjp(lambda r: lax.ragged_dot(lhs_MxK, r, group_sizes_E), jnp.zeros((E, K, N), lhs_MxK.dtype))
    return vjp(d_MxN.astype(lhs_MxK.dtype))[0].astype(out_dtype or lhs_MxK.dtype)


def _by_platform(**per_platform):
    """One function running per_platform[p] when compiled for platform p (ragged_dot where none is given)."""
    def run(*args, **kwargs):
        branches = {p: functools.partial(f, **kwargs) for p, f in per_platform.items()}
        return lax.platform_dependent(*args, default=branches.pop("default"), **branches)
    return run


_AUTO_GMM = _by_platform(cpu=bucketed.gmm, cuda=gpu.gmm, tpu=tpu.gmm, default=_ragged_dot_gmm)
_AUTO_TGMM = _by_platform(cpu=bucketed.tgmm, cuda=gpu.tgmm, tpu=tpu.tgmm, default=_ragged_dot_tgmm)


def kernels(impl: str, *, interpret=False, block_shape=None):
    """(gmm, tgmm) of one implementation with the contracts of gpu.gmm / gpu.tgmm (forward only)."""
    if impl == "auto":
        return _AUTO_GMM, _AUTO_TGMM
    if impl == "bucketed":
        return bucketed.gmm, bucketed.tgmm
    if impl == "blas":
        return blas.gmm, blas.tgmm
    if impl == "ragged_dot":
        return _ragged_dot_gmm, _ragged_dot_tgmm
    module = gpu if impl == "pallas_gpu" else tpu
    return (functools.partial(module.gmm, block_shape=block_shape, interpret=interpret),
            functools.partial(module.tgmm, block_shape=block_shape, interpret=interpret))


def differentiable(gmm, tgmm, precision=None):
    """grouped_matmul(lhs, rhs, group_sizes) from forward kernels, with their own VJP (Pallas has no autodiff):
    d lhs = gmm(d, rhs, transpose_rhs=True), d rhs = tgmm(lhs, d); group sizes get no cotangent."""

    @jax.custom_vjp
    def grouped(lhs_MxK, rhs_ExKxN, group_sizes_E):
        return gmm(lhs_MxK, rhs_ExKxN, group_sizes_E)

    def fwd(lhs_MxK, rhs_ExKxN, group_sizes_E):
        return grouped(lhs_MxK, rhs_ExKxN, group_sizes_E), (lhs_MxK, rhs_ExKxN, group_sizes_E)

    def bwd(res, d_MxN):
        lhs_MxK, rhs_ExKxN, group_sizes_E = res
        d_MxN = d_MxN.astype(lhs_MxK.dtype)
        with jax.default_matmul_precision(precision):
            d_lhs = gmm(d_MxN, rhs_ExKxN, group_sizes_E, transpose_rhs=True)
            d_rhs = tgmm(lhs_MxK, d_MxN, group_sizes_E, out_dtype=rhs_ExKxN.dtype)
        return d_lhs.astype(lhs_MxK.dtype), d_rhs.astype(rhs_ExKxN.dtype), None

    grouped.defvjp(fwd, bwd)
    return grouped


@functools.lru_cache(maxsize=None)
def _grouped(impl, interpret, block_shape, precision):
    return differentiable(*kernels(impl, interpret=interpret, block_shape=block_shape), precision=precision)


def _concrete_or_none(x):
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def validate(lhs, rhs, group_sizes, *, impl="auto", interpret=False, block_shape=None):
    """Raises ValueError on any inconsistent argument. Runs on the host, before tracing."""
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; choose one of {IMPLS}.")
    if np.ndim(lhs) != 2 or np.ndim(rhs) != 3 or np.ndim(group_sizes) != 1:
        raise ValueError(f"grouped_matmul needs lhs [M, K], rhs [E, K, N], group_sizes [E]; got shapes "
                         f"{np.shape(lhs)}, {np.shape(rhs)}, {np.shape(group_sizes)}.")
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"grouped_matmul shapes disagree: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape} (need lhs [M, K], rhs [E, K, N], group_sizes [E]).")
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs and rhs must share one floating dtype; got {lhs.dtype} and {rhs.dtype}.")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}.")
    if impl == "blas" and lhs.dtype != jnp.float32:
        raise ValueError(f"impl='blas' is float32 only, got {lhs.dtype}; use impl='bucketed' or 'auto'.")
    if impl in _PALLAS_BACKEND:
        backend = jax.default_backend()
        if not interpret and backend != _PALLAS_BACKEND[impl]:
            raise ValueError(f"impl={impl!r} needs a {_PALLAS_BACKEND[impl]} backend but jax runs on {backend!r}; "
                             "pass interpret=True to run the kernel in interpret mode, or use impl='auto'.")
    elif block_shape is not None:
        raise ValueError(f"block_shape is for the Pallas impls only, got impl={impl!r}.")
    sizes = _concrete_or_none(group_sizes)
    # Traced sizes (computed in-graph, as the MoE's bincount) cannot be checked on the host; they are trusted.
    if sizes is not None and (np.any(sizes < 0) or sizes.sum() > lhs.shape[0]):
        raise ValueError(f"group_sizes must be >= 0 and sum to at most the {lhs.shape[0]} rows of lhs; got "
                         f"{sizes.tolist()}.")


def grouped_matmul(lhs_MxK, rhs_ExKxN, group_sizes_E, *, impl="auto", interpret=False, block_shape=None):
    """lax.ragged_dot(lhs, rhs, group_sizes) at the routed FLOPs, differentiable in lhs and rhs.

    Args:
      lhs_MxK: [M, K] rows sorted by group. rhs_ExKxN: [E, K, N], same floating dtype.
      group_sizes_E: [E] integers >= 0 summing to at most M.
      impl: see the module docstring.
      interpret: run a Pallas impl in interpret mode (CPU tests).
      block_shape: (TM, TK, TN) tiles of a Pallas impl (default: gpu.tiling / tpu.tiling).

    Returns:
      [M, N] in lhs's dtype (products accumulated in float32).
    """
    validate(lhs_MxK, rhs_ExKxN, group_sizes_E, impl=impl, interpret=interpret, block_shape=block_shape)
    if impl == "reference":
        return grouped_matmul_reference(lhs_MxK, rhs_ExKxN, group_sizes_E)
    if impl == "ragged_dot":
        return lax.ragged_dot(lhs_MxK, rhs_ExKxN, group_sizes_E)
    block_shape = None if block_shape is None else tuple(int(b) for b in block_shape)
    precision = jax.config.jax_default_matmul_precision
    return _grouped(impl, interpret, block_shape, precision)(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32))
