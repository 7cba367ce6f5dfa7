"""The CPU grouped-matmul custom call (m1_jax/layers/grouped_matmul_cpu) against float64 numpy loops."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.layers import grouped_matmul_cpu

RNG = np.random.default_rng


def _groups(sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [(e, starts[e], starts[e + 1]) for e in range(len(sizes))]


def _gmm64(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    for e, a, b in _groups(sizes):
        out[a:b] = lhs[a:b] @ rhs[e]
    return out


# Empty groups, rows left past the groups, one group holding every row; widths that split into uneven column blocks.
@pytest.mark.parametrize("sizes,K,N", [([5, 0, 17, 9, 0, 3], 24, 200), ([0, 0, 40], 7, 64), ([1, 2, 3], 130, 517),
                                       ([0, 0, 0], 8, 16)])
def test_gmm_and_its_gradients_against_float64_loops(sizes, K, N):
    rng = RNG(sum(sizes) + K + N)
    M = sum(sizes) + 4  # 4 rows past the last group: zero output, zero gradient
    lhs, rhs = rng.standard_normal((M, K)), rng.standard_normal((len(sizes), K, N))
    d_out = rng.standard_normal((M, N))  # a random cotangent
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out, vjp = jax.vjp(lambda a, b: grouped_matmul_cpu.gmm(a, b, jnp.asarray(sizes, jnp.int32)), f32(lhs), f32(rhs))
    np.testing.assert_allclose(np.asarray(out), _gmm64(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)

    d_lhs, d_rhs = vjp(f32(d_out))
    want_lhs, want_rhs = np.zeros_like(lhs), np.zeros_like(rhs)
    for e, a, b in _groups(sizes):
        want_lhs[a:b] = d_out[a:b] @ rhs[e].T
        want_rhs[e] = lhs[a:b].T @ d_out[a:b]
    np.testing.assert_allclose(np.asarray(d_lhs), want_lhs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d_rhs), want_rhs, rtol=1e-4, atol=1e-4)


def test_gmm_under_jit_with_traced_group_sizes():
    rng = RNG(7)
    lhs, rhs = rng.standard_normal((30, 16)).astype(np.float32), rng.standard_normal((4, 16, 96)).astype(np.float32)
    run = jax.jit(grouped_matmul_cpu.gmm)
    for sizes in ([10, 10, 5, 5], [0, 30, 0, 0], [3, 0, 0, 20]):  # one compiled program, group sizes as data
        np.testing.assert_allclose(np.asarray(run(lhs, rhs, jnp.asarray(sizes, jnp.int32))),
                                   _gmm64(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)


def test_gmm_rejects_bad_inputs():
    lhs, rhs = jnp.ones((6, 4)), jnp.ones((2, 4, 3))
    sizes = jnp.asarray([3, 3], jnp.int32)
    with pytest.raises(ValueError, match="float32 only"):
        grouped_matmul_cpu.gmm(lhs.astype(jnp.bfloat16), rhs, sizes)
    with pytest.raises(ValueError, match="shapes disagree"):
        grouped_matmul_cpu.gmm(jnp.ones((6, 5)), rhs, sizes)
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        grouped_matmul_cpu.gmm(lhs, rhs, sizes.astype(jnp.float32))
    # Group sizes are data: checked when the custom call runs, never read past the rows.
    with pytest.raises(Exception, match="sums past the number of lhs rows"):
        jax.block_until_ready(grouped_matmul_cpu.gmm(lhs, rhs, jnp.asarray([4, 3], jnp.int32)))
    with pytest.raises(Exception, match="negative entry"):
        jax.block_until_ready(grouped_matmul_cpu.gmm(lhs, rhs, jnp.asarray([-1, 3], jnp.int32)))


def test_numpy_keeps_its_blas_threads():
    """The custom call's OpenBLAS is a private copy set to one thread; numpy's own copy keeps its thread count."""
    script = """
import ctypes, glob, os, numpy as np
lib = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so"))[0]
threads = ctypes.CDLL(lib).scipy_openblas_get_num_threads64_
threads.restype = ctypes.c_int
before = threads()
from m1_jax.layers import grouped_matmul_cpu
assert grouped_matmul_cpu.available(), grouped_matmul_cpu.unavailable_reason()
print(before, threads())
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]


def test_moe_auto_dispatch_on_cpu():
    """float32 matmuls of at least BLAS_MIN_FLOPS take the custom call; small ones and other dtypes stay pure JAX."""
    from m1_jax.layers import moe

    assert moe.default_grouped_impl(jnp.float32, moe.BLAS_MIN_FLOPS) == "blas"
    assert moe.default_grouped_impl(jnp.float32, moe.BLAS_MIN_FLOPS - 1) == "bucketed"
    assert moe.default_grouped_impl(jnp.bfloat16, moe.BLAS_MIN_FLOPS) == "bucketed"

    def lowered(T, D, F, E=4, k=2):
        x, w = jnp.ones((T, D)), jnp.full((T, k), 0.5)
        experts = jnp.asarray(np.arange(T * k).reshape(T, k) % E, jnp.int32)
        weights = (jnp.ones((E, D, F)), jnp.ones((E, D, F)), jnp.ones((E, F, D)))
        return jax.jit(lambda x: moe.moe_dropless(x, w, experts, *weights)).lower(x).as_text()

    assert "m1_jax_gmm" in lowered(256, 256, 512)  # 2 * 512 * 256 * 512 = 2^27 FLOPs
    assert "m1_jax_gmm" not in lowered(64, 32, 64)


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
