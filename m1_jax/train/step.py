"""The jitted train step (gradient accumulation by lax.scan over micro-batches) and the eval step.

Loss = sum over target tokens of cross-entropy / number of target tokens in the *whole* batch, plus
router_aux_loss_coef * mean over micro-batches of the MoE load-balancing loss. Dividing every
micro-batch by the whole batch's token count makes accumulated gradients equal the full-batch gradient.
The model returns its final hidden states and the LM head + cross-entropy run over `loss_chunk_size`
positions at a time (m1_jax/train/loss.py), so [B, L, V] float32 logits are never materialised.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.model import MiniMaxM1, lm_head_weight
from m1_jax.train.loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy
from m1_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def token_cross_entropy(logits_BxLxV, targets_BxL):
    """Per-token cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), targets_BxL)


def _forward_hidden(cfg: ModelConfig, params, batch, rng=None):
    """(final-normed hidden states [B, L, D], aux) of the model on a batch."""
    rngs = None if rng is None or cfg.router_jitter_noise == 0 else {"jitter": rng}
    return MiniMaxM1(cfg).apply({"params": params}, batch["tokens"], segment_ids_BxL=batch["segment_ids"],
                                positions_BxL=batch["positions"], rngs=rngs, return_hidden=True)


def split_micro_strided(x_BxL, accum: int):
    """[B, ...] -> [A, B/A, ...] taking rows a, a+A, ...: keeps each device's rows on that device."""
    B = x_BxL.shape[0]
    x = x_BxL.reshape((B // accum, accum) + x_BxL.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def accumulate_micro_batches(grad_fn, params, micros, num_micro: int, aux0, combine, constrain=lambda tree: tree):
    """(gradients summed over micro-batches, aux folded with `combine` from aux0): grad_fn(params, micro, i) ->
    (grads, aux) for each slice i of `micros` (arrays [num_micro, ...]). The float32 accumulators are pinned with
    `constrain` (e.g. sharded like the params). One micro-batch runs no scan and no zero accumulators: a loop of
    one costs a full extra pass over the gradients."""
    if num_micro == 1:
        grads, aux = grad_fn(params, jax.tree.map(lambda v: v[0], micros), jnp.zeros((), jnp.int32))
        return constrain(grads), combine(aux0, aux)

    def body(carry, xs):
        grads_acc, aux_acc = carry
        micro, i = xs
        grads, aux = grad_fn(params, micro, i)
        return (constrain(jax.tree.map(jnp.add, grads_acc, grads)), combine(aux_acc, aux)), None

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micros, jnp.arange(num_micro)))
    return grads, aux


def apply_if_finite(state: TrainState, optimizer: optax.GradientTransformation, grads, finite) -> TrainState:
    """One optimizer update; when `finite` is False none at all (params and moments untouched), counted in
    bad_steps. A cond, not a where: a where is one more pass over params, moments and updates."""
    def update(grads, params, opt_state):
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    params, opt_state = jax.lax.cond(finite, update, lambda g, p, o: (p, o), grads, state.params, state.opt_state)
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        bad_steps=state.bad_steps + (~finite).astype(jnp.int32),
        first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step))


mesh_context = sharding_lib.mesh_context  # re-exported: the train step and its tests enter it


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, schedule: Callable,
                    *, grad_accum_steps: int = 1, mesh=None, state_shardings=None,
                    loss_chunk_size: int = DEFAULT_CHUNK_SIZE):
    """`state, metrics = step(state, batch)`; jitted with the state donated. Batch arrays are [B, L].

    With mesh and state_shardings the jit gets explicit in/out shardings (state as given, batch split
    over the batch axes) and the gradient accumulators are kept sharded like the params (ZeRO-3), not
    left to propagation. `step.lower(state, batch)` lowers it (abstract ShapeDtypeStructs are fine).
    """
    accum = int(grad_accum_steps)
    coef = cfg.router_aux_loss_coef
    explicit = mesh is not None and state_shardings is not None

    def constrain_like_params(tree):
        if not explicit:
            return tree
        return jax.lax.with_sharding_constraint(tree, state_shardings.params)

    def micro_loss(params, micro, rng, total_tokens):
        h, aux = _forward_hidden(cfg, params, micro, rng)
        ce = chunked_cross_entropy(cfg, h, lm_head_weight(cfg, params), micro["targets"],
                                   chunk_size=loss_chunk_size)
        ce_sum = jnp.sum(ce * micro["loss_mask"])
        loss = ce_sum / total_tokens + coef * aux["moe_aux_loss"] / accum
        return loss, (ce_sum, aux["moe_aux_loss"], aux["expert_counts"])

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        micros = {k: split_micro_strided(batch[k], accum) for k in BATCH_KEYS}
        step_rng = jax.random.fold_in(state.rng, state.step)

        def micro_grads(params, micro, i):
            if mesh is not None:
                micro = {k: nn.with_logical_constraint(v, ("batch", "length")) for k, v in micro.items()}
            return grad_fn(params, micro, jax.random.fold_in(step_rng, i), total_tokens)

        aux0 = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.float32))
        grads, (ce_sum, aux_sum, counts) = accumulate_micro_batches(
            micro_grads, state.params, micros, accum, aux0, lambda a, b: jax.tree.map(jnp.add, a, b),
            constrain_like_params)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        ce_loss = ce_sum / total_tokens
        aux_loss = aux_sum / accum
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(ce_loss) & jnp.isfinite(aux_loss) & jnp.isfinite(grad_norm)
        new_state = apply_if_finite(state, optimizer, grads, finite)  # the host halts or carries on (flag)
        metrics = {"loss": ce_loss, "aux_loss": aux_loss, "total_loss": ce_loss + coef * aux_loss,
                   "grad_norm": grad_norm, "lr": schedule(state.step), "num_tokens": total_tokens,
                   "expert_counts": counts, "finite": finite}
        return new_state, metrics

    if explicit:
        rep = sharding_lib.replicated(mesh)
        jitted = jax.jit(step, donate_argnums=0,
                         in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                         out_shardings=(state_shardings, rep))
    else:
        jitted = jax.jit(step, donate_argnums=0,
                         out_shardings=None if state_shardings is None else (state_shardings, None))

    def run(state, batch):
        with mesh_context(mesh):
            return jitted(state, batch)

    def lower(state, batch):
        with mesh_context(mesh):
            return jitted.lower(state, batch)

    run.jitted = jitted
    run.lower = lower
    return run


def make_eval_step(cfg: ModelConfig, mesh=None, *, loss_chunk_size: int = DEFAULT_CHUNK_SIZE):
    """`ce_sum, num_tokens, argmax_correct = eval_step(params, batch)` (sums over loss_mask tokens)."""

    @jax.jit
    def step(params, batch):
        h, _ = _forward_hidden(cfg, params, batch)
        ce, argmax = chunked_cross_entropy(cfg, h, lm_head_weight(cfg, params), batch["targets"],
                                           chunk_size=loss_chunk_size, with_argmax=True)
        mask = batch["loss_mask"]
        correct = (argmax == batch["targets"]).astype(jnp.float32)
        return jnp.sum(ce * mask), jnp.sum(mask), correct * mask

    def run(params, batch):
        with mesh_context(mesh):
            return step(params, batch)

    return run
