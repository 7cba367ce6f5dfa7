"""Policy-gradient losses for RL on response tokens: CISPO (M1 §3.1), DAPO and GRPO.

Every loss has one interface,

    loss, metrics = loss_fn(logp_BxT, old_logp_BxT, adv_B, mask_BxT, **hyperparameters)

where logp is log pi_theta of the sampled tokens (the only input gradients flow through), old_logp the
log-probs of the policy that sampled them, adv the sequence-level advantage and mask 1 on response tokens.
The loss is for minimisation (objectives are negated).

Aggregation. Each loss reduces its per-token terms l_bt as  sum_b (sum_t l_bt m_bt) / d_b  with a
per-sequence divisor d_b:
  "token_mean_batch"     d_b = total response tokens in the batch            (DAPO)
  "token_mean_group"     d_b = tokens of b's group * number of groups        (M1 Eq. 4: per-prompt token
                                                                              mean, then mean over prompts)
  "seq_mean_token_mean"  d_b = |o_b| * number of sequences                   (GRPO)
Because the reduction is a plain sum over sequences, splitting a batch into micro-batches and summing their
losses is exact as long as every micro-batch uses the divisors of the full batch: compute them once with
`loss_denominators` and pass the matching slice as `denominator`.
"""

from typing import Callable

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean_group", "token_mean_batch", "seq_mean_token_mean")

# exp() of a log-ratio beyond this overflows or is meaningless; such tokens are pathological anyway.
_MAX_LOG_RATIO = 20.0


def _check_inputs(logp, old_logp, advantages, mask):
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T] (response tokens only), got shape {logp.shape}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} must have the same [B, T] "
            "shape; slice prompt tokens off and pad responses to one length")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = {logp.shape[:1]} (one per sequence), got {advantages.shape}; "
            "broadcast token-level advantages are not supported")


def _same_group_BxB(group_ids_B):
    return group_ids_B[:, None] == group_ids_B[None, :]


