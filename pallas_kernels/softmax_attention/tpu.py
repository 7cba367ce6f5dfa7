"""Causal softmax attention with segments on TPU: jax's Pallas Mosaic splash attention, GQA-aware.

Each kv head and its G query heads run as one multi-query (MQA) splash kernel, vmapped over the batch and the
kv heads, so kv heads are never repeated. Splash needs the sequence to be a multiple of its blocks (128-row
tiles at least on TPU): it is padded with a segment id no real token has, so padding sees only padding. The
scale is applied to q (splash applies none). Segment mask: id equality, as ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

MAX_BLOCK = 512  # MaxText's default splash tiles for long sequences; fits v5p/v6e scoped VMEM at head dim 128


def _kernel(L: int, G: int, block: int, interpret: bool):
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Built per trace, not cached: it holds jnp arrays, which would be tracers of the trace that made them.
    mask = splash.MultiHeadMask([splash.CausalMask((L, L)) for _ in range(G)])
    return splash.make_splash_mqa(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def softmax_attention_tpu(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale, interpret=False):
    """[B, L, H, D] causal GQA attention, output in q's dtype; differentiable (splash's own custom VJP)."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxLxKxD.shape[2]
    G = H // K
    Lp = max(128, -(-L // 128) * 128)
    block = max(b for b in (128, 256, MAX_BLOCK) if Lp % b == 0)
    seg = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    q = (q_BxLxHxD * jnp.asarray(scale, q_BxLxHxD.dtype)).reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxD, v_BxLxKxD))  # [B, K, L, D]
    if Lp != L:
        q = jnp.pad(q, ((0, 0),) * 3 + ((0, Lp - L), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, Lp - L), (0, 0))) for x in (k, v))
        seg = jnp.pad(seg, ((0, 0), (0, Lp - L)), constant_values=jnp.iinfo(jnp.int32).min)
    kernel = _kernel(Lp, G, block, bool(interpret))

    def one_kv_head(q_GxLxD, k_LxD, v_LxD, seg_L):
        return kernel(q_GxLxD, k_LxD, v_LxD, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

    per_batch = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))
    o_BxKxGxLxD = jax.vmap(per_batch)(q, k, v, seg)
    return o_BxKxGxLxD[:, :, :, :L].transpose(0, 3, 1, 2, 4).reshape(B, L, H, D).astype(q_BxLxHxD.dtype)
