"""Kernels under a mesh: each Pallas call runs per device inside shard_map (sharding.shard_map_by_logical_axes).

On 8 fake CPU devices in interpret mode the per-device lightning kernels and the per-device dropless MoE equal
the unsharded references and move no operand between devices; with libtpu installed, XLA:TPU compiles them for
a real v5p topology, where the same kernels called under plain GSPMD are refused.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1_jax import sharding
from m1_jax.layers.lightning import lightning_per_device
from m1_jax.layers.moe import moe_dropless, moe_per_device, route_top_k
from m1_jax.train import dry_run
from pallas_kernels.lightning_attention import lightning_attention, reference

B, N, H, K = 4, 32, 4, 16


def _lightning_inputs(seed):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, N, H, K)) * 0.5, jnp.float32) for _ in range(4))
    s0, dsf = (jnp.asarray(rng.standard_normal((B, H, K, K)) * 0.1, jnp.float32) for _ in range(2))
    return q, k, v, s0, do, dsf


DECAY = jnp.asarray([0.0, 0.1, 0.5, 2.0], jnp.float32)


def _lightning_loss(attend, q, k, v, s0, do, dsf):
    o, sf = attend(q, k, v, s0)
    return jnp.sum(o * do) + jnp.sum(sf * dsf)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "pallas_gpu_parallel"])
def test_lightning_kernel_per_device(impl):
    mesh = sharding.make_mesh("data=4,tensor=2")
    q, k, v, s0, do, dsf = _lightning_inputs(1)
    attend = functools.partial(lambda q, k, v, s0: lightning_per_device(q, k, v, DECAY, s0, impl=impl,
                                                                         block_size=16, interpret=True))
    grad = jax.jit(jax.value_and_grad(functools.partial(_lightning_loss, attend), argnums=(0, 1, 2, 3)))
    qkv, state = NamedSharding(mesh, P("data", None, "tensor")), NamedSharding(mesh, P("data", "tensor"))
    args = [jax.device_put(x, s) for x, s in zip((q, k, v, s0, do, dsf), (qkv, qkv, qkv, state, qkv, state))]
    with sharding.mesh_context(mesh):
        got = grad(*args)
        hlo = grad.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo  # q, k, v and the state stay on their devices
    ref = lambda q, k, v, s0: reference.lightning_attention_reference(q, k, v, DECAY, s0)  # noqa: E731
    want = jax.value_and_grad(functools.partial(_lightning_loss, ref), argnums=(0, 1, 2, 3))(q, k, v, s0, do, dsf)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def _moe_inputs(seed, T=64, D=16, F=24, E=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    weights, experts, _ = route_top_k(jnp.asarray(rng.standard_normal((T, E)), jnp.float32), 2)
    ws = tuple(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D)))
    return x, weights, experts, ws


@pytest.mark.parametrize("spec", ["data=8", "data=4,tensor=2"])
def test_dropless_moe_per_device(spec):
    """Per device on a batch-only mesh (no gather of the tokens); under GSPMD where a tensor axis would
    replicate the tokens. Equal to the unsharded MoE either way, gradients included."""
    mesh = sharding.make_mesh(spec)
    x, weights, experts, ws = _moe_inputs(2)
    loss = lambda fn, x, *ws: jnp.sum(fn(x, weights, experts, *ws) ** 2)  # noqa: E731
    want = jax.value_and_grad(functools.partial(loss, moe_dropless), argnums=(0, 1, 2, 3))(x, *ws)
    grad = jax.jit(jax.value_and_grad(functools.partial(loss, moe_per_device), argnums=(0, 1, 2, 3)))
    xs = jax.device_put(x, NamedSharding(mesh, P(sharding.batch_axes(mesh))))
    with sharding.mesh_context(mesh):
        got = grad(xs, *ws)
        hlo = grad.lower(xs, *ws).compile().as_text()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    if spec == "data=8":
        assert "all-gather" not in hlo  # every device sorts and multiplies its own tokens


# ---------------------------------------------------------------- real XLA:TPU compiles (libtpu)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e .[tpu] or requirements-parity.txt)")


@functools.cache
def _v5p_mesh():
    devices = dry_run.topology_devices("v5p:2x2x1")  # 4 chips, no TPU needed
    return jax.sharding.Mesh(np.asarray(devices).reshape(2, 2), ("data", "tensor"))


def _compile_for_tpu(fn, *shapes_and_specs):
    mesh = _v5p_mesh()
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for s, spec in shapes_and_specs]
    with sharding.mesh_context(mesh):
        lowered = jax.jit(fn).trace(*args).lower()
        return lowered.as_text(), lowered.compile()


@needs_libtpu
def test_lightning_kernel_compiles_for_tpu_per_device():
    qkv, state = ((8, 512, 4, 128), P("data", None, "tensor")), ((8, 4, 128, 128), P("data", "tensor"))
    decay = jnp.linspace(0.01, 1.0, 4)

    def loss(q, k, v, s0):
        o, sf = lightning_per_device(q, k, v, decay, s0.astype(jnp.float32), block_size=128)  # impl "auto"
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

    text, compiled = _compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2, 3)), qkv, qkv, qkv, state)
    assert text.count("tpu_custom_call") == 4  # forward, and the three sweeps of the backward
    assert compiled.cost_analysis() is not None

    def gspmd(q, k, v, s0):  # the kernel called directly: XLA cannot partition it
        return jnp.sum(lightning_attention(q, k, v, decay, initial_state=s0.astype(jnp.float32)).astype(jnp.float32))

    with pytest.raises(Exception, match="Mosaic kernels cannot be automatically partitioned"):
        _compile_for_tpu(gspmd, qkv, qkv, qkv, state)


@needs_libtpu
def test_dropless_moe_compiles_for_tpu_per_device():
    T, D, F, E = 1024, 256, 512, 4
    rng = np.random.default_rng(3)
    weights, experts, _ = route_top_k(jnp.asarray(rng.standard_normal((T, E)), jnp.float32), 2)

    def loss(x, wg, wu, wd):
        return jnp.sum(moe_per_device(x, weights, experts, wg, wu, wd).astype(jnp.float32) ** 2)

    mesh = jax.sharding.Mesh(_v5p_mesh().devices, ("data", "fsdp"))  # both axes split the tokens
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for s, spec in
            (((T, D), P(("data", "fsdp"))), ((E, D, F), P()), ((E, D, F), P()), ((E, F, D), P()))]
    with sharding.mesh_context(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower()
        lowered.compile()
    assert lowered.as_text().count("tpu_custom_call") >= 6  # megablox gmm / tgmm in the forward and backward
