"""Grouped matmul in pure JAX for XLA:CPU ("bucketed"), the CPU default.

XLA:CPU has no grouped matmul (`lax.ragged_dot` lowers to a dense product over every group, E x the work). Here
the first C rows of every group run as one batched matmul over [E, C, .] slots, and the rows beyond C as a loop
over tiles of consecutive sorted rows, one group per tile (a tile may run past its group's end: those rows are
masked). C is picked at run time, per call, from a few static sizes (`capacity_buckets`, 0 included) to
minimise the padded work, so the FLOPs stay close to the routed count whatever the routing.

Same contract as the other impls (api.py): gmm(lhs, rhs, sizes[, transpose_rhs]) and tgmm(lhs, d, sizes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import count_at_most

# Per-group capacities the batched part may use, as multiples of the mean group size M / E; 0 = tiles only.
CAPACITY_RATIOS = (0.0, 0.75, 1.0, 1.125, 1.25)
MAX_TILE = 128


def capacity_buckets(M: int, E: int) -> tuple[int, ...]:
    """The static capacities: ratio * M / E rounded up to 8 rows."""
    return tuple(sorted({min(M, 8 * math.ceil(M / E * r / 8)) for r in CAPACITY_RATIOS}))


def tile_rows(M: int, E: int) -> int:
    """Overflow tile rows: a quarter of the mean group, as a power of two in [8, MAX_TILE] (small tiles waste
    less on padding; a loop of tiny matmuls runs slower per row)."""
    rows = max(1, M // (4 * E))
    return min(MAX_TILE, max(8, 1 << max(0, (rows - 1).bit_length())))


def _pick_capacity(group_sizes_E, capacities, tile: int):
    """Index of the capacity with the least estimated work: E * C batched rows, plus the rows beyond C of every
    group in whole tiles, each tile row costing 1 + 32 / tile batched rows (a loop of small matmuls runs slower
    per row: about 1.2x at 128-row tiles, 2x at 32 on XLA:CPU, measured)."""
    caps_C = jnp.asarray(capacities, jnp.int32)
    overflow_CxE = jnp.maximum(group_sizes_E[None] - caps_C[:, None], 0)
    tiles_C = jnp.sum(-(-overflow_CxE // tile), axis=1)
    cost_C = group_sizes_E.shape[0] * caps_C + (tile + 32) * tiles_C
    return jnp.argmin(cost_C)


class Layout(NamedTuple):
    """Where each sorted row is computed. Rows [0, C) of every group go to the batched [E, C] slots; the rest
    of each group runs in tiles of `tile` consecutive rows, one group per tile. Rows after the last group
    belong to no group (E)."""

    branch: jax.Array  # index of C in the static capacities (the lax.switch branch)
    capacity: jax.Array  # C, int32 scalar
    group_M: jax.Array  # group of each row; E for rows of no group
    index_in_group_M: jax.Array
    group_starts_E: jax.Array
    group_sizes_E: jax.Array
    tile_starts_E: jax.Array  # first overflow tile of each group; tile_ends_E[-1] tiles are used
    tile_ends_E: jax.Array


def layout(group_sizes_E, M: int, capacities, tile: int) -> Layout:
    E = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    branch = _pick_capacity(sizes, capacities, tile)
    capacity = jnp.asarray(capacities, jnp.int32)[branch]
    ends_E = jnp.cumsum(sizes)
    group_M = count_at_most(ends_E, jnp.arange(M))  # E for rows after the last group
    index_M = jnp.arange(M) - (ends_E - sizes)[jnp.minimum(group_M, E - 1)]
    tiles_E = -(-jnp.maximum(sizes - capacity, 0) // tile)
    tile_ends_E = jnp.cumsum(tiles_E)
    return Layout(branch, capacity, group_M, index_M, ends_E - sizes, sizes, tile_ends_E - tiles_E, tile_ends_E)


def _slot_rows(lay: Layout, E: int, C: int):
    """Slot of each row in the flattened [E, C] batch; E * C (out of range) for rows not batched."""
    inside = (lay.index_in_group_M < C) & (lay.group_M < E)
    return jnp.where(inside, lay.group_M * C + lay.index_in_group_M, E * C)


def _to_slots(a_MxX, slot_M, E: int, C: int):
    """Rows scattered to their [E, C] slots (1-D row indices: XLA:CPU moves whole rows fastest); empty slots 0."""
    return jnp.zeros((E * C, a_MxX.shape[-1]), a_MxX.dtype).at[slot_M].set(a_MxX, mode="drop").reshape(E, C, -1)


def _from_slots(a_ExCxX, slot_M):
    """Back to row order. Rows not batched read the last slot, a finite stand-in that the tile loop or the
    final mask replaces (a filling gather costs a select over every row)."""
    E, C, X = a_ExCxX.shape
    return a_ExCxX.reshape(E * C, X).at[jnp.minimum(slot_M, E * C - 1)].get(mode="promise_in_bounds")


def _tile_rows(lay: Layout, i, tile: int, M: int):
    """Overflow tile i: (its group, the first of the `tile` rows it reads, which of those are its own).

    A tile that would run past the last row starts earlier instead (no padded copy of the operands): the rows
    it then reads before its own start are not its own, like those past its group's end."""
    e = count_at_most(lay.tile_ends_E, i)
    row0 = lay.group_starts_E[e] + lay.capacity + (i - lay.tile_starts_E[e]) * tile
    start = jnp.minimum(row0, M - tile)
    rows_t = start + jnp.arange(tile)
    keep_t = (rows_t >= row0) & (rows_t < lay.group_starts_E[e] + lay.group_sizes_E[e])
    return e, start, keep_t


