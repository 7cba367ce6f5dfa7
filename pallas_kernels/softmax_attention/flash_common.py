"""What our two offset-taking flash kernels (flash_gpu.py, flash_tpu.py) share: the mask's padding ids, the
matmul precision rule, padding, the custom VJP and the public signature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MASKED = -1e30  # finite: a fully masked row never produces inf - inf
PAD_Q = np.iinfo(np.int32).min       # segment id of padded queries
PAD_KV = np.iinfo(np.int32).min + 1  # of padded keys: never equal to a query's


def dot(a, b, contract):
    """Float32-accumulated dot; float32 operands at Precision.HIGHEST (IEEE on GPU, not TF32)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32)


def pad_to(x, L, axis, value=0):
    if x.shape[axis] == L:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, L - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def with_vjp(forward, backward):
    """The differentiable attention(q, k, v, segq, segk, offset) from forward(...) -> (o, lse) and
    backward(q, k, v, segq, segk, offset, o, lse, do) -> (dq, dk, dv); segment ids and offset get none."""

    @jax.custom_vjp
    def attention(q, k, v, segq, segk, off):
        return forward(q, k, v, segq, segk, off)[0]

    def fwd(q, k, v, segq, segk, off):
        o, lse = forward(q, k, v, segq, segk, off)
        return o, (q, k, v, segq, segk, off, o, lse)

    def bwd(res, do):
        q, k, v, segq, segk, off, o, lse = res
        dq, dk, dv = backward(q, k, v, segq, segk, off, o, lse, do.astype(q.dtype))
        zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
        return dq, dk, dv, zero(segq), zero(segk), zero(off)

    attention.defvjp(fwd, bwd)
    return attention


def call(attention, q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, kv_segment_ids_BxS, q_offset):
    """attention(...) with absent segment ids as zeros and the offset as an int32 scalar."""
    B, L = q_BxLxHxD.shape[:2]
    S = k_BxSxKxD.shape[1]
    segq = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    segk = jnp.zeros((B, S), jnp.int32) if kv_segment_ids_BxS is None else kv_segment_ids_BxS.astype(jnp.int32)
    return attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segq, segk, jnp.asarray(q_offset, jnp.int32))
