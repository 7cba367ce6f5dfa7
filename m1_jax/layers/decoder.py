"""One decoder layer (post-norm residuals, MiniMax style) and the scanned group of layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1_jax.config import LIGHTNING, ModelConfig
from m1_jax.layers.lightning import LightningAttention
from m1_jax.layers.expert_parallel import ExpertParallelMoE
from m1_jax.layers.moe import MoE
from m1_jax.layers.norms import rms_norm
from m1_jax.layers.partitioning import param
from m1_jax.layers.softmax_attention import SoftmaxAttention


class DecoderLayer(nn.Module):
    """h = norm(x); x' = a*h + b*attn(h); h2 = norm(x'); y = a'*h2 + b'*moe(h2).

    The residual carried on is the *normed* tensor times alpha, as in the official postnorm code.
    """

    cfg: ModelConfig
    kind: str  # "lightning" | "softmax"

    @nn.compact
    def __call__(self, x_BxLxD, layer_idx, segment_ids_BxL, cos_sin, cache=None):
        cfg = self.cfg
        ones = nn.initializers.ones
        pdtype = jnp.dtype(cfg.param_dtype)
        w_in = param(self, "input_norm", (cfg.hidden_size,), ("embed",), ones, pdtype)
        w_post = param(self, "post_attention_norm", (cfg.hidden_size,), ("embed",), ones, pdtype)
        want_cache = cache is not None
        h = rms_norm(x_BxLxD, w_in, cfg.rms_norm_eps)
        if self.kind == LIGHTNING:
            slopes_H = jnp.asarray(cfg.head_slopes(), jnp.float32)
            decay_H = slopes_H * cfg.layer_decay_factor(jnp.asarray(layer_idx, jnp.float32))
            attn, new_cache = LightningAttention(cfg, name="attn")(h, decay_H, segment_ids_BxL, cache, want_cache)
            alpha, beta = cfg.lightning_alpha, cfg.lightning_beta
        else:
            attn, new_cache = SoftmaxAttention(cfg, name="attn")(h, cos_sin, segment_ids_BxL, cache)
            alpha, beta = cfg.softmax_alpha, cfg.softmax_beta
        x = alpha * h + beta * attn.astype(h.dtype)
        h2 = rms_norm(x, w_post, cfg.rms_norm_eps)
        token_mask = None if segment_ids_BxL is None else segment_ids_BxL != 0
        if cfg.impl.moe_impl == "expert_parallel":  # mesh from context (jax.set_mesh), batch over its batch axes
            moe = ExpertParallelMoE(cfg, name="moe")
        else:
            moe = MoE(cfg, name="moe")
        moe_out, stats = moe(h2, token_mask)
        y = cfg.mlp_alpha * h2 + cfg.mlp_beta * moe_out.astype(h2.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        return y, stats, new_cache


_REMAT_POLICIES = {
    "full": None,  # save only each layer's input; recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderGroup(nn.Module):
    """cfg.group_period consecutive layers (7 lightning + 1 softmax for M1); the model scans over groups."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, group_idx, cache_group, segment_ids_BxL, cos_sin):
        x, (counts_E, prob_sum_E, num_tokens) = carry
        p = self.cfg.group_period
        layer_cls = DecoderLayer
        if self.cfg.impl.remat_policy != "none":
            # Per layer, not per group: remat of a whole 8-layer group would hold all 8 layers'
            # activations at once while recomputing it.
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=_REMAT_POLICIES[self.cfg.impl.remat_policy])
        new_caches, layer_counts = [], []
        for j, kind in enumerate(self.cfg.layer_types[:p]):
            layer_cache = None if cache_group is None else cache_group[j]
            x, (c_E, ps_E, n), new_cache = layer_cls(self.cfg, kind, name=f"layer_{j}")(
                x, group_idx * p + j, segment_ids_BxL, cos_sin, layer_cache)
            counts_E, prob_sum_E, num_tokens = counts_E + c_E, prob_sum_E + ps_E, num_tokens + n
            new_caches.append(new_cache)
            layer_counts.append(c_E)
        outputs = (None if cache_group is None else new_caches, jnp.stack(layer_counts))
        return (x, (counts_E, prob_sum_E, num_tokens)), outputs
