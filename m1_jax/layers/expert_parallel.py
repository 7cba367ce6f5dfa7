"""Expert parallelism for the MoE: tokens sharded over the batch axes, experts over the expert axis.

Under `jax.shard_map`, each shard routes its own tokens (float32 router, top-k renormalised, as in
moe.py), sends every token copy to the shard that owns its expert with an all-to-all over the expert
axis, runs its local experts, sends the results back and combines them with the router weights.
The expert axis also shards the batch (MaxText style), so every device holds distinct tokens.

Two backends behind one interface, both dropless with capacity_factor 0 (the default, and the
single-device MoE's semantics):
- "ragged": copies are sorted by expert and exchanged with `lax.ragged_all_to_all` (offsets from an
  all_gather of per-expert counts); local experts run the grouped matmul. Dropless, the receive buffer
  is the worst case, ep * tokens_per_shard * min(k, experts_per_shard) rows. With capacity_factor > 0
  it becomes MiniMax-01's global router: each expert takes at most
  C_global = ceil(capacity_factor * ep * tokens_per_shard * k / num_experts) copies from its whole
  expert-axis group (decided from the all-gathered counts, source shards in index order), so a copy
  drops only when the expert's group-wide load overflows, and the buffer shrinks to
  experts_per_shard * C_global rows.
  XLA:CPU cannot run `ragged_all_to_all`; on CPU this backend only traces/lowers (for TPU/GPU), or runs
  with an equivalent passed as `ragged_all_to_all` (the tests pass an all_gather-based one).
- "capacity": every (source shard, expert) pair gets C slots, exchanged with a plain
  `lax.all_to_all`; runs everywhere, including CPU.
  C = ceil(capacity_factor * tokens_per_shard * k / num_experts), clamped to [1, tokens_per_shard];
  capacity_factor 0 gives C = tokens_per_shard, which never drops (a token picks an expert at
  most once, so one shard never sends more than tokens_per_shard copies to one expert) but makes the
  buffers num_experts / k times the balanced size; 1.25 is the usual setting.
Dropped copies contribute 0 and the surviving weights are NOT renormalised. Slots are filled
first-choice first (all of a shard's top-1 copies, then its top-2, ...; token order within a rank),
GShard style, so overflow drops second choices before first choices.

Both run the local experts with `pallas_kernels.grouped_matmul` (`grouped_matmul_impl`, the single-device
MoE's `ModelConfig.impl.moe_grouped_matmul`). Both return the load-balance stats (counts_E, prob_sum_E, num_tokens) summed over every token shard,
so `aux_loss_from_stats` gives the same value as the single-device MoE, plus drop accounting.
Padding tokens (token_mask 0) are routed and computed like real tokens, as in `MoE`; the mask only
affects the load-balance stats.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from m1_jax import sharding
from m1_jax.config import ModelConfig
from m1_jax.layers.moe import grouped_swiglu, moe_dropless, moe_params, route, router_jitter

BACKENDS = ("capacity", "ragged")


def capacity_per_expert(tokens_per_shard: int, k: int, num_experts: int, capacity_factor) -> int:
    """Slots per expert for a pool of tokens_per_shard tokens (one shard for "capacity", one expert-axis
    group for the ragged global router); see the module docstring for the rule."""
    if capacity_factor == 0:
        return tokens_per_shard
    c = math.ceil(capacity_factor * tokens_per_shard * k / num_experts)
    return max(1, min(c, tokens_per_shard))


def moe_expert_parallel(x_TxD, router_w_DxE, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, mesh, k: int,
                        expert_axis: str = "expert", batch_axes: Sequence[str] | None = None,
                        backend: str = "capacity", capacity_factor: float = 0.0, grouped_matmul_impl: str = "auto",
                        token_mask_T=None, jitter_TxD=None, ragged_all_to_all=jax.lax.ragged_all_to_all):
    """Expert-parallel dropless-or-capacity MoE over `mesh`. Returns (y_TxD, stats).

    x_TxD: tokens (global shape), sharded over `batch_axes` (default `sharding.token_axes`: the mesh's batch
    axes, then context, the expert axis always). Over an expert_ffn axis the expert weights are gathered at the
    shard_map boundary and their gradients summed back over it by the transpose.
    router_w_DxE: float32 router (replicated inside). w_*: expert weights, sharded over `expert_axis`
    on their leading E dimension inside the shard_map (other shardings are gathered at the boundary).
    token_mask_T: optional, 0 for padding (load-balance stats only). jitter_TxD: optional multiplicative
    router noise (as MoE's jitter), sharded like x. capacity_factor: 0 = dropless, > 0 caps each expert's
    slots (module docstring). grouped_matmul_impl: the local experts' grouped matmul. ragged_all_to_all: the
    ragged backend's exchange (`lax.ragged_all_to_all`'s signature).
    stats: dict with counts_E, prob_sum_E, num_tokens (psum'd over all token shards, equal to the
    single-device `load_balance_stats`), dropped (int32 number of dropped token copies, summed over the
    mesh), total_copies (T * k) and drop_fraction (dropped / total_copies).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert-parallel backend {backend!r}; use one of {BACKENDS}")
    if capacity_factor is None or not capacity_factor >= 0:
        raise ValueError(f"capacity_factor must be >= 0 (0 = dropless), got {capacity_factor!r}")
    if expert_axis not in mesh.axis_names:
        raise ValueError(f"expert_axis {expert_axis!r} is not a mesh axis {mesh.axis_names}; pass the "
                         "name of the axis that shards the experts")
    batch_axes = sharding.token_axes(mesh, expert_axis) if batch_axes is None else tuple(batch_axes)
    if expert_axis not in batch_axes:
        raise ValueError(f"batch_axes {batch_axes} must include the expert axis {expert_axis!r}: the expert "
                         "axis also shards the tokens")
    unknown = [a for a in batch_axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch_axes {unknown} are not mesh axes {mesh.axis_names}")
    T, D = x_TxD.shape
    E = w_gate_ExDxF.shape[0]
    ep = mesh.shape[expert_axis]
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if E % ep:
        raise ValueError(f"{E} experts do not split over expert axis of size {ep}; make num_experts a "
                         "multiple of the expert-parallel degree")
    if T % shards:
        raise ValueError(f"{T} tokens do not split over {shards} token shards (axes {batch_axes}); make the "
                         "number of tokens (batch * length) a multiple of it")
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, num_experts={E}]")
    t_loc = T // shards
    mask_T = jnp.ones((T,), jnp.float32) if token_mask_T is None else token_mask_T.astype(jnp.float32)
    use_jitter = jitter_TxD is not None

    def body(x_txD, mask_t, router_DxE, w_gate_exDxF, w_up_exDxF, w_down_exFxD, *jitter):
        weights_txK, experts_txK, (counts_E, prob_sum_E, num_tokens) = route(
            x_txD, router_DxE, k, jitter_TxD=jitter[0] if use_jitter else None, mask_T=mask_t)
        experts_w = (w_gate_exDxF, w_up_exDxF, w_down_exFxD)
        if backend == "capacity":
            capacity = capacity_per_expert(t_loc, k, E, capacity_factor)
            y_txD, dropped = _capacity_dispatch(x_txD, weights_txK, experts_txK, experts_w, expert_axis, ep,
                                                capacity, grouped_matmul_impl)
        else:
            global_capacity = (None if capacity_factor == 0
                               else capacity_per_expert(ep * t_loc, k, E, capacity_factor))
            y_txD, dropped = _ragged_dispatch(x_txD, weights_txK, experts_txK, experts_w, expert_axis, ep,
                                              ragged_all_to_all, global_capacity, grouped_matmul_impl)
        stats = dict(counts_E=counts_E, prob_sum_E=prob_sum_E, num_tokens=num_tokens, dropped=dropped)
        stats = jax.lax.psum(stats, batch_axes)
        return y_txD, stats

    tok = P(batch_axes)
    experts = P(expert_axis)
    in_specs = (tok, tok, P(), experts, experts, experts) + ((tok,) if use_jitter else ())
    args = (x_TxD, mask_T, router_w_DxE.astype(jnp.float32), w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    args += (jitter_TxD,) if use_jitter else ()
    # check_vma=False: the grouped matmul kernels (megablox, Pallas) declare outputs without varying-axes types.
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()), check_vma=False)
    y_TxD, stats = fn(*args)
    stats["total_copies"] = jnp.asarray(T * k, jnp.int32)
    stats["drop_fraction"] = stats["dropped"].astype(jnp.float32) / (T * k)
    return y_TxD, stats


