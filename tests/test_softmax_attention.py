"""pallas_kernels/softmax_attention: the Pallas GPU (Triton mha) and TPU (splash) flash attention in interpret mode
against the full-softmax reference (GQA, segments, lengths no block divides, gradients), dispatch by the platform
compiled for, and the per-device wrapper under a mesh."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1_jax import sharding
from m1_jax.layers.softmax_attention import attention_per_device
from pallas_kernels.softmax_attention import softmax_attention
from lowering import lower_text


def _inputs(seed, B, L, H, K, D, dtype=jnp.float32, segments=True):
    rng = np.random.default_rng(seed)
    q, do = (jnp.asarray(rng.standard_normal((B, L, H, D)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, L, K, D)), dtype) for _ in range(2))
    seg = None
    if segments:  # documents of random lengths, a one-token one, and right padding (segment 0) on row 0
        ids = np.sort(rng.integers(2, 6, (B, L)), axis=1)
        ids[:, 0] = 1  # token 0 alone in document 1
        ids[0, -3:] = 0
        seg = jnp.asarray(ids, jnp.int32)
    return q, k, v, seg, do


def _outputs_and_grads(impl, q, k, v, seg, do, **kw):
    def f(q, k, v):
        return softmax_attention(q, k, v, seg, scale=q.shape[-1] ** -0.5, impl=impl, **kw)
    o, vjp = jax.vjp(f, q, k, v)
    return (o,) + vjp(do.astype(o.dtype))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu", "blockwise"])
@pytest.mark.parametrize("B,L,H,K,D,dtype,tol", [
    (2, 80, 4, 2, 16, jnp.float32, 1e-5),     # GQA 2:1, L not a multiple of any block, segments + padding
    (1, 64, 2, 2, 32, jnp.float32, 1e-5),     # MHA
    (2, 48, 8, 2, 16, jnp.bfloat16, 3e-2),    # GQA 4:1 in bf16
])
def test_kernels_match_reference(impl, B, L, H, K, D, dtype, tol):
    q, k, v, seg, do = _inputs(L + H, B, L, H, K, D, dtype)
    kw = dict(interpret=True) if impl.startswith("pallas") else dict(block_q=32, block_kv=16)
    got = jax.jit(functools.partial(_outputs_and_grads, impl, **kw))(q, k, v, seg, do)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _outputs_and_grads("reference", f32(q), f32(k), f32(v), seg, f32(do))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        assert _rel(g, w) <= tol, (name, _rel(g, w))
    unsegmented = _outputs_and_grads("reference", f32(q), f32(k), f32(v), None, f32(do))[0]
    assert _rel(unsegmented, want[0]) > 10 * tol  # the segments matter in this case


def test_auto_picks_the_kernel_of_the_platform_compiled_for():
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(softmax_attention(q, k, v, s, scale=0.1).astype(jnp.float32))  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = {p: lower_text(fn, q, kv, kv, seg, platform=p) for p in ("tpu", "cuda", "cpu")}
    assert "tpu_custom_call" in text["tpu"] and "triton" not in text["tpu"]
    assert "__gpu$xla.gpu.triton" in text["cuda"] and "tpu_custom_call" not in text["cuda"]
    assert "tpu_custom_call" not in text["cpu"] and "triton" not in text["cpu"]


def test_kernel_backward_runs_at_the_callers_precision():
    q, k, v, seg, do = _inputs(1, 1, 32, 2, 1, 16)

    def loss(q, k, v):
        with jax.default_matmul_precision("highest"):
            return jnp.sum(softmax_attention(q, k, v, seg, scale=0.25, impl="pallas_gpu", interpret=True) * do)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    precisions = re.findall(r"precision = \[(\w+), \w+\]", text)
    assert precisions and set(precisions) == {"HIGHEST"}, set(precisions)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_per_device_under_a_mesh(impl):
    """Batch over data, heads and kv heads over tensor: equal to the unsharded reference, nothing gathered."""
    mesh = sharding.make_mesh("data=4,tensor=2")
    q, k, v, seg, do = _inputs(2, 4, 40, 4, 2, 16)
    scale = 0.25
    attend = lambda q, k, v: attention_per_device(q, k, v, seg, scale=scale, impl=impl, interpret=True)  # noqa
    grad = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * do), argnums=(0, 1, 2)))
    heads = NamedSharding(mesh, P("data", None, "tensor"))
    args = [jax.device_put(x, heads) for x in (q, k, v)]
    with sharding.mesh_context(mesh):
        got = grad(*args)
        hlo = grad.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    want = jax.value_and_grad(lambda q, k, v: jnp.sum(softmax_attention(
        q, k, v, seg, scale=scale, impl="reference") * do), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    q, k, v, seg, _ = _inputs(3, 1, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown softmax attention impl"):
        softmax_attention(q, k, v, scale=1.0, impl="flash")
    with pytest.raises(ValueError, match="do not split into groups"):
        softmax_attention(q[:, :, :3], k, v, scale=1.0)
    with pytest.raises(ValueError, match="needs a tpu backend"):
        softmax_attention(q, k, v, scale=1.0, impl="pallas_tpu")
    with pytest.raises(ValueError, match="segment_ids must be"):
        softmax_attention(q, k, v, seg[:, :8], scale=1.0)


def _offset_attention_float64(q, k, v, seg_q, seg_k, q_offset, scale, do):
    """Numpy float64 causal GQA attention of queries at q_offset + i over keys 0 .. S-1: o and (dq, dk, dv)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, L, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    kk, vv = np.repeat(k, G, 2), np.repeat(v, G, 2)
    visible = ((np.arange(S)[None, :] <= q_offset + np.arange(L)[:, None])[None, None]
               & (np.asarray(seg_q)[:, None, :, None] == np.asarray(seg_k)[:, None, None, :]))
    s = np.where(visible, np.einsum("blhd,bshd->bhls", q, kk) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("blhd,bshd->bhls", do, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    grads = (np.einsum("bhls,bshd->blhd", ds, kk) * scale,
             np.einsum("bhls,blhd->bshd", ds, q).reshape(B, S, K, G, D).sum(3) * scale,
             np.einsum("bhls,blhd->bshd", p, do).reshape(B, S, K, G, D).sum(3))
    return np.einsum("bhls,bshd->blhd", p, vv), grads


def _offset_kernel(platform):
    from pallas_kernels.softmax_attention import flash_gpu, flash_tpu
    return {"gpu": flash_gpu.flash_attention_gpu, "tpu": flash_tpu.flash_attention_tpu}[platform]


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("B,L,S,H,K,D,q_offset,dtype,tol", [
    (2, 40, 120, 4, 2, 16, 80, jnp.float32, 1e-5),   # the last of three devices' chunks, GQA 2:1, padded blocks
    (1, 64, 64, 2, 2, 32, 0, jnp.float32, 1e-5),     # no offset, MHA: the plain causal layer
    (1, 16, 80, 2, 1, 16, 17, jnp.float32, 1e-5),    # an offset no block divides, MQA
    (1, 200, 600, 4, 2, 128, 400, jnp.float32, 1e-5),  # several query and key blocks (TPU tiles are 128)
    (2, 33, 99, 8, 2, 16, 66, jnp.bfloat16, 3e-2),   # GQA 4:1 in bf16
])
def test_offset_flash_kernel_matches_float64(platform, B, L, S, H, K, D, q_offset, dtype, tol):
    """Our Pallas flash kernels (the context-parallel local compute: Triton and Mosaic TPU) in interpret mode: a
    traced query offset, keys longer than the queries, separate query and key segment ids, forward and all
    three gradients."""
    rng = np.random.default_rng(L + S + q_offset)
    q, do = (jnp.asarray(rng.standard_normal((B, L, H, D)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), dtype) for _ in range(2))
    ids = np.ones((B, S), np.int32)
    for cut in rng.choice(np.arange(1, S), 4, replace=False):
        ids[:, cut:] += 1
    seg_k = jnp.asarray(ids)
    seg_q = seg_k[:, q_offset:q_offset + L]
    scale = D ** -0.5

    def f(q, k, v, offset):
        return _offset_kernel(platform)(q, k, v, seg_q, seg_k, scale=scale, q_offset=offset, interpret=True)

    o, vjp = jax.vjp(jax.jit(f), q, k, v, jnp.int32(q_offset))
    got = (o,) + vjp(do)[:3]
    want_o, want_grads = _offset_attention_float64(q, k, v, seg_q, seg_k, q_offset, scale, do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, (want_o,) + want_grads):
        assert g.dtype == dtype, name
        assert _rel(g, w) <= tol, (name, _rel(g, w))


def _offset_kernel_grad(platform):
    sds = jax.ShapeDtypeStruct

    def loss(q, k, v, offset):
        return jnp.sum(_offset_kernel(platform)(q, k, v, scale=0.1, q_offset=offset).astype(jnp.float32))

    args = (sds((1, 1000, 8, 128), jnp.bfloat16), sds((1, 4000, 2, 128), jnp.bfloat16),
            sds((1, 4000, 2, 128), jnp.bfloat16), sds((), jnp.int32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args


@pytest.mark.parametrize("platform,lowering,marker", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                      ("tpu", "tpu", "tpu_custom_call")])
def test_offset_flash_kernel_lowers(platform, lowering, marker):
    fn, args = _offset_kernel_grad(platform)
    assert lower_text(fn, *args, platform=lowering).count(marker) == 3  # fwd, dq, dk/dv


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e .[tpu])")
def test_offset_flash_kernel_compiles_for_v5p():
    """XLA:TPU compiles the Mosaic kernels (forward and backward, 1000 queries at a traced offset over 4000
    keys, bf16) for one v5p chip: Mosaic's tiling and VMEM rules hold."""
    from jax.sharding import Mesh
    from m1_jax.train.dry_run import topology_devices
    fn, args = _offset_kernel_grad("tpu")
    replicated = NamedSharding(Mesh(np.array(topology_devices("v5p:2x2x1")[:1]), ("x",)), P())
    compiled = fn.trace(*(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args)).lower().compile()
    assert compiled.as_text().count("custom-call") >= 3
