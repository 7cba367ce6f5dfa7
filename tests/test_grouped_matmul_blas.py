"""The opt-in CPU grouped-matmul custom call (pallas_kernels/grouped_matmul/blas.py): its build, run-time checks
and threads (its numerics are in test_grouped_matmul.py with the other impls)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import blas, grouped_matmul

RNG = np.random.default_rng


def _gmm64(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for e in range(len(sizes)):
        out[starts[e]:starts[e + 1]] = lhs[starts[e]:starts[e + 1]] @ rhs[e]
    return out


def test_gmm_under_jit_with_traced_group_sizes():
    rng = RNG(7)
    lhs, rhs = rng.standard_normal((30, 16)).astype(np.float32), rng.standard_normal((4, 16, 96)).astype(np.float32)
    run = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, impl="blas"))
    for sizes in ([10, 10, 5, 5], [0, 30, 0, 0], [3, 0, 0, 20]):  # one compiled program, group sizes as data
        np.testing.assert_allclose(np.asarray(run(lhs, rhs, jnp.asarray(sizes, jnp.int32))),
                                   _gmm64(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)


def test_gmm_checks_group_sizes_when_it_runs():
    """Traced group sizes are data: the custom call checks them when it runs and never reads past the rows."""
    lhs, rhs = jnp.ones((6, 4)), jnp.ones((2, 4, 3))
    run = jax.jit(lambda g: blas.gmm(lhs, rhs, g))
    with pytest.raises(Exception, match="sums past the number of lhs rows"):
        jax.block_until_ready(run(jnp.asarray([4, 3], jnp.int32)))
    with pytest.raises(Exception, match="negative entry"):
        jax.block_until_ready(run(jnp.asarray([-1, 3], jnp.int32)))


def test_numpy_keeps_its_blas_threads():
    """The custom call's OpenBLAS is a private copy set to one thread; numpy's own copy keeps its thread count."""
    script = """
import ctypes, glob, os, numpy as np
lib = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so"))[0]
threads = ctypes.CDLL(lib).scipy_openblas_get_num_threads64_
threads.restype = ctypes.c_int
before = threads()
from pallas_kernels.grouped_matmul import blas
assert blas.available(), blas.unavailable_reason()
print(before, threads())
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]


def test_blas_is_opt_in():
    """auto on CPU is the pure-JAX path: no custom call unless impl='blas' asks for it."""
    from m1_jax.layers import moe

    T, D, F, E, k = 256, 256, 512, 4, 2
    x, w = jnp.ones((T, D)), jnp.full((T, k), 0.5)
    experts = jnp.asarray(np.arange(T * k).reshape(T, k) % E, jnp.int32)
    weights = (jnp.ones((E, D, F)), jnp.ones((E, D, F)), jnp.ones((E, F, D)))
    lowered = lambda impl: jax.jit(lambda x: moe.moe_dropless(x, w, experts, *weights, impl=impl)).lower(x).as_text()
    assert "m1_jax_gmm" not in lowered("auto")
    assert "m1_jax_gmm" in lowered("blas")


def test_moe_blas_with_batch_sharded_inputs():
    """Under GSPMD the custom call has no sharding rule: XLA gathers its operands, and the result must not change."""
    from jax.sharding import NamedSharding, PartitionSpec
    from m1_jax.layers import moe

    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = RNG(5)
    T, D, F, E = 64, 16, 32, 4
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * .3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    weights, experts, _ = moe.route_top_k(jnp.asarray(rng.standard_normal((T, E))), 2)
    loss = lambda x, w, e: jnp.sum(moe.moe_dropless(x, w, e, *ws, impl="blas") ** 2)
    want = jax.jit(jax.value_and_grad(loss))(x, weights, experts)
    sharded = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (x, weights, experts)]
    got = jax.jit(jax.value_and_grad(loss))(*sharded)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
