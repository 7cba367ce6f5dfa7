"""Model pieces against independent numpy references: RoPE, RMSNorm, attention, MoE, aux loss, whole model."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.config import get_config
from m1_jax.layers.moe import aux_loss_from_stats, load_balance_stats, moe_dropless, route_top_k
from m1_jax.layers.norms import rms_norm
from m1_jax.layers.rope import apply_rope, rope_cos_sin
from pallas_kernels.softmax_attention.blockwise import blockwise_attention
from m1_jax.model import MiniMaxM1, abstract_params, init_params

RNG = np.random.default_rng


def test_partial_rope_against_formula():
    rng = RNG(0)
    B, L, H, D, R, theta = 2, 9, 3, 16, 8, 1e7
    x = rng.standard_normal((B, L, H, D))
    pos = rng.integers(0, 10_000, (B, L))
    cos, sin = rope_cos_sin(jnp.asarray(pos), R, theta)
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
    # Spec §3: pairs (i, i + R/2) inside the first R dims rotate by pos * theta^(-2i/R); the rest pass.
    expected = x.copy()
    for i in range(R // 2):
        angle = pos[..., None] * theta ** (-2 * i / R)
        a, b = x[..., i], x[..., i + R // 2]
        expected[..., i] = a * np.cos(angle) - b * np.sin(angle)
        expected[..., i + R // 2] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)  # fp32 angles up to ~1e4 rad
    np.testing.assert_array_equal(out[..., R:], x[..., R:].astype(np.float32))


def test_rms_norm_against_numpy():
    rng = RNG(1)
    x, w = rng.standard_normal((4, 32)) * 3, rng.standard_normal(32)
    expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w), 1e-6)),
                               expected, rtol=1e-5, atol=1e-5)


def _numpy_attention(q, k, v, seg, scale):
    B, L, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // G].T * scale
            mask = np.tril(np.ones((L, L), bool)) & (seg[b][:, None] == seg[b][None, :])
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // G]
    return out


@pytest.mark.parametrize("L, bq, bk", [(37, 8, 16), (64, 16, 16), (5, 512, 512), (48, 64, 16)])
def test_blockwise_attention_against_numpy(L, bq, bk):
    rng = RNG(L)
    B, H, K, D = 2, 4, 2, 8
    q, k, v = (rng.standard_normal((B, L, n, D)) for n in (H, K, K))
    seg = np.sort(rng.integers(1, 4, (B, L)), axis=1)
    f = lambda *a: blockwise_attention(*a, scale=D ** -0.5, block_q=bq, block_kv=bk)
    out = np.asarray(f(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), jnp.asarray(seg)))
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, seg, D ** -0.5), rtol=1e-5, atol=1e-5)


def test_router_against_numpy():
    logits = RNG(2).standard_normal((20, 8)) * 2
    w, e, p = (np.asarray(t) for t in route_top_k(jnp.asarray(logits, jnp.float32), 2))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :2]
    np.testing.assert_array_equal(e, top)
    top_logits = np.take_along_axis(logits, top, 1)  # renormalised top-k = softmax over the top-k logits
    np.testing.assert_allclose(w, np.exp(top_logits) / np.exp(top_logits).sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(p, probs, rtol=1e-5)



def _dense_attention(q, k, v, seg, scale):
    """The whole [L, L] masked softmax at once: an independent path for autodiff to differentiate."""
    L, G = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bqhd,bshd->bhqs", q, k, precision="highest") * scale
    mask = jnp.tril(jnp.ones((L, L), bool)) & (seg[:, :, None] == seg[:, None, :])
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqs,bshd->bqhd", p, v, precision="highest")


@pytest.mark.parametrize("L, bq, bk, segments", [(37, 8, 16, True), (40, 16, 8, True), (64, 16, 16, True),
                                                  (64, 16, 8, False), (64, 8, 16, False), (37, 64, 16, True),
                                                  (64, 64, 16, False)])
def test_blockwise_attention_gradients_against_dense(L, bq, bk, segments):
    """Outputs and gradients; without segments and padding, interior tiles take the unmasked path; L <= bq is
    one query block (the plain masked softmax)."""
    rng = RNG(100 + L)
    B, H, K, D = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, n, D)), jnp.float32) for n in (H, K, K))
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (B, L)), axis=1)) if segments else jnp.ones((B, L), jnp.int32)
    w = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)  # a random cotangent
    attend = lambda q, k, v: blockwise_attention(q, k, v, seg if segments else None, scale=D ** -0.5, block_q=bq,
                                                 block_kv=bk)
    blockwise = lambda q, k, v: jnp.sum(w * attend(q, k, v))
    dense = lambda q, k, v: jnp.sum(w * _dense_attention(q, k, v, seg, D ** -0.5))
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(q, k, v)),
                               np.asarray(_dense_attention(q, k, v, seg, D ** -0.5)),
                               rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(blockwise, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)

def _moe_dense_loop(x, weights, experts, wg, wu, wd):
    """float64 numpy: every token through each of its experts, one at a time."""
    silu = lambda z: z / (1 + np.exp(-z))
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[t, j]
            out[t] += weights[t, j] * ((silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
    return out


def _check_moe_impl(impl, x, weights, experts, wg, wu, wd):
    """Forward against the float64 loop; gradients (tokens, every expert weight) against autodiff of the
    all-experts reference grouped matmul."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    w_, e_ = f32(weights), jnp.asarray(experts, jnp.int32)
    out = jax.jit(lambda *a: moe_dropless(a[0], w_, e_, *a[1:], impl=impl))(f32(x), f32(wg), f32(wu), f32(wd))
    np.testing.assert_allclose(np.asarray(out), _moe_dense_loop(x, weights, experts, wg, wu, wd), rtol=1e-4, atol=1e-4)

    def loss(x_, wg_, wu_, wd_, impl_):
        return jnp.sum(moe_dropless(x_, w_, e_, wg_, wu_, wd_, impl=impl_) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    args = [f32(a) for a in (x, wg, wu, wd)]
    for got, want in zip(grads(*args, impl), grads(*args, "reference")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _moe_problem(rng, T, D, F, E):
    x = rng.standard_normal((T, D))
    ws = rng.standard_normal((E, D, F)) * .3, rng.standard_normal((E, D, F)) * .3, rng.standard_normal((E, F, D)) * .3
    return x, ws


@pytest.mark.parametrize("impl", ["auto", "blas", "bucketed", "ragged_dot"])
def test_moe_dropless_against_dense_loop(impl):
    rng = RNG(3)
    T, D, F, E, k = 50, 12, 20, 6, 2
    x, (wg, wu, wd) = _moe_problem(rng, T, D, F, E)
    experts = np.stack([rng.permutation(E - 1)[:k] for _ in range(T)])  # the last expert gets no tokens
    experts[:20] = [0, 1]  # a crowded expert pair, so group sizes are uneven
    _check_moe_impl(impl, x, rng.uniform(0.1, 1, (T, k)), experts, wg, wu, wd)


def test_aux_loss_by_hand():
    # Two layers of 3 tokens over E=3 experts, top-1, probabilities chosen by hand.
    probs_l1 = np.array([[.7, .2, .1], [.6, .3, .1], [.1, .1, .8]])
    probs_l2 = np.array([[.2, .5, .3], [.4, .4, .2], [.3, .3, .4]])
    top_l1, top_l2 = np.array([[0], [0], [2]]), np.array([[1], [0], [2]])
    s1 = load_balance_stats(jnp.asarray(probs_l1), jnp.asarray(top_l1))
    s2 = load_balance_stats(jnp.asarray(probs_l2), jnp.asarray(top_l2))
    loss = float(aux_loss_from_stats(s1[0] + s2[0], s1[1] + s2[1], s1[2] + s2[2]))
    f = np.array([3, 1, 2]) / 6  # counts over 6 rows
    P = (probs_l1.sum(0) + probs_l2.sum(0)) / 6
    assert loss == pytest.approx(3 * np.sum(f * P), rel=1e-6)  # = 3 * (0.5*0.3833 + ...)


def test_model_outputs_and_aux():
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = RNG(4).integers(0, cfg.vocab_size, (2, 70))
    logits, aux = jax.jit(MiniMaxM1(cfg).apply)({"params": params}, tokens)
    assert logits.shape == (2, 70, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    counts = np.asarray(aux["expert_counts"])
    assert counts.shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_array_equal(counts.sum(1), 2 * 70 * cfg.num_experts_per_tok)
    assert float(aux["moe_aux_loss"]) >= cfg.num_experts_per_tok * 0.99  # E*sum f P >= k, = k when uniform


def test_causality_and_packing():
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(1))
    apply = jax.jit(lambda t, s=None: MiniMaxM1(cfg).apply({"params": params}, t, s)[0])
    a, b = RNG(5).integers(0, cfg.vocab_size, (1, 30)), RNG(6).integers(0, cfg.vocab_size, (1, 20))
    # a later token never changes earlier logits
    changed = a.copy()
    changed[0, 20:] = (changed[0, 20:] + 1) % cfg.vocab_size
    np.testing.assert_allclose(np.asarray(apply(a))[0, :20], np.asarray(apply(changed))[0, :20], atol=1e-5)
    # a packed row [a | b] with segment ids equals running a and b separately (positions restart)
    packed = np.concatenate([a, b], 1)
    seg = np.concatenate([np.ones((1, 30), int), 2 * np.ones((1, 20), int)], 1)
    pos = np.concatenate([np.arange(30), np.arange(20)])[None]
    out = np.asarray(jax.jit(MiniMaxM1(cfg).apply)({"params": params}, packed, seg, pos)[0])
    np.testing.assert_allclose(out[0, :30], np.asarray(apply(a))[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[0, 30:], np.asarray(apply(b))[0], rtol=1e-4, atol=1e-4)


def test_bf16_compute_close_to_fp32():
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(2))
    tokens = RNG(7).integers(0, cfg.vocab_size, (2, 40))
    ref = np.asarray(jax.jit(MiniMaxM1(cfg).apply)({"params": params}, tokens)[0])
    out = np.asarray(jax.jit(MiniMaxM1(cfg.replace(dtype="bfloat16")).apply)({"params": params}, tokens)[0])
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 5e-2


def test_out_of_vocab_tokens_rejected():
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 259\)"):
        MiniMaxM1(cfg).apply({"params": params}, np.array([[1, 2, 259]]))
    with pytest.raises(ValueError, match="must be integers"):
        MiniMaxM1(cfg).apply({"params": params}, np.array([[1.0, 2.0]]))


def test_gradients_finite_with_remat():
    cfg = get_config("tiny", remat_policy="full")
    params = init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray(RNG(8).integers(0, cfg.vocab_size, (2, 33)))

    def loss(p, c):
        logits, aux = MiniMaxM1(c).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + 1e-3 * aux["moe_aux_loss"]

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_remat = grad(params, cfg)
    g_plain = grad(params, cfg.replace(remat_policy="none"))
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_full_m1_abstract_init_and_lowering():
    cfg = get_config("minimax-m1-80k")
    start = time.perf_counter()
    shapes = abstract_params(cfg)
    assert shapes["groups"]["layer_0"]["moe"]["w_gate"].shape == (10, 32, 6144, 9216)
    tokens = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    lowered = jax.jit(lambda p, t: MiniMaxM1(cfg).apply({"params": p}, t)[0]).lower(shapes, tokens)
    assert "while" in lowered.as_text()  # one scanned group, not 80 unrolled layers
    assert time.perf_counter() - start < 120  # generous; docs/RESULTS.md records the measured time


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_matmul_runs_at_the_config_precision(dtype):
    """The lowered StableHLO of a tiny-model gradient (with segments and L > block_q, so the blockwise softmax's
    custom-VJP backward is in it): every dot HIGHEST for float32 (GPUs would otherwise run TF32), and for bf16
    only the router and the float32 LM head, which ask for it themselves."""
    import re

    cfg = get_config("tiny", dtype=dtype)
    L = cfg.impl.attention_block_q + 44
    params = abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((1, L), jnp.int32)
    segments = jnp.asarray(np.repeat([1, 2], [L // 2, L - L // 2])[None], jnp.int32)

    def loss(p, t):
        return jnp.sum(MiniMaxM1(cfg).apply({"params": p}, t, segment_ids_BxL=segments)[0])

    text = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).as_text()
    counts = {p: len(re.findall(rf"precision = \[{p}, {p}\]", text)) for p in ("DEFAULT", "HIGHEST")}
    if dtype == "float32":
        assert counts["DEFAULT"] == 0 and counts["HIGHEST"] > 50, counts
    else:
        router_and_head = 3 * cfg.num_layers + 3  # per layer the router and its 2 gradients; the head and its 2
        assert counts["HIGHEST"] <= router_and_head and counts["DEFAULT"] > 50, counts
