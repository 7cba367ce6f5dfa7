"""Causal GQA softmax attention, memory-efficient, in pure JAX: the CPU path, and the reference the Pallas
kernels (gpu.py, tpu.py) are checked against.

`blockwise_attention` is flash attention written with JAX loops: the forward pass runs, per query block,
a loop over only the key blocks at or before the diagonal with an online softmax, and saves the output and
the row log-sum-exp; the backward pass (a `custom_vjp`, FlashAttention-2 style) runs per key block a loop
over the query blocks that see it, recomputing each tile's probabilities from the saved log-sum-exp.
Nothing larger than one [block_q, block_kv] score tile per head is live, so memory is O(L). A sequence no
longer than block_q is one query block and takes a plain masked softmax instead (the same tiles, no loops).
tests/test_model.py checks the output against a float64 numpy loop and the gradients against autodiff of a
dense masked softmax.
"""

import functools
import math

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a fully masked row never produces inf - inf = NaN


def _visible(q_pos, kv_pos, q_seg, kv_seg):
    """[..., Lq, Lk] mask: causal by index, same segment (segment 0 is padding and sees nothing else)."""
    causal = kv_pos[..., None, :] <= q_pos[..., :, None]
    return causal & (kv_seg[..., None, :] == q_seg[..., :, None])


def _tile_scores(q_BxbxKxGxD, k_BxbxKxD, qi, kj, segq_Bxb, segk_Bxb, q_offset, bq, bk, mask_all):
    """Masked float32 scores [B, K, G, bq, bk] of query block qi (first position q_offset + qi * bq) against
    key block kj.

    Without segments or padding (mask_all False) only tiles that straddle the diagonal need the mask; the
    others skip it, which is most of the elementwise work at long lengths.
    """
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_BxbxKxGxD, k_BxbxKxD, preferred_element_type=jnp.float32)
    q_first = q_offset + qi * bq

    def masked(s):
        mask_Bxbqxbk = _visible(q_first + jnp.arange(bq), kj * bk + jnp.arange(bk), segq_Bxb, segk_Bxb)
        return jnp.where(mask_Bxbqxbk[:, None, None], s, MASKED)

    if mask_all:
        return masked(s)
    return jax.lax.cond(kj * bk + bk - 1 > q_first, masked, lambda s: s, s)


def _num_kv_blocks(qi, q_offset, bq, bk, nk):
    """Key blocks 0 .. n-1 hold every key at or before query block qi's last position."""
    return jnp.minimum(nk, (q_offset + qi * bq + bq - 1) // bk + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q_QxBxbxKxGxD, k_NxBxbxKxD, v_NxBxbxKxD, seg_q_QxBxb, seg_k_NxBxb, q_offset, bq, bk, mask_all,
           precision):
    return _flash_fwd(q_QxBxbxKxGxD, k_NxBxbxKxD, v_NxBxbxKxD, seg_q_QxBxb, seg_k_NxBxb, q_offset, bq, bk,
                      mask_all, precision)[0]


def _flash_fwd(q_QxBxbxKxGxD, k_NxBxbxKxD, v_NxBxbxKxD, seg_q_QxBxb, seg_k_NxBxb, q_offset, bq, bk, mask_all,
               precision):
    del precision  # the caller's context is still in force while the forward is traced
    nk = k_NxBxbxKxD.shape[0]
    B, _, K, G, D = q_QxBxbxKxGxD.shape[1:]

    def one_query_block(args):
        qi, q_BxbxKxGxD, segq_Bxb = args

        def kv_step(kj, carry):
            m_BxKxGxb, l_BxKxGxb, acc_BxKxGxbxD = carry
            s = _tile_scores(q_BxbxKxGxD, k_NxBxbxKxD[kj], qi, kj, segq_Bxb, seg_k_NxBxb[kj], q_offset, bq, bk,
                             mask_all)
            m_new = jnp.maximum(m_BxKxGxb, s.max(-1))
            correction = jnp.exp(m_BxKxGxb - m_new)
            p = jnp.exp(s - m_new[..., None])
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_NxBxbxKxD.dtype), v_NxBxbxKxD[kj],
                            preferred_element_type=jnp.float32)
            return m_new, l_BxKxGxb * correction + p.sum(-1), acc_BxKxGxbxD * correction[..., None] + pv

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _num_kv_blocks(qi, q_offset, bq, bk, nk), kv_step, init)
        out_BxbxKxGxD = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).astype(q_BxbxKxGxD.dtype)
        return out_BxbxKxGxD, m + jnp.log(l)

    nq = q_QxBxbxKxGxD.shape[0]
    out, lse_QxBxKxGxb = jax.lax.map(one_query_block, (jnp.arange(nq), q_QxBxbxKxGxD, seg_q_QxBxb))
    return out, (q_QxBxbxKxGxD, k_NxBxbxKxD, v_NxBxbxKxD, seg_q_QxBxb, seg_k_NxBxb, q_offset, out, lse_QxBxKxGxb)


