"""Lightning attention (reference, chunked JAX, decode step) against a float64 numpy per-token recurrence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_attention import lightning_attention as lightning_attention_eager
from pallas_kernels.lightning_attention import lightning_attention_step


# Jitted once per shape: far fewer compiles than op-by-op dispatch. The validation tests use the eager function.
lightning_attention = jax.jit(lightning_attention_eager,
                              static_argnames=("impl", "return_final_state", "block_size", "interpret"))


def numpy_recurrence(q, k, v, decay, initial_state=None, segment_ids=None):
    """Independent oracle, float64: S_t = exp(-lam) S_{t-1} + k_t^T v_t, o_t = q_t S_t, reset at segment starts."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, N, H, K = q.shape
    V = v.shape[-1]
    lam = np.asarray(decay, np.float64)
    o = np.zeros((B, N, H, V))
    final = np.zeros((B, H, K, V))
    for b in range(B):
        state = np.zeros((H, K, V)) if initial_state is None else np.asarray(initial_state, np.float64)[b].copy()
        for t in range(N):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                state = np.zeros((H, K, V))
            state = np.exp(-lam)[:, None, None] * state + np.einsum("hk,hv->hkv", k[b, t], v[b, t])
            o[b, t] = np.einsum("hk,hkv->hv", q[b, t], state)
        final[b] = state
    return o, final


def make_inputs(seed, B, N, H, K, V, dtype=jnp.float32, with_state=False):
    rng = np.random.default_rng(seed)
    # Scale keeps |o| of order one over a few hundred tokens.
    q, k = (rng.normal(size=(B, N, H, K)) / np.sqrt(K) for _ in range(2))
    v = rng.normal(size=(B, N, H, V))
    state = rng.normal(size=(B, H, K, V)).astype(np.float32) if with_state else None
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            None if state is None else jnp.asarray(state))


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


SHAPES = [  # B, N, H, K, V, block
    (1, 1, 1, 8, 8, 16),     # N = 1
    (2, 11, 3, 8, 8, 16),    # N < block
    (1, 37, 2, 8, 16, 16),   # N not a multiple of the block, Dk != Dv
    (2, 64, 2, 16, 8, 16),   # several full blocks
]
DECAYS = {"zero": 0.0, "tiny": 1e-6, "mixed": None, "large": 30.0}


def decay_for(name, H):
    if DECAYS[name] is None:
        return jnp.asarray(np.linspace(0.01, 1.0, H), jnp.float32)
    return jnp.full((H,), DECAYS[name], jnp.float32)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay_name", list(DECAYS))
def test_fp32_matches_recurrence(impl, shape, decay_name):
    B, N, H, K, V, C = shape
    q, k, v, s0 = make_inputs(hash(shape) % 1000, B, N, H, K, V, with_state=True)
    decay = decay_for(decay_name, H)
    o, s = lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True, block_size=C)
    o_want, s_want = numpy_recurrence(q, k, v, decay, s0)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert o.shape == (B, N, H, V) and s.shape == (B, H, K, V)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
    assert rel_err(o, o_want) < 1e-5
    assert rel_err(s, s_want) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_no_initial_state_means_zeros(impl):
    q, k, v, _ = make_inputs(1, 2, 40, 2, 8, 8)
    decay = decay_for("mixed", 2)
    o, s = lightning_attention(q, k, v, decay, impl=impl, return_final_state=True, block_size=16)
    o_want, s_want = numpy_recurrence(q, k, v, decay)
    assert rel_err(o, o_want) < 1e-5 and rel_err(s, s_want) < 1e-5
    o_only = lightning_attention(q, k, v, decay, impl=impl, block_size=16)
    np.testing.assert_array_equal(o_only, o)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_bf16_matches_recurrence(impl):
    q, k, v, s0 = make_inputs(2, 2, 50, 2, 16, 8, dtype=jnp.bfloat16, with_state=True)
    decay = decay_for("mixed", 2)
    o, s = lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True, block_size=16)
    # The oracle sees the same bf16-rounded inputs.
    o_want, s_want = numpy_recurrence(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), decay, s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(o, o_want) < 2e-2 and rel_err(s, s_want) < 2e-2


