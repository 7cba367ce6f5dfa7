"""The policy-gradient step: recompute log pi on response tokens, the chosen policy loss, one optimizer update.

A rollout of `prompts_per_step` groups is split into `mu` minibatches of whole groups; each minibatch is one
optimizer update (off-policy after the first: old_logp stays the rollout's behaviour log-probs). Inside a
minibatch, `micro_batches` slices are accumulated by `lax.scan`; every slice uses the divisors
(`loss_denominators`) of the whole minibatch, so the accumulated loss and gradient equal the un-split ones.

Diagnostics, all over response tokens: clip fraction, approx KL, entropy of the trainer's sampling
distribution, and the sampler/trainer probability correlation (Pearson of exp(behaviour logp) and
exp(trainer logp); M1 §3.2, Fig. 3), accumulated as exact sums across micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1_jax.config import ModelConfig
from m1_jax.generate import SamplingConfig, sampling_logprobs
from m1_jax.model import MiniMaxM1
from m1_jax.rl.advantages import group_advantages
from m1_jax.rl.losses import AGGREGATIONS, POLICY_LOSSES, loss_denominators
from m1_jax.rl.rollout import Rollout, sequence_layout
from m1_jax.train.state import TrainState

# The aggregation each paper uses (rl.md §1-2): M1 Eq. 4 per-group token mean, DAPO token mean over the
# batch, GRPO per-sequence mean.
DEFAULT_AGGREGATION = {"cispo": "token_mean_group", "dapo": "token_mean_batch", "grpo": "seq_mean_token_mean"}


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Static settings of the RL step and loop (hashable: closed over by jit)."""

    algo: str = "cispo"
    group_size: int = 8
    prompts_per_step: int = 32
    mu: int = 4                    # minibatches (= optimizer updates) per rollout
    micro_batches: int = 1         # gradient-accumulation slices per minibatch
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4
    max_prompt_len: int = 32       # fixed prompt width (tokens, BOS included)
    # Clip offsets from 1; None = the algorithm's default (cispo: high 4.0 / no low; dapo 0.2 / 0.28; grpo 0.2).
    eps_low: float | None = None
    eps_high: float | None = None
    aggregation: str | None = None  # None = DEFAULT_AGGREGATION[algo]
    kl_coef: float = 0.0           # GRPO's beta (k3 KL to the warm start); needs algo="grpo"
    adv_std: str = "unbiased"
    aux_loss_coef: float | None = None  # MoE load-balance loss; None = the model config's coefficient
    dynamic_sampling: bool = False
    dynamic_max_rounds: int = 8
    overlong_penalty: bool = False
    overlong_cache: int = 2        # DAPO's L_cache, in tokens; L_max = max_new_tokens
    overlong_filter: bool = False  # mask truncated (no EOS) responses out of the loss
    format_weight: float = 0.0

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"RL config: {msg}")
        if self.algo not in POLICY_LOSSES:
            bad(f"algo must be one of {sorted(POLICY_LOSSES)}, got {self.algo!r}")
        for name in ("group_size", "prompts_per_step", "mu", "micro_batches", "max_new_tokens", "max_prompt_len"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            bad(f"group_size={self.group_size}: group-relative advantages need >= 2 responses per prompt")
        if self.prompts_per_step % self.mu:
            bad(f"prompts_per_step={self.prompts_per_step} must be divisible by mu={self.mu} (minibatches hold whole "
                "groups)")
        rows = self.prompts_per_step // self.mu * self.group_size
        if rows % self.micro_batches:
            bad(f"a minibatch has {rows} responses, not divisible by micro_batches={self.micro_batches}")
        if not self.temperature > 0:
            bad(f"temperature must be > 0, got {self.temperature}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            bad(f"aggregation must be one of {AGGREGATIONS} or None, got {self.aggregation!r}")
        if self.kl_coef and self.algo != "grpo":
            bad(f"kl_coef={self.kl_coef} is only defined for algo='grpo' (CISPO and DAPO use no KL)")
        if self.overlong_penalty and not 0 < self.overlong_cache <= self.max_new_tokens:
            bad(f"overlong_cache={self.overlong_cache} must lie in [1, max_new_tokens={self.max_new_tokens}]")

    @property
    def agg(self) -> str:
        return self.aggregation or DEFAULT_AGGREGATION[self.algo]

    def loss_kwargs(self) -> dict[str, Any]:
        """Hyperparameters for POLICY_LOSSES[algo], defaults filled in."""
        if self.algo == "cispo":
            return {"eps_high": 4.0 if self.eps_high is None else self.eps_high, "eps_low": self.eps_low}
        if self.algo == "dapo":
            return {"eps_low": 0.2 if self.eps_low is None else self.eps_low,
                    "eps_high": 0.28 if self.eps_high is None else self.eps_high}
        if self.eps_low is not None and self.eps_high is not None and self.eps_low != self.eps_high:
            raise ValueError(f"GRPO's clip is symmetric; got eps_low={self.eps_low} != eps_high={self.eps_high}")
        eps = next((e for e in (self.eps_high, self.eps_low) if e is not None), 0.2)
        return {"eps": eps, "kl_coef": self.kl_coef}

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(float(self.temperature), int(self.top_k), float(self.top_p))


# ---------------------------------------------------------------------------------------------------------
# Log-probs of response tokens under the trainer.


def response_logits(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width: int):
    """Logits [B, N, V] predicting each of the N response slots, and the model's aux dict."""
    logits, aux = MiniMaxM1(cfg).apply({"params": params}, tokens_BxL[:, :-1], segment_ids_BxL=segment_ids_BxL[:, :-1],
                                       positions_BxL=positions_BxL[:, :-1])
    # Position t's logits predict token t + 1: slots P .. P+N-1 are predicted at P-1 .. P+N-2.
    return logits[:, prompt_width - 1:], aux


def response_logp(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width: int,
                  sampling: SamplingConfig):
    """(logp [B, N] of the response tokens under the sampling distribution, logp over vocab [B, N, V], aux)."""
    logits_BxNxV, aux = response_logits(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width)
    logp_BxNxV = sampling_logprobs(logits_BxNxV, sampling)
    targets_BxN = tokens_BxL[:, prompt_width:]
    logp_BxN = jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]
    return logp_BxN, logp_BxNxV, aux


def token_entropy(logp_BxNxV):
    """Entropy per position of the distribution given by log-probs (-inf entries contribute 0)."""
    p = jnp.exp(logp_BxNxV)
    return -jnp.sum(jnp.where(p > 0, p * logp_BxNxV, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Host side: rollout -> advantages -> minibatches.

MINIBATCH_KEYS = ("tokens", "segment_ids", "positions", "response_mask", "old_logp", "advantages", "group_ids",
                  "denominator", "ref_logp")


def minibatches(rollout: Rollout, rl: RLConfig, ref_logp_BxN=None) -> list[dict[str, np.ndarray]]:
    """Group advantages over the whole rollout, then `mu` minibatches of whole groups with their divisors."""
    num_groups = rollout.num_groups
    if num_groups % rl.mu:
        raise ValueError(f"rollout has {num_groups} groups, not divisible by mu={rl.mu}")
    adv = np.asarray(group_advantages(rollout.rewards, rollout.group_ids, std=rl.adv_std), np.float32)
    mask = rollout.response_mask
    if rl.overlong_filter:
        mask = mask * rollout.finished[:, None].astype(np.float32)
    seg, pos = sequence_layout(rollout.prompt_lengths, rollout.prompt_width, rollout.tokens.shape[1])
    ref = np.zeros_like(rollout.behaviour_logp) if ref_logp_BxN is None else np.asarray(ref_logp_BxN, np.float32)
    per = num_groups // rl.mu
    out = []
    for m in range(rl.mu):
        rows = np.flatnonzero((rollout.group_ids >= m * per) & (rollout.group_ids < (m + 1) * per))
        mb_mask = mask[rows]
        denom = np.asarray(loss_denominators(mb_mask, rl.agg, rollout.group_ids[rows]), np.float32)
        out.append({"tokens": rollout.tokens[rows], "segment_ids": seg[rows], "positions": pos[rows],
                    "response_mask": mb_mask, "old_logp": rollout.behaviour_logp[rows], "advantages": adv[rows],
                    "group_ids": rollout.group_ids[rows], "denominator": denom, "ref_logp": ref[rows]})
    return out


# ---------------------------------------------------------------------------------------------------------
# The jitted step.

_SUM_KEYS = ("loss", "aux_loss", "tokens", "clip", "approx_kl", "approx_kl_k3", "ratio", "entropy", "sx", "sy", "sxx",
             "syy", "sxy", "kl_ref", "token_mask")


def make_policy_loss(cfg: ModelConfig, rl: RLConfig, prompt_width: int):
    """loss(params, micro) -> (scalar for grad, dict of sums) for one micro-batch of a minibatch."""
    loss_fn = POLICY_LOSSES[rl.algo]
    kwargs = rl.loss_kwargs()
    aux_coef = cfg.router_aux_loss_coef if rl.aux_loss_coef is None else rl.aux_loss_coef
    sampling = rl.sampling
    use_ref = rl.kl_coef != 0.0

    def micro_loss(params, micro, num_micro):
        logp, logp_v, aux = response_logp(cfg, params, micro["tokens"], micro["segment_ids"], micro["positions"],
                                          prompt_width, sampling)
        mask = micro["response_mask"]
        extra = {"ref_logp": micro["ref_logp"]} if use_ref else {}
        loss, m = loss_fn(logp, micro["old_logp"], micro["advantages"], mask, aggregation=rl.agg,
                          denominator=micro["denominator"], **kwargs, **extra)
        total = loss + aux_coef * aux["moe_aux_loss"] / num_micro
        n = m["num_tokens"]
        x = jnp.exp(micro["old_logp"]) * mask
        y = jax.lax.stop_gradient(jnp.exp(logp)) * mask
        ent = jax.lax.stop_gradient(token_entropy(logp_v))
        sums = {"loss": loss, "aux_loss": aux["moe_aux_loss"] / num_micro, "tokens": n,
                "clip": m["clip_fraction"] * n, "approx_kl": m["approx_kl"] * n, "approx_kl_k3": m["approx_kl_k3"] * n,
                "ratio": m["ratio_mean"] * n, "entropy": jnp.sum(ent * mask), "sx": jnp.sum(x), "sy": jnp.sum(y),
                "sxx": jnp.sum(x * x), "syy": jnp.sum(y * y), "sxy": jnp.sum(x * y),
                "kl_ref": m.get("kl_ref", 0.0) * n, "token_mask": m.get("token_mask_fraction", 0.0) * n}
        return total, (sums, m["ratio_max"])

    return micro_loss


def pearson_from_sums(n, sx, sy, sxx, syy, sxy):
    cov = sxy - sx * sy / n
    var_x = sxx - sx * sx / n
    var_y = syy - sy * sy / n
    return cov / jnp.sqrt(jnp.maximum(var_x * var_y, 1e-30))


def _split_micro(x, num_micro: int):
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])


def make_grads_fn(cfg: ModelConfig, rl: RLConfig, prompt_width: int):
    """(params, minibatch) -> (grads summed over micro-batches, dict of metric sums, ratio_max); not jitted."""
    rl.validate()
    num_micro = int(rl.micro_batches)
    grad_fn = jax.grad(make_policy_loss(cfg, rl, prompt_width), has_aux=True)

    def grads_and_sums(params, minibatch):
        micros = {k: _split_micro(jnp.asarray(minibatch[k]), num_micro) for k in MINIBATCH_KEYS}

        def body(carry, micro):
            g_acc, s_acc, rmax = carry
            g, (sums, ratio_max) = grad_fn(params, micro, num_micro)
            return (jax.tree.map(jnp.add, g_acc, g), {k: s_acc[k] + sums[k] for k in _SUM_KEYS},
                    jnp.maximum(rmax, ratio_max)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS}, jnp.full((), -jnp.inf, jnp.float32))
        (grads, sums, ratio_max), _ = jax.lax.scan(body, init, micros)
        return grads, sums, ratio_max

    return grads_and_sums


