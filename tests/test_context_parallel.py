"""Context parallelism on 8 fake CPU devices: the sequence split over a `context` mesh axis.

LASP-2 for the lightning layers and gathered-KV attention for the softmax layers must equal the single-device
result, forward and backward, for random packed-document layouts (documents crossing device boundaries, a
document starting exactly at a boundary, one-token documents), with the chunked path and the Pallas kernels
(interpret mode) as the local compute; the whole tiny model's loss and gradients on data x context meshes
must equal the unsharded model's.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m1_jax import sharding
from m1_jax.config import get_config
from m1_jax.layers import context_parallel
from m1_jax.layers.lightning import lightning_per_device
from m1_jax.layers.softmax_attention import attention_per_device
from m1_jax.model import MiniMaxM1, init_params, lm_head_weight
from m1_jax.train import dry_run
from m1_jax.train.loss import chunked_cross_entropy
from pallas_kernels.lightning_attention import reference
from pallas_kernels.softmax_attention import reference as softmax_reference
from lowering import lower_text


def _segments(rng, B, N, chunk):
    """Random packed layouts per row: documents of random lengths, plus forced starts at a device boundary
    and a one-token document; ids increase from 1 (0 would be padding for the softmax layers)."""
    seg = np.zeros((B, N), np.int32)
    for b in range(B):
        starts = {0, chunk * (1 + b % (N // chunk - 1))}  # one document starts exactly on a boundary
        starts |= set(rng.choice(np.arange(1, N), size=rng.integers(1, 5), replace=False).tolist())
        one = int(rng.integers(1, N - 1))
        starts |= {one, one + 1}  # a one-token document
        if b == 0:
            starts = {0}  # one document over every device: the state crosses every boundary
        seg[b] = np.cumsum(np.isin(np.arange(N), sorted(starts)))
    return jnp.asarray(seg)


def _lightning_case(seed, B=2, N=64, H=4, K=8):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, N, H, K)) * 0.5, jnp.float32) for _ in range(4))
    s0, dsf = (jnp.asarray(rng.standard_normal((B, H, K, K)) * 0.1, jnp.float32) for _ in range(2))
    decay = jnp.asarray(rng.uniform(0.0, 0.6, H), jnp.float32)
    return q, k, v, decay, s0, do, dsf


@pytest.mark.parametrize("impl,spec", [("chunked", "context=8"), ("chunked", "data=2,context=4"),
                                       ("pallas_tpu", "data=2,context=4"), ("pallas_gpu", "context=4,tensor=2")])
def test_lasp2_equals_reference(impl, spec):
    mesh = sharding.make_mesh(spec)
    P_ctx = mesh.shape["context"]
    q, k, v, decay, s0, do, dsf = _lightning_case(3)
    B, N = q.shape[:2]
    seg = _segments(np.random.default_rng(4), B, N, N // P_ctx)

    def loss(attend, q, k, v, s0):
        o, sf = attend(q, k, v, s0)
        return jnp.sum(o * do) + jnp.sum(sf * dsf)

    ref = lambda q, k, v, s0: reference.lightning_attention_reference(q, k, v, decay, s0, seg)  # noqa: E731
    want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2, 3))(q, k, v, s0)
    attend = lambda q, k, v, s0: lightning_per_device(q, k, v, decay, s0, seg, impl=impl, block_size=4,  # noqa: E731
                                                      interpret=impl.startswith("pallas"))
    grad = jax.jit(jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2, 3)))
    with sharding.mesh_context(mesh):
        qkv = NamedSharding(mesh, sharding.activation_spec(("batch", "length", "heads", None), mesh))
        args = [jax.device_put(x, qkv) for x in (q, k, v)] + [s0]
        got = grad(*args)
        hlo = grad.lower(*args).compile().as_text()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # Only states cross devices: every all-gather is of [P, B/data, H/tensor, K, K] states or the segment ids.
    local_q_bytes = q.size * 4 // mesh.size
    gathered = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert gathered
    for line in gathered:
        shape = line.split("=")[1].split("all-gather")[0]
        dims = [int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",") if d.strip()]
        assert np.prod(dims) * 4 <= max(local_q_bytes, P_ctx * B * q.shape[2] * 64 * 4), line


@pytest.mark.parametrize("spec,impl", [("context=8", "auto"), ("data=2,context=4", "auto"),
                                       ("data=2,context=4", "pallas_gpu"), ("data=2,context=4", "pallas_tpu")])
def test_gathered_kv_attention_equals_reference(spec, impl):
    """The blockwise path ("auto" on CPU) and our Pallas kernels (interpret mode) as the local compute."""
    mesh = sharding.make_mesh(spec)
    rng = np.random.default_rng(5)
    B, L, H, Kv, D = 2, 64, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, L, Kv, D)), jnp.float32) for _ in range(2))
    do = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    seg = _segments(rng, B, L, L // mesh.shape["context"])
    scale = D ** -0.5
    loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v) * do)  # noqa: E731
    ref = lambda q, k, v: softmax_reference.softmax_attention_reference(q, k, v, seg, scale=scale)  # noqa: E731
    want = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
    # Blocks of 4 over 8-token chunks: several query and key blocks per device, tiles skipped by the offset.
    mine = lambda q, k, v: attention_per_device(q, k, v, seg, scale=scale, block_q=4, block_kv=4,  # noqa: E731
                                                impl=impl, interpret=impl.startswith("pallas"))
    with sharding.mesh_context(mesh):
        got = jax.jit(jax.value_and_grad(functools.partial(loss, mine), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_unknown_softmax_impl_over_context_is_refused():
    mesh = sharding.make_mesh("context=8")
    x = jnp.ones((1, 64, 2, 8), jnp.float32)
    with sharding.mesh_context(mesh), pytest.raises(ValueError, match="cannot run over the context axis"):
        jax.jit(lambda x: attention_per_device(x, x, x, scale=1.0, impl="reference")).lower(x)


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_context_parallel_softmax_lowers_to_our_kernels(platform, marker):
    """"auto" over a context axis, lowered for CUDA or TPU from this CPU host: our offset-taking flash kernels
    (forward; dq and dk/dv in the backward), not jax's mha or splash."""
    mesh = sharding.make_mesh("context=8")
    q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(attention_per_device(q, k, v, scale=0.125).astype(jnp.float32))  # noqa: E731
    with sharding.mesh_context(mesh):
        text = lower_text(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, kv, kv, platform=platform, mesh=mesh)
    assert text.count(marker) == 3