def random_segments(rng, B, N, n_cuts):
    seg = np.zeros((B, N), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, N), size=n_cuts, replace=False))
        for c in cuts:
            seg[b, c:] += 1
    return seg + 3  # ids need not start at 0


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("N,n_cuts", [(37, 4), (64, 1), (50, 10)])
def test_segments_match_recurrence(impl, N, n_cuts):
    B, H, K, V = 2, 2, 8, 4
    q, k, v, s0 = make_inputs(N, B, N, H, K, V, with_state=True)
    seg = random_segments(np.random.default_rng(N + n_cuts), B, N, n_cuts)
    decay = decay_for("mixed", H)
    o, s = lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True, block_size=16,
                               segment_ids=jnp.asarray(seg))
    o_want, s_want = numpy_recurrence(q, k, v, decay, s0, seg)
    assert rel_err(o, o_want) < 1e-5 and rel_err(s, s_want) < 1e-5


def test_segment_boundary_on_block_edge():
    B, N, H, K, V = 1, 48, 1, 8, 8
    q, k, v, s0 = make_inputs(5, B, N, H, K, V, with_state=True)
    seg = np.zeros((B, N), np.int32)
    seg[:, 16:] = 1
    seg[:, 32:] = 2  # boundaries exactly at block starts (block 16)
    decay = decay_for("mixed", H)
    o, s = lightning_attention(q, k, v, decay, impl="chunked", initial_state=s0, return_final_state=True, block_size=16,
                               segment_ids=jnp.asarray(seg))
    o_want, s_want = numpy_recurrence(q, k, v, decay, s0, seg)
    assert rel_err(o, o_want) < 1e-5 and rel_err(s, s_want) < 1e-5


def loss_fn(impl, q, k, v, s0, decay, seg=None, block_size=16):
    o, s = lightning_attention(q, k, v, decay, impl=impl, initial_state=s0, return_final_state=True,
                               block_size=block_size, segment_ids=seg)
    # Fixed random projections so every output element gets a distinct cotangent.
    w_o = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
    w_s = jnp.sin(jnp.arange(s.size, dtype=jnp.float32).reshape(s.shape))
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)


@pytest.mark.parametrize("decay_name", ["zero", "mixed", "large"])
@pytest.mark.parametrize("shape", [(2, 37, 2, 8, 16), (1, 1, 1, 8, 8), (1, 64, 2, 8, 8)])
def test_chunked_grads_match_reference(decay_name, shape):
    B, N, H, K, V = shape
    q, k, v, s0 = make_inputs(7, B, N, H, K, V, with_state=True)
    decay = decay_for(decay_name, H)
    argnums = (1, 2, 3, 4)
    g_chunk = jax.jit(jax.grad(functools.partial(loss_fn, "chunked"), argnums=argnums))(q, k, v, s0, decay)
    g_ref = jax.jit(jax.grad(functools.partial(loss_fn, "reference"), argnums=argnums))(q, k, v, s0, decay)
    for name, gc, gr in zip(("dq", "dk", "dv", "ds0"), g_chunk, g_ref):
        assert np.all(np.isfinite(gc)), name
        assert rel_err(gc, gr) < 1e-5, name


def test_chunked_grads_with_segments_and_bf16():
    B, N, H, K, V = 2, 40, 2, 8, 8
    q, k, v, s0 = make_inputs(9, B, N, H, K, V, dtype=jnp.bfloat16, with_state=True)
    seg = jnp.asarray(random_segments(np.random.default_rng(3), B, N, 3))
    decay = decay_for("mixed", H)
    g_chunk = jax.jit(jax.grad(functools.partial(loss_fn, "chunked"), argnums=(0, 1, 2, 3)))(q, k, v, s0, decay, seg)
    g_ref = jax.jit(jax.grad(functools.partial(loss_fn, "reference"), argnums=(0, 1, 2, 3)))(q, k, v, s0, decay, seg)
    for name, gc, gr in zip(("dq", "dk", "dv", "ds0"), g_chunk, g_ref):
        assert rel_err(gc, gr) < 2e-2, name


def test_decay_gradient_finite_at_large_decay():
    # lambda * N ~ 1e4: the decay's own gradient must not be NaN either (masked exponents).
    q, k, v, s0 = make_inputs(11, 1, 330, 2, 8, 8, with_state=True)
    decay = jnp.asarray([30.0, 30.0], jnp.float32)
    grad = jax.jit(jax.grad(functools.partial(loss_fn, "chunked", block_size=64), argnums=(0, 1, 2, 3, 4)))
    g = grad(q, k, v, s0, decay)
    for x in g:
        assert np.all(np.isfinite(x))


