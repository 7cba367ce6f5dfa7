"""Group-relative advantages (M1 Eq. 2, GRPO): A_i = (R_i - mean_group R) / (std_group R + eps).

Every response of a prompt shares the prompt's group; the advantage is the same for all its tokens.
A group whose rewards are all equal carries no signal and gets exactly 0 (never NaN, never eps noise).
"""

import jax.numpy as jnp

STD_CONVENTIONS = ("unbiased", "biased", "none")


def group_advantages(rewards, group_ids=None, *, std="unbiased", eps=1e-6):
    """Advantages shaped like `rewards`.

    rewards: [num_groups, G] (one row per prompt), or [B] together with group_ids [B] (any integer labels,
      groups may have different sizes).
    std: "unbiased" (ddof=1: verl, TRL, tunix), "biased" (ddof=0: jnp.std's default), or "none" (only
      subtract the mean, Dr. GRPO). At G=4 with rewards [1, 1, 0, 0] these give 0.866, 1.0 and 0.5.
    """
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std={std!r} is not one of {STD_CONVENTIONS}")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim == 2:
        if group_ids is not None:
            raise ValueError("rewards [num_groups, G] already name their groups by row; drop group_ids")
        num_groups, group_size = rewards.shape
        flat_ids = jnp.repeat(jnp.arange(num_groups), group_size)
        return group_advantages(rewards.reshape(-1), flat_ids, std=std, eps=eps).reshape(rewards.shape)
    if rewards.ndim != 1 or group_ids is None:
        raise ValueError(
            f"rewards must be [num_groups, G], or [B] with group_ids [B]; got shape {rewards.shape} and "
            f"group_ids={'None' if group_ids is None else jnp.shape(group_ids)}")
    group_ids = jnp.asarray(group_ids)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {group_ids.shape} must equal rewards shape {rewards.shape}")
    # A [B, B] membership matrix keeps this jit-friendly without a static number of groups.
    same_BxB = group_ids[:, None] == group_ids[None, :]
    same_f_BxB = same_BxB.astype(jnp.float32)
    count_B = jnp.sum(same_f_BxB, axis=-1)
    mean_B = (same_f_BxB @ rewards) / count_B
    centred_B = rewards - mean_B
    group_max_B = jnp.max(jnp.where(same_BxB, rewards[None, :], -jnp.inf), axis=-1)
    group_min_B = jnp.min(jnp.where(same_BxB, rewards[None, :], jnp.inf), axis=-1)
    # Test equality of rewards directly: rounding in the mean would leave tiny centred values that eps
    # alone does not turn into zeros.
    constant_B = group_max_B == group_min_B
    if std == "none":
        adv_B = centred_B
    else:
        ddof = 1.0 if std == "unbiased" else 0.0
        var_B = (same_f_BxB @ (centred_B**2)) / jnp.maximum(count_B - ddof, 1.0)
        adv_B = centred_B / (jnp.sqrt(var_B) + eps)
    return jnp.where(constant_B, 0.0, adv_B)
