"""What the TPU and GPU Pallas kernels share: the per-chunk math on 2-D tiles and the custom VJP.

One "sweep" primitive does all the work. Forward sweep over chunks (state S before the chunk, m valid rows):
  O = ((Q K^T) * D) V + (Q * exp(-lam (i + 1))) S,   D_ij = exp(-lam (i - j)) for j <= i
  S <- exp(-lam m) S + (K * exp(-lam (m - 1 - j)))^T V          (rows j >= m masked: padding)
Reverse sweep (chunks last to first, within a chunk "later" tokens feed earlier ones; H is the cotangent that
the future hands to the chunk's last valid token):
  O = ((Q K^T) * D^T) V + (Q * exp(-lam (m - 1 - i))) H,          (rows i >= m masked)
  H <- exp(-lam m) H + (K * exp(-lam (j + 1)))^T V

The backward of o = sweep(q, k, v, S0), S_final follows from dS_t = q_t^T dO_t + exp(-lam) dS_{t+1}
(dS_{N-1} gets dS_final directly):
  dq          = forward sweep(dO, v, k, S0^T)          (dO S_{t}^T plus the intra term)
  dv, dS0     = reverse sweep(k, q, dO, dS_final)      (k_t dS_t; the sweep's final H is exactly dS0)
  dk          = reverse sweep(v, dO, q, dS_final^T)    (v_t dS_t^T)
so the backward kernels are the forward kernel run with other operands and reverse=True. decay gets a zero
cotangent: in M1 it is a fixed function of the layer index, never trained.

Segments (packed documents): every token carries the global index of the first and of the last token of its
segment (`segment_bounds`; the first segment starts at -1, since it continues the initial state, and the last
ends at N, since its state is the final one). For the chunk starting at token c0 with m valid rows:
  forward  D_ij also needs c0 + j >= start_i; query i sees S only if start_i < c0; the update keeps token j only
           if c0 + j >= start of the chunk's last token, and keeps S only if that start is < c0;
  reverse  the mirror image: D^T needs c0 + j <= end_i; query i sees H only if end_i > c0 + m - 1; the update
           keeps token j only if c0 + j <= end of the chunk's first token, and keeps H only if that end is past
           the chunk.
The three backward sweeps use the same bounds, so the backward resets where the forward does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _masked_exp(lam, expo_int):
    """exp(-lam * e) where e >= 0, else 0. Clamped before exp so masked entries can never overflow."""
    valid = expo_int >= 0
    return jnp.where(valid, jnp.exp(-lam * jnp.maximum(expo_int, 0).astype(jnp.float32)), 0.0)


def _dot(a, b, contract, precision):
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def segment_bounds(segment_ids_BxN):
    """(start_BxN, end_BxN) int32: the global index of the first and the last token of each token's segment,
    with -1 for the first segment's start and N for the last segment's end (see the module docstring)."""
    seg = jnp.asarray(segment_ids_BxN, jnp.int32)
    B, N = seg.shape
    pos = lax.broadcasted_iota(jnp.int32, (B, N), 1)
    change = seg[:, 1:] != seg[:, :-1]
    is_start = jnp.concatenate([jnp.ones((B, 1), bool), change], axis=1)
    is_end = jnp.concatenate([change, jnp.ones((B, 1), bool)], axis=1)
    start = lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    end = lax.cummin(jnp.where(is_end, pos, N), axis=1, reverse=True)
    return jnp.where(start == 0, -1, start), jnp.where(end == N - 1, N, end)


def pad_bounds(start_BxN, end_BxN, Np: int):
    """Bounds for a sequence padded to Np tokens: the padding continues the last segment (a sweep masks it)."""
    pad = Np - start_BxN.shape[1]
    if not pad:
        return start_BxN, end_BxN
    return (jnp.pad(start_BxN, ((0, 0), (0, pad)), mode="edge"),
            jnp.pad(end_BxN, ((0, 0), (0, pad)), mode="edge"))


def chunk_decays(lam, m, C, *, reverse: bool, scores: bool = True, c0=None, start_Cx1=None, end_Cx1=None):
    """The decay factors of one chunk of C rows (m valid; padding sits at the end), segment masks applied:
    (d_CxC or None, q_scale_Cx1, k_scale_Cx1, gamma). With scores=False the C x C intra-chunk decay is not
    built (a state-only pass). Arguments as in `chunk_step`."""
    r_Cx1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    d_CxC = None
    if scores:
        i_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
        j_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
        d_CxC = _masked_exp(lam, (j_CxC - i_CxC) if reverse else (i_CxC - j_CxC))
    if reverse:
        q_scale_Cx1 = _masked_exp(lam, m - 1 - r_Cx1)
        k_scale_Cx1 = _masked_exp(lam, r_Cx1 + 1)
    else:
        q_scale_Cx1 = _masked_exp(lam, r_Cx1 + 1)
        k_scale_Cx1 = _masked_exp(lam, m - 1 - r_Cx1)
    keep_state = True
    if c0 is not None:  # segments: reductions in float32 (exact for indices below 2^24; Mosaic reduces floats)
        valid_Cx1 = r_Cx1 < m
        if reverse:
            end_Cx1 = end_Cx1.astype(jnp.float32)
            first_end = jnp.min(jnp.where(valid_Cx1, end_Cx1, jnp.float32(2**30)))
            last = (c0 + m - 1).astype(jnp.float32)
            if scores:
                j_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
                d_CxC = jnp.where((c0 + j_CxC).astype(jnp.float32) <= end_Cx1, d_CxC, 0.0)
            q_scale_Cx1 = jnp.where(end_Cx1 > last, q_scale_Cx1, 0.0)
            k_scale_Cx1 = jnp.where((c0 + r_Cx1).astype(jnp.float32) <= first_end, k_scale_Cx1, 0.0)
            keep_state = first_end > last
        else:
            start_Cx1 = start_Cx1.astype(jnp.float32)
            last_start = jnp.max(jnp.where(valid_Cx1, start_Cx1, jnp.float32(-1)))
            first = c0.astype(jnp.float32)
            if scores:
                j_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
                d_CxC = jnp.where((c0 + j_CxC).astype(jnp.float32) >= start_Cx1, d_CxC, 0.0)
            q_scale_Cx1 = jnp.where(start_Cx1 < first, q_scale_Cx1, 0.0)
            k_scale_Cx1 = jnp.where((c0 + r_Cx1).astype(jnp.float32) >= last_start, k_scale_Cx1, 0.0)
            keep_state = last_start < first
    gamma = jnp.where(keep_state, jnp.exp(-lam * m.astype(jnp.float32)), 0.0)
    return d_CxC, q_scale_Cx1, k_scale_Cx1, gamma


def _precision(dt):
    return lax.Precision.HIGHEST if dt == jnp.float32 else lax.Precision.DEFAULT


def chunk_output(q_CxK, k_CxK, v_CxV, state_KxV, d_CxC, q_scale_Cx1):
    """o_CxV float32 = ((Q K^T) * D) V + (Q * q_scale) S: the intra-chunk term and the state's."""
    dt = q_CxK.dtype
    prec = _precision(dt)
    scores_CxC = _dot(q_CxK, k_CxK, ((1,), (1,)), prec) * d_CxC
    o_CxV = _dot(scores_CxC.astype(dt), v_CxV, ((1,), (0,)), prec)
    q_dec = (q_CxK.astype(jnp.float32) * q_scale_Cx1).astype(dt)
    return o_CxV + _dot(q_dec, state_KxV.astype(dt), ((1,), (0,)), prec)