def test_recurrent_steps_match_chunked():
    B, N, H, K, V = 2, 21, 3, 8, 4
    q, k, v, s0 = make_inputs(13, B, N, H, K, V, with_state=True)
    decay = decay_for("mixed", H)
    o_chunk, s_chunk = lightning_attention(q, k, v, decay, impl="chunked", initial_state=s0,
                                           return_final_state=True, block_size=8)
    step = jax.jit(lightning_attention_step)
    state, outs = s0, []
    for t in range(N):
        o_t, state = step(q[:, t], k[:, t], v[:, t], decay, state)
        outs.append(o_t)
    assert state.dtype == jnp.float32
    assert rel_err(jnp.stack(outs, axis=1), o_chunk) < 1e-5
    assert rel_err(state, s_chunk) < 1e-5


def test_step_hand_computed():
    # One head, Dk = Dv = 1: S' = e^-1 * 2 + 3 * 4, o = 5 * S'.
    args = [jnp.full((1, 1, 1), x, jnp.float32) for x in (5.0, 3.0, 4.0)]
    o, s = lightning_attention_step(*args, jnp.asarray([1.0]), jnp.full((1, 1, 1, 1), 2.0))
    want = 2.0 * np.exp(-1.0) + 12.0
    np.testing.assert_allclose(s[0, 0, 0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(o[0, 0, 0], 5.0 * want, rtol=1e-6)


def test_traced_decay_under_jit():
    q, k, v, _ = make_inputs(17, 1, 20, 2, 8, 8)

    @jax.jit
    def f(layer):
        decay = 0.5 * (1.0 - layer / 10.0) * jnp.ones((2,))
        return lightning_attention(q, k, v, decay, impl="chunked", block_size=8)

    o = f(jnp.float32(3.0))
    o_want, _ = numpy_recurrence(q, k, v, np.full((2,), 0.35))
    assert rel_err(o, o_want) < 1e-5


def test_chunked_output_independent_of_block_size():
    q, k, v, s0 = make_inputs(19, 1, 45, 2, 8, 8, with_state=True)
    decay = decay_for("mixed", 2)
    o_want, s_want = numpy_recurrence(q, k, v, decay, s0)
    for C in (1, 7, 16, 45, 256):
        o, s = lightning_attention(q, k, v, decay, impl="chunked", initial_state=s0, return_final_state=True,
                                   block_size=C)
        assert rel_err(o, o_want) < 1e-5 and rel_err(s, s_want) < 1e-5, C


@pytest.mark.parametrize("kwargs,match", [
    (dict(k_shape=(1, 8, 2, 4)), "q and k must have the same shape"),
    (dict(v_shape=(1, 9, 2, 8)), "v must be"),
    (dict(q_shape=(8, 2, 8)), "rank 4"),
    (dict(decay=np.ones((3,), np.float32)), "decay must have shape"),
    (dict(decay=np.array([0.1, -0.2], np.float32)), "decay must be >= 0"),
    (dict(k_dtype=jnp.bfloat16), "share a dtype"),
    (dict(impl="cuda"), "unknown impl"),
    (dict(block_size=0), "block_size"),
    (dict(initial_state=np.zeros((1, 2, 8, 4), np.float32)), "initial_state must be"),
    (dict(segment_ids=np.zeros((1, 7), np.int32)), "segment_ids must be"),
])
def test_validation_errors(kwargs, match):
    q = jnp.ones(kwargs.pop("q_shape", (1, 8, 2, 8)), jnp.float32)
    k = jnp.ones(kwargs.pop("k_shape", (1, 8, 2, 8)), kwargs.pop("k_dtype", jnp.float32))
    v = jnp.ones(kwargs.pop("v_shape", (1, 8, 2, 8)), jnp.float32)
    decay = kwargs.pop("decay", np.ones((2,), np.float32))
    with pytest.raises(ValueError, match=match):
        lightning_attention_eager(q, k, v, decay, **kwargs)


def test_step_validation_errors():
    q = jnp.ones((1, 2, 8))
    with pytest.raises(ValueError, match="state must be"):
        lightning_attention_step(q, q, q, jnp.ones((2,)), jnp.zeros((1, 2, 8, 4)))
    with pytest.raises(ValueError, match="decay must be >= 0"):
        lightning_attention_step(q, q, q, -jnp.ones((2,)), jnp.zeros((1, 2, 8, 8)))
