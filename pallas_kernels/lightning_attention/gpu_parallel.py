"""Lightning attention as chunk-parallel Pallas GPU kernels (Triton lowering), forward and backward.

The sequential kernel (gpu.py) gives each (batch*head, value tile) one program that walks the whole sequence,
so at B=1, H=64 an H100's 132 SMs run 128 programs, each bound by one chunk's latency at a time. Here a sweep
(kernel_common's maths) is split the way fla's chunk kernels split it:
  1. states: grid (B*H, Dk tiles, Dv tiles); a sequential loop updates a [TK, TV] float32 state in registers
     (state only: no C x C scores, no output) and writes the state entering each block of `block` tokens to
     HBM ([B, H, blocks, Dk, Dv] float32, 1/block of the state at every token).
  2. outputs: grid (B*H, blocks, Dv tiles), every program independent: it loads its block's entering state and
     walks the block's sub-chunks of C <= 64 rows (kernel_common.chunk_step, the state carried in registers).
The backward shares its state passes: one forward states pass over (k, v) gives S at every block (dq reads it
transposed), one reverse pass over (q, dO) gives dS at every block (dv reads it, dk transposed) and dS0; then
three output passes, all parallel over blocks. So the backward is 2 sequential state-only passes + 3 parallel
passes, against the sequential kernel's 3 sequential full sweeps.

Triton needs power-of-two loads and dots of at least 16, so Dk, Dv are zero-padded to a power of two >= 16
(exact) and the sub-chunk is a power of two in [16, 64]; a block is a whole number of sub-chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lightning_attention import kernel_common
from pallas_kernels.lightning_attention.gpu import MAX_CHUNK, VALUE_TILE, _pow2_at_least

STATE_TILE = 64  # [TK, TV] float32 state tile of the states pass (16 KiB: registers of 4 warps)


def _layout(N, K, V, chunk, block):
    """(sub-chunk C, sub-chunks per block, padded N, padded Dk, padded Dv)."""
    C = _pow2_at_least(min(chunk, MAX_CHUNK, N), 16)
    per_block = max(1, min(block // C, -(-N // C)))
    Np = kernel_common.round_up(N, C * per_block)
    return C, per_block, Np, _pow2_at_least(K, 16), _pow2_at_least(V, 16)


def _pad3(x, Np, Dp):
    """[B, N, H, D] -> [B, Np, H*Dp], zero-padded (a head is a column block, read as a strided view)."""
    B, N, H, D = x.shape
    if (Np, Dp) != (N, D):
        x = jnp.pad(x, ((0, 0), (0, Np - N), (0, 0), (0, Dp - D)))
    return x.reshape(B, Np, H * Dp)


def _rows(bh, H):
    return lax.div(bh, H), lax.rem(bh, H)


def _sub_chunk(idx, C, n_valid):
    """(first global row, valid rows) of sub-chunk idx; padding rows sit past n_valid."""
    c0 = pl.multiple_of(idx * C, C)
    return c0, jnp.minimum(jnp.maximum(n_valid - c0, 0), C).astype(jnp.int32)


def _segment_args(bound_ref, local_rows, c0, reverse):
    bound_Cx1 = bound_ref[local_rows][:, None]
    return dict(c0=c0, end_Cx1=bound_Cx1) if reverse else dict(c0=c0, start_Cx1=bound_Cx1)


def _states_kernel(decay_ref, k_ref, v_ref, s0_ref, *refs, n_valid, num_blocks, C, per_block, reverse, segmented):
    bound_ref, h_ref, sf_ref = refs if segmented else (None, *refs)
    lam = decay_ref[0]

    def block_body(b, state):
        blk = (num_blocks - 1 - b) if reverse else b
        h_ref[blk] = state  # the state entering this block, in the sweep's direction
        for s in range(per_block):
            idx = blk * per_block + ((per_block - 1 - s) if reverse else s)
            c0, m = _sub_chunk(idx, C, n_valid)
            rows = pl.ds(c0, C)
            seg = _segment_args(bound_ref, rows, c0, reverse) if segmented else {}
            _, _, k_scale, gamma = kernel_common.chunk_decays(lam, m, C, reverse=reverse, scores=False, **seg)
            state = kernel_common.state_update(k_ref[rows, :], v_ref[rows, :], state, k_scale, gamma)
        return state

    sf_ref[...] = lax.fori_loop(0, num_blocks, block_body, s0_ref[...].astype(jnp.float32))


def _outputs_kernel(decay_ref, q_ref, k_ref, v_ref, h_ref, *refs, n_valid, C, per_block, reverse, segmented,
                    transpose_state):
    bound_ref, o_ref = refs if segmented else (None, *refs)
    lam = decay_ref[0]
    blk = pl.program_id(1)
    state = h_ref[...].astype(jnp.float32)
    state = state.T if transpose_state else state
    for s in range(per_block):
        local = (per_block - 1 - s) if reverse else s
        c0, m = _sub_chunk(blk * per_block + local, C, n_valid)
        rows = pl.ds(local * C, C)  # this block's rows
        seg = _segment_args(bound_ref, rows, c0, reverse) if segmented else {}
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        d, q_scale, k_scale, gamma = kernel_common.chunk_decays(lam, m, C, reverse=reverse, **seg)
        o_ref[rows, :] = kernel_common.chunk_output(q, k, v, state, d, q_scale).astype(o_ref.dtype)
        if s + 1 < per_block:
            state = kernel_common.state_update(k, v, state, k_scale, gamma)


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _states(k3, v3, lam_rows, s0, bound, *, H, n_valid, C, per_block, reverse, interpret):
    """k3 [B, Np, H*Kp], v3 [B, Np, H*Vp], s0 [B, H, Kp, Vp] f32 -> (h [B, H, blocks, Kp, Vp] f32, s_final)."""
    B, Np, _ = k3.shape
    Kp, Vp = s0.shape[-2:]
    TK, TV = min(Kp, STATE_TILE), min(Vp, STATE_TILE)
    nk, nv = Kp // TK, Vp // TV
    nb = Np // (C * per_block)
    segmented = bound is not None
    extra_specs = [pl.BlockSpec((None, Np), lambda bh, kt, vt: (_rows(bh, H)[0], 0))] if segmented else []
    kernel = functools.partial(_states_kernel, n_valid=n_valid, num_blocks=nb, C=C, per_block=per_block,
                               reverse=reverse, segmented=segmented)
    state_map = lambda bh, kt, vt: (*_rows(bh, H), kt, vt)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(B * H, nk, nv),
        in_specs=[
            pl.BlockSpec((1,), lambda bh, kt, vt: (bh,)),
            pl.BlockSpec((None, Np, TK), lambda bh, kt, vt: (_rows(bh, H)[0], 0, _rows(bh, H)[1] * nk + kt)),
            pl.BlockSpec((None, Np, TV), lambda bh, kt, vt: (_rows(bh, H)[0], 0, _rows(bh, H)[1] * nv + vt)),
            pl.BlockSpec((None, None, TK, TV), state_map),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, nb, TK, TV), lambda bh, kt, vt: (*_rows(bh, H), 0, kt, vt)),
            pl.BlockSpec((None, None, TK, TV), state_map),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, H, nb, Kp, Vp), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
    )(lam_rows, k3, v3, s0, *([bound] if segmented else []))


def _outputs(q3, k3, v3, lam_rows, h, bound, *, H, n_valid, C, per_block, reverse, transpose_state, interpret):
    """o3 [B, Np, H*Vp] in v3's dtype from the block-entering states h ([B, H, blocks, Kp, Vp], or the transposed
    layout [B, H, blocks, Vp, Kp] read as its transpose when transpose_state)."""
    B, Np, _ = q3.shape
    Kp = q3.shape[-1] // H
    Vp = v3.shape[-1] // H
    TV = min(Vp, VALUE_TILE)
    nv = Vp // TV
    Cb = C * per_block
    nb = Np // Cb
    segmented = bound is not None
    if transpose_state:
        h_spec = pl.BlockSpec((None, None, None, TV, Kp), lambda bh, blk, vt: (*_rows(bh, H), blk, vt, 0))
    else:
        h_spec = pl.BlockSpec((None, None, None, Kp, TV), lambda bh, blk, vt: (*_rows(bh, H), blk, 0, vt))
    extra_specs = [pl.BlockSpec((None, Cb), lambda bh, blk, vt: (_rows(bh, H)[0], blk))] if segmented else []
    qk_spec = pl.BlockSpec((None, Cb, Kp), lambda bh, blk, vt: (_rows(bh, H)[0], blk, _rows(bh, H)[1]))
    v_spec = pl.BlockSpec((None, Cb, TV), lambda bh, blk, vt: (_rows(bh, H)[0], blk, _rows(bh, H)[1] * nv + vt))
    kernel = functools.partial(_outputs_kernel, n_valid=n_valid, C=C, per_block=per_block, reverse=reverse,
                               segmented=segmented, transpose_state=transpose_state)
    return pl.pallas_call(
        kernel,
        grid=(B * H, nb, nv),
        in_specs=[pl.BlockSpec((1,), lambda bh, blk, vt: (bh,)), qk_spec, qk_spec, v_spec, h_spec, *extra_specs],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct((B, Np, H * Vp), v3.dtype),
        compiler_params=_params(),
        interpret=interpret,
    )(lam_rows, q3, k3, v3, h, *([bound] if segmented else []))


@functools.lru_cache(maxsize=None)
def _differentiable(chunk, block, interpret):
    """The custom VJP over unpadded [B, N, H, D] arrays (see the module docstring for the backward)."""

    def prepare(q, k, v, decay, bounds):
        B, N, H, K = q.shape
        V = v.shape[-1]
        C, per_block, Np, Kp, Vp = _layout(N, K, V, chunk, block)
        lam_rows = jnp.tile(jnp.asarray(decay, jnp.float32), B)
        padded = None if bounds is None else kernel_common.pad_bounds(*bounds, Np)
        common = dict(H=H, n_valid=N, C=C, per_block=per_block, interpret=interpret)
        return (B, N, H, K, V, Np, Kp, Vp), lam_rows, padded, common

    def pad_state(s, rows, cols):
        return jnp.pad(s.astype(jnp.float32), ((0, 0), (0, 0), (0, rows - s.shape[2]), (0, cols - s.shape[3])))

    def forward(q, k, v, decay, s0, bounds):
        (B, N, H, K, V, Np, Kp, Vp), lam_rows, padded, common = prepare(q, k, v, decay, bounds)
        q3, k3 = _pad3(q, Np, Kp), _pad3(k, Np, Kp)
        v3 = _pad3(v, Np, Vp)
        start = None if padded is None else padded[0]
        h, sf = _states(k3, v3, lam_rows, pad_state(s0, Kp, Vp), start, reverse=False, **common)
        o3 = _outputs(q3, k3, v3, lam_rows, h, start, reverse=False, transpose_state=False, **common)
        return o3.reshape(B, Np, H, Vp)[:, :N, :, :V], sf[:, :, :K, :V]

    @jax.custom_vjp
    def attention(q, k, v, decay, s0, bounds):
        return forward(q, k, v, decay, s0, bounds)

    def fwd(q, k, v, decay, s0, bounds):
        return forward(q, k, v, decay, s0, bounds), (q, k, v, decay, s0, bounds)

    def bwd(res, cts):
        q, k, v, decay, s0, bounds = res
        do, dsf = cts
        (B, N, H, K, V, Np, Kp, Vp), lam_rows, padded, common = prepare(q, k, v, decay, bounds)
        start, end = (None, None) if padded is None else padded
        q3, k3 = _pad3(q, Np, Kp), _pad3(k, Np, Kp)
        v3, do3 = _pad3(v, Np, Vp), _pad3(do.astype(v.dtype), Np, Vp)
        h, _ = _states(k3, v3, lam_rows, pad_state(s0, Kp, Vp), start, reverse=False, **common)
        dh, ds0 = _states(q3, do3, lam_rows, pad_state(dsf, Kp, Vp), end, reverse=True, **common)
        dq3 = _outputs(do3, v3, k3, lam_rows, h, start, reverse=False, transpose_state=True, **common)
        dv3 = _outputs(k3, q3, do3, lam_rows, dh, end, reverse=True, transpose_state=False, **common)
        dk3 = _outputs(v3, do3, q3, lam_rows, dh, end, reverse=True, transpose_state=True, **common)
        unpad = lambda x3, D: x3.reshape(B, Np, H, -1)[:, :N, :, :D]  # noqa: E731
        no_bounds = None if bounds is None else tuple(np.zeros(b.shape, jax.dtypes.float0) for b in bounds)
        return (unpad(dq3, K).astype(q.dtype), unpad(dk3, K).astype(k.dtype), unpad(dv3, V),
                jnp.zeros_like(decay), ds0[:, :, :K, :V].astype(s0.dtype), no_bounds)

    attention.defvjp(fwd, bwd)
    return attention


def lightning_attention_gpu_parallel(q, k, v, decay, initial_state=None, segment_ids=None, *, block_size=256,
                                     chunk=MAX_CHUNK, interpret=False):
    """Returns (o [B, N, H, V] in v's dtype, final_state [B, H, K, V] float32); differentiable in q, k, v, state.
    block_size: tokens per block (one stored state each, one program per block and value tile); chunk: the
    sub-chunk (power of two in [16, 64]). segment_ids [B, N]: the state resets at each segment start."""
    B, _, H, K = q.shape
    s0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None else initial_state
    bounds = None if segment_ids is None else kernel_common.segment_bounds(segment_ids)
    return _differentiable(int(chunk), int(block_size), interpret)(q, k, v, jnp.asarray(decay, jnp.float32), s0,
                                                                   bounds)
