"""Mixture of experts: float32 top-k router, dropless SwiGLU experts, Switch-style load-balancing stats.

Dropless dispatch sorts the token copies by expert so each expert's rows are contiguous, then runs a
grouped matmul (`impl`):
  "ragged_dot"  `lax.ragged_dot`, the default on GPU/TPU. XLA:CPU lowers it to a dense masked product over every
                expert (E times the work).
  "blas"        the CPU default for float32 matmuls of at least BLAS_MIN_FLOPS: `grouped_matmul_cpu.gmm`, an
                XLA FFI custom call running BLAS sgemm on exactly each expert's rows. Needs a C++ compiler on
                first use.
  "bucketed"    pure JAX, the CPU fallback (other dtypes, small matmuls, or no compiler): the first C rows of
                every expert run as one batched matmul over [E, C, .], and the rows beyond C as a loop over tiles
                of consecutive sorted rows, one expert per tile. C is picked at run time from a few static sizes
                (`capacity_buckets`, 0 included) to minimise the padded work.
  "tiled"       "bucketed" with C = 0.
All compute the same thing; no row is ever dropped.
"""

import functools
import math
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax.config import GROUPED_MATMUL_IMPLS, ModelConfig
from m1_jax.layers import grouped_matmul_cpu
from m1_jax.layers.partitioning import param


def route_top_k(router_logits_TxE, k: int):
    """Softmax over experts in float32, top-k, renormalised (= a softmax over the top-k logits).

    Returns (weights_TxK float32, experts_TxK int32, probs_TxE float32).
    """
    probs_TxE = jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)
    top_p_TxK, experts_TxK = jax.lax.top_k(probs_TxE, k)
    weights_TxK = top_p_TxK / jnp.sum(top_p_TxK, axis=-1, keepdims=True)
    return weights_TxK, experts_TxK.astype(jnp.int32), probs_TxE


def load_balance_stats(probs_TxE, experts_TxK, mask_T=None):
    """Per-expert sums the Switch aux loss needs: (top-k assignment counts, router prob sums, #tokens)."""
    num_experts = probs_TxE.shape[-1]
    mask_T = jnp.ones(probs_TxE.shape[0], jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    onehot_TxKxE = jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32)
    counts_E = jnp.einsum("tke,t->e", onehot_TxKxE, mask_T)
    prob_sum_E = jnp.einsum("te,t->e", probs_TxE, mask_T)
    return counts_E, prob_sum_E, jnp.sum(mask_T)


def aux_loss_from_stats(counts_E, prob_sum_E, num_tokens):
    """E * sum_e f_e P_e with f_e = counts_e / N and P_e = prob_sum_e / N over all layers' tokens."""
    num_experts = counts_E.shape[-1]
    n = jnp.maximum(num_tokens, 1.0)
    return num_experts * jnp.sum((counts_E / n) * (prob_sum_E / n))


def swiglu(x, w_gate, w_up, w_down):
    """w_down(silu(x w_gate) * (x w_up)) for one expert's rows."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down


def grouped_swiglu(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, grouped_matmul):
    """SwiGLU over expert-sorted rows with a ragged_dot-like grouped_matmul(lhs, rhs, group_sizes)."""
    gate = grouped_matmul(x_MxD, w_gate_ExDxF, group_sizes_E)
    up = grouped_matmul(x_MxD, w_up_ExDxF, group_sizes_E)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down_ExFxD, group_sizes_E)


def _row_groups(group_sizes_E, M: int):
    """For each expert-sorted row: (its expert, its index within that expert's group)."""
    ends_E = jnp.cumsum(group_sizes_E)
    expert_M = jnp.searchsorted(ends_E, jnp.arange(M), side="right")  # < E, since ends_E[-1] = M
    return expert_M, jnp.arange(M) - (ends_E - group_sizes_E)[expert_M]


def _swiglu_grads(gate, up, dh):
    """Backward of h = silu(gate) * up given dh: (d_gate, d_up, h)."""
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    d_gate = dh * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))
    return d_gate, dh * act, act * up