def _combine(y_copies_KxtxD, weights_txK, dtype):
    """sum_k w[t,k] y[k,t] in float32, as moe_dropless does."""
    y = jnp.einsum("ktd,tk->td", y_copies_KxtxD.astype(jnp.float32), weights_txK.astype(jnp.float32))
    return y.astype(dtype)


def _capacity_dispatch(x_txD, weights_txK, experts_txK, experts_w, expert_axis, ep, capacity, impl):
    """Capacity-padded all_to_all dispatch on one shard. Returns (y_txD, local dropped count)."""
    t, D = x_txD.shape
    k = experts_txK.shape[1]
    w_gate_exDxF, w_up_exDxF, w_down_exFxD = experts_w
    e_loc = w_gate_exDxF.shape[0]
    E = e_loc * ep
    C = capacity
    # Copies in priority order: rank-major (every top-1 choice before any top-2), then token order.
    expert_M = experts_txK.T.reshape(-1)
    token_M = jnp.tile(jnp.arange(t), k)
    M = expert_M.shape[0]
    order_M = jnp.argsort(expert_M, stable=True)
    counts_E = jnp.bincount(expert_M, length=E)
    starts_E = jnp.cumsum(counts_E) - counts_E
    pos_sorted = jnp.arange(M) - starts_E[expert_M[order_M]]
    pos_M = jnp.zeros((M,), pos_sorted.dtype).at[order_M].set(pos_sorted)  # slot index within its expert
    keep_M = pos_M < C
    trash = E * C  # dropped copies go to one extra row that is never sent
    slot_M = jnp.where(keep_M, expert_M * C + pos_M, trash)
    send = jnp.zeros((E * C + 1, D), x_txD.dtype).at[slot_M].add(x_txD[token_M])[:trash]
    # [E*C] rows are ordered (dest shard, local expert, slot): split the leading dim over the axis.
    recv = jax.lax.all_to_all(send.reshape(ep, e_loc * C, D), expert_axis, 0, 0)  # [src shard, e_loc*C, D]
    h_exRxD = recv.reshape(ep, e_loc, C, D).transpose(1, 0, 2, 3).reshape(e_loc, ep * C, D)
    # Every local expert has ep * C rows (empty slots are zero rows, whose SwiGLU is zero).
    group_sizes_e = jnp.full((e_loc,), ep * C, jnp.int32)
    out_exRxD = grouped_swiglu(h_exRxD.reshape(e_loc * ep * C, D), group_sizes_e, w_gate_exDxF, w_up_exDxF,
                               w_down_exFxD, impl=impl).reshape(e_loc, ep * C, D)
    back = out_exRxD.reshape(e_loc, ep, C, D).transpose(1, 0, 2, 3).reshape(ep, e_loc * C, D)
    back = jax.lax.all_to_all(back, expert_axis, 0, 0).reshape(E * C, D)
    back = jnp.concatenate([back, jnp.zeros((1, D), back.dtype)])  # the trash row reads zeros
    y_KxtxD = back[slot_M].reshape(k, t, D)
    dropped = jnp.sum(~keep_M).astype(jnp.int32)
    return _combine(y_KxtxD, weights_txK, x_txD.dtype), dropped


