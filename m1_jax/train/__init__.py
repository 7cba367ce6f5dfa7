"""Training: optimizer, train state, the jitted step, Orbax checkpoints, metrics and the loop."""

from m1_jax.train.checkpoint import CheckpointError, Checkpointer
from m1_jax.train.loop import build_setup, train
from m1_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from m1_jax.train.state import TrainState, create_sharded_state, init_state
from m1_jax.train.step import make_eval_step, make_train_step
