"""Rewards for RL: sandboxed code execution, answer format, verifiable tasks."""

from m1_jax.rl.rewards.sandbox import SandboxConfig, SandboxResult, run_python
from m1_jax.rl.rewards.scoring import code_reward, format_reward, task_reward
