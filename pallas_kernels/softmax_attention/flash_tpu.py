"""Our own causal flash attention as Pallas Mosaic TPU kernels, with a traced query offset: the TPU twin of
flash_gpu.py (same arguments, same mask), the local compute of context parallelism on TPU. Splash attention's
masks are static numpy objects, so the per-device offset (a function of `lax.axis_index`) cannot reach them.

Key j is visible to query i iff j <= q_offset + i and their segment ids are equal. The offset is a scalar
prefetched into SMEM, so the index maps see it too: a key block past the query block's last position repeats
the previous block index (no DMA) and its grid step does no work.
  forward  grid (B, H, query blocks, key blocks), key axis sequential: online softmax in float32 VMEM scratch
           (running max and sum lane-replicated [bq, 128], the accumulator [bq, D]); writes O and the row
           log-sum-exp.
  dq       the forward's grid: dq accumulates over key blocks.
  dk, dv   grid (B, K, key blocks, G * query blocks): the sequential axis walks the G query heads of the kv
           head and their query blocks at or after the key block, accumulating dk and dv.
Layout [B, heads, L, D] (the last two block dims: 128-row tiles and the whole head dim); segment ids as the
TPU kernels in jax keep them (queries lane-replicated [B, L, 128], keys sublane-replicated [B, 8, S]). Lengths
are padded to 128 with segment ids no real token has; matmul operands stay in the input dtype (float32 at
Precision.HIGHEST), everything else is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.softmax_attention.flash_common import MASKED, PAD_KV, PAD_Q, call, dot, pad_to, with_vjp

BLOCK = 128   # query and key tile (one lane width: scores and the replicated row stats share a shape)
LANES = 128
SUBLANES = 8
VMEM_LIMIT_BYTES = 32 * 1024 * 1024


def _to_width(x_bqx128, n):
    """A lane-replicated [bq, 128] row statistic as [bq, n]."""
    if n == LANES:
        return x_bqx128
    if n < LANES:
        return x_bqx128[:, :n]
    return jnp.tile(x_bqx128, (1, n // LANES))


def _last_kv_block(off, i, nk):
    """The last key block holding a key at or before query block i's last position."""
    return jnp.minimum(nk - 1, lax.div(off + i * BLOCK + BLOCK - 1, BLOCK))


def _first_q_block(off, j):
    """The first query block with a position at or after key block j's first key."""
    return lax.div(jnp.maximum(j * BLOCK - off, 0), BLOCK)