@pytest.mark.parametrize("spec,moe_impl", [pytest.param("data=2,context=4", "dropless", marks=pytest.mark.slow),
                                           pytest.param("context=8", "dropless", marks=pytest.mark.slow),
                                           ("expert=2,context=4", "expert_parallel")])
def test_model_loss_and_grads_equal_single_device(spec, moe_impl, monkeypatch):
    """The tiny model (lightning + softmax layers, MoE) with packed documents: loss and every gradient on a
    context-parallel mesh equal the single-device values (fp32, <= 1e-5), with both layer kinds running their
    context-parallel paths (not a GSPMD fallback)."""
    calls = []
    for name in ("lasp2_lightning", "gathered_kv_attention"):
        real = getattr(context_parallel, name)
        monkeypatch.setattr(context_parallel, name, functools.partial(
            lambda real, name, *a, **kw: calls.append(name) or real(*a, **kw), real, name))
    cfg = get_config("tiny", moe_impl=moe_impl, moe_capacity_factor=0.0, block_size=8, attention_block_q=8,
                     attention_block_kv=8)
    B, L = 2, 64
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L)), jnp.int32)
    mesh = sharding.make_mesh(spec, num_experts=cfg.num_experts)
    seg = _segments(rng, B, L, L // mesh.shape["context"])
    params = init_params(cfg, jax.random.key(0))

    def loss(cfg, params, tokens, seg):
        h = MiniMaxM1(cfg).apply({"params": params}, tokens, seg, return_hidden=True)[0]
        ce = chunked_cross_entropy(cfg, h, lm_head_weight(cfg, params), targets, chunk_size=16)
        return jnp.mean(ce)

    # The single-device reference runs the dropless MoE (expert parallelism needs a mesh; same parameters).
    single = get_config("tiny", block_size=8, attention_block_q=8, attention_block_kv=8)
    want_loss, want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, single)))(params, tokens, seg)
    with sharding.mesh_context(mesh):
        tok = NamedSharding(mesh, P(sharding.batch_axes(mesh) or None, "context"))
        got_loss, got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(
            params, jax.device_put(tokens, tok), jax.device_put(seg, tok))
    assert set(calls) == {"lasp2_lightning", "gathered_kv_attention"}
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    for (path, w), g in zip(flat_want, jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_parse_context_mesh_and_length_divisibility():
    assert sharding.parse_mesh_shape("data:2,context:4", 8) == {"data": 2, "context": 4}
    mesh = sharding.make_mesh("data:2,context:4")
    assert sharding.context_axes(mesh) == ("context",)
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="length"):
        sharding.check_activation_divisibility(cfg, mesh, micro_batch=2, seq_len=30)
    # Token arrays [B, L] enter split over batch and context; rows [B] over the batch only.
    assert sharding.batch_sharding(mesh).spec == P("data", "context")
    assert sharding.batch_sharding(mesh, ndim=1).spec == P("data")
    assert sharding.host_share(sharding.batch_sharding(mesh), (4, 64)) == (0, 1, slice(0, 64))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e .[tpu])")
def test_host_share_when_context_spans_hosts():
    """On a v5p topology of 2 hosts x 4 chips with context=8, both hosts hold every row: they load the same
    rows and each keeps its half of the length; with data=2,context=4 each host loads its own rows whole."""
    devices = dry_run.topology_devices("v5p:2x2x2")
    assert {d.process_index for d in devices} == {0, 1}
    spread = Mesh(np.asarray(devices).reshape(8), ("context",))
    share = [sharding.host_share(sharding.batch_sharding(spread), (4, 64), p) for p in (0, 1)]
    assert [(i, c) for i, c, _ in share] == [(0, 1), (0, 1)]
    assert sorted((s.start, s.stop) for _, _, s in share) == [(0, 32), (32, 64)]
    by_host = sorted(devices, key=lambda d: (d.process_index, d.id))
    split = Mesh(np.asarray(by_host).reshape(2, 4), ("data", "context"))
    share = [sharding.host_share(sharding.batch_sharding(split), (4, 64), p) for p in (0, 1)]
    assert sorted(share, key=lambda s: s[0]) == [(0, 2, slice(0, 64)), (1, 2, slice(0, 64))]