def _exclusive_cumsum(v, axis):
    return jnp.cumsum(v, axis=axis) - v


def _ragged_dispatch(x_txD, weights_txK, experts_txK, experts_w, expert_axis, ep, a2a, global_capacity, impl):
    """ragged_all_to_all dispatch on one shard. Returns (y_txD, local dropped count).

    global_capacity None: dropless, with a worst-case receive buffer. Otherwise each expert takes at most
    global_capacity copies from its whole expert-axis group, decided from all-gathered per-expert counts
    (MiniMax-01's global router): source shards fill an expert's slots in shard order, so copies drop
    only when the expert's group-wide load overflows, and the receive buffer shrinks to e_loc * capacity.
    """
    t, D = x_txD.shape
    k = experts_txK.shape[1]
    w_gate_exDxF, w_up_exDxF, w_down_exFxD = experts_w
    e_loc = w_gate_exDxF.shape[0]
    E = e_loc * ep
    # Copies rank-major (every top-1 choice before any top-2), so a capacity cut drops later choices first.
    expert_M = experts_txK.T.reshape(-1)
    token_M = jnp.tile(jnp.arange(t), k)
    M = expert_M.shape[0]
    sizes_E = jnp.bincount(expert_M, length=E).astype(jnp.int32)
    # sizes_SxE[s, e]: copies shard s has for expert e (identical on every shard of the group).
    sizes_SxE = jax.lax.all_gather(sizes_E, expert_axis)
    me = jax.lax.axis_index(expert_axis)
    R = ep * t * min(k, e_loc)  # dropless worst case: every shard's tokens pick min(k, e_loc) of my experts
    if global_capacity is None:
        kept_SxE = sizes_SxE
        order_M = jnp.argsort(expert_M, stable=True)
    else:
        kept_SxE = jnp.clip(global_capacity - _exclusive_cumsum(sizes_SxE, 0), 0, sizes_SxE)
        by_expert = jnp.argsort(expert_M, stable=True)
        pos_sorted = jnp.arange(M) - _exclusive_cumsum(sizes_E, 0)[expert_M[by_expert]]
        pos_M = jnp.zeros((M,), pos_sorted.dtype).at[by_expert].set(pos_sorted)
        keep_M = pos_M < kept_SxE[me][expert_M]
        order_M = jnp.argsort(jnp.where(keep_M, expert_M, E), stable=True)  # dropped copies last, unsent
        R = min(R, e_loc * global_capacity)
    x_sorted = x_txD[token_M[order_M]]
    # blocks_SxS[s, j]: copies shard s sends to shard j.
    blocks_SxS = kept_SxE.reshape(ep, ep, e_loc).sum(-1)
    mine_S = blocks_SxS[:, me]  # what each source sends me
    recv_starts_S = _exclusive_cumsum(mine_S, 0)  # where each source's segment lands in my buffer
    fwd_in_off = _exclusive_cumsum(blocks_SxS[me], 0)  # my copies for shard j start here (sorted order)
    fwd_out_off = _exclusive_cumsum(blocks_SxS, 0)[me]  # ...and land here on shard j
    buf = jnp.zeros((R, D), x_txD.dtype)
    recv_RxD = a2a(x_sorted, buf, fwd_in_off, blocks_SxS[me], fwd_out_off, mine_S, axis_name=expert_axis)
    # The buffer holds, per source, runs of rows for my local experts in order; regroup by expert.
    seg_sizes = kept_SxE.reshape(ep, ep, e_loc)[:, me, :].reshape(-1)  # [source, local expert]
    seg_of_R = jnp.searchsorted(jnp.cumsum(seg_sizes), jnp.arange(R), side="right")
    local_e_R = jnp.where(seg_of_R < ep * e_loc, seg_of_R % e_loc, e_loc)  # e_loc marks the padding tail
    perm_R = jnp.argsort(local_e_R, stable=True)
    group_sizes_e = seg_sizes.reshape(ep, e_loc).sum(0)
    # The grouped matmul leaves rows past sum(group_sizes) zero, so the padding tail costs no expert work.
    out_sorted = grouped_swiglu(recv_RxD[perm_R], group_sizes_e, w_gate_exDxF, w_up_exDxF, w_down_exFxD,
                                impl=impl)
    out_RxD = jnp.zeros_like(out_sorted).at[perm_R].set(out_sorted)
    # Return trip: the exact reverse of the forward exchange. Rows of dropped copies stay zero.
    back = jnp.zeros((M, D), out_RxD.dtype)
    back_out_off = _exclusive_cumsum(blocks_SxS, 1)[:, me]  # where source j's copies for me began on j
    y_sorted = a2a(out_RxD, back, recv_starts_S, mine_S, back_out_off, blocks_SxS[me], axis_name=expert_axis)
    y_MxD = jnp.zeros_like(y_sorted).at[order_M].set(y_sorted)
    dropped = (M - jnp.sum(kept_SxE[me])).astype(jnp.int32)
    return _combine(y_MxD.reshape(k, t, D), weights_txK, x_txD.dtype), dropped