def make_rl_step(cfg: ModelConfig, rl: RLConfig, optimizer: optax.GradientTransformation, prompt_width: int):
    """Jitted `state, metrics = step(state, minibatch)`: micro-batched policy gradient, one optimizer update.

    The state is donated. metrics hold device scalars (read them with jax.device_get).
    """
    grads_and_sums = make_grads_fn(cfg, rl, prompt_width)

    def step(state: TrainState, minibatch):
        grads, s, ratio_max = grads_and_sums(state.params, minibatch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        n = jnp.maximum(s["tokens"], 1.0)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(s["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite update is skipped (params and moments untouched) and counted in bad_steps.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
            bad_steps=state.bad_steps + (~finite).astype(jnp.int32),
            first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step))
        metrics = {"policy_loss": s["loss"], "aux_loss": s["aux_loss"], "grad_norm": grad_norm, "num_tokens": s["tokens"],
                   "clip_fraction": s["clip"] / n, "approx_kl": s["approx_kl"] / n, "approx_kl_k3": s["approx_kl_k3"] / n,
                   "ratio_mean": s["ratio"] / n, "ratio_max": ratio_max, "entropy": s["entropy"] / n,
                   "prob_corr": pearson_from_sums(n, s["sx"], s["sy"], s["sxx"], s["syy"], s["sxy"]),
                   "kl_ref": s["kl_ref"] / n, "token_mask_fraction": s["token_mask"] / n, "finite": finite}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_logp_fn(cfg: ModelConfig, rl: RLConfig, prompt_width: int):
    """Jitted (params, tokens, segment_ids, positions) -> trainer log-probs [B, N] (e.g. of a reference policy)."""
    sampling = rl.sampling

    @jax.jit
    def logp_fn(params, tokens, segment_ids, positions):
        return response_logp(cfg, params, tokens, segment_ids, positions, prompt_width, sampling)[0]

    return logp_fn
