"""Lightning attention as a Pallas GPU kernel (Triton lowering), forward and backward.

Why Triton and not Mosaic GPU: the kernel has to run on both jax 0.10 (this repo's CPU pin) and jax 0.11 (the
GPU machines). The Triton lowering of `pl.pallas_call` exists with the same API in both (deprecated in 0.11,
selected explicitly by passing `pallas.triton.CompilerParams`), it runs under `interpret=True` on CPU so CI
can check it against the reference, and it lowers for "cuda" from a CPU-only machine. Mosaic GPU is
Hopper-only, its `plgpu.kernel`/`emit_pipeline` API changed between 0.10 and 0.11, and its interpret mode is
private in 0.10 (it failed on `emit_pipeline`). When Triton is removed from JAX, port `_kernel` to
`plgpu.kernel` (one CTA per (b*h, value tile), `emit_pipeline` over chunks with the state as `init_carry`).

Structure: grid (batch*heads, value tiles); each program keeps its [Dk, TV] float32 state in registers and
loops over the chunks with `lax.fori_loop` (state is never carried across grid steps: GPU programs are
unordered). Reverse sweeps (backward) walk the chunks last-to-first. Triton needs power-of-two loads and
dots of at least 16, so Dk and Dv are zero-padded to a power of two >= 16 (exact: zero columns add nothing)
and the chunk is a power of two in [16, 64] (64: the C x C float32 score tile stays in registers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lightning_attention import kernel_common

MAX_CHUNK = 64
VALUE_TILE = 64


def _pow2_at_least(x: int, lo: int) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def _kernel(decay_ref, q_ref, k_ref, v_ref, s0_ref, *refs, num_chunks, last_len, chunk, reverse, segmented):
    bound_ref, o_ref, sf_ref = refs if segmented else (None, *refs)
    lam = decay_ref[0]

    def body(c, state):
        idx = (num_chunks - 1 - c) if reverse else c
        c0 = pl.multiple_of(idx * chunk, chunk)
        rows = pl.ds(c0, chunk)
        # Arithmetic, not jnp.where: Triton's scalar select of two int literals lowers with a bool/int mix-up.
        m = chunk - (chunk - last_len) * (idx == num_chunks - 1).astype(jnp.int32)
        seg = {}
        if segmented:  # this sweep's segment bound of each row (start forward, end reverse), as a column
            bound_Cx1 = bound_ref[rows][:, None]
            seg = dict(c0=c0, end_Cx1=bound_Cx1) if reverse else dict(c0=c0, start_Cx1=bound_Cx1)
        o, new_state = kernel_common.chunk_step(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state, lam, m,
                                                reverse=reverse, **seg)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return new_state

    sf_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def sweep(q, k, v, decay, s0, bounds=None, *, reverse, chunk=64, interpret=False):
    """q, k [B, N, H, K]; v [B, N, H, V]; decay [H]; s0 [B, H, K, V]; bounds None or kernel_common.segment_bounds
    -> (o [B, N, H, V] v.dtype, s_final f32)."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    C = _pow2_at_least(min(chunk, MAX_CHUNK, N), 16)
    Np = kernel_common.round_up(N, C)
    nc = Np // C
    Kp, Vp = _pow2_at_least(K, 16), _pow2_at_least(V, 16)
    qk_pad = ((0, 0), (0, Np - N), (0, 0), (0, Kp - K))
    q, k = (jnp.pad(x, qk_pad) if qk_pad != ((0, 0),) * 4 else x for x in (q, k))
    v_pad = ((0, 0), (0, Np - N), (0, 0), (0, Vp - V))
    v = jnp.pad(v, v_pad) if v_pad != ((0, 0),) * 4 else v
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    TV = min(Vp, VALUE_TILE)
    nv = Vp // TV
    # [B, N, H, D] -> [B, N, H*D] is free; a head is a column block (Triton reads it as a strided pointer view).
    q3, k3, v3 = (x.reshape(B, Np, -1) for x in (q, k, v))
    lam_rows = jnp.tile(jnp.asarray(decay, jnp.float32), B)  # [B*H]

    def qk_map(bh, vt):
        return lax.div(bh, H), 0, lax.rem(bh, H)

    def v_map(bh, vt):
        return lax.div(bh, H), 0, lax.rem(bh, H) * nv + vt

    def s_map(bh, vt):
        return lax.div(bh, H), lax.rem(bh, H), 0, vt

    segmented = bounds is not None
    extra_specs, extra_args = [], []
    if segmented:
        bound = kernel_common.pad_bounds(*bounds, Np)[1 if reverse else 0]
        extra_specs, extra_args = [pl.BlockSpec((None, Np), lambda bh, vt: (lax.div(bh, H), 0))], [bound]
    kernel = functools.partial(_kernel, num_chunks=nc, last_len=N - (nc - 1) * C, chunk=C, reverse=reverse,
                               segmented=segmented)
    o3, sf = pl.pallas_call(
        kernel,
        grid=(B * H, nv),
        in_specs=[
            pl.BlockSpec((1,), lambda bh, vt: (bh,)),
            pl.BlockSpec((None, Np, Kp), qk_map),
            pl.BlockSpec((None, Np, Kp), qk_map),
            pl.BlockSpec((None, Np, TV), v_map),
            pl.BlockSpec((None, None, Kp, TV), s_map),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, Np, TV), v_map),
            pl.BlockSpec((None, None, Kp, TV), s_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Np, H * Vp), v.dtype),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(lam_rows, q3, k3, v3, s0, *extra_args)
    return o3.reshape(B, Np, H, Vp)[:, :N, :, :V], sf[:, :, :K, :V]


@functools.lru_cache(maxsize=None)
def _differentiable(chunk, interpret):
    return kernel_common.make_differentiable(functools.partial(sweep, chunk=chunk, interpret=interpret))


def lightning_attention_gpu(q, k, v, decay, initial_state=None, segment_ids=None, *, block_size=64,
                            interpret=False):
    """Returns (o [B, N, H, V] in v's dtype, final_state [B, H, K, V] float32); differentiable in q, k, v, state.
    segment_ids [B, N]: the state resets at each segment start (packed documents)."""
    B, _, H, K = q.shape
    s0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None else initial_state
    bounds = None if segment_ids is None else kernel_common.segment_bounds(segment_ids)
    return _differentiable(int(block_size), interpret)(q, k, v, jnp.asarray(decay, jnp.float32), s0, bounds)
