"""Causal softmax attention with segments on GPU: jax's Pallas Triton flash attention (`pallas.ops.gpu.attention
.mha`, forward and backward kernels), adapted to GQA, any length, and our layout.

mha has no GQA (fewer kv heads than query heads would be silently wrong), so each kv head is repeated for its
G query heads: G x the kv bytes, not the FLOPs. It needs the sequence to be a multiple of its blocks: the
sequence is padded with a segment id no real token has, so padding sees only padding. Its segment mask is
id equality, as ours (segment 0, padding, sees only itself).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention

# Forward 128 x 128 tiles, backward 32 x 32 (the kernel's own defaults, for head dims up to 128).
BLOCK_SIZES = triton_attention.BlockSizes.get_default()


def _pow2_at_most(x: int, cap: int) -> int:
    p = 16
    while p * 2 <= min(x, cap):
        p *= 2
    return p


def softmax_attention_gpu(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale, interpret=False):
    """[B, L, H, D] causal GQA attention, output in q's dtype; differentiable (the kernel's own custom VJP)."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxLxKxD.shape[2]
    block = _pow2_at_most(L, BLOCK_SIZES.block_q)
    blocks = triton_attention.BlockSizes(block_q=block, block_k=block,
                                         **{f: min(block, getattr(BLOCK_SIZES, f)) for f in
                                            ("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")})
    Lp = -(-L // block) * block
    seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    k, v = (jnp.repeat(x, H // K, axis=2) if K != H else x for x in (k_BxLxKxD, v_BxLxKxD))
    q = q_BxLxHxD
    if Lp != L:
        pad = ((0, 0), (0, Lp - L), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, Lp - L)), constant_values=jnp.iinfo(jnp.int32).min)
    o = triton_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=blocks, interpret=interpret)
    return o[:, :L]