def loss_denominators(mask_BxT, aggregation, group_ids_B=None):
    """Per-sequence divisors d_B of the full batch; slice them alongside each micro-batch.

    Computed without knowing the number of groups statically (a [B, B] comparison), so it is jit-friendly.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    lengths_B = jnp.sum(jnp.asarray(mask_BxT, jnp.float32), axis=-1)
    num_seqs = lengths_B.shape[0]
    if aggregation == "token_mean_batch":
        return jnp.broadcast_to(jnp.sum(lengths_B), lengths_B.shape)
    if aggregation == "seq_mean_token_mean":
        return lengths_B * num_seqs
    if group_ids_B is None:
        raise ValueError(
            "aggregation='token_mean_group' (M1 Eq. 4) needs group_ids [B] naming each response's prompt, or "
            "a precomputed denominator; pass aggregation='token_mean_batch' to normalise over the whole batch")
    group_ids_B = jnp.asarray(group_ids_B)
    if group_ids_B.shape != lengths_B.shape:
        raise ValueError(f"group_ids must be [B] = {lengths_B.shape}, got {group_ids_B.shape}")
    same_BxB = _same_group_BxB(group_ids_B).astype(jnp.float32)
    group_tokens_B = same_BxB @ lengths_B
    num_groups = jnp.sum(1.0 / jnp.sum(same_BxB, axis=-1))  # each group's members add up to exactly 1
    return group_tokens_B * num_groups


def aggregate(per_token_BxT, mask_BxT, aggregation, group_ids_B=None, denominator=None):
    """sum_b (sum_t l_bt m_bt) / d_b; d_b from `denominator` (scalar or [B]) or from this batch."""
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    if denominator is None:
        denominator = loss_denominators(mask_BxT, aggregation, group_ids_B)
    elif aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    d_B = jnp.broadcast_to(jnp.asarray(denominator, jnp.float32), mask_BxT.shape[:1])
    # An empty sequence/group has a zero numerator; dividing it by 1 keeps the sum free of NaN.
    d_B = jnp.where(d_B > 0, d_B, 1.0)
    return jnp.sum(jnp.sum(per_token_BxT * mask_BxT, axis=-1) / d_B)


def log_ratio_and_ratio(logp_BxT, old_logp_BxT):
    """float32 log(pi/pi_old) (clamped to +-20) and its exp."""
    log_ratio = jnp.clip(
        logp_BxT.astype(jnp.float32) - old_logp_BxT.astype(jnp.float32), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return log_ratio, jnp.exp(log_ratio)


def k3_kl(logp_BxT, ref_logp_BxT):
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: pi_ref/pi - log(pi_ref/pi) - 1 >= 0."""
    log_ref_ratio = jnp.clip(
        ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0


def _masked_mean(x_BxT, mask_BxT):
    return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def _ratio_metrics(log_ratio_BxT, ratio_BxT, mask_BxT):
    """Diagnostics of how far the policy moved from the sampler; no gradient."""
    log_ratio_BxT = jax.lax.stop_gradient(log_ratio_BxT)
    ratio_BxT = jax.lax.stop_gradient(ratio_BxT)
    return {
        # k1 = E_old[log pi_old - log pi]; k3 = E_old[r - 1 - log r], both estimate KL(pi_old || pi).
        "approx_kl": _masked_mean(-log_ratio_BxT, mask_BxT),
        "approx_kl_k3": _masked_mean(ratio_BxT - 1.0 - log_ratio_BxT, mask_BxT),
        "ratio_mean": _masked_mean(ratio_BxT, mask_BxT),
        "ratio_max": jnp.max(jnp.where(mask_BxT > 0, ratio_BxT, -jnp.inf)),
        "num_tokens": jnp.sum(mask_BxT),
    }


def _ppo_zero_grad_BxT(ratio_BxT, adv_Bx1, eps_low, eps_high):
    """Eq. 7 complement: tokens where PPO-clip's min picks the constant clipped branch (no gradient)."""
    above = (adv_Bx1 > 0) & (ratio_BxT > 1.0 + eps_high) if eps_high is not None else False
    below = (adv_Bx1 < 0) & (ratio_BxT < 1.0 - eps_low) if eps_low is not None else False
    return jnp.logical_or(above, below)


def _check_eps(**eps):
    for name, value in eps.items():
        if value is not None and value < 0:
            raise ValueError(f"{name}={value} must be >= 0: epsilons are offsets from 1 (the cap is 1 + eps)")


def cispo_loss(logp, old_logp, advantages, mask, *, eps_high, eps_low=None, token_mask=False,
               mask_eps_high=None, mask_eps_low=None, aggregation="token_mean_group", group_ids=None,
               denominator=None):
    """CISPO, M1 Eq. 4-5: -sum sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi, no KL.

    eps_high / eps_low are offsets from 1 (slime/verl convention; TRL's absolute cap c is eps_high = c - 1).
    None disables that side of the clip; M1 uses no lower bound. token_mask=True multiplies by the Eq. 7
    mask M (0 where A > 0 and r > 1 + mask_eps_high, or A < 0 and r < 1 - mask_eps_low); its epsilons
    default to the IS-clip ones.
    """
    _check_inputs(logp, old_logp, advantages, mask)
    _check_eps(eps_high=eps_high, eps_low=eps_low, mask_eps_high=mask_eps_high, mask_eps_low=mask_eps_low)
    mask = jnp.asarray(mask, jnp.float32)
    logp32 = logp.astype(jnp.float32)
    adv_Bx1 = advantages.astype(jnp.float32)[:, None]
    log_ratio, ratio = log_ratio_and_ratio(logp, old_logp)
    lower = -jnp.inf if eps_low is None else 1.0 - eps_low
    upper = jnp.inf if eps_high is None else 1.0 + eps_high
    # The IS weight is a constant: the gradient is clip(r) * A * grad log pi, never through r itself.
    is_weight = jax.lax.stop_gradient(jnp.clip(ratio, lower, upper))
    per_token = -is_weight * adv_Bx1 * logp32
    metrics = _ratio_metrics(log_ratio, ratio, mask)
    clipped = jnp.logical_or(ratio > upper, ratio < lower).astype(jnp.float32)
    metrics["clip_fraction"] = _masked_mean(clipped, mask)
    # Capping the weight keeps every token's gradient; only the optional Eq. 7 mask zeroes some.
    metrics["zeroed_fraction"] = jnp.zeros((), jnp.float32)
    if token_mask:
        m_eps_high = eps_high if mask_eps_high is None else mask_eps_high
        m_eps_low = eps_low if mask_eps_low is None else mask_eps_low
        dropped = _ppo_zero_grad_BxT(jax.lax.stop_gradient(ratio), adv_Bx1, m_eps_low, m_eps_high)
        per_token = jnp.where(dropped, 0.0, per_token)
        metrics["token_mask_fraction"] = _masked_mean(dropped.astype(jnp.float32), mask)
        metrics["zeroed_fraction"] = metrics["token_mask_fraction"]
    loss = aggregate(per_token, mask, aggregation, group_ids, denominator)
    return loss, metrics


def _ppo_clip_per_token(logp, old_logp, advantages, mask, eps_low, eps_high):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, plus metrics."""
    _check_inputs(logp, old_logp, advantages, mask)
    _check_eps(eps_high=eps_high, eps_low=eps_low)
    mask = jnp.asarray(mask, jnp.float32)
    adv_Bx1 = advantages.astype(jnp.float32)[:, None]
    log_ratio, ratio = log_ratio_and_ratio(logp, old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv_Bx1, clipped_ratio * adv_Bx1)
    metrics = _ratio_metrics(log_ratio, ratio, mask)
    zero_grad = _ppo_zero_grad_BxT(jax.lax.stop_gradient(ratio), adv_Bx1, eps_low, eps_high)
    # For PPO-clip the clipped tokens are exactly those whose gradient the min zeroes.
    metrics["clip_fraction"] = metrics["zeroed_fraction"] = _masked_mean(zero_grad.astype(jnp.float32), mask)
    return per_token, mask, metrics


def dapo_loss(logp, old_logp, advantages, mask, *, eps_low=0.2, eps_high=0.28,
              aggregation="token_mean_batch", group_ids=None, denominator=None):
    """DAPO: PPO-clip with clip-higher (eps_low < eps_high), token-level mean, no KL."""
    per_token, mask, metrics = _ppo_clip_per_token(logp, old_logp, advantages, mask, eps_low, eps_high)
    return aggregate(per_token, mask, aggregation, group_ids, denominator), metrics


def grpo_loss(logp, old_logp, advantages, mask, *, eps=0.2, kl_coef=0.0, ref_logp=None,
              aggregation="seq_mean_token_mean", group_ids=None, denominator=None):
    """GRPO: PPO-clip with symmetric eps, mean over each sequence's tokens then over sequences, + beta*k3."""
    per_token, mask, metrics = _ppo_clip_per_token(logp, old_logp, advantages, mask, eps, eps)
    if kl_coef != 0.0:
        if ref_logp is None:
            raise ValueError(f"kl_coef={kl_coef} needs ref_logp [B, T] from the reference policy; "
                             "pass ref_logp or set kl_coef=0.0")
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp shape {ref_logp.shape} must equal logp shape {logp.shape}")
        kl_BxT = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl_BxT
        metrics["kl_ref"] = _masked_mean(jax.lax.stop_gradient(kl_BxT), mask)
    return aggregate(per_token, mask, aggregation, group_ids, denominator), metrics


POLICY_LOSSES: dict[str, Callable] = {"cispo": cispo_loss, "dapo": dapo_loss, "grpo": grpo_loss}
