"""Quadratic reference for lightning attention: the definition, written out. O(N^2); for tests only.

o_t = sum_{s <= t, seg(s) == seg(t)} exp(-lambda (t - s)) (q_t . k_s) v_s
      + [seg(t) == seg(0)] exp(-lambda (t + 1)) q_t S_init
S_final = sum_{s in last segment} exp(-lambda (N - 1 - s)) k_s^T v_s
      + [seg(N-1) == seg(0)] exp(-lambda N) S_init
"""

from __future__ import annotations

import jax.numpy as jnp


def lightning_attention_reference(q_BxNxHxK, k_BxNxHxK, v_BxNxHxV, decay_H, initial_state_BxHxKxV=None,
                                  segment_ids_BxN=None):
    """Returns (o_BxNxHxV in v's dtype, final_state_BxHxKxV float32). All math in float32."""
    f32 = jnp.float32
    q, k, v = (x.astype(f32) for x in (q_BxNxHxK, k_BxNxHxK, v_BxNxHxV))
    B, N, H, K = q.shape
    V = v.shape[-1]
    lam_H = jnp.asarray(decay_H, f32)
    pos_N = jnp.arange(N)
    if segment_ids_BxN is None:
        segment_ids_BxN = jnp.zeros((B, N), jnp.int32)
    seg = segment_ids_BxN
    same_BxNxN = seg[:, :, None] == seg[:, None, :]
    causal_NxN = pos_N[:, None] >= pos_N[None, :]
    mask_Bx1xNxN = (same_BxNxN & causal_NxN)[:, None]
    dist_NxN = (pos_N[:, None] - pos_N[None, :]).astype(f32)
    # Mask the exponent before exp: exp of a large positive number would be inf and inf*0 = NaN (also in grads).
    expo_BxHxNxN = jnp.where(mask_Bx1xNxN, -lam_H[None, :, None, None] * dist_NxN, -jnp.inf)
    decay_BxHxNxN = jnp.exp(expo_BxHxNxN)
    scores_BxHxNxN = jnp.einsum("bthk,bshk->bhts", q, k) * decay_BxHxNxN
    o = jnp.einsum("bhts,bshv->bthv", scores_BxHxNxN, v)

    # Final state: the last segment's tokens.
    in_last_BxN = seg == seg[:, -1:]
    expo_last_BxHxN = jnp.where(in_last_BxN[:, None, :], -lam_H[None, :, None] * (N - 1 - pos_N).astype(f32), -jnp.inf)
    w_BxHxN = jnp.exp(expo_last_BxHxN)
    state = jnp.einsum("bhs,bshk,bshv->bhkv", w_BxHxN, k, v)

    if initial_state_BxHxKxV is not None:
        s0 = initial_state_BxHxKxV.astype(f32)
        in_first_BxN = seg == seg[:, :1]
        expo_init_BxHxN = jnp.where(in_first_BxN[:, None, :], -lam_H[None, :, None] * (pos_N + 1).astype(f32), -jnp.inf)
        o = o + jnp.einsum("bht,bthk,bhkv->bthv", jnp.exp(expo_init_BxHxN), q, s0)
        carry_B = (seg[:, -1] == seg[:, 0]).astype(f32)
        state = state + carry_B[:, None, None, None] * jnp.exp(-lam_H * N)[None, :, None, None] * s0
    return o.astype(v_BxNxHxV.dtype), state

