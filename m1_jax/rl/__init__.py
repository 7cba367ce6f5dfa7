"""RL for m1-jax: policy losses (CISPO, DAPO, GRPO), advantages, sample filters and rewards."""

from m1_jax.rl.advantages import group_advantages
from m1_jax.rl.losses import POLICY_LOSSES, cispo_loss, dapo_loss, grpo_loss, loss_denominators
