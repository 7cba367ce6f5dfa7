"""Parameters declared with logical axis names; sharding.py maps the names onto mesh axes."""

import flax.linen as nn


def param(module: nn.Module, name: str, shape, axes, init, dtype):
    """module.param with logical axis names (one per dimension) attached for sharding."""
    if len(axes) != len(shape):
        raise ValueError(f"param {name}: {len(axes)} axis names {axes} for shape {shape}")
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