def context_mesh(expert_axis: str = "expert"):
    """The mesh set with `jax.set_mesh` / `jax.sharding.use_mesh` (the training loop sets it around
    tracing); ValueError when there is none or it lacks the expert axis."""
    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
    if expert_axis not in names:
        raise ValueError(
            f"moe_impl='expert_parallel' needs a mesh with an {expert_axis!r} axis, but the active mesh has axes "
            f"{names or 'none (no mesh set)'}; trace the model under `with jax.set_mesh(mesh):` with a mesh "
            f"such as make_mesh('data=2,expert=4'), or use moe_impl='dropless'")
    return mesh


class ExpertParallelMoE(nn.Module):
    """Drop-in for `MoE` (same parameter names, shapes, logical axes and return value) running experts in
    parallel over `mesh`, configured by cfg's moe_backend, moe_capacity_factor and moe_grouped_matmul.
    Returns (y_BxLxD, (counts_E, prob_sum_E, num_tokens)); drop counts are sown into the "intermediates"
    collection as "moe_dropped" (visible when that collection is mutable).

    mesh None: the mesh from context (`jax.set_mesh`); batch_axes None: that mesh's batch axes
    (`sharding.token_axes`: the batch axes, then context). During `init` (parameter shapes only; model init traces a 1x1 token batch that
    no mesh splits) it computes the single-device dropless MoE instead, with the same parameters.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None
    expert_axis: str = "expert"
    batch_axes: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, h_BxLxD, token_mask_BxL=None):
        cfg = self.cfg
        D, E = cfg.hidden_size, cfg.num_experts
        dtype = jnp.dtype(cfg.dtype)
        w_router, w_gate, w_up, w_down = moe_params(self, cfg)

        B, L, _ = h_BxLxD.shape
        h_TxD = h_BxLxD.reshape(B * L, D)
        jitter = router_jitter(self, cfg, h_TxD.shape)
        mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)
        w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
        if self.is_initializing():
            weights_TxK, experts_TxK, _ = route(h_TxD, w_router, cfg.num_experts_per_tok, jitter_TxD=jitter)
            y_TxD = moe_dropless(h_TxD.astype(dtype), weights_TxK, experts_TxK, w_gate, w_up, w_down,
                                 impl=cfg.impl.moe_grouped_matmul)
            zeros_E = jnp.zeros((E,), jnp.float32)
            return y_TxD.reshape(B, L, D), (zeros_E, zeros_E, jnp.zeros((), jnp.float32))
        mesh = self.mesh if self.mesh is not None else context_mesh(self.expert_axis)
        batch_axes = self.batch_axes if self.batch_axes is not None else sharding.token_axes(mesh, self.expert_axis)
        y_TxD, stats = moe_expert_parallel(
            h_TxD.astype(dtype), w_router, w_gate, w_up, w_down, mesh=mesh, k=cfg.num_experts_per_tok,
            expert_axis=self.expert_axis, batch_axes=batch_axes, backend=cfg.impl.moe_backend,
            capacity_factor=cfg.impl.moe_capacity_factor, grouped_matmul_impl=cfg.impl.moe_grouped_matmul,
            token_mask_T=mask_T, jitter_TxD=jitter)
        self.sow("intermediates", "moe_dropped", stats["dropped"])
        return y_TxD.reshape(B, L, D), (stats["counts_E"], stats["prob_sum_E"], stats["num_tokens"])
