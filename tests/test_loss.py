"""The chunked LM head + cross-entropy (m1_jax/train/loss.py) against a float64 numpy full-logits
reference (values and gradients w.r.t. hidden states and head weight), and the model's hidden-state path
against its logits path (whole-model loss and gradients)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.config import get_config
from m1_jax.model import MiniMaxM1, init_params, lm_head_logits, lm_head_weight
from m1_jax.train.loss import chunked_cross_entropy
from m1_jax.train.step import token_cross_entropy

B, L, D, V = 3, 37, 16, 50
CFG = get_config("tiny", fp32_lm_head=True)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, L, D)) * 2.0
    head = rng.standard_normal((D, V)) * 0.5
    targets = rng.integers(0, V, (B, L))
    mask = np.ones((B, L))
    mask[0, -9:] = 0.0    # right padding
    mask[1, :5] = 0.0     # a masked prompt
    mask[2, ::4] = 0.0
    return h, head, targets, mask


def _numpy_loss_and_grads(h, head, targets, mask):
    """float64: loss = sum(mask * ce) / sum(mask) with full [B, L, V] logits; analytic gradients."""
    logits = h @ head
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    label = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ce = lse - label
    n = mask.sum()
    probs = np.exp(logits - lse[..., None])
    dlogits = (probs - np.eye(V)[targets]) * (mask / n)[..., None]
    dh = dlogits @ head.T
    dhead = np.einsum("bld,blv->dv", h, dlogits)
    return ce, (ce * mask).sum() / n, dh, dhead


def _chunked_loss(chunk_size, cfg=CFG):
    def loss(h, head, targets, mask):
        ce = chunked_cross_entropy(cfg, h, head, targets, chunk_size=chunk_size)
        return jnp.sum(ce * mask) / jnp.sum(mask), ce
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 64])  # 8 and 16 do not divide L=37; 64 > L
def test_chunked_cross_entropy_matches_float64_reference(chunk_size):
    h, head, targets, mask = _inputs(chunk_size)
    want_ce, want_loss, want_dh, want_dhead = _numpy_loss_and_grads(h, head, targets, mask)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    (loss, ce), (dh, dhead) = _chunked_loss(chunk_size)(f32(h), f32(head), jnp.asarray(targets, jnp.int32),
                                                        f32(mask))
    assert ce.shape == (B, L) and ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), want_ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), want_dh, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dhead), want_dhead, rtol=1e-4, atol=1e-7)
    # Masked positions get no gradient at all.
    assert not np.any(np.asarray(dh)[mask == 0])


def test_chunked_cross_entropy_argmax_and_bf16_head():
    h, head, targets, _ = _inputs(5)
    ce, argmax = jax.jit(lambda *a: chunked_cross_entropy(CFG, *a, chunk_size=8, with_argmax=True))(
        jnp.asarray(h, jnp.float32), jnp.asarray(head, jnp.float32), jnp.asarray(targets, jnp.int32))
    np.testing.assert_array_equal(np.asarray(argmax), np.argmax(h @ head, -1))
    # fp32_lm_head off (bf16 compute): the same numbers as the model's own head + optax's cross-entropy.
    cfg = get_config("tiny", fp32_lm_head=False, dtype="bfloat16")
    hb = jnp.asarray(h, jnp.bfloat16)
    want = token_cross_entropy(lm_head_logits(cfg, hb, jnp.asarray(head, jnp.float32)), jnp.asarray(targets))
    got = chunked_cross_entropy(cfg, hb, jnp.asarray(head, jnp.float32), jnp.asarray(targets), chunk_size=8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_never_builds_full_logits():
    # Every array in the forward and backward pass is smaller than one [B, L, V] logits tensor.
    Lb, Vb, C = 512, 1000, 64
    loss = lambda h, w, t: jnp.sum(chunked_cross_entropy(CFG, h, w, t, chunk_size=C))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        jnp.zeros((1, Lb, D)), jnp.zeros((D, Vb)), jnp.zeros((1, Lb), jnp.int32))

    def sizes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) <= C * Vb < Lb * Vb


@pytest.mark.parametrize("tie", [False, True])
def test_model_hidden_path_equals_logits_path(tie):
    cfg = get_config("tiny", tie_word_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 21)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 21)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 21)) > 0.2, jnp.float32)
    model = MiniMaxM1(cfg)

    # Both paths in one jitted program (op-by-op dispatch of the whole model takes minutes on CPU), so XLA
    # compiles them alike and they must agree exactly.
    @jax.jit
    def both_paths(p):
        h, _ = model.apply({"params": p}, tokens, return_hidden=True)
        return lm_head_logits(cfg, h, lm_head_weight(cfg, p)), model.apply({"params": p}, tokens)[0]

    from_hidden, logits = both_paths(params)
    np.testing.assert_array_equal(np.asarray(from_hidden), np.asarray(logits))

    def full(p):
        logits, _ = model.apply({"params": p}, tokens)
        return jnp.sum(token_cross_entropy(logits, targets) * mask)

    def chunked(p):
        h, _ = model.apply({"params": p}, tokens, return_hidden=True)
        return jnp.sum(chunked_cross_entropy(cfg, h, lm_head_weight(cfg, p), targets, chunk_size=8) * mask)

    loss_f, grads_f = jax.jit(jax.value_and_grad(full))(params)
    loss_c, grads_c = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(float(loss_c), float(loss_f), rtol=1e-6)
    assert jax.tree.structure(grads_c) == jax.tree.structure(grads_f)
    jax.tree.map(lambda c, f: np.testing.assert_allclose(np.asarray(c), np.asarray(f), rtol=1e-4, atol=1e-6),
                 grads_c, grads_f)


@pytest.mark.parametrize("spec", ["data=2,expert=4", "data=2,expert=2,tensor=2"])
def test_chunked_cross_entropy_under_a_mesh(spec):
    # 8 fake devices. Batch axes only: a shard_map (head gathered once, its gradient reduce-scattered once).
    # With a tensor axis: plain GSPMD. Both must give the single-device numbers.
    from m1_jax import sharding as sharding_lib
    from m1_jax.train.step import mesh_context

    Bm, Lm, Vm = 8, 40, 300
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((Bm, Lm, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, Vm)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, Vm, (Bm, Lm)), jnp.int32)
    mask = jnp.asarray(rng.random((Bm, Lm)) > 0.3, jnp.float32)
    fn = _chunked_loss(16)
    (want_loss, want_ce), want_grads = fn(h, head, targets, mask)
    mesh = sharding_lib.make_mesh(spec)
    with mesh_context(mesh):
        (loss, ce), grads = fn(h, head, targets, mask)
        hlo = fn.lower(h, head, targets, mask).compile().as_text()
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ce), np.asarray(want_ce), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if "tensor" not in spec:
        # The head gradient is never all-reduced (GSPMD would all-reduce it once per chunk inside the loop).
        head_collectives = [line for line in hlo.split("\n")
                            if re.search(r"(all-reduce|reduce-scatter)\(", line) and f",{Vm}]" in line]
        assert len(head_collectives) == 1 and "reduce-scatter(" in head_collectives[0], head_collectives
