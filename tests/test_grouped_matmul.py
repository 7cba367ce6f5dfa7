"""pallas_kernels/grouped_matmul: every implementation (the Pallas GPU and TPU kernels in interpret mode) against
float64 numpy loops over the groups, gradients included; the CPU bucketed path with each static capacity forced;
dispatch by the platform compiled for; routed FLOPs in XLA's cost analysis; bad input."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import api, bucketed, grouped_matmul
from lowering import lower_text

RNG = np.random.default_rng


def _groups(sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [(e, starts[e], starts[e + 1]) for e in range(len(sizes))]


def _float64_grouped(lhs, rhs, d, sizes):
    """out, d lhs and d rhs of the grouped matmul, group by group in float64 (rows past the groups: zero)."""
    out, d_lhs, d_rhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    for e, a, b in _groups(sizes):
        out[a:b], d_lhs[a:b], d_rhs[e] = lhs[a:b] @ rhs[e], d[a:b] @ rhs[e].T, lhs[a:b].T @ d[a:b]
    return out, d_lhs, d_rhs


def _check(fn, sizes, K, N, extra_rows=3, dtype=jnp.float32, tol=1e-4, seed=0):
    """fn(lhs, rhs, sizes) and its VJP on fresh normal draws (in `dtype`) against the float64 loops."""
    rng = RNG(seed + K + N)
    M = sum(sizes) + extra_rows
    lhs, rhs, d = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((M, K), (len(sizes), K, N), (M, N)))
    wants = _float64_grouped(*(np.asarray(a, np.float64) for a in (lhs, rhs, d)), sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
    for name, got, want in zip(("out", "d lhs", "d rhs"), (out,) + vjp(d), wants):
        assert got.dtype == dtype, name
        scale = max(1.0, float(np.abs(want).max()))
        err = float(np.abs(np.asarray(got, np.float64) - want).max())
        assert err <= tol * scale, f"{name}: max error {err} (scale {scale})"


# Empty groups (first, middle, last), single-row groups, rows past the last group, K and N that no tile divides.
CASES = [([5, 0, 17, 9, 0, 3], 24, 40), ([1, 1, 0, 30, 1], 7, 33), ([0, 0, 12], 130, 16)]


@pytest.mark.parametrize("impl", ["reference", "ragged_dot", "bucketed", "blas", "auto"])
@pytest.mark.parametrize("sizes,K,N", CASES)
def test_jax_impls_against_float64_loops(impl, sizes, K, N):
    _check(jax.jit(functools.partial(grouped_matmul, impl=impl)), sizes, K, N)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("sizes,K,N", CASES[:2])
def test_pallas_kernels_in_interpret_mode(impl, sizes, K, N):
    _check(jax.jit(functools.partial(grouped_matmul, impl=impl, interpret=True)), sizes, K, N)


@pytest.mark.parametrize("impl,block_shape", [("pallas_gpu", (16, 16, 16)), ("pallas_tpu", None)])
def test_pallas_kernels_bf16_with_many_tiles(impl, block_shape):
    """bf16 operands, float32 accumulation; on the GPU kernel, 16-row tiles so groups span several tiles."""
    fn = jax.jit(functools.partial(grouped_matmul, impl=impl, interpret=True, block_shape=block_shape))
    _check(fn, [37, 0, 20, 1, 6], 48, 40, extra_rows=5, dtype=jnp.bfloat16, tol=2e-2)


@pytest.mark.parametrize("crowded", [0, 40, 128])
def test_bucketed_every_capacity(crowded):
    """From even groups to every row in two groups, each static capacity forced in turn, so rows run in the
    batched slots only, in overflow tiles only (C = 0), and split between the two."""
    E, M = 8, 256
    sizes = np.full(E, M // E)
    if crowded:  # move `crowded` rows from the other groups into groups 0 and 1
        take = np.zeros(E, int)
        take[2:] = crowded // (E - 2)
        sizes = sizes - take
        sizes[0] += take.sum() // 2
        sizes[1] += take.sum() - take.sum() // 2
    capacities = bucketed.capacity_buckets(M, E)
    assert capacities == (0, 24, 32, 40)  # ratios 0, 0.75, 1, 1.125 and 1.25 (both 40 rounded up to 8) x 32
    for C in capacities:
        kw = dict(capacities=(C,), tile=8)
        fn = api.differentiable(functools.partial(bucketed.gmm, **kw), functools.partial(bucketed.tgmm, **kw))
        _check(jax.jit(fn), sizes.tolist(), 8, 16, extra_rows=0, seed=C + crowded)
    if crowded == 0:  # every group is 32 rows: C = 32 is no padding and no tiles
        assert capacities[int(bucketed._pick_capacity(jnp.asarray(sizes), capacities, 8))] == 32


def test_auto_picks_the_kernel_of_the_platform_compiled_for():
    lhs, rhs = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16), jax.ShapeDtypeStruct((4, 128, 256), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda a, b, g: jnp.sum(grouped_matmul(a, b, g).astype(jnp.float32)),
                                      argnums=(0, 1)))
    text = {p: lower_text(step, lhs, rhs, sizes, platform=p) for p in ("cuda", "tpu", "cpu")}
    # Forward, lhs gradient and rhs gradient: three kernels each, none of the other platform's.
    assert text["cuda"].count("__gpu$xla.gpu.triton") == 3 and "tpu_custom_call" not in text["cuda"]
    assert text["tpu"].count("tpu_custom_call") == 3 and "triton" not in text["tpu"]
    assert "triton" not in text["cpu"] and "tpu_custom_call" not in text["cpu"] and "ragged" not in text["cpu"]


def test_cpu_default_costs_the_routed_flops():
    """XLA's cost analysis of the CPU default (forward + backward) stays near 3 x 2 M K N, not E x that."""
    M, K, N, E = 512, 64, 128, 8
    rng = RNG(9)
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((E, K, N)), jnp.float32)
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)

    def flops(impl):
        fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(grouped_matmul(a, b, sizes, impl=impl)), argnums=(0, 1)))
        cost = fn.lower(lhs, rhs).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    routed = 3 * 2 * M * K * N
    assert flops("auto") <= 1.5 * routed
    assert flops("ragged_dot") >= 0.8 * E * routed  # what the CPU default avoids


