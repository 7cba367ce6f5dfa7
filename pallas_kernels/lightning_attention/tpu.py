"""Lightning attention as a Pallas TPU (Mosaic) kernel.

Grid (batch*heads, value tiles, chunks). The chunk axis is sequential ("arbitrary") and the running state lives
in a float32 VMEM scratch that persists across its steps; the other two axes are "parallel" (megacore). The
state is reset from initial_state at the first chunk and written to the final-state output at the last.
Backward = the same kernel run as a forward dq sweep and two reverse sweeps (see kernel_common.py); reverse
sweeps visit chunks last-to-first through the index maps, so no array is flipped in HBM.

Layout: with Dk and Dv multiples of 128 (M1: 128), [B, N, H, D] is viewed for free as [B, N, H*D] and a head
is a 128-aligned column block, so no transpose is needed. Otherwise (small test shapes) the wrapper transposes
to [B*H, N, D] so every block's last dim spans the full axis (TPU tiling: last two block dims multiples of
(8, 128) or the full axis). The chunk is rounded up to a multiple of 16 (bf16 packs 16 rows per sublane tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning_attention import kernel_common

VMEM_LIMIT_BYTES = 32 * 1024 * 1024  # far above need (C=256, D=128: ~2 MiB), within every TPU generation's VMEM


def _kernel(decay_ref, q_ref, k_ref, v_ref, s0_ref, *refs, num_chunks, last_len, chunk, reverse, segmented):
    bound_ref, o_ref, sf_ref, state_scr = refs if segmented else (None, *refs)
    bh, c = pl.program_id(0), pl.program_id(2)

    @pl.when(c == 0)
    def _():
        state_scr[...] = s0_ref[...].astype(jnp.float32)

    chunk_idx = (num_chunks - 1 - c) if reverse else c
    m = jnp.where(chunk_idx == num_chunks - 1, last_len, chunk).astype(jnp.int32)
    seg = {}
    if segmented:  # this sweep's segment bound of each row (start forward, end reverse), a [C, 1] column
        c0 = (chunk_idx * chunk).astype(jnp.int32)
        seg = dict(c0=c0, end_Cx1=bound_ref[...]) if reverse else dict(c0=c0, start_Cx1=bound_ref[...])
    o, new_state = kernel_common.chunk_step(q_ref[...], k_ref[...], v_ref[...], state_scr[...], decay_ref[bh], m,
                                            reverse=reverse, **seg)
    o_ref[...] = o.astype(o_ref.dtype)
    state_scr[...] = new_state

    @pl.when(c == num_chunks - 1)
    def _():
        sf_ref[...] = new_state


def sweep(q, k, v, decay, s0, bounds=None, *, reverse, chunk=256, interpret=False):
    """q, k [B, N, H, K]; v [B, N, H, V]; decay [H]; s0 [B, H, K, V]; bounds None or kernel_common.segment_bounds
    -> (o [B, N, H, V] v.dtype, s_final f32)."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    C = kernel_common.round_up(min(chunk, N), 16)
    Np = kernel_common.round_up(N, C)
    nc = Np // C
    pad = ((0, 0), (0, Np - N), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) if Np != N else x for x in (q, k, v))
    lam_rows = jnp.tile(jnp.asarray(decay, jnp.float32), B)  # [B*H], row b*H + h

    aligned = (K % 128 == 0 and V % 128 == 0) or H == 1
    if aligned:
        Bv, Hv = B, H
        q3, k3, v3 = (x.reshape(B, Np, -1) for x in (q, k, v))
        s0v = s0
    else:  # small heads: one row per (b, h) so each block spans the full last axis
        Bv, Hv = B * H, 1
        q3, k3, v3 = (jnp.swapaxes(x, 1, 2).reshape(B * H, Np, -1) for x in (q, k, v))
        s0v = s0.reshape(B * H, 1, K, V)
    TV = 128 if V % 128 == 0 else V
    nv = V // TV

    def row(bh):  # lax.div/rem: jnp's floor division lowers through sign(), which Mosaic rejects off-TPU
        return lax.div(bh, Hv), lax.rem(bh, Hv)

    def chunk_of(c):
        return nc - 1 - c if reverse else c

    def qk_map(bh, vt, c):
        b, h = row(bh)
        return b, chunk_of(c), h

    def v_map(bh, vt, c):
        b, h = row(bh)
        return b, chunk_of(c), h * nv + vt

    def s_map(bh, vt, c):
        b, h = row(bh)
        return b, h, 0, vt

    segmented = bounds is not None
    extra_specs, extra_args = [], []
    if segmented:  # [B, Np, 1] (one row per (b, h) in the small-head layout): [C, 1] blocks, the full last dim
        bound = kernel_common.pad_bounds(*bounds, Np)[1 if reverse else 0][:, :, None]
        if not aligned:
            bound = jnp.repeat(bound, H, axis=0)
        extra_specs = [pl.BlockSpec((None, C, 1), lambda bh, vt, c: (row(bh)[0], chunk_of(c), 0))]
        extra_args = [bound]
    kernel = functools.partial(_kernel, num_chunks=nc, last_len=N - (nc - 1) * C, chunk=C, reverse=reverse,
                               segmented=segmented)
    o3, sf = pl.pallas_call(
        kernel,
        grid=(Bv * Hv, nv, nc),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((None, C, K), qk_map),
            pl.BlockSpec((None, C, K), qk_map),
            pl.BlockSpec((None, C, TV), v_map),
            pl.BlockSpec((None, None, K, TV), s_map),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, C, TV), v_map),
            pl.BlockSpec((None, None, K, TV), s_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((Bv, Np, Hv * V), v.dtype),
            jax.ShapeDtypeStruct((Bv, Hv, K, V), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((K, TV), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        interpret=interpret,
    )(lam_rows, q3, k3, v3, s0v.astype(jnp.float32), *extra_args)
    if aligned:
        o = o3.reshape(B, Np, H, V)
    else:
        o = jnp.swapaxes(o3.reshape(B, H, Np, V), 1, 2)
    return o[:, :N], sf.reshape(B, H, K, V)


@functools.lru_cache(maxsize=None)
def _differentiable(chunk, interpret):
    return kernel_common.make_differentiable(functools.partial(sweep, chunk=chunk, interpret=interpret))


def lightning_attention_tpu(q, k, v, decay, initial_state=None, segment_ids=None, *, block_size=256,
                            interpret=False):
    """Returns (o [B, N, H, V] in v's dtype, final_state [B, H, K, V] float32); differentiable in q, k, v, state.
    segment_ids [B, N]: the state resets at each segment start (packed documents)."""
    B, _, H, K = q.shape
    s0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None else initial_state
    bounds = None if segment_ids is None else kernel_common.segment_bounds(segment_ids)
    return _differentiable(int(block_size), interpret)(q, k, v, jnp.asarray(decay, jnp.float32), s0, bounds)
