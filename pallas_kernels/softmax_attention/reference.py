"""The definition of causal GQA softmax attention with segments, written out over the full [L, L] scores in
float32 (for tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_attention_reference(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale):
    """Query t attends to keys s <= t of its own segment; output in q's dtype."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxLxKxD.shape[2]
    f32 = jnp.float32
    q = q_BxLxHxD.astype(f32).reshape(B, L, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BxLxKxD.astype(f32)) * scale
    seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL
    pos = jnp.arange(L)
    visible = (pos[None, :] <= pos[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v_BxLxKxD.astype(f32))
    return o.reshape(B, L, H, D).astype(q_BxLxHxD.dtype)
