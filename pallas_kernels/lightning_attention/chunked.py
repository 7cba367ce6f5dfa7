"""Blockwise lightning attention in pure JAX (the portable, differentiable path), plus the decode step.

Per block of C tokens with local positions i, j in [0, C) and m <= C valid tokens:
  O   = ((Q K^T) * D) V + (Q * exp(-lambda (i + 1))) S_prev,      D_ij = exp(-lambda (i - j)) for j <= i
  S   = exp(-lambda m) S_prev + (K * exp(-lambda (m - 1 - j)))^T V
The state is carried by `lax.scan` over blocks; each block is `jax.checkpoint`ed so the backward keeps only the
block inputs and the carried state (N / C states of [B, H, K, V] float32). A single block (N <= C) is not
checkpointed: its intermediates are the whole working set anyway.

Segments (sequence packing): the carry also holds the segment id of the previous block's last token. Query i
sees S_prev only if it is in that segment; the new state keeps S_prev only if the block's last token is still in
it, and keeps only the block tokens of the block's last segment.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _block_step(carry, xs, *, lam_H):
    """One block. carry = (state_BxHxKxV f32, prev_seg_B); xs = block slices and the valid length m."""
    state, prev_seg_B = carry
    q, k, v, seg_BxC, m = xs  # q/k: [B, C, H, K], v: [B, C, H, V], seg: [B, C] int32, m: scalar int32
    f32 = jnp.float32
    C = q.shape[1]
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    i_C = jnp.arange(C, dtype=jnp.int32)
    lam = lam_H[None, :, None, None]  # [1, H, 1, 1]

    # Intra-block: masked exponents (no exp of positive numbers, no inf * 0 in the gradient).
    same_BxCxC = seg_BxC[:, :, None] == seg_BxC[:, None, :]
    causal_CxC = i_C[:, None] >= i_C[None, :]
    mask_Bx1xCxC = (same_BxCxC & causal_CxC)[:, None]
    dist_CxC = (i_C[:, None] - i_C[None, :]).astype(f32)
    d_BxHxCxC = jnp.exp(jnp.where(mask_Bx1xCxC, -lam * dist_CxC, -jnp.inf))
    scores_BxHxCxC = jnp.einsum("bihk,bjhk->bhij", q, k) * d_BxHxCxC
    o = jnp.einsum("bhij,bjhv->bihv", scores_BxHxCxC, v)

    # Inter-block: the carried state, seen only by queries of the carried segment.
    sees_prev_BxC = seg_BxC == prev_seg_B[:, None]
    q_decay_BxHxC = jnp.exp(jnp.where(sees_prev_BxC[:, None, :], -lam[..., 0] * (i_C + 1).astype(f32), -jnp.inf))
    o = o + jnp.einsum("bhi,bihk,bhkv->bihv", q_decay_BxHxC, q, state)

    # State update, relative to the last valid token m - 1 (padding sits after it, with zero k and v). The i < m
    # mask is needed: for padded i the exponent -lambda (m - 1 - i) is positive and could overflow.
    last_seg_B = seg_BxC[:, -1]  # padded ids repeat the last real one
    keep_BxC = (seg_BxC == last_seg_B[:, None]) & (i_C < m)[None, :]
    k_decay_BxHxC = jnp.exp(jnp.where(keep_BxC[:, None, :], -lam[..., 0] * (m - 1 - i_C).astype(f32), -jnp.inf))
    keep_prev_B = (prev_seg_B == last_seg_B).astype(f32)
    prev_scale_BxH = keep_prev_B[:, None] * jnp.exp(-lam_H * m.astype(f32))[None, :]
    new_state = (prev_scale_BxH[:, :, None, None] * state
                 + jnp.einsum("bhj,bjhk,bjhv->bhkv", k_decay_BxHxC, k, v))
    return (new_state, last_seg_B), o


def lightning_attention_chunked(q_BxNxHxK, k_BxNxHxK, v_BxNxHxV, decay_H, initial_state_BxHxKxV=None,
                                segment_ids_BxN=None, *, block_size=256):
    """Returns (o_BxNxHxV in v's dtype, final_state_BxHxKxV float32). Inputs are assumed validated (api.py)."""
    B, N, H, K = q_BxNxHxK.shape
    V = v_BxNxHxV.shape[-1]
    C = min(block_size, N)  # one short block when the whole sequence is shorter than a block
    nb = -(-N // C)
    pad = nb * C - N
    lam_H = jnp.asarray(decay_H, jnp.float32)
    if segment_ids_BxN is None:
        seg_BxN = jnp.zeros((B, N), jnp.int32)
    else:
        seg_BxN = jnp.asarray(segment_ids_BxN, jnp.int32)
    if initial_state_BxHxKxV is None:
        state0 = jnp.zeros((B, H, K, V), jnp.float32)
    else:
        state0 = initial_state_BxHxKxV.astype(jnp.float32)

    def pad_n(x, value=0):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, constant_values=value) if pad else x

    # Padded k and v are zero, so padded tokens add nothing to the state; padded segment ids repeat the last one.
    q = pad_n(q_BxNxHxK)
    k = pad_n(k_BxNxHxK)
    v = pad_n(v_BxNxHxV)
    seg = jnp.concatenate([seg_BxN, jnp.broadcast_to(seg_BxN[:, -1:], (B, pad))], axis=1) if pad else seg_BxN

    def blocks(x):  # [B, nb*C, ...] -> [nb, B, C, ...]
        return jnp.moveaxis(x.reshape((B, nb, C) + x.shape[2:]), 1, 0)

    m_nb = jnp.full((nb,), C, jnp.int32).at[-1].set(C - pad)
    step = functools.partial(_block_step, lam_H=lam_H)
    if nb > 1:  # with one block there is nothing to save by recomputing it in the backward
        step = jax.checkpoint(step)
    (final_state, _), o_nbxBxCxHxV = lax.scan(step, (state0, seg[:, 0]), (blocks(q), blocks(k), blocks(v), blocks(seg), m_nb))
    o = jnp.moveaxis(o_nbxBxCxHxV, 0, 1).reshape(B, nb * C, H, V)[:, :N]
    return o.astype(v_BxNxHxV.dtype), final_state


def lightning_attention_step(q_BxHxK, k_BxHxK, v_BxHxV, decay_H, state_BxHxKxV):
    """One-token recurrent decode step: S' = exp(-lambda) S + k^T v, o = q S' (the current token included).

    Returns (o_BxHxV in v's dtype, new_state_BxHxKxV float32).
    """
    f32 = jnp.float32
    lam_H = jnp.asarray(decay_H, f32)
    new_state = (jnp.exp(-lam_H)[None, :, None, None] * state_BxHxKxV.astype(f32)
                 + jnp.einsum("bhk,bhv->bhkv", k_BxHxK.astype(f32), v_BxHxV.astype(f32)))
    o = jnp.einsum("bhk,bhkv->bhv", q_BxHxK.astype(f32), new_state)
    return o.astype(v_BxHxV.dtype), new_state