def _write_rows(a_MxX, new_txX, start, keep_t):
    """a with rows start .. start + t - 1 replaced by new where keep (the others belong elsewhere)."""
    old = jax.lax.dynamic_slice_in_dim(a_MxX, start, new_txX.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(a_MxX, jnp.where(keep_t[:, None], new_txX, old), start, axis=0)


def _plan(group_sizes_E, M: int, capacities, tile):
    E = group_sizes_E.shape[0]
    capacities = capacity_buckets(M, E) if capacities is None else tuple(capacities)
    tile = min(M, tile_rows(M, E) if tile is None else int(tile))
    return capacities, tile, layout(group_sizes_E, M, capacities, tile)


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs: bool = False, capacities=None, tile=None):
    """out[r] = lhs[r] @ rhs[g(r)] (rhs [E, K, N]; [E, N, K] with transpose_rhs); zero rows past the groups."""
    M = lhs_MxK.shape[0]
    E = rhs.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if M == 0:
        return jnp.zeros((0, N), lhs_MxK.dtype)
    capacities, tile, lay = _plan(group_sizes_E, M, capacities, tile)
    rhs = rhs.astype(lhs_MxK.dtype)
    batched_spec = "eck,enk->ecn" if transpose_rhs else "eck,ekn->ecn"

    def batched(C):
        def run(lhs_MxK):
            if C == 0:  # full_like: under shard_map the zeros must vary over the same mesh axes as lhs
                return jax.lax.full_like(lhs_MxK, 0, shape=(M, N))
            slot_M = _slot_rows(lay, E, C)
            return _from_slots(jnp.einsum(batched_spec, _to_slots(lhs_MxK, slot_M, E, C), rhs), slot_M)
        return run

    def one_tile(i, out_MxN):
        e, start, keep_t = _tile_rows(lay, i, tile, M)
        a = jax.lax.dynamic_slice_in_dim(lhs_MxK, start, tile)
        return _write_rows(out_MxN, a @ (rhs[e].T if transpose_rhs else rhs[e]), start, keep_t)

    out_MxN = jax.lax.switch(lay.branch, [batched(C) for C in capacities], lhs_MxK)
    out_MxN = jax.lax.fori_loop(0, lay.tile_ends_E[-1], one_tile, out_MxN)
    return jnp.where((lay.group_M < E)[:, None], out_MxN, 0)


def tgmm(lhs_MxK, d_MxN, group_sizes_E, *, out_dtype=None, capacities=None, tile=None):
    """out[g] = lhs[rows of g]^T @ d[rows of g], [E, K, N], accumulated in float32."""
    M, K = lhs_MxK.shape
    N = d_MxN.shape[1]
    E = group_sizes_E.shape[0]
    if M == 0:
        return jnp.zeros((E, K, N), out_dtype or lhs_MxK.dtype)
    capacities, tile, lay = _plan(group_sizes_E, M, capacities, tile)
    d_MxN = d_MxN.astype(lhs_MxK.dtype)

    def batched(C):
        def run(lhs_MxK, d_MxN):
            if C == 0:
                return jax.lax.full_like(lhs_MxK, 0, jnp.float32, (E, K, N))
            slot_M = _slot_rows(lay, E, C)
            # Rows of no group are not scattered and empty slots hold zeros, so they add nothing.
            return jnp.einsum("eck,ecn->ekn", _to_slots(lhs_MxK, slot_M, E, C), _to_slots(d_MxN, slot_M, E, C),
                              preferred_element_type=jnp.float32)
        return run

    def one_tile(i, out_ExKxN):
        e, start, keep_t = _tile_rows(lay, i, tile, M)
        a = jax.lax.dynamic_slice_in_dim(lhs_MxK, start, tile)
        # Rows that are not the tile's own (another group's, or rows before it) get a zero d: they add nothing.
        d = jnp.where(keep_t[:, None], jax.lax.dynamic_slice_in_dim(d_MxN, start, tile), 0)
        return out_ExKxN.at[e].add(jnp.dot(a.T, d, preferred_element_type=jnp.float32))

    out = jax.lax.switch(lay.branch, [batched(C) for C in capacities], lhs_MxK, d_MxN)
    out = jax.lax.fori_loop(0, lay.tile_ends_E[-1], one_tile, out)
    return out.astype(out_dtype or lhs_MxK.dtype)
