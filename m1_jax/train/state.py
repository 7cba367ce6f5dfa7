"""The train state: everything a resumed run needs besides the data-iterator position."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.model import abstract_params, init_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 []: number of steps taken (the next step's index)
    params: dict               # float32 master weights (cfg.param_dtype)
    opt_state: optax.OptState
    rng: jax.Array             # uint32 [2]: base key; step keys are fold_in(rng, step), so resume is exact
    bad_steps: jax.Array       # int32 []: steps whose loss or gradient was not finite (update skipped)
    first_bad_step: jax.Array  # int32 []: the first such step, -1 if none


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(cfg, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=train_rng, bad_steps=jnp.zeros((), jnp.int32),
                      first_bad_step=jnp.full((), -1, jnp.int32))


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (no memory)."""
    return jax.eval_shape(lambda: init_state(cfg, optimizer, 0))


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings for every state leaf: params by the logical rules, optimizer moments like their
    params, scalars replicated."""
    param_sh = sharding_lib.logical_shardings(abstract_params(cfg, boxed=True), mesh)
    rep = sharding_lib.replicated(mesh)
    shapes = abstract_state(cfg, optimizer)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, bad_steps=rep,
                      first_bad_step=rep)


def create_sharded_state(cfg: ModelConfig, optimizer, seed: int, mesh) -> TrainState:
    shardings = state_shardings(cfg, optimizer, mesh)
    return jax.jit(lambda: init_state(cfg, optimizer, seed), out_shardings=shardings)()
