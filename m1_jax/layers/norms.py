"""RMSNorm as MiniMax computes it: normalise in float32, cast back, then scale."""

import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32, then times weight in x's dtype."""
    x_f32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
    normed = (x_f32 * jnp.reciprocal(jnp.sqrt(variance + eps))).astype(x.dtype)
    return weight.astype(x.dtype) * normed
