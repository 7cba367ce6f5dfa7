"""Mixture of experts: float32 top-k router, dropless SwiGLU experts, Switch-style load-balancing stats.

Dropless dispatch sorts the token copies by expert so each expert's rows are contiguous, then runs the three
SwiGLU matmuls as grouped matmuls (`pallas_kernels.grouped_matmul`, at the routed FLOPs on every platform; the
implementation is `ModelConfig.impl.moe_grouped_matmul`). No row is ever dropped.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax import sharding
from m1_jax.config import ModelConfig
from m1_jax.layers.partitioning import param
from pallas_kernels.grouped_matmul import grouped_matmul


def route_top_k(router_logits_TxE, k: int):
    """Softmax over experts in float32, top-k, renormalised (= a softmax over the top-k logits).

    Returns (weights_TxK float32, experts_TxK int32, probs_TxE float32).
    """
    probs_TxE = jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)
    top_p_TxK, experts_TxK = jax.lax.top_k(probs_TxE, k)
    weights_TxK = top_p_TxK / jnp.sum(top_p_TxK, axis=-1, keepdims=True)
    return weights_TxK, experts_TxK.astype(jnp.int32), probs_TxE


def load_balance_stats(probs_TxE, experts_TxK, mask_T=None):
    """Per-expert sums the Switch aux loss needs: (top-k assignment counts, router prob sums, #tokens)."""
    num_experts = probs_TxE.shape[-1]
    mask_T = jnp.ones(probs_TxE.shape[0], jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    onehot_TxKxE = jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32)
    counts_E = jnp.einsum("tke,t->e", onehot_TxKxE, mask_T)
    prob_sum_E = jnp.einsum("te,t->e", probs_TxE, mask_T)
    return counts_E, prob_sum_E, jnp.sum(mask_T)


def aux_loss_from_stats(counts_E, prob_sum_E, num_tokens):
    """E * sum_e f_e P_e with f_e = counts_e / N and P_e = prob_sum_e / N over all layers' tokens."""
    num_experts = counts_E.shape[-1]
    n = jnp.maximum(num_tokens, 1.0)
    return num_experts * jnp.sum((counts_E / n) * (prob_sum_E / n))


def route(x_TxD, w_router_DxE, k: int, *, jitter_TxD=None, mask_T=None):
    """The router of every MoE path: float32 logits (optionally jittered input), top-k, load-balance stats.

    Returns (weights_TxK, experts_TxK, (counts_E, prob_sum_E, num_tokens)).
    """
    router_in = x_TxD.astype(jnp.float32)
    if jitter_TxD is not None:
        router_in = router_in * jitter_TxD.astype(jnp.float32)
    logits_TxE = jnp.dot(router_in, w_router_DxE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    weights_TxK, experts_TxK, probs_TxE = route_top_k(logits_TxE, k)
    return weights_TxK, experts_TxK, load_balance_stats(probs_TxE, experts_TxK, mask_T)


def swiglu(x, w_gate, w_up, w_down):
    """w_down(silu(x w_gate) * (x w_up)) for one expert's rows (the definition; tests and references)."""
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return h @ w_down


def grouped_swiglu(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, impl: str = "auto"):
    """SwiGLU over expert-sorted rows: three grouped matmuls (rows past the groups give zero)."""
    gate = grouped_matmul(x_MxD, w_gate_ExDxF, group_sizes_E, impl=impl)
    up = grouped_matmul(x_MxD, w_up_ExDxF, group_sizes_E, impl=impl)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down_ExFxD, group_sizes_E, impl=impl)


def moe_dropless(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, impl: str = "auto"):
    """sum_k weights[t,k] * expert_{experts[t,k]}(x[t]), every token kept (no capacity, no drops).

    `impl` is the grouped matmul implementation (pallas_kernels.grouped_matmul.IMPLS).
    """
    T, D = x_TxD.shape
    E = w_gate_ExDxF.shape[0]
    k = experts_TxK.shape[1]
    flat_expert_M = experts_TxK.reshape(-1)
    order_M = jnp.argsort(flat_expert_M, stable=True)
    token_of_M = order_M // k
    group_sizes_E = jnp.bincount(flat_expert_M, length=E).astype(jnp.int32)
    y_sorted_MxD = grouped_swiglu(x_TxD[token_of_M], group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                  impl=impl)
    weight_M = weights_TxK.reshape(-1)[order_M].astype(jnp.float32)
    out_TxD = jnp.zeros((T, D), jnp.float32).at[token_of_M].add(y_sorted_MxD.astype(jnp.float32) * weight_M[:, None])
    return out_TxD.astype(x_TxD.dtype)


def moe_per_device(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, impl="auto"):
    """moe_dropless run per device when a mesh is set: each device sorts and multiplies its own tokens (the
    batch and context axes split the tokens; the experts' weights are gathered whole, as FSDP does for a dense layer). GSPMD
    could not split the global sort, nor partition the grouped matmul kernels. On a mesh with a model-parallel
    axis it runs under GSPMD (sharding.shard_map_by_logical_axes); use moe_impl="expert_parallel" there."""
    tok = ("tokens", None)  # batch x length flattened: split over the batch and context axes
    fn = sharding.shard_map_by_logical_axes(functools.partial(moe_dropless, impl=impl),
                                            (tok, tok, tok, None, None, None), tok, what="the dropless MoE")
    return fn(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def moe_params(module: nn.Module, cfg: ModelConfig):
    """Declares (router [D,E], w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]) on `module`: one layout for
    every MoE implementation, so checkpoints and shardings do not depend on which one runs."""
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_dim
    pdtype = jnp.dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.initializer_range)
    # The router stays float32 whatever param_dtype is (the official checkpoint stores it in fp32).
    w_router = param(module, "router", (D, E), ("embed", None), init, jnp.float32)
    w_gate = param(module, "w_gate", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdtype)
    w_up = param(module, "w_up", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdtype)
    w_down = param(module, "w_down", (E, F, D), ("experts", "expert_mlp", "embed"), init, pdtype)
    return w_router, w_gate, w_up, w_down


def router_jitter(module: nn.Module, cfg: ModelConfig, shape):
    """Multiplicative router-input noise in [1 - eps, 1 + eps] when cfg asks for it and a "jitter" rng is
    given, else None."""
    if cfg.router_jitter_noise > 0 and module.has_rng("jitter"):
        return jax.random.uniform(module.make_rng("jitter"), shape, jnp.float32, 1.0 - cfg.router_jitter_noise,
                                  1.0 + cfg.router_jitter_noise)
    return None


class MoE(nn.Module):
    """Router (float32 weights and math) + dropless SwiGLU experts; returns (y, load-balance stats)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxLxD, token_mask_BxL=None):
        cfg = self.cfg
        D = cfg.hidden_size
        dtype = jnp.dtype(cfg.dtype)
        w_router, w_gate, w_up, w_down = moe_params(self, cfg)
        B, L, _ = h_BxLxD.shape
        h_TxD = h_BxLxD.reshape(B * L, D)
        mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)
        weights_TxK, experts_TxK, stats = route(h_TxD, w_router, cfg.num_experts_per_tok,
                                                jitter_TxD=router_jitter(self, cfg, h_TxD.shape), mask_T=mask_T)
        y_TxD = moe_per_device(h_TxD.astype(dtype), weights_TxK, experts_TxK, w_gate.astype(dtype),
                               w_up.astype(dtype), w_down.astype(dtype), impl=cfg.impl.moe_grouped_matmul)
        return y_TxD.reshape(B, L, D), stats
