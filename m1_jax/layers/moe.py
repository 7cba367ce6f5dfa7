"""Mixture of experts: float32 top-k router, dropless SwiGLU experts, Switch-style load-balancing stats.

Dropless dispatch sorts the token copies by expert so each expert's rows are contiguous, then runs a
grouped matmul. `lax.ragged_dot` is the grouped matmul on GPU/TPU; XLA:CPU lowers it to a dense masked
product over every expert (E times the work), so the CPU default is "bucketed": every expert's rows are
padded to one shared capacity C >= the largest group, picked at run time from a few static sizes
(`capacity_buckets`), and the experts run as one batched matmul over [E, C, .]; when the routing is too
uneven for the largest bucket it falls back to "tiled" (each group padded to whole row tiles, one small
matmul per used tile). All compute the same thing; no row is ever dropped.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax.config import ModelConfig
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


def _grouped_swiglu_ragged(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    gate = jax.lax.ragged_dot(x_MxD, w_gate_ExDxF, group_sizes_E)
    up = jax.lax.ragged_dot(x_MxD, w_up_ExDxF, group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_ExFxD, group_sizes_E)


def _row_groups(group_sizes_E, M: int):
    """For each expert-sorted row: (its expert, its index within that expert's group)."""
    ends_E = jnp.cumsum(group_sizes_E)
    expert_M = jnp.searchsorted(ends_E, jnp.arange(M), side="right")  # < E, since ends_E[-1] = M
    return expert_M, jnp.arange(M) - (ends_E - group_sizes_E)[expert_M]


def _scatter_rows(a_MxX, dest_M, num_rows: int):
    """Rows of a placed at dest (1-D row indices: XLA:CPU scatters and gathers whole rows fastest)."""
    return jnp.zeros((num_rows, a_MxX.shape[-1]), a_MxX.dtype).at[dest_M].set(a_MxX)


def _tile_layout(group_sizes_E, M: int, tile: int):
    """Each expert's rows padded to whole tiles: (dest row of each sorted row, expert of each tile, tiles per
    expert, static tile count).

    The tile count is a static worst case (every group ending one row into a tile); tiles past the used
    ones are skipped at run time.
    """
    E = group_sizes_E.shape[0]
    padded_sizes_E = -(-group_sizes_E // tile) * tile
    padded_ends_E = jnp.cumsum(padded_sizes_E)
    num_tiles = -(-(M + E * (tile - 1)) // tile)
    expert_M, index_in_group_M = _row_groups(group_sizes_E, M)
    dest_M = (padded_ends_E - padded_sizes_E)[expert_M] + index_in_group_M
    tile_expert_N = jnp.searchsorted(padded_ends_E, jnp.arange(num_tiles) * tile, side="right")
    tile_expert_N = jnp.minimum(tile_expert_N, E - 1)
    return dest_M, tile_expert_N, padded_sizes_E // tile, num_tiles


def _swiglu_grads(gate, up, dh):
    """Backward of h = silu(gate) * up given dh: (d_gate, d_up, h)."""
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    d_gate = dh * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))
    return d_gate, dh * act, act * up


def _tiled_swiglu_loop(x_NxtxD, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """One SwiGLU chain per used tile on that tile's expert: (y, gate and up projections); unused tiles are 0."""
    N, t, _ = x_NxtxD.shape
    F, D_out = w_down_ExFxD.shape[1:]

    def body(i, carry):
        y_NxtxD, gate_NxtxF, up_NxtxF = carry
        e = tile_expert_N[i]
        gate, up = x_NxtxD[i] @ w_gate_ExDxF[e], x_NxtxD[i] @ w_up_ExDxF[e]
        y = (jax.nn.silu(gate) * up) @ w_down_ExFxD[e]
        return y_NxtxD.at[i].set(y), gate_NxtxF.at[i].set(gate), up_NxtxF.at[i].set(up)

    dtype = x_NxtxD.dtype
    init = (jnp.zeros((N, t, D_out), dtype), jnp.zeros((N, t, F), dtype), jnp.zeros((N, t, F), dtype))
    return jax.lax.fori_loop(0, jnp.sum(tile_count_E), body, init)


@jax.custom_vjp
def _tiled_swiglu(x_NxtxD, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    return _tiled_swiglu_loop(x_NxtxD, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)[0]


def _tiled_swiglu_fwd(x_NxtxD, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    y, gate, up = _tiled_swiglu_loop(x_NxtxD, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    return y, (x_NxtxD, gate, up, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def _tiled_swiglu_bwd(res, dy_NxtxD):
    # Hand-written: autodiff of the forward loop would carry a zero [E, D, F] weight gradient per tile into
    # the loop's transpose. One loop over the used tiles adds each tile's weight gradient in place into its
    # expert's slot of a float32 [E, D, F] accumulator and reuses the saved gate/up projections. (A scan over
    # experts with an inner loop over each expert's tiles computed the same and ran 1.6-2x slower on XLA:CPU.)
    x_NxtxD, gate_NxtxF, up_NxtxF, tile_expert_N, tile_count_E, w_gate, w_up, w_down = res
    dtype = x_NxtxD.dtype
    f32_xt_dot = lambda a, b: jnp.dot(a.T, b, preferred_element_type=jnp.float32)

    def one_tile(i, carry):
        dx_NxtxD, dw_gate, dw_up, dw_down = carry
        e = tile_expert_N[i]
        x, gate, up, dy = x_NxtxD[i], gate_NxtxF[i], up_NxtxF[i], dy_NxtxD[i].astype(dtype)
        d_gate, d_up, h = _swiglu_grads(gate, up, dy @ w_down[e].T)
        dx = d_gate @ w_gate[e].T + d_up @ w_up[e].T
        return (dx_NxtxD.at[i].set(dx), dw_gate.at[e].add(f32_xt_dot(x, d_gate)),
                dw_up.at[e].add(f32_xt_dot(x, d_up)), dw_down.at[e].add(f32_xt_dot(h, dy)))

    zeros_f32 = lambda w: jnp.zeros(w.shape, jnp.float32)
    init = (jnp.zeros_like(x_NxtxD), zeros_f32(w_gate), zeros_f32(w_up), zeros_f32(w_down))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, jnp.sum(tile_count_E), one_tile, init)
    return (dx, None, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype))


_tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


def _small_tile(M: int, E: int, tile: int) -> int:
    """Small batches get small tiles, so padding each group to a tile boundary does not dominate the work."""
    return min(tile, max(8, 1 << max(0, (M // E - 1).bit_length())))


def _grouped_swiglu_tiled(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile: int):
    M, D = x_MxD.shape
    tile = _small_tile(M, group_sizes_E.shape[0], tile)
    dest_M, tile_expert_N, tile_count_E, num_tiles = _tile_layout(group_sizes_E, M, tile)
    x_tiles = _scatter_rows(x_MxD, dest_M, num_tiles * tile).reshape(num_tiles, tile, D)
    y_pad = _tiled_swiglu(x_tiles, tile_expert_N, tile_count_E, w_gate_ExDxF, w_up_ExDxF,
                          w_down_ExFxD)
    return y_pad.reshape(num_tiles * tile, -1)[dest_M]


# Capacities tried, as multiples of the mean group size M / E; beyond the last one "tiled" runs instead.
CAPACITY_RATIOS = (1.0, 1.125, 1.25, 1.5, 2.0)


def capacity_buckets(M: int, E: int) -> tuple[int, ...]:
    """The static per-expert capacities of the "bucketed" grouped matmul: ratio * M / E rounded up to 8 rows."""
    return tuple(sorted({min(M, 8 * math.ceil(M / E * r / 8)) for r in CAPACITY_RATIOS}))


def _bucket_rows(group_sizes_E, M: int, C: int):
    """Row of [E * C, .] that each expert-sorted row goes to: row m of group e lands at e * C + (m - start_e)."""
    expert_M, index_in_group_M = _row_groups(group_sizes_E, M)
    return expert_M * C + index_in_group_M


def _bucket_index(group_sizes_E, buckets):
    """Index of the smallest bucket that holds the largest group; len(buckets) means "tiled"."""
    return jnp.searchsorted(jnp.asarray(buckets, jnp.int32), jnp.max(group_sizes_E), side="left")


def _bucketed_swiglu_run(x_MxD, group_sizes_E, w_gate, w_up, w_down, tile, with_residuals: bool):
    """y (and the gate/up projections when with_residuals) in sorted-row order, from whichever branch fits."""
    M, D = x_MxD.shape
    E = w_gate.shape[0]
    buckets = capacity_buckets(M, E)

    def batched(C):
        def run(x_MxD):
            dest_M = _bucket_rows(group_sizes_E, M, C)
            x_ExCxD = _scatter_rows(x_MxD, dest_M, E * C).reshape(E, C, D)
            gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate)
            up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up)
            y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down)
            out = (y, gate, up) if with_residuals else (y,)
            return tuple(a.reshape(E * C, -1)[dest_M] for a in out)
        return run

    def tiled(x_MxD):
        dest_M, tile_expert_N, tile_count_E, num_tiles = _tile_layout(group_sizes_E, M, tile)
        x_tiles = _scatter_rows(x_MxD, dest_M, num_tiles * tile).reshape(num_tiles, tile, D)
        out = _tiled_swiglu_loop(x_tiles, tile_expert_N, tile_count_E, w_gate, w_up, w_down)
        out = out if with_residuals else out[:1]
        return tuple(a.reshape(num_tiles * tile, -1)[dest_M] for a in out)

    return jax.lax.switch(_bucket_index(group_sizes_E, buckets), [batched(C) for C in buckets] + [tiled], x_MxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bucketed_swiglu(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile):
    return _bucketed_swiglu_run(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile, False)[0]


def _bucketed_swiglu_fwd(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile):
    y, gate, up = _bucketed_swiglu_run(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile, True)
    # Saved in sorted-row order, whichever branch ran, so the residuals do not depend on the bucket.
    return y, (x_MxD, gate, up, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def _bucketed_swiglu_bwd(tile, res, dy_MxD):
    x_MxD, gate_MxF, up_MxF, group_sizes_E, w_gate, w_up, w_down = res
    M, D = x_MxD.shape
    E = w_gate.shape[0]
    dy_MxD = dy_MxD.astype(x_MxD.dtype)
    buckets = capacity_buckets(M, E)
    f32_einsum = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    def batched(C):
        def run(x_MxD, gate_MxF, up_MxF, dy_MxD):
            dest_M = _bucket_rows(group_sizes_E, M, C)
            x, gate, up, dy = (_scatter_rows(a, dest_M, E * C).reshape(E, C, -1)
                               for a in (x_MxD, gate_MxF, up_MxF, dy_MxD))
            d_gate, d_up, h = _swiglu_grads(gate, up, jnp.einsum("ecd,efd->ecf", dy, w_down))
            dx = jnp.einsum("ecf,edf->ecd", d_gate, w_gate) + jnp.einsum("ecf,edf->ecd", d_up, w_up)
            # Empty slots hold zeros in x and dy, so they add nothing to the weight gradients.
            return (dx.reshape(E * C, D)[dest_M], f32_einsum("ecd,ecf->edf", x, d_gate),
                    f32_einsum("ecd,ecf->edf", x, d_up), f32_einsum("ecf,ecd->efd", h, dy))
        return run

    def tiled(x_MxD, gate_MxF, up_MxF, dy_MxD):
        dest_M, tile_expert_N, tile_count_E, num_tiles = _tile_layout(group_sizes_E, M, tile)
        to_tiles = lambda a: _scatter_rows(a, dest_M, num_tiles * tile).reshape(num_tiles, tile, -1)
        res_tiles = (to_tiles(x_MxD), to_tiles(gate_MxF), to_tiles(up_MxF), tile_expert_N, tile_count_E,
                     w_gate, w_up, w_down)
        dx, _, _, dwg, dwu, dwd = _tiled_swiglu_bwd(res_tiles, to_tiles(dy_MxD))
        return dx.reshape(num_tiles * tile, D)[dest_M], dwg, dwu, dwd

    dx, dwg, dwu, dwd = jax.lax.switch(_bucket_index(group_sizes_E, buckets),
                                       [batched(C) for C in buckets] + [tiled], x_MxD, gate_MxF, up_MxF, dy_MxD)
    return dx, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


_bucketed_swiglu.defvjp(_bucketed_swiglu_fwd, _bucketed_swiglu_bwd)


def default_grouped_impl() -> str:
    return "bucketed" if jax.default_backend() == "cpu" else "ragged_dot"


def moe_dropless(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *,
                 impl: str = "auto", tile: int = 128):
    """sum_k weights[t,k] * expert_{experts[t,k]}(x[t]), every token kept (no capacity, no drops)."""
    T, D = x_TxD.shape
    E = w_gate_ExDxF.shape[0]
    k = experts_TxK.shape[1]
    impl = default_grouped_impl() if impl == "auto" else impl
    flat_expert_M = experts_TxK.reshape(-1)
    order_M = jnp.argsort(flat_expert_M, stable=True)
    token_of_M = order_M // k
    x_sorted_MxD = x_TxD[token_of_M]
    group_sizes_E = jnp.bincount(flat_expert_M, length=E).astype(jnp.int32)
    if impl == "ragged_dot":
        y_sorted = _grouped_swiglu_ragged(x_sorted_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    elif impl == "bucketed":
        y_sorted = _bucketed_swiglu(x_sorted_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                    _small_tile(x_sorted_MxD.shape[0], E, tile))
    elif impl == "tiled":
        y_sorted = _grouped_swiglu_tiled(x_sorted_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                         tile)
    else:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; use 'auto', 'ragged_dot', 'bucketed' or 'tiled'")
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
                             w_up.astype(dtype), w_down.astype(dtype))
        mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)
        return y_TxD.reshape(B, L, D), load_balance_stats(probs_TxE, experts_TxK, mask_T)
