"""The softmax-attention layer of MiniMax-M1: GQA with partial RoPE, the KV cache and decode attention.

Training and prefill run `pallas_kernels.softmax_attention` (flash attention: Pallas kernels on GPU and TPU, the
blockwise pure-JAX path elsewhere), per device under a mesh; decoding attends over the cache here.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax import sharding
from m1_jax.config import ModelConfig
from m1_jax.layers import context_parallel
from m1_jax.layers.partitioning import param
from m1_jax.layers.rope import apply_rope
from pallas_kernels.softmax_attention import blockwise, softmax_attention


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
    s = jnp.where(mask_BxTxS[:, None, None], s, blockwise.MASKED)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_cache_BxSxKxD.dtype), v_cache_BxSxKxD,
                   preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)



def attention_per_device(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None, *, scale, impl="auto",
                         block_q=512, block_kv=512, interpret=False):
    """`softmax_attention`, run per device when a mesh is set (a Pallas kernel is not partitioned by GSPMD):
    batch over the batch axes, heads and kv heads over the tensor axis. Over a context axis each device attends
    its queries to the gathered keys (context_parallel.py: our Pallas kernels with a traced query offset on
    CUDA and TPU, the blockwise path elsewhere)."""
    def attend(q, k, v, segments):
        return softmax_attention(q, k, v, segments, scale=scale, impl=impl, block_q=block_q, block_kv=block_kv,
                                 interpret=interpret)

    qh, kvh = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
    in_axes = (qh, kvh, kvh, ("batch", "length"))
    context = sharding.context_axes(sharding.context_mesh())
    if not context:
        fn = sharding.shard_map_by_logical_axes(attend, in_axes, qh, what="softmax attention")
        return fn(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)
    if impl not in context_parallel.GATHERED_KV_IMPLS:
        raise ValueError(f"softmax_impl={impl!r} cannot run over the context axis {context}: use one of "
                         f"{context_parallel.GATHERED_KV_IMPLS}")

    def attend_chunk(q, k, v, segments):
        return context_parallel.gathered_kv_attention(q, k, v, segments, scale=scale, axis=context,
                                                      block_q=block_q, block_kv=block_kv, impl=impl,
                                                      interpret=interpret)

    fn = sharding.shard_map_by_logical_axes(attend_chunk, in_axes, qh, what="softmax attention (context parallel)",
                                            fallback=attend)
    return fn(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)


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
            o = attention_per_device(q, k, v, segment_ids_BxL, scale=scale, impl=cfg.impl.softmax_impl,
                                     block_q=cfg.impl.attention_block_q, block_kv=cfg.impl.attention_block_kv)
            if kv_cache is not None:
                valid = None if segment_ids_BxL is None else segment_ids_BxL != 0
                new_kv = kv_cache.write(k, v, valid)
            elif return_kv:
                new_kv = (k, v)
        y = jnp.einsum("blhk,hkd->bld", o, w_o.astype(dtype))
        return y, new_kv