def _flash_bwd(bq, bk, mask_all, precision, res, dout_QxBxbxKxGxD):
    # JAX traces this later, outside the caller's jax.default_matmul_precision block: re-enter it.
    with jax.default_matmul_precision(precision):
        return _flash_bwd_math(bq, bk, mask_all, res, dout_QxBxbxKxGxD)


def _flash_bwd_math(bq, bk, mask_all, res, dout_QxBxbxKxGxD):
    q, k, v, seg_q, seg_k, q_offset, out, lse_QxBxKxGxb = res
    nq, nk = q.shape[0], k.shape[0]
    # delta_i = sum_d dO_i * O_i: the softmax-Jacobian term of every row, computed once.
    delta_QxBxKxGxb = jnp.einsum("qbikgd,qbikgd->qbkgi", dout_QxBxbxKxGxD.astype(jnp.float32),
                                 out.astype(jnp.float32))

    def one_kv_block(dq_QxBxbxKxGxD, kj):
        k_BxbxKxD, v_BxbxKxD = k[kj], v[kj]

        def q_step(qi, carry):
            dq, dk_BxbxKxD, dv_BxbxKxD = carry
            do = dout_QxBxbxKxGxD[qi].astype(v.dtype)
            s = _tile_scores(q[qi], k_BxbxKxD, qi, kj, seg_q[qi], seg_k[kj], q_offset, bq, bk, mask_all)
            p = jnp.exp(s - lse_QxBxKxGxb[qi][..., None])
            dv_BxbxKxD = dv_BxbxKxD + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), do,
                                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do, v_BxbxKxD, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_QxBxKxGxb[qi][..., None])).astype(q.dtype)
            dq = dq.at[qi].add(jnp.einsum("bkgqs,bskd->bqkgd", ds, k_BxbxKxD, preferred_element_type=jnp.float32))
            dk_BxbxKxD = dk_BxbxKxD + jnp.einsum("bkgqs,bqkgd->bskd", ds, q[qi], preferred_element_type=jnp.float32)
            return dq, dk_BxbxKxD, dv_BxbxKxD

        zeros = jnp.zeros(k_BxbxKxD.shape, jnp.float32)
        # The first query block whose last position reaches this key block.
        first_q = jnp.maximum(0, (kj * bk - q_offset) // bq)
        dq, dk, dv = jax.lax.fori_loop(first_q, nq, q_step, (dq_QxBxbxKxGxD, zeros, zeros))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(one_kv_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    return dq.astype(q.dtype), dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _one_query_block_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, scale):
    """All L queries are one block (L <= block_q): the blockwise loops would visit every key block anyway, so
    one masked [L, L] softmax with autodiff's backward does the same work without the loop machinery (2-3x
    faster fwd+bwd on XLA:CPU at L = 256, measured), and never pads L to a multiple of the tiles."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxLxKxD.shape[2]
    q_BxLxKxGxD = q_BxLxHxD.reshape(B, L, K, H // K, D) * jnp.asarray(scale, q_BxLxHxD.dtype)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_BxLxKxGxD, k_BxLxKxD, preferred_element_type=jnp.float32)
    seg = jnp.ones((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    pos = jnp.arange(L)
    s = jnp.where(_visible(pos, pos, seg, seg)[:, None, None], s, MASKED)
    p = jax.nn.softmax(s, axis=-1)  # every row sees at least itself
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v_BxLxKxD.dtype), v_BxLxKxD, preferred_element_type=jnp.float32)
    return o.reshape(B, L, H, D).astype(q_BxLxHxD.dtype)


def blockwise_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL=None, *, scale,
                        block_q=512, block_kv=512, q_offset=None, kv_segment_ids_BxS=None):
    """Causal GQA attention with online softmax over key blocks; output [B, L, H, D] in q's dtype.

    Keys may outnumber queries (context parallelism: this device's L queries against all S keys): query i sits
    at position q_offset + i (a traced int32 scalar; default 0) and key j at position j; kv_segment_ids_BxS are
    the keys' segment ids (default: segment_ids_BxL, which then needs S == L).
    """
    B, L, H, D = q_BxLxHxD.shape
    S, K = k_BxSxKxD.shape[1:3]
    G = H // K
    if kv_segment_ids_BxS is None and S != L:
        raise ValueError(f"{S} keys for {L} queries need kv_segment_ids_BxS (and usually q_offset)")
    if q_offset is None and S == L and L <= block_q:
        return _one_query_block_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, scale)
    bq, bk = min(block_q, L), min(block_kv, S)
    if S == L:  # one padded length for both (the historical tiling)
        Lp = Sp = -(-L // math.lcm(bq, bk)) * math.lcm(bq, bk)
    else:
        Lp, Sp = -(-L // bq) * bq, -(-S // bk) * bk
    has_segments = segment_ids_BxL is not None or kv_segment_ids_BxS is not None
    seg_q = jnp.ones((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    seg_k = seg_q if kv_segment_ids_BxS is None else kv_segment_ids_BxS.astype(jnp.int32)
    # Padded keys/queries get segment -1, so no real query sees a padded key.
    pad_len = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    if Lp != L:
        q_BxLxHxD = pad_len(q_BxLxHxD, Lp)
        seg_q = jnp.pad(seg_q, ((0, 0), (0, Lp - L)), constant_values=-1)
    if Sp != S:
        k_BxSxKxD, v_BxSxKxD = pad_len(k_BxSxKxD, Sp), pad_len(v_BxSxKxD, Sp)
        seg_k = jnp.pad(seg_k, ((0, 0), (0, Sp - S)), constant_values=-1)
    nq, nk = Lp // bq, Sp // bk
    q_QxBxbxKxGxD = q_BxLxHxD.reshape(B, nq, bq, K, G, D).transpose(1, 0, 2, 3, 4, 5)
    q_QxBxbxKxGxD = q_QxBxbxKxGxD * jnp.asarray(scale, q_QxBxbxKxGxD.dtype)  # scale q once, not every tile
    k_NxBxbxKxD = k_BxSxKxD.reshape(B, nk, bk, K, D).transpose(1, 0, 2, 3, 4)
    v_NxBxbxKxD = v_BxSxKxD.reshape(B, nk, bk, K, D).transpose(1, 0, 2, 3, 4)
    seg_q_QxBxb = seg_q.reshape(B, nq, bq).transpose(1, 0, 2)
    seg_k_NxBxb = seg_k.reshape(B, nk, bk).transpose(1, 0, 2)
    mask_all = has_segments or Lp != L or Sp != S  # else only diagonal tiles need the causal mask
    offset = jnp.zeros((), jnp.int32) if q_offset is None else jnp.asarray(q_offset, jnp.int32)
    out_QxBxbxKxGxD = _flash(q_QxBxbxKxGxD, k_NxBxbxKxD, v_NxBxbxKxD, seg_q_QxBxb, seg_k_NxBxb, offset, bq, bk,
                             mask_all, jax.config.jax_default_matmul_precision)
    out = out_QxBxbxKxGxD.transpose(1, 0, 2, 3, 4, 5).reshape(B, Lp, H, D)
    return out[:, :L]
