"""Causal GQA softmax attention, memory-efficient, in pure JAX.

`blockwise_attention` is a flash-style online softmax: an outer map over query blocks (rematerialised in
the backward pass) and an inner scan over key blocks that skips blocks above the diagonal. Nothing larger
than one [block_q, block_kv] score tile per head is live, so memory is O(L) in sequence length.
tests/test_model.py checks it against a float64 numpy per-head loop.
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax.config import ModelConfig
from m1_jax.layers.partitioning import param
from m1_jax.layers.rope import apply_rope

_MASKED = -1e30  # finite, so a fully masked tile never produces inf - inf = NaN


def _visible(q_pos, kv_pos, q_seg, kv_seg):
    """[..., Lq, Lk] mask: causal by index, same segment (segment 0 is padding and sees nothing else)."""
    causal = kv_pos[..., None, :] <= q_pos[..., :, None]
    return causal & (kv_seg[..., None, :] == q_seg[..., :, None])


def blockwise_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale,
                        block_q=512, block_kv=512):
    """Causal GQA attention with online softmax over key blocks; output [B, L, H, D] in q's dtype."""
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxLxKxD.shape[2]
    G = H // K
    bq, bk = min(block_q, L), min(block_kv, L)
    step = math.lcm(bq, bk)
    Lp = -(-L // step) * step
    seg = jnp.ones((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    if Lp != L:  # pad keys/queries; padded keys get segment -1 so nothing sees them
        pad = Lp - L
        q_BxLxHxD = jnp.pad(q_BxLxHxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_BxLxKxD = jnp.pad(k_BxLxKxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_BxLxKxD = jnp.pad(v_BxLxKxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    nq, nk = Lp // bq, Lp // bk
    q_QxBxbxKxGxD = q_BxLxHxD.reshape(B, nq, bq, K, G, D).transpose(1, 0, 2, 3, 4, 5)
    k_NxBxbxKxD = k_BxLxKxD.reshape(B, nk, bk, K, D).transpose(1, 0, 2, 3, 4)
    v_NxBxbxKxD = v_BxLxKxD.reshape(B, nk, bk, K, D).transpose(1, 0, 2, 3, 4)
    seg_q = seg.reshape(B, nq, bq).transpose(1, 0, 2)
    seg_k = seg.reshape(B, nk, bk).transpose(1, 0, 2)

    has_segments = segment_ids_BxL is not None or Lp != L
    q_QxBxbxKxGxD = q_QxBxbxKxGxD * jnp.asarray(scale, q_QxBxbxKxGxD.dtype)  # scale q once, not every tile

    @jax.checkpoint
    def one_query_block(args):
        qi, q_Bxbx_KxGxD, segq_Bxb = args
        q_pos = qi * bq + jnp.arange(bq)

        def kv_step(carry, kv_args):
            kj, k_BxbxKxD, v_BxbxKxD, segk_Bxb = kv_args

            def attend(carry, masked: bool):
                m_BxKxGxb, l_BxKxGxb, acc_BxKxGxbxD = carry
                s = jnp.einsum("bqkgd,bskd->bkgqs", q_Bxbx_KxGxD, k_BxbxKxD, preferred_element_type=jnp.float32)
                if masked:
                    kv_pos = kj * bk + jnp.arange(bk)
                    mask_Bxbqxbk = _visible(q_pos, kv_pos, segq_Bxb, segk_Bxb)
                    s = jnp.where(mask_Bxbqxbk[:, None, None], s, _MASKED)
                m_new = jnp.maximum(m_BxKxGxb, s.max(-1))
                correction = jnp.exp(m_BxKxGxb - m_new)
                p = jnp.exp(s - m_new[..., None])
                l_new = l_BxKxGxb * correction + p.sum(-1)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_BxbxKxD.dtype), v_BxbxKxD,
                                preferred_element_type=jnp.float32)
                return m_new, l_new, acc_BxKxGxbxD * correction[..., None] + pv

            # 0: the key block is entirely in this query block's future (skip); 1: entirely in its past
            # (no causal mask needed unless segments or padding); 2: it straddles the diagonal (mask).
            future = kj * bk > qi * bq + bq - 1
            straddles = kj * bk + bk - 1 > qi * bq
            branch = jnp.where(future, 0, jnp.where(straddles | has_segments, 2, 1))
            branches = (lambda c: c, lambda c: attend(c, False), lambda c: attend(c, True))
            return jax.lax.switch(branch, branches, carry), None

        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, D), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(kv_step, init, (jnp.arange(nk), k_NxBxbxKxD, v_NxBxbxKxD, seg_k))
        out_BxKxGxbxD = acc / l[..., None]
        return out_BxKxGxbxD.transpose(0, 3, 1, 2, 4).astype(q_BxLxHxD.dtype)

    out_QxBxbxKxGxD = jax.lax.map(one_query_block, (jnp.arange(nq), q_QxBxbxKxGxD, seg_q))
    out = out_QxBxbxKxGxD.transpose(1, 0, 2, 3, 4, 5).reshape(B, Lp, H, D)
    return out[:, :L]


def decode_attention(q_BxTxHxD, k_cache_BxSxKxD, v_cache_BxSxKxD, q_pos_BxT, kv_valid_BxS, *, scale):
    """Attention of T new queries over a KV cache whose slot s holds absolute position s - pad_b.

    `kv_valid_BxS` marks filled, non-padding slots; query t sees valid slots at index <= q_slot_t, where
    q_slot is given by `q_pos_BxT` expressed in cache slots. O(T * S) work, float32 softmax.
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_cache_BxSxKxD.shape[2]
    q = q_BxTxHxD.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_cache_BxSxKxD, preferred_element_type=jnp.float32) * scale
    slots = jnp.arange(k_cache_BxSxKxD.shape[1])
    mask_BxTxS = (slots[None, None, :] <= q_pos_BxT[:, :, None]) & kv_valid_BxS[:, None, :]
    s = jnp.where(mask_BxTxS[:, None, None], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_cache_BxSxKxD.dtype), v_cache_BxSxKxD,
                   preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)



@flax.struct.dataclass
class KVCache:
    """Keys/values of one softmax layer: slot s of row b holds that row's token written s-th.

    Prompts are left-padded, so all rows advance in lockstep; `valid` masks padding slots.
    """

    k: jax.Array  # [B, S, K, D]
    v: jax.Array  # [B, S, K, D]
    valid: jax.Array  # bool [B, S]
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def empty(cls, batch, max_len, num_kv_heads, head_dim, dtype):
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))

    def write(self, k_BxTxKxD, v_BxTxKxD, valid_BxT=None):
        T = k_BxTxKxD.shape[1]
        valid_BxT = jnp.ones(k_BxTxKxD.shape[:2], bool) if valid_BxT is None else valid_BxT
        at = (0, self.index, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.k, k_BxTxKxD.astype(self.k.dtype), at),
            jax.lax.dynamic_update_slice(self.v, v_BxTxKxD.astype(self.v.dtype), at),
            jax.lax.dynamic_update_slice(self.valid, valid_BxT, (0, self.index)),
            self.index + T)


class SoftmaxAttention(nn.Module):
    """GQA attention with partial RoPE; blockwise for training/prefill, cache attention for decoding."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos_sin, segment_ids_BxL=None, kv_cache=None, return_kv=False):
        cfg = self.cfg
        H, K, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        w_q = param(self, "q_proj", (D, H, Dh), ("embed", "heads", "head_dim"), init, pdtype)
        w_k = param(self, "k_proj", (D, K, Dh), ("embed", "kv_heads", "head_dim"), init, pdtype)
        w_v = param(self, "v_proj", (D, K, Dh), ("embed", "kv_heads", "head_dim"), init, pdtype)
        w_o = param(self, "o_proj", (H, Dh, D), ("heads", "head_dim", "embed"), init, pdtype)

        x = x_BxLxD.astype(dtype)
        q = jnp.einsum("bld,dhk->blhk", x, w_q.astype(dtype))
        k = jnp.einsum("bld,dhk->blhk", x, w_k.astype(dtype))
        v = jnp.einsum("bld,dhk->blhk", x, w_v.astype(dtype))
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        scale = Dh ** -0.5
        new_kv = None
        if kv_cache is not None and x.shape[1] == 1:  # decoding over the cache
            slots_Bx1 = jnp.broadcast_to(kv_cache.index, (x.shape[0], 1))
            new_kv = kv_cache.write(k, v)
            o = decode_attention(q, new_kv.k, new_kv.v, slots_Bx1, new_kv.valid, scale=scale)
        else:  # training, or prefill of an empty cache
            o = blockwise_attention(q, k, v, segment_ids_BxL, scale=scale, block_q=cfg.attention_block_q,
                                    block_kv=cfg.attention_block_kv)
            if kv_cache is not None:
                valid = None if segment_ids_BxL is None else segment_ids_BxL != 0
                new_kv = kv_cache.write(k, v, valid)
            elif return_kv:
                new_kv = (k, v)
        y = jnp.einsum("blhk,hkd->bld", o, w_o.astype(dtype))
        return y, new_kv
