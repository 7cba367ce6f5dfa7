"""Pallas lightning-attention kernels (TPU Mosaic, GPU Triton) on CPU: interpret mode vs the reference, race
detection, lowering for "tpu" / "cuda" from CPU, and the kernels inside shard_map on fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.lightning_attention import api
from pallas_kernels.lightning_attention import gpu_parallel
from pallas_kernels.lightning_attention import lightning_attention
from pallas_kernels.lightning_attention import reference
from pallas_kernels.lightning_attention import tpu
from lowering import lower_text

KERNELS = ["pallas_tpu", "pallas_gpu", "pallas_gpu_parallel"]


def make_inputs(seed, B, N, H, K, V, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, N, H, K)) / np.sqrt(K), dtype) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, N, H, V)), dtype)
    s0 = jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32)
    # Cotangents for o and the final state: random, so every output element matters.
    do = jnp.asarray(rng.normal(size=(B, N, H, V)), dtype)
    dsf = jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32)
    return q, k, v, s0, do, dsf


def decays(H):
    # From no decay to lambda * N ~ 1e3-1e4 (everything but the diagonal underflows).
    return jnp.asarray([0.0, 30.0, 0.05, 1e-6][:H] if H <= 4 else np.linspace(0, 30, H), jnp.float32)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


@functools.partial(jax.jit, static_argnames=("impl", "block_size"))
def outputs_and_grads(q, k, v, decay, s0, do, dsf, *, impl, block_size):
    """(o, final_state) and the VJP of (do, dsf) w.r.t. (q, k, v, s0): one trace for forward and backward."""
    def f(q, k, v, s0):
        if impl == "reference":
            return reference.lightning_attention_reference(q, k, v, decay, s0)
        return lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True,
                                   block_size=block_size, interpret=True)
    (o, sf), vjp = jax.vjp(f, q, k, v, s0)
    return o, sf, vjp((do, dsf))


CASES = [  # B, N, H, K, V, block, dtype, tolerance
    (2, 37, 3, 8, 16, 16, jnp.float32, 1e-5),     # N not a multiple of the chunk, Dk != Dv
    (1, 1, 2, 16, 8, 16, jnp.float32, 1e-5),      # N = 1
    (1, 72, 2, 16, 16, 16, jnp.float32, 1e-5),    # 5 chunks (4 full + 1 partial)
    (2, 50, 4, 16, 32, 16, jnp.bfloat16, 2e-2),   # bf16
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}H{c[2]}K{c[3]}V{c[4]}C{c[5]}-{c[6].__name__}")
def test_kernel_matches_reference(impl, case):
    B, N, H, K, V, C, dtype, tol = case
    q, k, v, s0, do, dsf = make_inputs(N * 7 + H, B, N, H, K, V, dtype)
    decay = decays(H)
    o, sf, grads = outputs_and_grads(q, k, v, decay, s0, do, dsf, impl=impl, block_size=C)
    o_r, sf_r, grads_r = outputs_and_grads(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           decay, s0, do.astype(jnp.float32), dsf, impl="reference", block_size=C)
    assert o.dtype == dtype and sf.dtype == jnp.float32 and o.shape == (B, N, H, V)
    assert rel_err(o, o_r) <= tol
    assert rel_err(sf, sf_r) <= tol
    for name, g, g_r, x in zip(("dq", "dk", "dv", "ds0"), grads, grads_r, (q, k, v, s0)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, g_r) <= tol, name


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_without_initial_state(impl):
    q, k, v, _, _, _ = make_inputs(3, 1, 40, 2, 16, 16)
    decay = jnp.asarray([0.1, 0.7], jnp.float32)
    fn = jax.jit(functools.partial(lightning_attention, impl=impl, return_final_state=True, block_size=16,
                                   interpret=True))
    o, sf = fn(q, k, v, decay)
    o_r, sf_r = reference.lightning_attention_reference(q, k, v, decay)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(sf, sf_r) <= 1e-5


def _races_found():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
    return interpret_pallas_call.races.races_found


@pytest.mark.parametrize("reverse", [False, True])
def test_tpu_kernel_has_no_races(reverse):
    q, k, v, s0, _, _ = make_inputs(5, 1, 20, 2, 8, 8)
    decay = jnp.asarray([0.1, 0.5], jnp.float32)
    pltpu.reset_tpu_interpret_mode_state()
    try:
        o, sf = tpu.sweep(q, k, v, decay, s0, reverse=reverse, chunk=8,
                          interpret=pltpu.InterpretParams(detect_races=True))
        o = jax.block_until_ready(o)
        assert not _races_found()
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    if not reverse:
        o_r, sf_r = reference.lightning_attention_reference(q, k, v, decay, s0)
        assert rel_err(o, o_r) <= 1e-5 and rel_err(sf, sf_r) <= 1e-5
    else:
        # The reverse sweep is the forward one on time-reversed tokens, except that its incoming state reaches the
        # last token undecayed and its final state is decayed once more (it is the cotangent of S_{-1}).
        per_head = lambda x: x[None, :, None, None]
        o_f, sf_f = reference.lightning_attention_reference(q[:, ::-1], k[:, ::-1], v[:, ::-1], decay,
                                                            s0 * per_head(jnp.exp(decay)))
        assert rel_err(o, o_f[:, ::-1]) <= 1e-5
        assert rel_err(sf, sf_f * per_head(jnp.exp(-decay))) <= 1e-5


def _lower_fwd_bwd(impl, platform, dtype, B, N, H, D, block_size):
    sds = jax.ShapeDtypeStruct
    args = (sds((B, N, H, D), dtype), sds((B, N, H, D), dtype), sds((B, N, H, D), dtype), sds((H,), jnp.float32),
            sds((B, H, D, D), jnp.float32))

    def loss(q, k, v, decay, s0):
        o, sf = lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True,
                                    block_size=block_size, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 4)))
    return lower_text(fn, *args, platform=platform)


@pytest.mark.parametrize("shape", [(1, 1000, 2, 128, 256), (2, 100, 3, 8, 16)], ids=["M1-heads", "small-heads"])
def test_tpu_kernel_lowers_for_tpu(shape, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # let api.validate accept pallas_tpu on this CPU
    text = _lower_fwd_bwd("pallas_tpu", "tpu", jnp.bfloat16, *shape)
    assert text.count("tpu_custom_call") == 4  # forward + dq + two reverse sweeps


@pytest.mark.parametrize("impl,block_size,kernels", [
    ("pallas_gpu", 64, 4),            # forward + dq + two reverse sweeps
    ("pallas_gpu_parallel", 256, 7),  # forward states + outputs; backward 2 state passes + 3 output passes
])
def test_gpu_kernel_lowers_for_cuda(impl, block_size, kernels, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    text = _lower_fwd_bwd(impl, "cuda", jnp.bfloat16, 1, 1000, 2, 128, block_size)
    assert text.count("__gpu$xla.gpu.triton") == kernels


@pytest.mark.parametrize("block", [64, pytest.param(256, marks=pytest.mark.slow)])
def test_parallel_gpu_kernel_blocks_and_sub_chunks(block):
    """Blocks of several sub-chunks, trailing all-padding sub-chunks, and segment resets inside and on the edge
    of a block: every block's output pass starts from the state the states pass stored for it (block 256: one
    block of ten sub-chunks)."""
    B, N, H, K, V = 1, 150, 2, 16, 32
    q, k, v, s0, do, dsf = make_inputs(29, B, N, H, K, V)
    decay = jnp.asarray([0.02, 0.4], jnp.float32)
    ids = np.ones((B, N), np.int32)
    for cut in (5, 64, 65, 100, 128):  # 64 and 128 are block edges (block 64 = 4 sub-chunks of 16)
        ids[:, cut:] += 1
    seg = jnp.asarray(ids)

    def run(fn):
        (o, sf), vjp = jax.vjp(lambda q, k, v, s0: fn(q, k, v, decay, s0, seg), q, k, v, s0)
        return (o, sf) + vjp((do, dsf))

    want = run(reference.lightning_attention_reference)
    got = run(functools.partial(gpu_parallel.lightning_attention_gpu_parallel, block_size=block, chunk=16,
                                interpret=True))
    for name, g, w in zip(("o", "state", "dq", "dk", "dv", "ds0"), got, want):
        assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_inside_shard_map(impl):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    B, N, H, K, V = 4, 24, 4, 8, 8
    q, k, v, s0, do, dsf = make_inputs(11, B, N, H, K, V)
    decay = jnp.asarray([0.0, 0.2, 1.0, 30.0], jnp.float32)
    x_spec, s_spec = P("data", None, "model", None), P("data", "model", None, None)

    def local(q, k, v, decay, s0):
        return lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True,
                                   block_size=16, interpret=True)

    # check_vma=False: pallas_call's out_shape carries no varying-manual-axes annotation.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, P("model"), s_spec),
                            out_specs=(x_spec, s_spec), check_vma=False)

    def loss(fn, q, k, v, s0):
        o, sf = fn(q, k, v, decay, s0)
        return jnp.sum(o * do) + jnp.sum(sf * dsf), (o, sf)

    ref = lambda q, k, v, d, s0: reference.lightning_attention_reference(q, k, v, d, s0)
    (_, (o, sf)), g = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), argnums=(0, 1, 2, 3),
                                                 has_aux=True))(q, k, v, s0)
    (_, (o_r, sf_r)), g_r = jax.value_and_grad(functools.partial(loss, ref), argnums=(0, 1, 2, 3),
                                               has_aux=True)(q, k, v, s0)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(sf, sf_r) <= 1e-5
    for a, b in zip(g, g_r):
        assert rel_err(a, b) <= 1e-5


def test_dispatch_and_errors():
    q, k, v, s0, _, _ = make_inputs(13, 1, 24, 2, 8, 8)
    decay = jnp.asarray([0.1, 0.2], jnp.float32)
    assert jax.default_backend() == "cpu" and api.resolve_impl("auto") == "chunked"
    for impl in ("pallas_gpu", "pallas_gpu_parallel"):
        with pytest.raises(ValueError, match="needs a gpu backend"):
            lightning_attention(q, k, v, decay, impl=impl)
    with pytest.raises(ValueError, match="needs a tpu backend"):
        lightning_attention(q, k, v, decay, impl="pallas_tpu")
    with pytest.raises(ValueError, match="decay must be >= 0"):
        lightning_attention(q, k, v, -decay, impl="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="share a dtype"):
        lightning_attention(q, k.astype(jnp.bfloat16), v, decay, impl="pallas_tpu", interpret=True)


def test_impl_lists_agree():
    from m1_jax.config import LIGHTNING_IMPLS
    assert LIGHTNING_IMPLS == api.IMPLS


def test_resolve_impl_by_platform(monkeypatch):
    assert api.resolve_impl("auto", platform="tpu") == "pallas_tpu"
    assert api.resolve_impl("auto", platform="cuda") == "pallas_gpu"
    assert api.resolve_impl("auto", platform="cpu") == "chunked"
    assert api.resolve_impl("chunked", platform="tpu") == "chunked"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert api.resolve_impl("auto") == "pallas_gpu"


def _random_segments(rng, B, N, C):
    """Per row: documents of random lengths (one-token ones among them), one boundary on a chunk edge."""
    rows = []
    for _ in range(B):
        cuts = set(rng.choice(np.arange(1, N), size=min(N - 1, rng.integers(1, 6)), replace=False).tolist())
        cuts |= {C} if C < N else set()  # a reset exactly on a chunk boundary
        cuts |= {N - 1} if N > 2 else set()  # a one-token document at the end
        if N > 4:
            cuts |= {2, 3}  # a one-token document (token 2)
        ids = np.zeros(N, np.int32)
        for c in sorted(cuts):
            ids[c:] += 1
        rows.append(ids + 1)
    return jnp.asarray(np.stack(rows))


SEGMENT_CASES = [  # B, N, H, K, V, block, dtype, tolerance
    (2, 45, 3, 8, 16, 16, jnp.float32, 1e-5),
    (1, 64, 2, 16, 16, 16, jnp.float32, 1e-5),   # whole chunks only
    (2, 50, 4, 16, 32, 16, jnp.bfloat16, 2e-2),
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: f"B{c[0]}N{c[1]}H{c[2]}C{c[5]}-{c[6].__name__}")
def test_kernel_with_segments_matches_reference(impl, case):
    """State resets at each document start, in the forward and in all three backward sweeps."""
    B, N, H, K, V, C, dtype, tol = case
    rng = np.random.default_rng(N + H)
    q, k, v, s0, do, dsf = make_inputs(N * 3 + H, B, N, H, K, V, dtype)
    seg = _random_segments(rng, B, N, C)
    decay = decays(H)

    def run(impl, q, k, v):
        def f(q, k, v, s0):
            if impl == "reference":
                return reference.lightning_attention_reference(q, k, v, decay, s0, seg)
            return lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True,
                                       block_size=C, segment_ids=seg, interpret=True)
        (o, sf), vjp = jax.vjp(f, q, k, v, s0)
        return (o, sf) + vjp((do.astype(o.dtype), dsf))

    got = jax.jit(functools.partial(run, impl))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = run("reference", f32(q), f32(k), f32(v))
    unsegmented = lightning_attention(f32(q), f32(k), f32(v), decay, impl="reference", initial_state=s0)
    assert rel_err(unsegmented, want[0]) > 10 * tol  # the resets matter in this case
    for name, g, w in zip(("o", "state", "dq", "dk", "dv", "ds0"), got, want):
        assert rel_err(g, w) <= tol, (name, rel_err(g, w))


def test_auto_picks_the_kernel_of_the_platform_compiled_for():
    """An ahead-of-time lowering from this CPU host for TPU or CUDA contains that platform's kernel."""
    q = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
    decay = jnp.asarray([0.1, 0.2], jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(lightning_attention(q, k, v, decay, block_size=16)),
                                    argnums=(0, 1, 2)))
    text = {p: lower_text(fn, q, q, q, platform=p) for p in ("tpu", "cuda", "cpu")}
    assert "tpu_custom_call" in text["tpu"] and "triton" not in text["tpu"]
    assert "__gpu$xla.gpu.triton" in text["cuda"] and "tpu_custom_call" not in text["cuda"]
    assert "tpu_custom_call" not in text["cpu"] and "triton" not in text["cpu"]
