"""Rotary position embedding on the first rotary_dim dims of each head (NeoX rotate-half in that slice)."""

import jax.numpy as jnp


def rope_cos_sin(positions_BxL, rotary_dim: int, theta: float):
    """cos, sin [B, L, rotary_dim] in float32: inv_freq_j = theta^(-2j/rotary_dim), duplicated halves."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.int32).astype(jnp.float32) / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxLxR2, freqs_BxLxR2], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxLxHxD, cos_BxLxR, sin_BxLxR):
    """Rotates dims [0:R] of every head; dims [R:D] pass through. Math in float32, result in x's dtype."""
    rotary_dim = cos_BxLxR.shape[-1]
    x_rot = x_BxLxHxD[..., :rotary_dim].astype(jnp.float32)
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos_BxLxR[:, :, None, :], sin_BxLxR[:, :, None, :]
    out = (x_rot * cos + rotated * sin).astype(x_BxLxHxD.dtype)
    if rotary_dim == x_BxLxHxD.shape[-1]:
        return out
    return jnp.concatenate([out, x_BxLxHxD[..., rotary_dim:]], axis=-1)