def test_backward_runs_at_the_callers_precision():
    """The custom VJP's backward is traced outside the caller's precision block; it must re-enter it."""
    lhs, rhs = jnp.ones((16, 8)), jnp.ones((2, 8, 4))
    sizes = jnp.asarray([10, 6], jnp.int32)

    def loss(a, b):
        with jax.default_matmul_precision("highest"):
            return jnp.sum(grouped_matmul(a, b, sizes, impl="bucketed"))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(lhs, rhs).as_text()
    precisions = re.findall(r"precision = \[(\w+), \w+\]", text)
    assert precisions and set(precisions) == {"HIGHEST"}, precisions


@pytest.mark.parametrize("args,kwargs,match", [
    (((6, 4), (2, 4, 3), [3, 3]), dict(impl="cuda"), "unknown grouped matmul impl"),
    (((6, 5), (2, 4, 3), [3, 3]), {}, "shapes disagree"),
    (((6, 4), (3, 4, 3), [3, 3]), {}, "shapes disagree"),
    (((6, 4, 1), (2, 4, 3), [3, 3]), {}, "needs lhs"),
    (((6, 4), (2, 4, 3), [4, 3]), {}, "sum to at most the 6 rows"),
    (((6, 4), (2, 4, 3), [-1, 3]), {}, "must be >= 0"),
    (((6, 4), (2, 4, 3), [3, 3]), dict(impl="pallas_gpu"), "needs a gpu backend"),
    (((6, 4), (2, 4, 3), [3, 3]), dict(impl="pallas_tpu"), "needs a tpu backend"),
    (((6, 4), (2, 4, 3), [3, 3]), dict(block_shape=(16, 16, 16)), "block_shape is for the Pallas impls"),
])
def test_bad_arguments(args, kwargs, match):
    lhs_shape, rhs_shape, sizes = args
    with pytest.raises(ValueError, match=match):
        grouped_matmul(jnp.ones(lhs_shape), jnp.ones(rhs_shape), jnp.asarray(sizes, jnp.int32), **kwargs)


def test_bad_dtypes():
    lhs, rhs, sizes = jnp.ones((6, 4)), jnp.ones((2, 4, 3)), jnp.asarray([3, 3], jnp.int32)
    with pytest.raises(ValueError, match="share one floating dtype"):
        grouped_matmul(lhs.astype(jnp.bfloat16), rhs, sizes)
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        grouped_matmul(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="float32 only"):
        grouped_matmul(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), sizes, impl="blas")


def test_config_lists_the_same_impls():
    from m1_jax.config import GROUPED_MATMUL_IMPLS

    assert GROUPED_MATMUL_IMPLS == api.IMPLS