def _small_tile(rows: int, tile: int) -> int:
    """The power of two >= rows (at least 8), capped at tile: small batches get small tiles, so padding each
    group to a tile boundary does not dominate the work."""
    return min(tile, max(8, 1 << max(0, (rows - 1).bit_length())))


# Per-expert capacities the batched part may use, as multiples of the mean group size M / E; 0 = tiles only.
CAPACITY_RATIOS = (0.0, 0.75, 1.0, 1.125, 1.25, 1.5)


def capacity_buckets(M: int, E: int) -> tuple[int, ...]:
    """The static capacities of the "bucketed" grouped matmul: ratio * M / E rounded up to 8 rows."""
    return tuple(sorted({min(M, 8 * math.ceil(M / E * r / 8)) for r in CAPACITY_RATIOS}))


def _pick_capacity(group_sizes_E, capacities, tile: int):
    """Index of the capacity with the least estimated work: E * C batched rows, plus the rows beyond C of every
    group in whole tiles, each tile row costing 1 + 32 / tile batched rows (a loop of small matmuls runs
    slower per row: about 1.2x at 128-row tiles, 2x at 32 on XLA:CPU; WORKSPACE 6.3)."""
    caps_C = jnp.asarray(capacities, jnp.int32)
    overflow_CxE = jnp.maximum(group_sizes_E[None] - caps_C[:, None], 0)
    tiles_C = jnp.sum(-(-overflow_CxE // tile), axis=1)
    cost_C = group_sizes_E.shape[0] * caps_C + (tile + 32) * tiles_C
    return jnp.argmin(cost_C)


class _Layout(NamedTuple):
    """Where each expert-sorted row is computed. Rows [0, C) of every group go to the batched [E, C] slots;
    the rest of each group runs in tiles of `tile` consecutive sorted rows, one expert per tile (a tile may
    run past its group's end; those rows are computed and thrown away). Row arrays carry P = M + tile rows so
    that a tile starting on the last row still reads `tile` rows; the padding rows belong to no expert (E)."""

    branch: jax.Array  # index of C in the static capacities (the lax.switch branch)
    capacity: jax.Array  # C, int32 scalar
    expert_P: jax.Array  # expert of each row; E for the padding rows
    index_in_group_P: jax.Array  # position of each row within its group
    group_starts_E: jax.Array  # first sorted row of each group
    group_sizes_E: jax.Array
    tile_starts_E: jax.Array  # first overflow tile of each expert; tile_ends_E[-1] tiles are used
    tile_ends_E: jax.Array


def _layout(group_sizes_E, M: int, capacities, tile: int) -> _Layout:
    E = group_sizes_E.shape[0]
    branch = _pick_capacity(group_sizes_E, capacities, tile)
    capacity = jnp.asarray(capacities, jnp.int32)[branch]
    expert_M, index_in_group_M = _row_groups(group_sizes_E, M)
    tiles_E = -(-jnp.maximum(group_sizes_E - capacity, 0) // tile)
    tile_ends_E = jnp.cumsum(tiles_E)
    return _Layout(branch, capacity, jnp.pad(expert_M, (0, tile), constant_values=E),
                   jnp.pad(index_in_group_M, (0, tile)), jnp.cumsum(group_sizes_E) - group_sizes_E, group_sizes_E,
                   tile_ends_E - tiles_E, tile_ends_E)


def _slot_rows(layout: _Layout, E: int, C: int):
    """Slot of each padded row in the flattened [E, C] batch; E * C (out of range) for rows not batched."""
    inside = (layout.index_in_group_P < C) & (layout.expert_P < E)
    return jnp.where(inside, layout.expert_P * C + layout.index_in_group_P, E * C)


def _to_slots(a_PxX, slot_P, E: int, C: int):
    """Rows scattered to their [E, C] slots (1-D row indices: XLA:CPU moves whole rows fastest)."""
    return jnp.zeros((E * C, a_PxX.shape[-1]), a_PxX.dtype).at[slot_P].set(a_PxX, mode="drop").reshape(E, C, -1)


def _from_slots(a_ExCxX, slot_P):
    """Back to row order. Rows that were not batched read the last slot, a finite stand-in: the tile loop
    overwrites every overflow row, and the padding rows only ever meet a zero cotangent (a filling gather
    costs a select over every row)."""
    E, C, X = a_ExCxX.shape
    return a_ExCxX.reshape(E * C, X).at[jnp.minimum(slot_P, E * C - 1)].get(mode="promise_in_bounds")


def _tile_rows(layout: _Layout, i, tile: int):
    """Overflow tile i: (its expert, its first sorted row, which of its `tile` rows are in that expert's group)."""
    e = jnp.searchsorted(layout.tile_ends_E, i, side="right")
    row0 = layout.group_starts_E[e] + layout.capacity + (i - layout.tile_starts_E[e]) * tile
    keep_t = jnp.arange(tile) < layout.group_starts_E[e] + layout.group_sizes_E[e] - row0
    return e, row0, keep_t


def _write_rows(a_PxX, new_txX, row0, keep_t):
    """a with rows row0 .. row0 + t - 1 replaced by new where keep (the others belong to another expert)."""
    old = jax.lax.dynamic_slice_in_dim(a_PxX, row0, new_txX.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(a_PxX, jnp.where(keep_t[:, None], new_txX, old), row0, axis=0)


def _grouped_swiglu_run(x_MxD, group_sizes_E, w_gate, w_up, w_down, capacities, tile, with_residuals: bool):
    """(y, and the gate/up projections when with_residuals) over P padded sorted rows, and x padded to P."""
    M, D = x_MxD.shape
    E, _, F = w_gate.shape
    layout = _layout(group_sizes_E, M, capacities, tile)
    x_PxD = jnp.pad(x_MxD, ((0, tile), (0, 0)))
    widths = (D, F, F) if with_residuals else (D,)

    def batched(C):
        def run(x_PxD):
            if C == 0:
                return tuple(jnp.zeros((M + tile, width), x_PxD.dtype) for width in widths)
            slot_P = _slot_rows(layout, E, C)
            x_ExCxD = _to_slots(x_PxD, slot_P, E, C)
            gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate)
            up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up)
            y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down)
            return tuple(_from_slots(a, slot_P) for a in (y, gate, up)[:len(widths)])
        return run

    def one_tile(i, out):
        e, row0, keep_t = _tile_rows(layout, i, tile)
        x = jax.lax.dynamic_slice_in_dim(x_PxD, row0, tile)
        gate, up = x @ w_gate[e], x @ w_up[e]
        y = (jax.nn.silu(gate) * up) @ w_down[e]
        return tuple(_write_rows(a, new, row0, keep_t) for a, new in zip(out, (y, gate, up)))

    out = jax.lax.switch(layout.branch, [batched(C) for C in capacities], x_PxD)
    return jax.lax.fori_loop(0, layout.tile_ends_E[-1], one_tile, out), x_PxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_swiglu(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, capacities, tile):
    (y_PxD,), _ = _grouped_swiglu_run(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, capacities,
                                      tile, False)
    return y_PxD[:x_MxD.shape[0]]


def _grouped_swiglu_fwd(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, capacities, tile):
    (y_PxD, gate_PxF, up_PxF), x_PxD = _grouped_swiglu_run(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF,
                                                           w_down_ExFxD, capacities, tile, True)
    # Saved in sorted-row order, whichever capacity ran, so the residuals do not depend on the branch.
    return y_PxD[:x_MxD.shape[0]], (x_PxD, gate_PxF, up_PxF, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def _grouped_swiglu_bwd(capacities, tile, res, dy_MxD):
    # Hand-written: autodiff of the tile loop would carry a zero [E, D, F] weight gradient per tile into the
    # loop's transpose. Here the batched part's weight gradients seed float32 accumulators that each tile adds
    # its own into, in place, reusing the saved gate/up projections.
    x_PxD, gate_PxF, up_PxF, group_sizes_E, w_gate, w_up, w_down = res
    M, D = dy_MxD.shape
    E = w_gate.shape[0]
    layout = _layout(group_sizes_E, M, capacities, tile)
    dy_PxD = jnp.pad(dy_MxD.astype(x_PxD.dtype), ((0, tile), (0, 0)))
    f32_einsum = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    f32_xt_dot = lambda a, b: jnp.dot(a.T, b, preferred_element_type=jnp.float32)
    zeros_f32 = lambda w: jnp.zeros(w.shape, jnp.float32)

    def batched(C):
        def run(x_PxD, gate_PxF, up_PxF, dy_PxD):
            if C == 0:
                return jnp.zeros_like(x_PxD), zeros_f32(w_gate), zeros_f32(w_up), zeros_f32(w_down)
            slot_P = _slot_rows(layout, E, C)
            x, gate, up, dy = (_to_slots(a, slot_P, E, C) for a in (x_PxD, gate_PxF, up_PxF, dy_PxD))
            d_gate, d_up, h = _swiglu_grads(gate, up, jnp.einsum("ecd,efd->ecf", dy, w_down))
            dx = jnp.einsum("ecf,edf->ecd", d_gate, w_gate) + jnp.einsum("ecf,edf->ecd", d_up, w_up)
            # Empty slots hold zeros in x and dy, so they add nothing to the weight gradients.
            return (_from_slots(dx, slot_P), f32_einsum("ecd,ecf->edf", x, d_gate),
                    f32_einsum("ecd,ecf->edf", x, d_up), f32_einsum("ecf,ecd->efd", h, dy))
        return run

    def one_tile(i, carry):
        dx_PxD, dw_gate, dw_up, dw_down = carry
        e, row0, keep_t = _tile_rows(layout, i, tile)
        x, gate, up = (jax.lax.dynamic_slice_in_dim(a, row0, tile) for a in (x_PxD, gate_PxF, up_PxF))
        # Rows past the group's end belong to another expert: a zero dy makes them add nothing here.
        dy = jnp.where(keep_t[:, None], jax.lax.dynamic_slice_in_dim(dy_PxD, row0, tile), 0)
        d_gate, d_up, h = _swiglu_grads(gate, up, dy @ w_down[e].T)
        dx = d_gate @ w_gate[e].T + d_up @ w_up[e].T
        return (_write_rows(dx_PxD, dx, row0, keep_t), dw_gate.at[e].add(f32_xt_dot(x, d_gate)),
                dw_up.at[e].add(f32_xt_dot(x, d_up)), dw_down.at[e].add(f32_xt_dot(h, dy)))

    carry = jax.lax.switch(layout.branch, [batched(C) for C in capacities], x_PxD, gate_PxF, up_PxF, dy_PxD)
    dx_PxD, dwg, dwu, dwd = jax.lax.fori_loop(0, layout.tile_ends_E[-1], one_tile, carry)
    return dx_PxD[:M], None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


_grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


@functools.cache
def _warn_no_blas(reason: str) -> None:
    warnings.warn(f"the MoE runs its slower pure-JAX grouped matmul ('bucketed'): the CPU custom call is "
                  f"unavailable: {reason}", RuntimeWarning, stacklevel=3)


# Below this many FLOPs per grouped matmul (2 M D F) the pure-JAX path wins on CPU: in the tiny preset's whole
# train step (17 MFLOP) bucketed took 37-45 ms against 50-68 ms with the custom call (WORKSPACE 6.3).
BLAS_MIN_FLOPS = 2**26


def default_grouped_impl(dtype=jnp.float32, flops: float = float("inf")) -> str:
    """ragged_dot off CPU; on CPU the BLAS custom call for float32 matmuls of at least BLAS_MIN_FLOPS when it
    builds, else bucketed."""
    if jax.default_backend() != "cpu":
        return "ragged_dot"
    if jnp.dtype(dtype) != jnp.float32 or flops < BLAS_MIN_FLOPS:
        return "bucketed"
    reason = grouped_matmul_cpu.unavailable_reason()
    if reason is not None:
        _warn_no_blas(reason)
        return "bucketed"
    return "blas"


def moe_dropless(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *,
                 impl: str = "auto", tile: int = 128, capacities=None):
    """sum_k weights[t,k] * expert_{experts[t,k]}(x[t]), every token kept (no capacity, no drops).

    `impl` is one of GROUPED_MATMUL_IMPLS (module docstring). `tile` caps the overflow tile rows of
    "bucketed"/"tiled"; `capacities` (bucketed only) replaces `capacity_buckets`, e.g. one value to force that
    branch.
    """
    T, D = x_TxD.shape
    E = w_gate_ExDxF.shape[0]
    k = experts_TxK.shape[1]
    if impl not in GROUPED_MATMUL_IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; use one of {GROUPED_MATMUL_IMPLS}")
    if impl == "auto":
        impl = default_grouped_impl(x_TxD.dtype, 2 * T * k * D * w_gate_ExDxF.shape[2])
    if capacities is not None and impl != "bucketed":
        raise ValueError(f"capacities is for impl='bucketed' only, got impl={impl!r}")
    flat_expert_M = experts_TxK.reshape(-1)
    order_M = jnp.argsort(flat_expert_M, stable=True)
    token_of_M = order_M // k
    x_sorted_MxD = x_TxD[token_of_M]
    group_sizes_E = jnp.bincount(flat_expert_M, length=E).astype(jnp.int32)
    if impl in ("ragged_dot", "blas"):
        grouped_matmul = jax.lax.ragged_dot if impl == "ragged_dot" else grouped_matmul_cpu.gmm
        y_sorted = grouped_swiglu(x_sorted_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                  grouped_matmul)
    else:  # bucketed / tiled
        M = x_sorted_MxD.shape[0]
        if impl == "tiled":  # tiles hold whole groups: about the mean group size
            capacities, tile_rows = (0,), _small_tile(M // E, tile)
        else:  # tiles hold only the rows past C: a quarter of the mean group wastes less on padding
            capacities = capacity_buckets(M, E) if capacities is None else tuple(capacities)
            tile_rows = _small_tile(M // (4 * E), tile)
        y_sorted = _grouped_swiglu(x_sorted_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                   capacities, tile_rows)
    weight_M = weights_TxK.reshape(-1)[order_M].astype(jnp.float32)
    y_weighted = y_sorted.astype(jnp.float32) * weight_M[:, None]
    out_TxD = jnp.zeros((T, D), jnp.float32).at[token_of_M].add(y_weighted)
    return out_TxD.astype(x_TxD.dtype)


def moe_params(module: nn.Module, cfg: ModelConfig):
    """Declares (router [D,E], w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]) on `module`: one layout for
    every MoE implementation, so checkpoints and shardings do not depend on which one runs."""
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_dim
    pdtype = jnp.dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.initializer_range)
    # The router stays float32 whatever param_dtype is (the official checkpoint stores it in fp32).
    w_router = param(module, "router", (D, E), ("embed", None), init, jnp.float32)
    w_gate = param(module, "w_gate", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdtype)
    w_up = param(module, "w_up", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdtype)
    w_down = param(module, "w_down", (E, F, D), ("experts", "expert_mlp", "embed"), init, pdtype)
    return w_router, w_gate, w_up, w_down


class MoE(nn.Module):
    """Router (float32 weights and math) + dropless SwiGLU experts; returns (y, load-balance stats)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxLxD, token_mask_BxL=None):
        cfg = self.cfg
        D = cfg.hidden_size
        dtype = jnp.dtype(cfg.dtype)
        w_router, w_gate, w_up, w_down = moe_params(self, cfg)

        B, L, _ = h_BxLxD.shape
        h_TxD = h_BxLxD.reshape(B * L, D)
        router_in = h_TxD.astype(jnp.float32)
        if cfg.router_jitter_noise > 0 and self.has_rng("jitter"):
            noise = jax.random.uniform(self.make_rng("jitter"), router_in.shape, jnp.float32,
                                       1.0 - cfg.router_jitter_noise, 1.0 + cfg.router_jitter_noise)
            router_in = router_in * noise
        logits_TxE = jnp.dot(router_in, w_router, precision=jax.lax.Precision.HIGHEST)
        weights_TxK, experts_TxK, probs_TxE = route_top_k(logits_TxE, cfg.num_experts_per_tok)
        y_TxD = moe_dropless(h_TxD.astype(dtype), weights_TxK, experts_TxK, w_gate.astype(dtype),
                             w_up.astype(dtype), w_down.astype(dtype), impl=cfg.moe_grouped_matmul)
        mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)
        return y_TxD.reshape(B, L, D), load_balance_stats(probs_TxE, experts_TxK, mask_T)
