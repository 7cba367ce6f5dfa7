"""Cross-entropy of the LM head over sequence chunks: only [B, chunk, V] logits are ever live.

At M1 scale a device's 8192 tokens times the 200064-entry vocabulary are 6.56 GB of float32 logits, and
autodiff of a plain `softmax_cross_entropy(model logits)` keeps several such buffers (logits, exp, the
softmax cotangent, the scatter-add of the label gather). Here the model returns its final hidden states
and the head matmul, log-sum-exp and label logit run per chunk of positions inside a `lax.scan`; a
custom VJP saves only the inputs and each token's log-sum-exp, and its backward scan recomputes one
chunk's logits at a time. The math is the same cross-entropy (log-sum-exp minus the label's logit,
float32, the same head matmul as the model, whose transposes come from jax.vjp); only the order of
evaluation changes.

Under a mesh (`jax.set_mesh`, as the train step sets) whose axes all split the batch, it runs per device
in a `shard_map`: the FSDP-sharded head is all-gathered once, each device sums its own head gradient over
the chunks, and that sum is reduce-scattered once. Left to GSPMD, the head-gradient accumulator of the
backward scan gets a sharding, so every chunk's partial sum is all-reduced inside the loop: one full
[D, V] float32 all-reduce per chunk (the fallback when the mesh has a non-batch axis such as tensor).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.model import lm_head_logits

DEFAULT_CHUNK_SIZE = 1024


def chunked_cross_entropy(cfg: ModelConfig, h_BxLxD, head_DxV, targets_BxL, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          with_argmax: bool = False):
    """Per-token float32 cross-entropy [B, L] of `lm_head_logits(cfg, h, head)` against integer targets.

    chunk_size: positions per chunk (clipped to L); L need not be a multiple (the tail chunk is padded
    and its padding dropped). with_argmax: also return the argmax token id per position [B, L] (eval;
    not differentiable). Targets outside [0, V) give log-sum-exp (a label logit of 0) rather than NaN;
    mask them out.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mesh = jax.sharding.get_abstract_mesh()
    plan = _shard_map_plan(mesh, h_BxLxD.shape, head_DxV.shape)
    if plan is None:
        return _chunked(cfg, h_BxLxD, head_DxV, targets_BxL, chunk_size, with_argmax, None, constrain=True)
    batch_axes, context_axes, head_spec = plan
    tok = P(batch_axes or None, context_axes or None)
    body = functools.partial(_chunked, cfg, chunk_size=chunk_size, with_argmax=with_argmax,
                             head_axes=_spec_axes(head_spec), constrain=False)
    # check_vma=False: every collective in the body is explicit (the head's all-gather and reduce-scatter),
    # and _shard_map_plan guarantees no mesh axis holds replicated work.
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, head_spec, tok), out_specs=(tok, tok) if with_argmax else tok,
                       check_vma=False)
    return fn(h_BxLxD, head_DxV, targets_BxL)


def _spec_axes(spec) -> tuple[tuple[str, ...], ...]:
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec)


def _shard_map_plan(mesh, h_shape, head_shape):
    """(batch axes, context axes, head PartitionSpec) when the loss can run per device, else None (GSPMD).

    Per device needs every mesh axis of size > 1 to split the tokens (the batch, or the length over a context
    axis): over any other axis (tensor) the devices would compute the same tokens, and gathering the head over
    it would sum their identical gradients. The head's own axes (its FSDP-sharded embed dim) must be among them.
    """
    if mesh is None or mesh.empty:
        return None
    batch_axes = tuple(sharding_lib.batch_axes(mesh))
    context_axes = tuple(sharding_lib.context_axes(mesh))
    token_axes = batch_axes + context_axes
    if not token_axes or any(size > 1 and name not in token_axes for name, size in mesh.shape.items()):
        return None
    head_spec = sharding_lib.param_spec(("embed", "vocab"), mesh)
    for axes, size in zip(_spec_axes(head_spec), head_shape):
        if not set(axes) <= set(token_axes) or size % math.prod(mesh.shape[a] for a in axes):
            return None
    for size, axes in ((h_shape[0], batch_axes), (h_shape[1], context_axes)):
        if size % math.prod(mesh.shape[a] for a in axes):
            return None
    return batch_axes, context_axes, head_spec


