"""The lightning-attention layer of MiniMax-M1 (a Linen module around `lightning_attention`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax import sharding
from m1_jax.config import ModelConfig
from m1_jax.layers import context_parallel
from m1_jax.layers.norms import rms_norm
from m1_jax.layers.partitioning import param
from pallas_kernels.lightning_attention import lightning_attention, lightning_attention_step


_QKV = ("batch", "length", "heads", "head_dim")
_STATE = ("batch", "heads", None, None)


def lightning_per_device(q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, decay_H, state_BxHxKxV=None, segment_ids_BxL=None, *,
                         impl="auto", block_size=256, interpret=False):
    """(o, final state) of `lightning_attention`, run per device when a mesh is set (a Pallas kernel is not
    partitioned by GSPMD): batch over the batch axes, heads over the tensor axis, and the sequence over the
    context axis, whose chunks are combined by LASP-2 (context_parallel.py)."""
    def attend(q, k, v, decay, state, segments):
        return lightning_attention(q, k, v, decay, impl=impl, initial_state=state, return_final_state=True,
                                   block_size=block_size, segment_ids=segments, interpret=interpret)

    args = (q_BxLxHxK, k_BxLxHxK, v_BxLxHxV, decay_H, state_BxHxKxV, segment_ids_BxL)
    in_axes = (_QKV, _QKV, _QKV, ("heads",), _STATE, ("batch", "length"))
    context = sharding.context_axes(sharding.context_mesh())
    if not context:
        return sharding.shard_map_by_logical_axes(attend, in_axes, (_QKV, _STATE), what="lightning attention")(*args)

    def attend_chunk(*chunk_args):
        return context_parallel.lasp2_lightning(attend, *chunk_args, axis=context)

    def attend_whole(*whole_args):
        o, state = attend(*whole_args)
        return o, state[None]

    # Every device returns the state after its own chunk (stacked over the context axis); the last is the final.
    o, states = sharding.shard_map_by_logical_axes(attend_chunk, in_axes, (_QKV, ("length",) + _STATE),
                                                   what="lightning attention (context parallel)",
                                                   fallback=attend_whole)(*args)
    return o, states[-1]


class LightningAttention(nn.Module):
    """Fused per-head qkv -> SiLU -> decayed linear attention -> RMSNorm(all heads) -> sigmoid gate -> out.

    The fused projection is laid out per head as [q | k | v] (rows h*3d + {0..d-1 q, d..2d-1 k, 2d.. v}),
    as in the official checkpoint, not as [Q | K | V] blocks.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, decay_H, segment_ids_BxL=None, state_BxHxKxV=None, return_state=False):
        cfg = self.cfg
        H, Dh, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        w_qkv = param(self, "qkv_proj", (D, H, 3 * Dh), ("embed", "heads", "head_dim"), init, pdtype)
        w_gate = param(self, "output_gate", (D, H, Dh), ("embed", "heads", "head_dim"), init, pdtype)
        w_norm = param(self, "norm", (H, Dh), ("heads", "head_dim"), nn.initializers.ones, pdtype)
        w_out = param(self, "out_proj", (H, Dh, D), ("heads", "head_dim", "embed"), init, pdtype)

        x = x_BxLxD.astype(dtype)
        B, L = x.shape[:2]
        # [B, L, H, 3, K] and an index per part, not jnp.split of the last axis: XLA:CPU runs the projection's
        # fwd+bwd 1.6x faster this way (measured).
        qkv_BxLxHx3xK = jnp.einsum("bld,dhk->blhk", x, w_qkv.astype(dtype)).reshape(B, L, H, 3, Dh)
        q, k, v = (jax.nn.silu(qkv_BxLxHx3xK[:, :, :, i]) for i in range(3))
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "head_dim")) for t in (q, k, v))
        new_state = None
        if state_BxHxKxV is not None and x.shape[1] == 1:  # decoding: one recurrent step
            o_BxHxV, new_state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], decay_H, state_BxHxKxV)
            o_BxLxHxV = o_BxHxV[:, None]
        else:
            o_BxLxHxV, new_state = lightning_per_device(q, k, v, decay_H, state_BxHxKxV, segment_ids_BxL,
                                                        impl=cfg.impl.lightning_impl, block_size=cfg.impl.block_size)
            new_state = new_state if return_state else None
        # RMSNorm jointly over all heads' channels (not per head), eps 1e-6 as in the official code.
        o_BxLxF = rms_norm(o_BxLxHxV.astype(dtype).reshape(B, L, H * Dh), w_norm.reshape(H * Dh),
                           cfg.lightning_norm_eps)
        gate_BxLxHxK = jax.nn.sigmoid(jnp.einsum("bld,dhk->blhk", x, w_gate.astype(dtype)))
        o_BxLxHxK = gate_BxLxHxK * o_BxLxF.reshape(B, L, H, Dh)
        y = jnp.einsum("blhk,hkd->bld", o_BxLxHxK, w_out.astype(dtype))
        return y, new_state
