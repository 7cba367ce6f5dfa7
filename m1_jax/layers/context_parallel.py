"""Context (sequence) parallelism: each device holds one contiguous chunk of every sequence.

Both functions run inside `jax.shard_map` (the layers' per-device wrappers call them) with `axis` the context
mesh axes; device p holds positions [p * Lc, (p + 1) * Lc).

Lightning layers, LASP-2 (arXiv 2502.07563): the attention is linear in its initial state, so each device runs
its chunk from a zero state (any local implementation, the Pallas kernels included), all-gathers the chunk's
final state (one [B, H, K, V] per device, independent of the length), combines the states of the devices
before it with the decay, and adds the state's contribution q_t exp(-lambda (t + 1)) S_in to its queries. The
backward is autodiff's: the all-gather transposes to a reduce-scatter. Packed documents: the incoming state
survives a device boundary only if the segment continues across it, and a chunk passes it on only if the
chunk is one segment.

Softmax layers (LASP-2H style): all-gather the keys, values and their segment ids, and attend this device's
queries at their global positions (flash attention with a traced query offset: our Pallas kernels,
softmax_attention/flash_gpu.py on CUDA and flash_tpu.py on TPU, the blockwise JAX path elsewhere). Keys and values are H / K times smaller
than the queries under GQA; the gather is 2 * L * K * D per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.softmax_attention import blockwise, flash_gpu, flash_tpu

# The local compute of the gathered-kv attention ("auto": by the platform compiled for, as softmax_attention).
GATHERED_KV_IMPLS = ("auto", "blockwise", "pallas_gpu", "pallas_tpu")


def lasp2_lightning(attend, q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, decay_H, state0_BxHxKxV, segment_ids_BxL, *, axis):
    """This device's (o [B, Lc, H, V], state after its chunk [1, B, H, K, V] float32) of the lightning attention
    over the whole sequence, split over `axis`.

    attend(q, k, v, decay, initial_state, segment_ids) -> (o, final_state): the local lightning attention.
    state0_BxHxKxV: the state before the sequence (or None), the same on every device.
    """
    f32 = jnp.float32
    B, Lc, H, K = q_BxLxHxK.shape
    V = v_BxLxHxV.shape[-1]
    seg_BxL = (jnp.zeros((B, Lc), jnp.int32) if segment_ids_BxL is None
               else segment_ids_BxL.astype(jnp.int32))
    o_local, s_local_BxHxKxV = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, decay_H, None, segment_ids_BxL)
    s_all_PxBxHxKxV = lax.all_gather(s_local_BxHxKxV.astype(f32), axis)
    first_PxB = lax.all_gather(seg_BxL[:, 0], axis)
    last_PxB = lax.all_gather(seg_BxL[:, -1], axis)

    lam_H = jnp.asarray(decay_H, f32)
    chunk_decay_1xHx1x1 = jnp.exp(-lam_H * Lc)[None, :, None, None]

    def device_step(carry, xs):
        s_end_prev, last_prev_B = carry
        s_local, first_B, last_B = xs
        # The state entering this device: the previous device's end state if its last segment continues here.
        s_in = jnp.where((last_prev_B == first_B)[:, None, None, None], s_end_prev, 0.0)
        one_segment_B = first_B == last_B
        s_end = s_local + jnp.where(one_segment_B[:, None, None, None], chunk_decay_1xHx1x1 * s_in, 0.0)
        return (s_end, last_B), (s_in, s_end)

    s0 = jnp.zeros((B, H, K, V), f32) if state0_BxHxKxV is None else state0_BxHxKxV.astype(f32)
    # The initial state enters device 0 (its "previous last segment" is device 0's first one).
    _, (s_in_PxBxHxKxV, s_end_PxBxHxKxV) = lax.scan(device_step, (s0, first_PxB[0]),
                                                    (s_all_PxBxHxKxV, first_PxB, last_PxB))
    me = lax.axis_index(axis)
    s_in = s_in_PxBxHxKxV[me]
    # Queries of the chunk's first segment see the incoming state, decayed by their distance to it.
    sees_BxL = seg_BxL == seg_BxL[:, :1]
    expo_BxHxL = jnp.where(sees_BxL[:, None, :], -lam_H[None, :, None] * jnp.arange(1, Lc + 1, dtype=f32), -jnp.inf)
    o_in = jnp.einsum("bht,bthk,bhkv->bthv", jnp.exp(expo_BxHxL), q_BxLxHxK.astype(f32), s_in)
    o = (o_local.astype(f32) + o_in).astype(v_BxLxHxV.dtype)
    return o, s_end_PxBxHxKxV[me][None]


def gathered_kv_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, *, scale, axis, block_q=512,
                          block_kv=512, impl="auto", interpret=False):
    """This device's causal attention output [B, Lc, H, D] over the keys of every device on `axis`.
    impl: GATHERED_KV_IMPLS; block_q / block_kv: the blockwise path's tiles."""
    if impl not in GATHERED_KV_IMPLS:
        raise ValueError(f"gathered-kv attention impl must be one of {GATHERED_KV_IMPLS}, got {impl!r}")
    B, Lc = q_BxLxHxD.shape[:2]
    seg_BxL = (jnp.ones((B, Lc), jnp.int32) if segment_ids_BxL is None
               else segment_ids_BxL.astype(jnp.int32))
    gather = lambda x: lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
    q_offset = lax.axis_index(axis) * Lc
    args = (q_BxLxHxD, gather(k_BxLxKxD), gather(v_BxLxKxD), seg_BxL, gather(seg_BxL), q_offset)

    def kernel(fn, interpret):
        return lambda q, k, v, seg_q, seg_k, offset: fn(q, k, v, seg_q, seg_k, scale=scale, q_offset=offset,
                                                        interpret=interpret)

    def jax_path(q, k, v, seg_q, seg_k, offset):
        return blockwise.blockwise_attention(q, k, v, seg_q, scale=scale, block_q=block_q, block_kv=block_kv,
                                             q_offset=offset, kv_segment_ids_BxS=seg_k)

    gpu, tpu = flash_gpu.flash_attention_gpu, flash_tpu.flash_attention_tpu
    if impl == "auto":
        return lax.platform_dependent(*args, cuda=kernel(gpu, False), tpu=kernel(tpu, False), default=jax_path)
    if impl == "blockwise":
        return jax_path(*args)
    return kernel(gpu if impl == "pallas_gpu" else tpu, interpret)(*args)
