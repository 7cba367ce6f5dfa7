"""The definition of the grouped matmul, written out (E x the routed FLOPs; for tests).

Row r belongs to group g when sum(sizes[:g]) <= r < sum(sizes[:g + 1]); out[r] = lhs[r] @ rhs[g], and rows
after the last group are zero (lax.ragged_dot's semantics). Differentiable by autodiff.
"""

from __future__ import annotations

import jax.numpy as jnp


def count_at_most(ends_E, x):
    """How many of the sorted ends_E are <= x (searchsorted side="right"), for a short ends_E: one compare
    per (x, end) and no loop (jnp.searchsorted is a while loop, and XLA:CPU pays for every loop it runs)."""
    return jnp.sum(ends_E <= jnp.asarray(x)[..., None], axis=-1).astype(jnp.int32)


def group_of_rows(group_sizes_E, M: int):
    """[M] group of each row; E for rows after the last group."""
    return count_at_most(jnp.cumsum(group_sizes_E), jnp.arange(M))


def grouped_matmul_reference(lhs_MxK, rhs_ExKxN, group_sizes_E):
    """Every row times every group's rhs, then the row's own group kept: float32 products, lhs's dtype out."""
    E = rhs_ExKxN.shape[0]
    onehot_MxE = (group_of_rows(group_sizes_E, lhs_MxK.shape[0])[:, None] == jnp.arange(E)).astype(jnp.float32)
    all_MxExN = jnp.einsum("mk,ekn->men", lhs_MxK.astype(jnp.float32), rhs_ExKxN.astype(jnp.float32))
    return jnp.einsum("men,me->mn", all_MxExN, onehot_MxE).astype(lhs_MxK.dtype)
