"""Grouped matmul on TPU: jax's own Pallas Mosaic megablox kernels (`gmm`, `tgmm`), adapted to ragged_dot's
contract (any M, zero rows past the groups).

megablox needs M to be a multiple of the row tile, visits only the row tiles that hold a group's rows, and
leaves the output rows after the last group unwritten; here M is padded up to the tile, those rows are zeroed,
and the padding is cut off. Tiles follow TPU's layout rule (last two block dims multiples of (8, 128), or the
whole dim) and stay within the v5p/v6e scoped VMEM: 512 x 1024 x 1024 at most (MaxText's default for M1-sized
experts), the whole dim where a dim is not a multiple of 128.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp

# The package exports the custom_vjp function under the module's name; the raw kernels live in the module.
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _tile(dim: int, cap: int) -> int:
    if dim % 128:
        return dim
    t = min(cap, dim)
    while dim % t:
        t -= 128
    return t


def tiling(M: int, K: int, N: int, dtype) -> tuple[int, int, int]:
    rows = 16 if jnp.dtype(dtype).itemsize <= 2 else 8  # sublane packing of the dtype
    tm = min(512, -(-M // rows) * rows)
    return tm, _tile(K, 1024), _tile(N, 1024)


def _pad_rows(x, tm):
    pad = -x.shape[0] % tm
    return (jnp.pad(x, ((0, pad), (0, 0))) if pad else x), x.shape[0]


def _zero_past_groups(out_PxN, group_sizes_E, M):
    rows = jnp.arange(out_PxN.shape[0])[:, None]
    return jnp.where(rows < jnp.sum(group_sizes_E), out_PxN, 0)[:M]


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs: bool = False, block_shape=None, interpret: bool = False):
    """Same contract as gpu.gmm: rhs [E, K, N] (or [E, N, K] with transpose_rhs); output in lhs's dtype."""
    M, K = lhs_MxK.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = block_shape or tiling(M, K, N, lhs_MxK.dtype)
    lhs_PxK, M = _pad_rows(lhs_MxK, tm)
    sizes = group_sizes_E.astype(jnp.int32)
    out = _megablox.gmm(lhs_PxK, rhs.astype(lhs_MxK.dtype), sizes, preferred_element_type=lhs_MxK.dtype,
                        tiling=(tm, tk, tn), transpose_rhs=transpose_rhs, interpret=interpret)
    return _zero_past_groups(out, sizes, M)


def tgmm(lhs_MxK, d_MxN, group_sizes_E, *, out_dtype=None, block_shape=None, interpret: bool = False):
    """Same contract as gpu.tgmm: [E, K, N], the per-group lhs^T @ d."""
    M, K = lhs_MxK.shape
    N = d_MxN.shape[1]
    tm, tk, tn = block_shape or tiling(M, K, N, lhs_MxK.dtype)
    lhs_PxK, _ = _pad_rows(lhs_MxK, tm)
    d_PxN, _ = _pad_rows(d_MxN.astype(lhs_MxK.dtype), tm)
    return _megablox.tgmm(lhs_PxK.T, d_PxN, group_sizes_E.astype(jnp.int32),
                          preferred_element_type=out_dtype or lhs_MxK.dtype, tiling=(tm, tk, tn),
                          interpret=interpret)