def state_update(k_CxK, v_CxV, state_KxV, k_scale_Cx1, gamma):
    """The state after the chunk, float32: gamma S + (K * k_scale)^T V."""
    dt = k_CxK.dtype
    k_dec = (k_CxK.astype(jnp.float32) * k_scale_Cx1).astype(dt)
    return gamma * state_KxV + _dot(k_dec, v_CxV, ((0,), (0,)), _precision(dt))


def chunk_step(q_CxK, k_CxK, v_CxV, state_KxV, lam, m, *, reverse: bool, c0=None, start_Cx1=None, end_Cx1=None):
    """One chunk on tiles already loaded on chip. Returns (o_CxV float32, new_state_KxV float32).

    lam: float32 scalar; m: int32 scalar, the chunk's number of valid rows (padding sits at the end).
    With segments: c0, the chunk's first global token index, and its rows' segment bounds start_Cx1 / end_Cx1
    (int32; only the one of the sweep's direction is read).

    Matmul operands stay in the input dtype (bf16 runs on tensor cores / the MXU) and accumulate in float32;
    float32 inputs use Precision.HIGHEST (IEEE on Triton, not TF32). Iotas are int32 and cast (TPU has no float
    iota).
    """
    d_CxC, q_scale_Cx1, k_scale_Cx1, gamma = chunk_decays(lam, m, q_CxK.shape[0], reverse=reverse, c0=c0,
                                                          start_Cx1=start_Cx1, end_Cx1=end_Cx1)
    o_CxV = chunk_output(q_CxK, k_CxK, v_CxV, state_KxV, d_CxC, q_scale_Cx1)
    return o_CxV, state_update(k_CxK, v_CxV, state_KxV, k_scale_Cx1, gamma)


def make_differentiable(sweep):
    """Wraps sweep(q, k, v, decay_H, s0, bounds, *, reverse) -> (o, s_final) in a custom VJP (Pallas has no
    autodiff). bounds: None, or segment_bounds' (start, end); they get no cotangent."""

    @jax.custom_vjp
    def attention(q, k, v, decay, s0, bounds):
        return sweep(q, k, v, decay, s0, bounds, reverse=False)

    def fwd(q, k, v, decay, s0, bounds):
        return sweep(q, k, v, decay, s0, bounds, reverse=False), (q, k, v, decay, s0, bounds)

    def bwd(res, cts):
        q, k, v, decay, s0, bounds = res
        do, dsf = cts
        do = do.astype(v.dtype)
        dsf = dsf.astype(jnp.float32)
        t = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
        dq, _ = sweep(do, v, k, decay, t(s0), bounds, reverse=False)
        dv, ds0 = sweep(k, q, do, decay, dsf, bounds, reverse=True)
        dk, _ = sweep(v, do, q, decay, t(dsf), bounds, reverse=True)
        no_bounds = None if bounds is None else tuple(np.zeros(b.shape, jax.dtypes.float0) for b in bounds)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv, jnp.zeros_like(decay), ds0.astype(s0.dtype), no_bounds

    attention.defvjp(fwd, bwd)
    return attention