def _chunked(cfg: ModelConfig, h_BxLxD, head_in, targets_BxL, chunk_size: int, with_argmax: bool,
             head_axes: tuple[tuple[str, ...], ...] | None, *, constrain: bool):
    """The chunked loss on whatever arrays it is given: GSPMD's global ones (head_axes None), or one
    device's inside the shard_map, where head_in is this device's shard of the head and head_axes the
    mesh axes of each of its dims (all-gathered here; the gradient reduce-scattered back).

    constrain: pin the logits to the activation rules (GSPMD path; not allowed inside a shard_map).
    """
    B, L, D = h_BxLxD.shape
    C = min(int(chunk_size), L)
    N = -(-L // C)
    pad = N * C - L
    if pad:
        h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    # Chunks along the sequence, not the batch: the batch dim keeps its sharding over the batch axes.
    h_NxBxCxD = jnp.swapaxes(h_BxLxD.reshape(B, N, C, D), 0, 1)
    t_NxBxC = jnp.swapaxes(targets_BxL.reshape(B, N, C), 0, 1)
    unchunk = lambda y_NxBxC: jnp.swapaxes(y_NxBxC, 0, 1).reshape(B, N * C)[:, :L]  # noqa: E731

    def gather(w):
        for dim, axes in enumerate(head_axes or ()):
            if axes:
                w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
        return w

    def scatter(g):  # the transpose of gather
        for dim, axes in reversed(list(enumerate(head_axes or ()))):
            if axes:
                g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
        return g

    def logits_of(h_BxCxD, head_DxV):
        logits_BxCxV = lm_head_logits(cfg, h_BxCxD, head_DxV)
        if constrain:
            logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ("batch", "length", "vocab"))
        return logits_BxCxV

    def is_label(t_BxC, V):
        return jnp.arange(V, dtype=t_BxC.dtype) == t_BxC[..., None]

    def ce_of(logits_BxCxV, t_BxC):
        """(cross-entropy, log-sum-exp) of one chunk's logits, both [B, C]."""
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        # The label logit by a compare-and-select over the vocab, not a gather (whose gradient would be a
        # scatter-add into a zero [B, C, V]).
        label_BxC = jnp.sum(jnp.where(is_label(t_BxC, logits_BxCxV.shape[-1]), logits_BxCxV, 0.0), axis=-1)
        return lse_BxC - label_BxC, lse_BxC

    if with_argmax:
        head_DxV = gather(head_in)

        def eval_chunk(_, xs):
            h_BxCxD, t_BxC = xs
            logits_BxCxV = logits_of(h_BxCxD, head_DxV)
            argmax_BxC = jnp.argmax(logits_BxCxV, axis=-1).astype(jnp.int32)
            return None, (ce_of(logits_BxCxV, t_BxC)[0], argmax_BxC)

        _, (ce_NxBxC, argmax_NxBxC) = jax.lax.scan(eval_chunk, None, (h_NxBxCxD, t_NxBxC))
        return unchunk(ce_NxBxC), unchunk(argmax_NxBxC)

    def forward(h_NxBxCxD, head_in, t_NxBxC):
        head_DxV = gather(head_in)
        _, (ce_NxBxC, lse_NxBxC) = jax.lax.scan(lambda _, xs: (None, ce_of(logits_of(xs[0], head_DxV), xs[1])), None,
                                                (h_NxBxCxD, t_NxBxC))
        return ce_NxBxC, lse_NxBxC

    # A hand-written backward pass. The forward saves its inputs and each token's log-sum-exp; the backward
    # recomputes one chunk's logits at a time, d ce / d logits = softmax - onehot = exp(logits - lse) -
    # onehot, and takes the head matmul's transposes from jax.vjp (autodiff's own). It sums the head
    # gradient over the chunks on each device and reduce-scatters it inside the loop's last step: after
    # the loop it would be a free-standing collective that the scheduler may leave until the end of the
    # step, holding the [D, V] sum through the whole backward pass. The saved log-sum-exp also makes the
    # backward depend on the forward loop, so that loop (and the gathered head it shares with the
    # backward) cannot be deferred past the backward pass.
    @jax.custom_vjp
    def ce_fn(h_NxBxCxD, head_in, t_NxBxC):
        return forward(h_NxBxCxD, head_in, t_NxBxC)[0]

    def ce_fwd(h_NxBxCxD, head_in, t_NxBxC):
        ce_NxBxC, lse_NxBxC = forward(h_NxBxCxD, head_in, t_NxBxC)
        return ce_NxBxC, (h_NxBxCxD, head_in, t_NxBxC, lse_NxBxC)

    def ce_bwd(res, g_NxBxC):
        h_NxBxCxD, head_in, t_NxBxC, lse_NxBxC = res
        head_DxV = gather(head_in)

        def step(carry, xs):
            i, dhead_DxV, dhead_out = carry
            h_BxCxD, t_BxC, lse_BxC, g_BxC = xs
            logits_BxCxV, vjp = jax.vjp(logits_of, h_BxCxD, head_DxV)
            p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
            dlogits_BxCxV = g_BxC[..., None] * jnp.where(is_label(t_BxC, p_BxCxV.shape[-1]), p_BxCxV - 1.0, p_BxCxV)
            dh_BxCxD, dhead_c = vjp(dlogits_BxCxV)
            dhead_DxV = dhead_DxV + dhead_c
            if head_axes is not None:
                dhead_out = jax.lax.cond(i == N - 1, scatter, lambda _: dhead_out, dhead_DxV)
            return (i + 1, dhead_DxV, dhead_out), dh_BxCxD

        zeros = jnp.zeros(head_DxV.shape, head_DxV.dtype)
        out0 = jnp.zeros(head_in.shape, head_in.dtype) if head_axes is not None else None
        (_, dhead_DxV, dhead_out), dh_NxBxCxD = jax.lax.scan(step, (0, zeros, out0),
                                                             (h_NxBxCxD, t_NxBxC, lse_NxBxC, g_NxBxC))
        return dh_NxBxCxD, (dhead_DxV if head_axes is None else dhead_out), None

    ce_fn.defvjp(ce_fwd, ce_bwd)
    return unchunk(ce_fn(h_NxBxCxD, head_in, t_NxBxC))
