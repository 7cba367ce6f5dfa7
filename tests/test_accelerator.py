"""The Pallas kernels compiled for real (not interpreted) on a GPU or TPU, against float64 numpy loops and the
lightning reference; and the tiny model's float32 numerics there. Skipped on CPU (CI): experiments/gpu_check.sh
runs them on a lent accelerator (run as `pytest tests/test_accelerator.py` with the accelerator visible)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_grouped_matmul import _check
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.lightning_attention import lightning_attention, reference

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="compiled Pallas kernels need a GPU or TPU (experiments/gpu_check.sh)")

KERNEL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())
LIGHTNING_KERNELS = {"gpu": ["pallas_gpu", "pallas_gpu_parallel"], "tpu": ["pallas_tpu"]}.get(jax.default_backend(), [])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("sizes,K,N", [([5, 0, 17, 9, 0, 3, 1, 200], 256, 384), ([0, 700, 1, 0], 128, 512),
                                       ([64] * 8, 2048, 1024)])
def test_grouped_matmul_kernel_compiled(dtype, tol, sizes, K, N):
    for impl in (KERNEL, "auto"):
        _check(jax.jit(functools.partial(grouped_matmul, impl=impl)), sizes, K, N, dtype=dtype, tol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("N", [64, 1000, 4096])
@pytest.mark.parametrize("impl", LIGHTNING_KERNELS)
def test_lightning_kernel_compiled(impl, dtype, tol, N):
    rng = np.random.default_rng(N)
    B, H, D = 2, 4, 128
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, N, H, D)) / np.sqrt(D), dtype) for _ in range(4))
    s0 = jnp.asarray(rng.standard_normal((B, H, D, D)) * 0.1, jnp.float32)
    decay = jnp.asarray([0.0, 0.01, 0.3, 2.0], jnp.float32)

    def run(fn):
        (o, sf), vjp = jax.vjp(fn, q, k, v, s0)
        return (o, sf) + vjp((do.astype(o.dtype), jnp.ones_like(sf)))

    got = jax.jit(lambda: run(lambda q, k, v, s: lightning_attention(
        q, k, v, decay, impl=impl, initial_state=s, return_final_state=True,
        block_size=64 if impl == "pallas_gpu" else 256)))()
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # the reference in true float32 (not TF32) on GPU
        want = jax.jit(lambda: run(lambda q, k, v, s: reference.lightning_attention_reference(
            f32(q), f32(k), f32(v), decay, s)))()
    for name, g, w in zip(("o", "state", "dq", "dk", "dv", "ds0"), got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.abs(g - w).max() / max(1.0, np.abs(w).max())
        assert err <= tol, f"{name}: relative error {err}"


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("L,S,q_offset", [(512, 2048, 1536), (1000, 1000, 0), (300, 1300, 1000)])
def test_offset_flash_kernel_compiled(dtype, tol, L, S, q_offset):
    """The context-parallel softmax kernel of this platform (Triton or Mosaic TPU) compiled, against float64 numpy
    (GQA 4:1, D 128)."""
    from test_softmax_attention import _offset_attention_float64, _offset_kernel
    rng = np.random.default_rng(L + S)
    B, H, K, D = 1, 8, 2, 128
    q, do = (jnp.asarray(rng.standard_normal((B, L, H, D)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), dtype) for _ in range(2))
    ids = np.ones((B, S), np.int32)
    for cut in rng.choice(np.arange(1, S), 6, replace=False):
        ids[:, cut:] += 1
    seg_k = jnp.asarray(ids)
    seg_q = seg_k[:, q_offset:q_offset + L]
    kernel = _offset_kernel(jax.default_backend())
    fn = lambda q, k, v: kernel(q, k, v, seg_q, seg_k, scale=D ** -0.5, q_offset=jnp.int32(q_offset))  # noqa: E731
    o, vjp = jax.vjp(jax.jit(fn), q, k, v)
    want_o, want_grads = _offset_attention_float64(q, k, v, seg_q, seg_k, q_offset, D ** -0.5, do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), (o,) + vjp(do), (want_o,) + want_grads):
        g = np.asarray(g, np.float64)
        err = np.abs(g - w).max() / max(1.0, np.abs(w).max())
        assert err <= tol, f"{name}: relative error {err}"