def _scores(q, k, segq_ref, segk_ref, q_first, k_first, scale):
    s = dot(q, k, ((1,), (1,))) * scale
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_first + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = (k_pos <= q_pos) & (segq_ref[...] == segk_ref[0:1, :])
    return s, visible


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                scale, nk):
    i, j = pl.program_id(2), pl.program_id(3)
    off = off_ref[0]

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j <= _last_kv_block(off, i, nk))
    def _():
        s, visible = _scores(q_ref[...], k_ref[...], segq_ref, segk_ref, off + i * BLOCK, j * BLOCK, scale)
        s = jnp.where(visible, s, MASKED)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128], lane-replicated
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_scr[...] = l_scr[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        D = acc_scr.shape[1]
        acc_scr[...] = acc_scr[...] * _to_width(corr, D) + dot(p.astype(v_ref.dtype), v_ref[...], ((1,), (0,)))

    @pl.when(j == nk - 1)
    def _():
        l = l_scr[...]
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_scr[...] / _to_width(safe_l, acc_scr.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(safe_l), 0.0)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *,
               scale, nk):
    i, j = pl.program_id(2), pl.program_id(3)
    off = off_ref[0]

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(j <= _last_kv_block(off, i, nk))
    def _():
        k = k_ref[...]
        s, visible = _scores(q_ref[...], k, segq_ref, segk_ref, off + i * BLOCK, j * BLOCK, scale)
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dp = dot(do_ref[...], v_ref[...], ((1,), (1,)))
        ds = p * (dp - delta_ref[...])
        dq_scr[...] += dot(ds.astype(k.dtype), k, ((1,), (0,)))

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, scale, nq, steps):
    j, t = pl.program_id(2), pl.program_id(3)
    i = lax.rem(t, nq)
    off = off_ref[0]

    @pl.when(t == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(i >= _first_q_block(off, j))
    def _():
        q, do = q_ref[...], do_ref[...]
        s, visible = _scores(q, k_ref[...], segq_ref, segk_ref, off + i * BLOCK, j * BLOCK, scale)
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dv_scr[...] += dot(p.T.astype(do.dtype), do, ((1,), (0,)))
        dp = dot(do, v_ref[...], ((1,), (1,)))
        ds = p * (dp - delta_ref[...])
        dk_scr[...] += dot(ds.T.astype(q.dtype), q, ((1,), (0,)))

    @pl.when(t == steps - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


@functools.lru_cache(maxsize=None)
def _attention(scale, interpret):

    def layout(q, k, v, segq, segk):
        """[B, heads, Lp, D] operands, padded; segment ids in the kernels' replicated layouts."""
        Lq, Lk = q.shape[1], k.shape[1]
        Lqp, Lkp = -(-Lq // BLOCK) * BLOCK, -(-Lk // BLOCK) * BLOCK
        q4 = pad_to(q.transpose(0, 2, 1, 3), Lqp, 2)
        k4, v4 = (pad_to(x.transpose(0, 2, 1, 3), Lkp, 2) for x in (k, v))
        segq3 = jnp.broadcast_to(pad_to(segq, Lqp, 1, PAD_Q)[:, :, None], (q.shape[0], Lqp, LANES))
        segk3 = jnp.broadcast_to(pad_to(segk, Lkp, 1, PAD_KV)[:, None, :], (q.shape[0], SUBLANES, Lkp))
        return q4, k4, v4, segq3, segk3

    def q_specs(D, G, nk):
        """Specs of (q, k, v, segq, segk) on the grid (b, h, i, j) with the offset prefetched."""
        kv_block = lambda b, h, i, j, off: (b, lax.div(h, G), jnp.minimum(j, _last_kv_block(off[0], i, nk)), 0)
        return [pl.BlockSpec((None, None, BLOCK, D), lambda b, h, i, j, off: (b, h, i, 0)),
                pl.BlockSpec((None, None, BLOCK, D), kv_block),
                pl.BlockSpec((None, None, BLOCK, D), kv_block),
                pl.BlockSpec((None, BLOCK, LANES), lambda b, h, i, j, off: (b, i, 0)),
                pl.BlockSpec((None, SUBLANES, BLOCK),
                             lambda b, h, i, j, off: (b, 0, jnp.minimum(j, _last_kv_block(off[0], i, nk))))]

    def row_spec(D):
        return pl.BlockSpec((None, None, BLOCK, D), lambda b, h, i, j, off: (b, h, i, 0))

    def forward(q, k, v, segq, segk, off):
        B, Lq, H, D = q.shape
        G = H // k.shape[2]
        q4, k4, v4, segq3, segk3 = layout(q, k, v, segq, segk)
        nq, nk = q4.shape[2] // BLOCK, k4.shape[2] // BLOCK
        o4, lse = pl.pallas_call(
            functools.partial(_fwd_kernel, scale=scale, nk=nk),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(B, H, nq, nk), in_specs=q_specs(D, G, nk),
                out_specs=[row_spec(D), row_spec(LANES)],
                scratch_shapes=[pltpu.VMEM((BLOCK, LANES), jnp.float32), pltpu.VMEM((BLOCK, LANES), jnp.float32),
                                pltpu.VMEM((BLOCK, D), jnp.float32)]),
            out_shape=[jax.ShapeDtypeStruct(q4.shape, q.dtype),
                       jax.ShapeDtypeStruct((B, H, q4.shape[2], LANES), jnp.float32)],
            compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")), interpret=interpret,
        )(off.reshape(1), q4, k4, v4, segq3, segk3)
        return o4[:, :, :Lq].transpose(0, 2, 1, 3), lse[..., 0]  # one lane kept: the residual is [B, H, Lqp]

    def backward(q, k, v, segq, segk, off, o, lse, do):
        B, Lq, H, D = q.shape
        Lk, K = k.shape[1], k.shape[2]
        G = H // K
        q4, k4, v4, segq3, segk3 = layout(q, k, v, segq, segk)
        do4 = pad_to(do.transpose(0, 2, 1, 3), q4.shape[2], 2)
        nq, nk = q4.shape[2] // BLOCK, k4.shape[2] // BLOCK
        delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
        lse = jnp.broadcast_to(lse[..., None], (*lse.shape, LANES))
        delta = jnp.broadcast_to(pad_to(delta, q4.shape[2], 2)[..., None], lse.shape)
        off1 = off.reshape(1)
        dq4 = pl.pallas_call(
            functools.partial(_dq_kernel, scale=scale, nk=nk),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(B, H, nq, nk),
                in_specs=q_specs(D, G, nk) + [row_spec(D), row_spec(LANES), row_spec(LANES)],
                out_specs=row_spec(D), scratch_shapes=[pltpu.VMEM((BLOCK, D), jnp.float32)]),
            out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
            compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")), interpret=interpret,
        )(off1, q4, k4, v4, segq3, segk3, do4, lse, delta)

        # Grid (b, kv head, key block j, t = g * nq + i): query head kv * G + g, query block i (clamped up to
        # the first block that sees key block j, so skipped steps fetch nothing new).
        def q_block(b, kv, j, t, off):
            i = jnp.maximum(lax.rem(t, nq), _first_q_block(off[0], j))
            return b, kv * G + lax.div(t, nq), i, 0

        def q_seg_block(b, kv, j, t, off):
            return b, jnp.maximum(lax.rem(t, nq), _first_q_block(off[0], j)), 0

        kv_block = pl.BlockSpec((None, None, BLOCK, D), lambda b, kv, j, t, off: (b, kv, j, 0))
        steps = G * nq
        dk4, dv4 = pl.pallas_call(
            functools.partial(_dkv_kernel, scale=scale, nq=nq, steps=steps),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(B, K, nk, steps),
                in_specs=[pl.BlockSpec((None, None, BLOCK, D), q_block), kv_block, kv_block,
                          pl.BlockSpec((None, BLOCK, LANES), q_seg_block),
                          pl.BlockSpec((None, SUBLANES, BLOCK), lambda b, kv, j, t, off: (b, 0, j)),
                          pl.BlockSpec((None, None, BLOCK, D), q_block),
                          pl.BlockSpec((None, None, BLOCK, LANES), q_block),
                          pl.BlockSpec((None, None, BLOCK, LANES), q_block)],
                out_specs=[kv_block, kv_block],
                scratch_shapes=[pltpu.VMEM((BLOCK, D), jnp.float32), pltpu.VMEM((BLOCK, D), jnp.float32)]),
            out_shape=[jax.ShapeDtypeStruct(k4.shape, k.dtype)] * 2,
            compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")), interpret=interpret,
        )(off1, q4, k4, v4, segq3, segk3, do4, lse, delta)
        back = lambda x4, L: x4[:, :, :L].transpose(0, 2, 1, 3)  # noqa: E731
        return back(dq4, Lq), back(dk4, Lk), back(dv4, Lk)

    return with_vjp(forward, backward)


def flash_attention_tpu(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL=None, kv_segment_ids_BxS=None, *, scale,
                        q_offset=0, interpret=False):
    """Causal GQA attention of queries at global positions q_offset + i (q_offset may be traced) over keys at
    positions 0 .. S-1; output [B, L, H, D] in q's dtype, differentiable in q, k, v."""
    return call(_attention(float(scale), interpret), q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL,
                kv_segment_ids_BxS, q_offset)
