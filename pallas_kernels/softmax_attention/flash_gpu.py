"""Our own causal flash attention as Pallas Triton kernels: GQA-aware, a traced query offset, keys longer than
the queries, separate query and key segment ids. It is the local compute of context parallelism
(m1_jax/layers/context_parallel.py: this device's queries at global positions q_offset + i against every
device's gathered keys), which jax's `mha` cannot do: its causal mask has no offset and its one segment array
serves queries and keys of the same length.

Mask: key j is visible to query i iff j <= q_offset + i and their segment ids are equal.
Forward, grid (B * H, query blocks): an online softmax over only the key blocks at or before the block's last
position (a traced loop bound), saving the output and the row log-sum-exp. Backward (FlashAttention-2):
delta = rowsum(dO * O) in JAX, then a dq kernel (the forward's grid and loop) and a dk/dv kernel, grid (B * K,
key blocks), that loops over the G query heads of its kv head and the query blocks that see the key block.
A kv head is read in place for its G query heads (no repeated kv). Scores, softmax and accumulators are
float32; matmul operands stay in the input dtype (float32 inputs at Precision.HIGHEST: IEEE, not TF32).
Lengths are padded to the block with segment ids no real token has (padded queries see nothing and output 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.softmax_attention.flash_common import MASKED, PAD_KV, PAD_Q, call, dot, pad_to, with_vjp

MAX_BLOCK = 64


def _block(L):
    b = 16
    while b * 2 <= min(L, MAX_BLOCK):
        b *= 2
    return b


def _probs(q, k, segq_bq, segk_bk, q_first, k_first, lse_or_none, scale):
    """Masked float32 scores [bq, bk] (lse None) or probabilities exp(s - lse) (lse [bq])."""
    bq, bk = q.shape[0], k.shape[0]
    s = dot(q, k, ((1,), (1,))) * scale
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = (k_pos <= q_pos) & (segk_bk[None, :] == segq_bq[:, None])
    if lse_or_none is None:
        return jnp.where(visible, s, MASKED), visible
    return jnp.where(visible, jnp.exp(s - lse_or_none[:, None]), 0.0), visible


def _kv_blocks(q_first, bq, bk, nk):
    """Key blocks 0 .. n-1 hold every key at or before the query block's last position."""
    return jnp.minimum(nk, lax.div(q_first + bq - 1, bk) + 1)


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, *, scale, bq, bk, nk):
    q_first = off_ref[0] + pl.program_id(1) * bq
    q, segq = q_ref[...], segq_ref[...]
    D = q.shape[1]

    def body(j, carry):
        m, l, acc = carry
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s, visible = _probs(q, k_ref[rows, :], segq, segk_ref[rows], q_first, j * bk, None, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[:, None] + dot(p.astype(v_ref.dtype), v_ref[rows, :], ((1,), (0,)))
        return m_new, l * corr + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, D), jnp.float32))
    m, l, acc = lax.fori_loop(0, _kv_blocks(q_first, bq, bk, nk), body, init)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, bq,
               bk, nk):
    q_first = off_ref[0] + pl.program_id(1) * bq
    q, segq, do, lse, delta = q_ref[...], segq_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[rows, :]
        p, _ = _probs(q, k, segq, segk_ref[rows], q_first, j * bk, lse, scale)
        dp = dot(do, v_ref[rows, :], ((1,), (1,)))
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, ((1,), (0,)))

    dq = lax.fori_loop(0, _kv_blocks(q_first, bq, bk, nk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, bq, bk, nq, G, D):
    kj = pl.program_id(1)
    k_first = kj * bk
    k, v, segk = k_ref[...], v_ref[...], segk_ref[...]
    # The first query block with a position at or after this key block's first key.
    first_q = jnp.maximum(0, lax.div(jnp.maximum(k_first - off_ref[0], 0), bq))

    def per_head(g, carry):
        cols = pl.ds(pl.multiple_of(g * D, D), D)

        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[rows, cols], do_ref[rows, cols]
            p, _ = _probs(q, k, segq_ref[rows], segk, off_ref[0] + i * bq, k_first, lse_ref[g, rows], scale)
            dv = dv + dot(p.astype(do.dtype), do, ((0,), (0,)))
            dp = dot(do, v, ((1,), (1,)))
            ds = p * (dp - delta_ref[g, rows][:, None])
            return dk + dot(ds.astype(q.dtype), q, ((0,), (0,))), dv

        return lax.fori_loop(first_q, nq, body, carry)

    zeros = jnp.zeros((bk, D), jnp.float32)
    dk, dv = lax.fori_loop(0, G, per_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _attention(scale, interpret):

    def shapes(q, k):
        B, Lq, H, D = q.shape
        Lk, K = k.shape[1], k.shape[2]
        bq, bk = _block(Lq), _block(Lk)
        return B, Lq, H, D, Lk, K, H // K, bq, bk, -(-Lq // bq) * bq, -(-Lk // bk) * bk

    def forward(q, k, v, segq, segk, off):
        B, Lq, H, D, Lk, K, G, bq, bk, Lqp, Lkp = shapes(q, k)
        q3 = pad_to(q, Lqp, 1).reshape(B, Lqp, H * D)
        k3, v3 = (pad_to(x, Lkp, 1).reshape(B, Lkp, K * D) for x in (k, v))
        segq_p, segk_p = pad_to(segq, Lqp, 1, PAD_Q), pad_to(segk, Lkp, 1, PAD_KV)
        row = lambda bh: (lax.div(bh, H), lax.rem(bh, H))  # noqa: E731
        o3, lse = pl.pallas_call(
            functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk, nk=Lkp // bk),
            grid=(B * H, Lqp // bq),
            in_specs=[pl.BlockSpec((1,), lambda bh, i: (0,)),
                      pl.BlockSpec((None, bq, D), lambda bh, i: (row(bh)[0], i, row(bh)[1])),
                      pl.BlockSpec((None, Lkp, D), lambda bh, i: (row(bh)[0], 0, lax.div(row(bh)[1], G))),
                      pl.BlockSpec((None, Lkp, D), lambda bh, i: (row(bh)[0], 0, lax.div(row(bh)[1], G))),
                      pl.BlockSpec((None, bq), lambda bh, i: (row(bh)[0], i)),
                      pl.BlockSpec((None, Lkp), lambda bh, i: (row(bh)[0], 0))],
            out_specs=[pl.BlockSpec((None, bq, D), lambda bh, i: (row(bh)[0], i, row(bh)[1])),
                       pl.BlockSpec((None, None, bq), lambda bh, i: (*row(bh), i))],
            out_shape=[jax.ShapeDtypeStruct((B, Lqp, H * D), q.dtype),
                       jax.ShapeDtypeStruct((B, H, Lqp), jnp.float32)],
            compiler_params=_params(), interpret=interpret,
        )(off.reshape(1), q3, k3, v3, segq_p, segk_p)
        return o3.reshape(B, Lqp, H, D)[:, :Lq], lse

    def backward(q, k, v, segq, segk, off, o, lse, do):
        B, Lq, H, D, Lk, K, G, bq, bk, Lqp, Lkp = shapes(q, k)
        q3, do3 = (pad_to(x, Lqp, 1).reshape(B, Lqp, H * D) for x in (q, do))
        k3, v3 = (pad_to(x, Lkp, 1).reshape(B, Lkp, K * D) for x in (k, v))
        segq_p, segk_p = pad_to(segq, Lqp, 1, PAD_Q), pad_to(segk, Lkp, 1, PAD_KV)
        delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
        delta = pad_to(delta, Lqp, 2)
        off1 = off.reshape(1)
        row = lambda bh: (lax.div(bh, H), lax.rem(bh, H))  # noqa: E731
        kv_of = lambda bh: lax.div(row(bh)[1], G)  # noqa: E731
        dq3 = pl.pallas_call(
            functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, nk=Lkp // bk),
            grid=(B * H, Lqp // bq),
            in_specs=[pl.BlockSpec((1,), lambda bh, i: (0,)),
                      pl.BlockSpec((None, bq, D), lambda bh, i: (row(bh)[0], i, row(bh)[1])),
                      pl.BlockSpec((None, Lkp, D), lambda bh, i: (row(bh)[0], 0, kv_of(bh))),
                      pl.BlockSpec((None, Lkp, D), lambda bh, i: (row(bh)[0], 0, kv_of(bh))),
                      pl.BlockSpec((None, bq), lambda bh, i: (row(bh)[0], i)),
                      pl.BlockSpec((None, Lkp), lambda bh, i: (row(bh)[0], 0)),
                      pl.BlockSpec((None, bq, D), lambda bh, i: (row(bh)[0], i, row(bh)[1])),
                      pl.BlockSpec((None, None, bq), lambda bh, i: (*row(bh), i)),
                      pl.BlockSpec((None, None, bq), lambda bh, i: (*row(bh), i))],
            out_specs=pl.BlockSpec((None, bq, D), lambda bh, i: (row(bh)[0], i, row(bh)[1])),
            out_shape=jax.ShapeDtypeStruct((B, Lqp, H * D), q.dtype),
            compiler_params=_params(), interpret=interpret,
        )(off1, q3, k3, v3, segq_p, segk_p, do3, lse, delta)
        krow = lambda bk_: (lax.div(bk_, K), lax.rem(bk_, K))  # noqa: E731
        dk3, dv3 = pl.pallas_call(
            functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, nq=Lqp // bq, G=G, D=D),
            grid=(B * K, Lkp // bk),
            in_specs=[pl.BlockSpec((1,), lambda b_k, j: (0,)),
                      pl.BlockSpec((None, Lqp, G * D), lambda b_k, j: (krow(b_k)[0], 0, krow(b_k)[1])),
                      pl.BlockSpec((None, bk, D), lambda b_k, j: (krow(b_k)[0], j, krow(b_k)[1])),
                      pl.BlockSpec((None, bk, D), lambda b_k, j: (krow(b_k)[0], j, krow(b_k)[1])),
                      pl.BlockSpec((None, Lqp), lambda b_k, j: (krow(b_k)[0], 0)),
                      pl.BlockSpec((None, bk), lambda b_k, j: (krow(b_k)[0], j)),
                      pl.BlockSpec((None, Lqp, G * D), lambda b_k, j: (krow(b_k)[0], 0, krow(b_k)[1])),
                      pl.BlockSpec((None, G, Lqp), lambda b_k, j: (krow(b_k)[0], krow(b_k)[1], 0)),
                      pl.BlockSpec((None, G, Lqp), lambda b_k, j: (krow(b_k)[0], krow(b_k)[1], 0))],
            out_specs=[pl.BlockSpec((None, bk, D), lambda b_k, j: (krow(b_k)[0], j, krow(b_k)[1]))] * 2,
            out_shape=[jax.ShapeDtypeStruct((B, Lkp, K * D), k.dtype)] * 2,
            compiler_params=_params(), interpret=interpret,
        )(off1, q3, k3, v3, segq_p, segk_p, do3, lse, delta)
        unpad = lambda x3, L, n: x3.reshape(B, -1, n, D)[:, :L]  # noqa: E731
        return unpad(dq3, Lq, H), unpad(dk3, Lk, K), unpad(dv3, Lk, K)

    return with_vjp(forward, backward)


def flash_attention_gpu(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL=None, kv_segment_ids_BxS=None, *, scale,
                        q_offset=0, interpret=False):
    """Causal GQA attention of queries at global positions q_offset + i (q_offset may be traced) over keys at
    positions 0 .. S-1; output [B, L, H, D] in q's dtype, differentiable in q, k, v."""
    return call(_attention(float(scale), interpret), q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL,
                kv_segment_ids_BxS, q_offset)
