"""Grouped matmul as Pallas Triton GPU kernels, at the routed FLOPs: gmm, its transposed-rhs twin, and tgmm.

  gmm(lhs [M, K], rhs [E, K, N])          out[r] = lhs[r] @ rhs[g(r)]       (the forward)
  gmm(d [M, N], rhs [E, K, N], transpose)  out[r] = d[r] @ rhs[g(r)]^T       (the lhs gradient)
  tgmm(lhs [M, K], d [M, N])               out[g] = lhs[rows of g]^T @ d[rows of g]   (the rhs gradient)

Tiles never straddle a group: group g's rows [start_g, end_g) are cut into ceil(size_g / TM) tiles of TM rows
that begin at start_g (not at a multiple of TM); a tile's rows past end_g are masked on load and on store, so
two tiles never write the same row and each row is multiplied by exactly one expert. The rows after the last
group form one more "group" whose tiles only store zeros (lax.ragged_dot's semantics). The per-tile group,
first row and row count are computed in XLA and passed in as arrays, one element per program: Triton has no
scalar prefetch, and the rhs block of a tile is picked inside the kernel from its group id. tgmm runs one
program per (group, K tile, N tile) that loops over its group's rows, so an empty group costs one store.

Why Triton: as in lightning_attention/gpu.py, it is the one Pallas GPU lowering that runs on jax 0.10 and 0.11,
in interpret mode on CPU (the tests), and lowers for "cuda" from a CPU host. Triton needs power-of-two block
dims, so K and N are covered by power-of-two tiles with the remainders masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grouped_matmul.reference import count_at_most


def _cdiv(a, b):
    return -(-a // b)


def _pow2_in(x: int, lo: int, hi: int) -> int:
    """The smallest power of two >= x, clamped to [lo, hi]."""
    p = lo
    while p < min(x, hi):
        p *= 2
    return p


def tiling(M: int, K: int, N: int, num_groups: int, dtype) -> tuple[int, int, int]:
    """(TM, TK, TN): bf16 128 x 64 x 128 (tensor-core tiles of Triton's own matmul configs), float32 half that;
    TM shrinks towards the mean group size so small batches do not pad every group to 128 rows."""
    big = jnp.dtype(dtype).itemsize <= 2
    tm_max, tk_max, tn_max = (128, 64, 128) if big else (64, 32, 64)
    return (_pow2_in(max(1, M // max(1, num_groups)), 16, tm_max), _pow2_in(K, 16, tk_max),
            _pow2_in(N, 16, tn_max))


def _compiler_params(tm: int, tn: int):
    return pltriton.CompilerParams(num_warps=8 if tm * tn >= 128 * 128 else 4, num_stages=3)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, contract, precision):
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
    # float32 operands: IEEE products (Triton would otherwise use TF32); bf16: tensor cores, float32 accumulate.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def tile_plan(group_sizes_E, M: int, tm: int):
    """Per tile: (group, first row, rows in the tile). Group E is the rows after the last group (zeros).

    The static tile count cdiv(M, tm) + E bounds sum_g cdiv(size_g, tm) over the E + 1 groups (each group adds
    less than one partial tile); tiles past the real count get 0 rows and do nothing.
    """
    E = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    sizes = jnp.concatenate([sizes, jnp.maximum(M - jnp.sum(sizes), 0)[None]])  # [E + 1]
    starts = jnp.cumsum(sizes) - sizes
    tiles = _cdiv(sizes, tm)
    tile_ends = jnp.cumsum(tiles)
    num_tiles = _cdiv(M, tm) + E
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group_T = jnp.minimum(count_at_most(tile_ends, t), E)
    offset_T = t - (tile_ends - tiles)[group_T]
    row0_T = starts[group_T] + offset_T * tm
    rows_T = jnp.where(t < tile_ends[-1], jnp.clip(sizes[group_T] - offset_T * tm, 0, tm), 0)
    return group_T, row0_T.astype(jnp.int32), rows_T.astype(jnp.int32)


def _gmm_kernel(group_ref, row0_ref, rows_ref, lhs_ref, rhs_ref, out_ref, *, num_groups, K, N, tm, tk, tn,
                transpose_rhs):
    g, row0, rows = group_ref[0], row0_ref[0], rows_ref[0]
    n0 = pl.program_id(1) * tn
    row_mask = _iota((tm, 1), 0) < rows
    col_mask = n0 + _iota((1, tn), 1) < N
    precision = _precision(lhs_ref.dtype)

    @pl.when((rows > 0) & (g < num_groups))
    def _():
        def k_step(kb, acc):
            k0 = kb * tk
            k_mask = k0 + _iota((1, tk), 1) < K
            a = pltriton.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], mask=row_mask & k_mask, other=0)
            if transpose_rhs:  # rhs [E, N, K] viewed as the [N, K] block of group g
                b = pltriton.load(rhs_ref.at[g, pl.ds(n0, tn), pl.ds(k0, tk)], mask=col_mask.T & k_mask, other=0)
                return acc + _dot(a, b, ((1,), (1,)), precision)
            b = pltriton.load(rhs_ref.at[g, pl.ds(k0, tk), pl.ds(n0, tn)], mask=k_mask.T & col_mask, other=0)
            return acc + _dot(a, b, ((1,), (0,)), precision)

        acc = lax.fori_loop(0, _cdiv(K, tk), k_step, jnp.zeros((tm, tn), jnp.float32))
        pltriton.store(out_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)], acc.astype(out_ref.dtype),
                       mask=row_mask & col_mask)

    @pl.when((rows > 0) & (g == num_groups))
    def _():  # rows after the last group
        pltriton.store(out_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)], jnp.zeros((tm, tn), out_ref.dtype),
                       mask=row_mask & col_mask)


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs: bool = False, block_shape=None, interpret: bool = False):
    """out[r] = lhs[r] @ rhs[g(r)] (rhs [E, K, N]), or lhs[r] @ rhs[g(r)]^T with transpose_rhs (rhs [E, N, K]).

    Rows past sum(group_sizes) are zero. Output in lhs's dtype, accumulated in float32.
    """
    M, K = lhs_MxK.shape
    E = rhs.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = block_shape or tiling(M, K, N, E, lhs_MxK.dtype)
    group_T, row0_T, rows_T = tile_plan(group_sizes_E, M, tm)
    one = pl.BlockSpec((1,), lambda t, n: (t,))
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, n: (0,) * x.ndim)
    kernel = functools.partial(_gmm_kernel, num_groups=E, K=K, N=N, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        grid=(group_T.shape[0], _cdiv(N, tn)),
        in_specs=[one, one, one, whole(lhs_MxK), whole(rhs)],
        out_specs=pl.BlockSpec((M, N), lambda t, n: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((M, N), lhs_MxK.dtype),
        compiler_params=_compiler_params(tm, tn),
        interpret=interpret,
    )(group_T, row0_T, rows_T, lhs_MxK, rhs.astype(lhs_MxK.dtype))


def _tgmm_kernel(start_ref, size_ref, lhs_ref, d_ref, out_ref, *, K, N, tm, tk, tn):
    g, k0, n0 = pl.program_id(0), pl.program_id(1) * tk, pl.program_id(2) * tn
    start, size = start_ref[0], size_ref[0]
    k_mask = k0 + _iota((1, tk), 1) < K
    n_mask = n0 + _iota((1, tn), 1) < N
    precision = _precision(lhs_ref.dtype)

    def m_step(i, acc):
        r0 = start + i * tm
        row_mask = _iota((tm, 1), 0) < size - i * tm
        a = pltriton.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)], mask=row_mask & k_mask, other=0)
        b = pltriton.load(d_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], mask=row_mask & n_mask, other=0)
        return acc + _dot(a, b, ((0,), (0,)), precision)

    acc = lax.fori_loop(0, _cdiv(size, tm), m_step, jnp.zeros((tk, tn), jnp.float32))
    pltriton.store(out_ref.at[g, pl.ds(k0, tk), pl.ds(n0, tn)], acc.astype(out_ref.dtype),
                   mask=k_mask.T & n_mask)


def tgmm(lhs_MxK, d_MxN, group_sizes_E, *, out_dtype=None, block_shape=None, interpret: bool = False):
    """out[g] = lhs[rows of g]^T @ d[rows of g], [E, K, N] (zero for empty groups); float32 accumulation."""
    M, K = lhs_MxK.shape
    N = d_MxN.shape[1]
    E = group_sizes_E.shape[0]
    tm, tk, tn = block_shape or tiling(M, K, N, E, lhs_MxK.dtype)
    sizes = group_sizes_E.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    one = pl.BlockSpec((1,), lambda g, i, j: (g,))
    whole = lambda shape: pl.BlockSpec(shape, lambda g, i, j: (0,) * len(shape))
    kernel = functools.partial(_tgmm_kernel, K=K, N=N, tm=tm, tk=tk, tn=tn)
    return pl.pallas_call(
        kernel,
        grid=(E, _cdiv(K, tk), _cdiv(N, tn)),
        in_specs=[one, one, whole((M, K)), whole((M, N))],
        out_specs=whole((E, K, N)),
        out_shape=jax.ShapeDtypeStruct((E, K, N), out_dtype or lhs_MxK.dtype),
        compiler_params=_compiler_params(tk, tn),
        interpret=interpret,
    )(starts, sizes, lhs_MxK, d_MxN.astype(lhs_MxK.dtype))
