"""MiniMaxM1: embed -> scanned decoder groups -> final RMSNorm -> (float32) LM head; count_params."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m1_jax.config import LIGHTNING, ModelConfig
from m1_jax.layers.decoder import DecoderGroup
from m1_jax.layers.moe import aux_loss_from_stats
from m1_jax.layers.norms import rms_norm
from m1_jax.layers.partitioning import param
from m1_jax.layers.rope import rope_cos_sin
from m1_jax.layers.softmax_attention import KVCache

def check_tokens(cfg: ModelConfig, tokens) -> None:
    """Host-side check that token ids are integers inside [0, vocab_size)."""
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); found {bad.size} outside, "
                         f"e.g. {bad.ravel()[:5].tolist()}")


class MiniMaxM1(nn.Module):
    """`logits, aux = model.apply({"params": params}, tokens_BxL)`.

    logits are float32 [B, L, V]; aux["moe_aux_loss"] is the Switch load-balancing loss over all layers
    (multiply by cfg.router_aux_loss_coef), aux["expert_counts"] [num_layers, E] the top-k assignments.
    segment_ids (packing; 0 = padding) keep documents apart; positions default to 0..L-1.
    With `cache` (from `init_cache`), L > 1 prefills an empty cache and L == 1 decodes one token;
    aux["cache"] is the updated cache.
    `return_hidden=True` returns the final-normed hidden states [B, L, D] (compute dtype) instead of the
    logits; `lm_head_logits(cfg, h, lm_head_weight(cfg, params))` turns them into the same logits.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, cache=None,
                 return_hidden: bool = False):
        cfg = self.cfg
        # Every matmul of the model (and, through the custom VJPs that re-enter it, of its backward pass) runs
        # at cfg's precision: on GPU float32 means float32, not TF32.
        with jax.default_matmul_precision(cfg.default_matmul_precision):
            return self._forward(cfg, tokens_BxL, segment_ids_BxL, positions_BxL, cache, return_hidden)

    def _forward(self, cfg, tokens_BxL, segment_ids_BxL, positions_BxL, cache, return_hidden):
        if not isinstance(tokens_BxL, jax.core.Tracer):
            check_tokens(cfg, tokens_BxL)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        B, L = tokens_BxL.shape
        embed_VxD = param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), init, pdtype)
        x = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if positions_BxL is None:
            start = 0 if cache is None else _first(cache).index
            positions_BxL = jnp.broadcast_to(start + jnp.arange(L), (B, L))
        cos_sin = rope_cos_sin(positions_BxL, cfg.rotary_dim, cfg.rope_theta)

        scanned = nn.scan(
            DecoderGroup,
            variable_axes={"params": 0},
            split_rngs={"params": True, "jitter": True},
            in_axes=(0, 0, nn.broadcast, nn.broadcast),
            length=cfg.num_groups,
            unroll=min(cfg.impl.scan_unroll, cfg.num_groups),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="groups")
        zero_stats = (jnp.zeros(cfg.num_experts, jnp.float32), jnp.zeros(cfg.num_experts, jnp.float32),
                      jnp.zeros((), jnp.float32))
        (x, stats), (new_cache, counts_GxPxE) = scanned(
            (x, zero_stats), jnp.arange(cfg.num_groups), cache, segment_ids_BxL, cos_sin)

        w_norm = param(self, "final_norm", (cfg.hidden_size,), ("embed",), nn.initializers.ones, pdtype)
        h = rms_norm(x, w_norm, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            head_DxV = embed_VxD.T
        else:  # declared even with return_hidden, so any call creates the same params
            head_DxV = param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), init, pdtype)
        aux = {"moe_aux_loss": aux_loss_from_stats(*stats),
               "expert_counts": counts_GxPxE.reshape(cfg.num_layers, cfg.num_experts)}
        if cache is not None:
            aux["cache"] = new_cache
        if return_hidden:
            # The loss applies the head itself, chunk by chunk (m1_jax/train/loss.py), so that full
            # [B, L, V] float32 logits never exist.
            return h, aux
        logits = lm_head_logits(cfg, h, head_DxV)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits, aux


def lm_head_weight(cfg: ModelConfig, params):
    """The [D, V] LM head weight from the model's params (the embedding transposed when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def lm_head_logits(cfg: ModelConfig, h_BxLxD, head_DxV):
    """float32 logits of final hidden states; the one LM head matmul (the model and the chunked loss)."""
    with jax.default_matmul_precision(cfg.default_matmul_precision):
        return _lm_head_logits(cfg, h_BxLxD, head_DxV)


def _lm_head_logits(cfg: ModelConfig, h_BxLxD, head_DxV):
    if cfg.fp32_lm_head:
        # The matmul itself in float32 (casting bf16 logits afterwards does not fix the mismatch).
        return jnp.dot(h_BxLxD.astype(jnp.float32), head_DxV.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.dot(h_BxLxD, head_DxV.astype(h_BxLxD.dtype), preferred_element_type=jnp.float32)


def _first(cache):
    """The KV cache of the first softmax layer (all share the same index)."""
    for c in cache:
        if isinstance(c, KVCache):
            return KVCache(c.k, c.v, c.valid, c.index[0])
    raise ValueError("cache holds no softmax layer; pass positions explicitly")


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None):
    """Empty decode cache: per position j of a layer group, stacked over groups.

    Lightning layers: float32 state [G, B, H, Dk, Dv]. Softmax layers: KVCache with k/v [G, B, S, K, D].
    """
    G = cfg.num_groups
    kv_dtype = jnp.dtype(dtype or cfg.dtype)
    cache = []
    for kind in cfg.layer_types[:cfg.group_period]:
        if kind == LIGHTNING:
            cache.append(jnp.zeros((G, batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32))
        else:
            one = KVCache.empty(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
            cache.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (G,) + a.shape), one))
    return cache


def abstract_params(cfg: ModelConfig, *, boxed: bool = False):
    """Shapes and dtypes of the parameter tree, from an abstract init (no memory, no FLOPs)."""
    model = MiniMaxM1(cfg)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return variables["params"] if boxed else nn.unbox(variables)["params"]


def init_params(cfg: ModelConfig, rng):
    """Freshly initialised (unboxed) parameters."""
    model = MiniMaxM1(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(model.init)(rng, tokens))["params"]


def _is_routed_expert(path) -> bool:
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    return "moe" in names and names[-1] in ("w_gate", "w_up", "w_down")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "active"}: active counts top-k of the experts per layer and excludes embedding and LM head."""
    shapes = abstract_params(cfg)
    total, experts = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        n = int(np.prod(leaf.shape))
        total += n
        if _is_routed_expert(path):
            experts += n
    embed_and_head = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    inactive_experts = experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    return {"total": total, "active": total - embed_and_head - inactive_experts}
