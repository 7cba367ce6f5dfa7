"""Tests of m1_jax.rl.losses, advantages and filters against hand-derived values (rl.md §8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.rl import advantages as adv_lib
from m1_jax.rl import filters
from m1_jax.rl import losses

jax.config.update("jax_enable_x64", False)

# ---------------------------------------------------------------------------------------------------------
# The shared hand case: two responses (3 and 2 tokens, padded to T=4), A = +0.7 and -1.3.
#   row 0 (A > 0): r = 1.10 (inside), 1.50 (above every upper clip), 0.70 (below 1 - 0.2, but A > 0)
#   row 1 (A < 0): r = 0.50 (below 1 - 0.2: PPO's clipped branch), 1.05 (inside)
RATIO = np.array([[1.10, 1.50, 0.70, 7.0], [0.50, 1.05, 9.0, 0.01]])  # pads hold garbage ratios
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
ADV = np.array([0.7, -1.3])
N_TOKENS = 5.0


def _hand_case(seed=0):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.9, size=RATIO.shape))  # fresh, never zero
    old_logp = logp - np.log(RATIO)
    return (jnp.asarray(logp, jnp.float32), jnp.asarray(old_logp, jnp.float32), jnp.asarray(ADV, jnp.float32),
            jnp.asarray(MASK), logp)


def _value_and_grad(loss_fn, logp, old_logp, adv, mask, **kw):
    (loss, metrics), grad = jax.value_and_grad(lambda lp: loss_fn(lp, old_logp, adv, mask, **kw),
                                               has_aux=True)(logp)
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


def test_cispo_hand_case():
    logp, old_logp, adv, mask, logp_np = _hand_case()
    loss, grad, metrics = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=0.28,
                                          eps_low=0.2, aggregation="token_mean_batch")
    # IS weights clip(r, 0.8, 1.28), by hand:
    weight = np.array([[1.10, 1.28, 0.80, 0.0], [0.80, 1.05, 0.0, 0.0]])
    expected_loss = -np.sum(weight * ADV[:, None] * logp_np * MASK) / N_TOKENS
    expected_grad = -weight * ADV[:, None] * MASK / N_TOKENS
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(3 / 5)  # 1.50, 0.70 and 0.50 are clamped
    assert metrics["zeroed_fraction"] == 0.0 and np.all(grad[MASK > 0] != 0)  # clamped tokens keep a gradient
    assert metrics["ratio_mean"] == pytest.approx((1.10 + 1.50 + 0.70 + 0.50 + 1.05) / 5, rel=1e-5)
    assert metrics["approx_kl"] == pytest.approx(-np.log([1.1, 1.5, 0.7, 0.5, 1.05]).mean(), rel=1e-4)


def test_cispo_group_aggregation_hand_case():
    logp, old_logp, adv, mask, logp_np = _hand_case(1)
    weight = np.array([[1.10, 1.28, 0.80, 0.0], [0.80, 1.05, 0.0, 0.0]])
    term = -weight * ADV[:, None] * logp_np * MASK
    # Two groups (one response each): mean of the group token means = (sum0 / 3 + sum1 / 2) / 2.
    loss, grad, _ = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=0.28, eps_low=0.2,
                                    group_ids=jnp.array([3, 8]))
    np.testing.assert_allclose(loss, (term[0].sum() / 3 + term[1].sum() / 2) / 2, rtol=1e-5)
    np.testing.assert_allclose(grad[0], -weight[0] * 0.7 * MASK[0] / 6, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad[1], weight[1] * 1.3 * MASK[1] / 4, rtol=1e-5, atol=1e-7)
    # One group with both responses: the group token mean is the batch token mean.
    loss_one, _, _ = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=0.28, eps_low=0.2,
                                     group_ids=jnp.array([5, 5]))
    np.testing.assert_allclose(loss_one, term.sum() / 5, rtol=1e-5)


def test_dapo_hand_case():
    logp, old_logp, adv, mask, _ = _hand_case(2)
    loss, grad, metrics = _value_and_grad(losses.dapo_loss, logp, old_logp, adv, mask)
    # min(r A, clip(r, 0.8, 1.28) A) per token, by hand:
    #   row 0: 1.10*0.7 = 0.77 | min(1.05, 1.28*0.7 = 0.896) = 0.896 (clipped) | min(0.49, 0.56) = 0.49
    #   row 1: min(-0.65, -1.04) = -1.04 (clipped) | 1.05*-1.3 = -1.365
    objective = np.array([0.77, 0.896, 0.49, -1.04, -1.365])
    # d/dlogp of r A is r A on the unclipped branch, 0 on the clipped one.
    dobj = np.array([[0.77, 0.0, 0.49, 0.0], [0.0, -1.365, 0.0, 0.0]])
    np.testing.assert_allclose(loss, -objective.sum() / N_TOKENS, rtol=1e-5)
    np.testing.assert_allclose(grad, -dobj / N_TOKENS, rtol=1e-5, atol=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["zeroed_fraction"] == pytest.approx(np.mean(grad[MASK > 0] == 0))  # = 2 / 5, from the gradient


def test_grpo_hand_case():
    logp, old_logp, adv, mask, _ = _hand_case(3)
    loss, grad, metrics = _value_and_grad(losses.grpo_loss, logp, old_logp, adv, mask)
    # min(r A, clip(r, 0.8, 1.2) A): row 0: 0.77 | min(1.05, 0.84) = 0.84 | 0.49;  row 1: -1.04 | -1.365
    seq_means = np.array([(0.77 + 0.84 + 0.49) / 3, (-1.04 - 1.365) / 2])
    dobj = np.array([[0.77, 0.0, 0.49, 0.0], [0.0, -1.365, 0.0, 0.0]])
    lengths = np.array([[3.0], [2.0]])
    np.testing.assert_allclose(loss, -seq_means.mean(), rtol=1e-5)
    np.testing.assert_allclose(grad, -dobj / (lengths * 2), rtol=1e-5, atol=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("eps_low,eps_high,ratios,expected", [
    # slime tests/test_cispo_loss.py closed forms (rl.md §3).
    (0.2, 0.28, [1.0, 1.14, 1.56, 0.4], [1.0, 1.14, 1.28, 0.8]),
    (1.0, 4.0, [1.0, 3.0, 9.0, 0.4], [1.0, 3.0, 5.0, 0.4]),
])
def test_cispo_closed_form_clamp(eps_low, eps_high, ratios, expected):
    rng = np.random.default_rng(4)
    logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, size=(1, 4))), jnp.float32)
    old_logp = logp - jnp.log(jnp.asarray([ratios], jnp.float32))
    adv, mask = jnp.array([1.0]), jnp.ones((1, 4))
    _, grad, _ = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=eps_high,
                                 eps_low=eps_low, aggregation="token_mean_batch")
    # grad = -sg(clip(r)) * A / N with A = 1, N = 4: the IS weight is read off the gradient.
    np.testing.assert_allclose(-4.0 * grad[0], expected, rtol=1e-5)


def test_no_gradient_through_clipped_ratio():
    logp, old_logp, adv, mask, _ = _hand_case(5)
    kw = dict(eps_high=0.28, eps_low=0.2, aggregation="token_mean_batch")
    grad_old = jax.grad(lambda o: losses.cispo_loss(logp, o, adv, mask, **kw)[0])(old_logp)
    np.testing.assert_array_equal(np.asarray(grad_old), 0.0)  # old_logp enters only through sg(r)
    # Without the stop-gradient the logp gradient would gain r * A * logp / N on unclipped tokens.
    _, grad, _ = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, **kw)
    weight = np.array([[1.10, 1.28, 0.80, 0.0], [0.80, 1.05, 0.0, 0.0]])
    np.testing.assert_allclose(grad, -weight * ADV[:, None] * MASK / N_TOKENS, rtol=1e-5, atol=1e-7)


def _random_batch(seed, batch=6, seq_len=7, ratio_range=(0.9, 1.1)):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, size=batch)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float32)
    logp = np.log(rng.uniform(0.05, 0.95, size=(batch, seq_len)))
    ratio = rng.uniform(*ratio_range, size=(batch, seq_len))
    adv = rng.normal(size=batch)
    return (jnp.asarray(logp, jnp.float32), jnp.asarray(logp - np.log(ratio), jnp.float32),
            jnp.asarray(adv, jnp.float32), jnp.asarray(mask), ratio, adv, mask)


def test_unclipped_equivalence_ppo_and_cispo():
    logp, old_logp, adv, mask, ratio, adv_np, mask_np = _random_batch(6, ratio_range=(0.85, 1.15))
    expected = -ratio * adv_np[:, None] * mask_np / mask_np.sum()  # d(-r A / N)/dlogp = -r A / N
    for loss_fn, kw in [(losses.cispo_loss, dict(eps_high=0.28, eps_low=0.2)),
                        (losses.dapo_loss, {}), (losses.grpo_loss, dict(eps=0.2))]:
        _, grad, metrics = _value_and_grad(loss_fn, logp, old_logp, adv, mask, aggregation="token_mean_batch",
                                           **kw)
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7, err_msg=loss_fn.__name__)
        assert metrics["clip_fraction"] == 0.0


def test_on_policy_all_losses_give_minus_a_over_n():
    logp, _, adv, mask, _, adv_np, mask_np = _random_batch(7)
    for loss_fn in losses.POLICY_LOSSES.values():
        kw = dict(eps_high=0.28) if loss_fn is losses.cispo_loss else {}
        _, grad, metrics = _value_and_grad(loss_fn, logp, logp, adv, mask, aggregation="token_mean_batch", **kw)
        np.testing.assert_allclose(grad, -adv_np[:, None] * mask_np / mask_np.sum(), rtol=1e-5, atol=1e-7)
        assert metrics["approx_kl"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    # GRPO's own aggregation: -A / (|o_b| B).
    _, grad, _ = _value_and_grad(losses.grpo_loss, logp, logp, adv, mask)
    lengths = mask_np.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, -adv_np[:, None] * mask_np / (lengths * len(adv_np)), rtol=1e-5, atol=1e-7)


def test_eq7_token_mask_without_is_clip_equals_dapo_gradient():
    logp, old_logp, adv, mask, ratio, _, _ = _random_batch(8, batch=8, ratio_range=(0.5, 1.6))
    assert (ratio > 1.28).any() and (ratio < 0.8).any()  # both sides of the clip are exercised
    _, grad_dapo, _ = _value_and_grad(losses.dapo_loss, logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28)
    _, grad_cispo, m = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=None,
                                       eps_low=None, token_mask=True, mask_eps_low=0.2, mask_eps_high=0.28,
                                       aggregation="token_mean_batch")
    np.testing.assert_allclose(grad_cispo, grad_dapo, rtol=1e-5, atol=1e-7)
    assert m["token_mask_fraction"] > 0 and m["clip_fraction"] == 0.0
    assert m["zeroed_fraction"] == pytest.approx(np.mean(grad_dapo[np.asarray(mask) > 0] == 0))
    # Without the mask the gradients differ (the test can fail).
    _, grad_plain, _ = _value_and_grad(losses.cispo_loss, logp, old_logp, adv, mask, eps_high=None,
                                       aggregation="token_mean_batch")
    assert not np.allclose(grad_plain, grad_dapo)


def test_aggregation_modes_on_unequal_lengths():
    logp, _, adv, mask, _, adv_np, mask_np = _random_batch(9)
    group_ids = np.array([0, 0, 1, 1, 1, 2])
    term = -adv_np[:, None] * np.asarray(logp, np.float64) * mask_np  # on-policy CISPO term per token
    seq_sum, lengths = term.sum(-1), mask_np.sum(-1)
    expected = {
        "token_mean_batch": seq_sum.sum() / lengths.sum(),
        "seq_mean_token_mean": np.mean(seq_sum / lengths),
        "token_mean_group": np.mean([seq_sum[group_ids == g].sum() / lengths[group_ids == g].sum()
                                     for g in range(3)]),
    }
    assert len(set(np.round(list(expected.values()), 6))) == 3  # the modes really differ here
    for aggregation, value in expected.items():
        loss, _ = losses.cispo_loss(logp, logp, adv, mask, eps_high=0.28, aggregation=aggregation,
                                    group_ids=jnp.asarray(group_ids))
        np.testing.assert_allclose(float(loss), value, rtol=1e-5, err_msg=aggregation)


@pytest.mark.parametrize("name,aggregation", [
    ("cispo", "token_mean_group"), ("cispo", "token_mean_batch"), ("dapo", "token_mean_batch"),
    ("grpo", "seq_mean_token_mean"), ("grpo", "token_mean_group")])
def test_micro_batches_with_global_denominators_equal_full_batch(name, aggregation):
    logp, old_logp, adv, mask, _, _, _ = _random_batch(10, batch=8, ratio_range=(0.6, 1.5))
    group_ids = jnp.array([4, 4, 4, 7, 7, 7, 9, 9])  # micro-batches of 2 split groups across them
    loss_fn = losses.POLICY_LOSSES[name]
    kw = dict(eps_high=0.28) if name == "cispo" else {}
    ref_logp = old_logp - 0.05
    if name == "grpo":
        kw.update(kl_coef=0.04)

    def full(lp):
        extra = dict(ref_logp=ref_logp) if name == "grpo" else {}
        return loss_fn(lp, old_logp, adv, mask, aggregation=aggregation, group_ids=group_ids, **kw, **extra)[0]

    dens = losses.loss_denominators(mask, aggregation, group_ids)

    def micro_sum(lp, local=False):
        total = 0.0
        for s in range(0, 8, 2):
            sl = slice(s, s + 2)
            extra = dict(ref_logp=ref_logp[sl]) if name == "grpo" else {}
            total += loss_fn(lp[sl], old_logp[sl], adv[sl], mask[sl], aggregation=aggregation,
                             group_ids=group_ids[sl], denominator=None if local else dens[sl], **kw, **extra)[0]
        return total

    np.testing.assert_allclose(float(micro_sum(logp)), float(full(logp)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(micro_sum)(logp)), np.asarray(jax.grad(full)(logp)),
                               rtol=1e-5, atol=1e-8)
    # Normalising each micro-batch by itself is the classic bug (rl.md §6.1): it gives a different loss.
    assert not np.isclose(float(micro_sum(logp, local=True)), float(full(logp)), rtol=1e-3)


def test_grpo_k3_kl_value_and_gradient():
    logp, _, adv, mask, _, adv_np, mask_np = _random_batch(11)
    rng = np.random.default_rng(12)
    ref_logp_np = np.asarray(logp, np.float64) + rng.normal(scale=0.3, size=logp.shape)
    beta = 0.1
    loss, grad, metrics = _value_and_grad(losses.grpo_loss, logp, logp, adv, mask, kl_coef=beta,
                                          ref_logp=jnp.asarray(ref_logp_np, jnp.float32))
    delta = ref_logp_np - np.asarray(logp, np.float64)  # log(pi_ref / pi)
    k3 = np.exp(delta) - delta - 1.0
    lengths = mask_np.sum(-1, keepdims=True)
    weight = mask_np / (lengths * len(adv_np))
    # On policy the PPO term is -A per token; d k3 / d logp = 1 - pi_ref / pi.
    np.testing.assert_allclose(loss, np.sum((-adv_np[:, None] + beta * k3) * weight), rtol=1e-5)
    np.testing.assert_allclose(grad, (-adv_np[:, None] + beta * (1.0 - np.exp(delta))) * weight,
                               rtol=1e-4, atol=1e-7)
    assert metrics["kl_ref"] == pytest.approx((k3 * mask_np).sum() / mask_np.sum(), rel=1e-4)
    assert (np.asarray(losses.k3_kl(logp, logp)) == 0.0).all()
    with pytest.raises(ValueError, match="ref_logp"):
        losses.grpo_loss(logp, logp, adv, mask, kl_coef=0.1)


def test_bad_inputs_raise():
    logp, old_logp, adv, mask, _ = _hand_case()
    with pytest.raises(ValueError, match="advantages"):
        losses.dapo_loss(logp, old_logp, adv[:1], mask)
    with pytest.raises(ValueError, match="group_ids"):
        losses.cispo_loss(logp, old_logp, adv, mask, eps_high=0.28)
    with pytest.raises(ValueError, match="aggregation"):
        losses.dapo_loss(logp, old_logp, adv, mask, aggregation="token_sum")
    with pytest.raises(ValueError, match="offsets"):
        losses.cispo_loss(logp, old_logp, adv, mask, eps_high=-0.5, aggregation="token_mean_batch")


# ---------------------------------------------------------------------------------------------------------
# Bandit mechanism check (rl.md §7): PPO-clip stops pushing a rare positive token once r > 1 + eps.

def _bandit(loss_fn, steps=16, lr=0.4, vocab=10, **kw):
    # Target token 0 starts at p = 0.02; the other samples have zero advantage.
    logits = np.zeros(vocab)
    logits[0] = np.log(0.02 * (vocab - 1) / 0.98)
    tokens = jnp.array([0, 3, 5, 7])
    adv = jnp.array([1.0, 0.0, 0.0, 0.0])
    mask = jnp.ones((4, 1))
    theta = jnp.asarray(logits, jnp.float32)
    old_logp = jax.nn.log_softmax(theta)[tokens][:, None]

    def loss(th):
        logp = jax.nn.log_softmax(th)[tokens][:, None]
        return loss_fn(logp, old_logp, adv, mask, aggregation="token_mean_batch", **kw)[0]

    grad_fn = jax.jit(jax.grad(loss))
    probs = [float(jax.nn.softmax(theta)[0])]
    grads = []
    for _ in range(steps):  # mu = 16 off-policy SGD steps on one batch, old_logp fixed
        g = grad_fn(theta)
        grads.append(np.abs(np.asarray(g)).max())
        theta = theta - lr * g
        probs.append(float(jax.nn.softmax(theta)[0]))
    return np.array(probs) / probs[0], np.array(grads)  # ratios r_k of the target, |grad| per step


@pytest.mark.parametrize("loss_fn,kw,cap", [(losses.grpo_loss, dict(eps=0.2), 1.2),
                                            (losses.dapo_loss, dict(eps_low=0.2, eps_high=0.28), 1.28)])
def test_bandit_ppo_clip_stops_while_cispo_keeps_pushing(loss_fn, kw, cap):
    ratio_ppo, grads_ppo = _bandit(loss_fn, **kw)
    ratio_cispo, _ = _bandit(losses.cispo_loss, eps_high=0.28)
    assert ratio_ppo.max() > cap  # it did reach the clip
    # Once r > 1 + eps the gradient is exactly zero, so r never moves again.
    beyond = ratio_ppo[:-1] > cap
    assert beyond.any() and (grads_ppo[beyond] == 0.0).all()
    # Overshoot at most one step: the largest single-step growth while still inside the clip.
    inside = ~beyond
    max_step = np.max(np.log(ratio_ppo[1:][inside] / ratio_ppo[:-1][inside]))
    assert np.log(ratio_ppo[-1]) <= np.log(cap) + max_step + 1e-6
    # CISPO keeps raising p every step and ends far beyond the PPO cap.
    assert (np.diff(ratio_cispo) > 0).all()
    assert ratio_cispo[-1] > 2.0 * ratio_ppo[-1]


# ---------------------------------------------------------------------------------------------------------
# Advantages.

def test_advantages_std_conventions_at_g4():
    rewards = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    sign = np.array([[1, 1, -1, -1]])
    # mean 0.5; population std 0.5; sample std sqrt(1/3) = 0.57735 -> 0.5 / 0.57735 = 0.8660.
    for std, magnitude in [("unbiased", np.sqrt(0.75)), ("biased", 1.0), ("none", 0.5)]:
        np.testing.assert_allclose(np.asarray(adv_lib.group_advantages(rewards, std=std, eps=0.0)),
                                   sign * magnitude, rtol=1e-6, err_msg=std)


def test_advantages_random_groups_match_numpy_float64():
    rng = np.random.default_rng(13)
    rewards = rng.normal(size=(5, 8))
    for std, ddof in [("unbiased", 1), ("biased", 0)]:
        expected = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=ddof, keepdims=True) + 1e-4)
        np.testing.assert_allclose(np.asarray(adv_lib.group_advantages(rewards, std=std, eps=1e-4)), expected,
                                   rtol=1e-5, atol=1e-6)


def test_advantages_flat_with_interleaved_uneven_groups():
    rng = np.random.default_rng(14)
    group_ids = np.array([2, 0, 2, 1, 0, 2, 0, 2, 9])  # group 9 has a single member
    rewards = rng.uniform(size=group_ids.shape)
    got = np.asarray(adv_lib.group_advantages(rewards, jnp.asarray(group_ids), std="unbiased", eps=1e-6))
    for g in np.unique(group_ids):
        r = rewards[group_ids == g]
        want = np.zeros_like(r) if len(r) == 1 else (r - r.mean()) / (r.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(got[group_ids == g], want, rtol=1e-5, atol=1e-6)


def test_advantages_constant_group_is_exactly_zero():
    # 0.1 is not exactly representable, so the mean of equal values carries rounding error; eps = 0 too.
    rewards = jnp.array([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [-3.0, -3.0, -3.0]])
    for std in adv_lib.STD_CONVENTIONS:
        got = np.asarray(adv_lib.group_advantages(rewards, std=std, eps=0.0))
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got[[0, 2]], 0.0)
        assert (got[1] != 0).all()


# ---------------------------------------------------------------------------------------------------------
# Filters.

def test_overlong_penalty_boundaries():
    got = np.asarray(filters.overlong_penalty([0, 16, 17, 18, 19, 20, 21, 100], max_len=20, cache_len=4))
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    # DAPO's setting: expected length 16384.
    got = np.asarray(filters.overlong_penalty([16384, 16385, 20480, 20481], max_len=20480, cache_len=4096))
    np.testing.assert_allclose(got, [0.0, -1 / 4096, -1.0, -1.0], rtol=1e-6)
    with pytest.raises(ValueError):
        filters.overlong_penalty([1], max_len=4, cache_len=8)


def test_overlong_filter_mask():
    np.testing.assert_array_equal(np.asarray(filters.overlong_filter_mask([3, 8, 10, 12], max_len=10)),
                                  [1, 1, 0, 0])
    np.testing.assert_array_equal(
        np.asarray(filters.overlong_filter_mask([3, 10], max_len=10, finished=[False, True])), [0, 1])


def _naive_stop(probs, min_run, threshold):
    out = []
    for row in probs:
        run, stop = 0, len(row)
        for t, p in enumerate(row):
            run = run + 1 if p > threshold else 0
            if run >= min_run:
                stop = t + 1
                break
        out.append(stop)
    return np.array(out)


def test_repetition_stop_exact_threshold_resets_the_run():
    probs = np.array([
        [0.995, 0.995, 0.99, 0.995, 0.995, 0.995, 0.5, 0.3],  # exactly 0.99 resets: hit at t=5 -> 6
        [0.995, 0.995, 0.5, 0.995, 0.995, 0.2, 0.999, 0.999],  # never 3 in a row -> T
        [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1],  # hit at t=2 -> 3
        [0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99],  # all exactly at threshold -> T
    ])
    got = np.asarray(filters.repetition_stop_index(probs, min_run=3, threshold=0.99))
    np.testing.assert_array_equal(got, [6, 8, 3, 8])
    got = np.asarray(filters.repetition_stop_index(probs, min_run=3, threshold=0.99, lengths=[4, 8, 8, 8]))
    np.testing.assert_array_equal(got, [4, 8, 3, 8])


def test_repetition_stop_defaults_and_random_against_loop():
    probs = np.full((2, 3200), 0.5)
    probs[0, 50:3050] = 0.999  # exactly 3000 tokens above 0.99
    probs[1, 50:3049] = 0.999  # one short
    np.testing.assert_array_equal(np.asarray(filters.repetition_stop_index(probs)), [3050, 3200])
    rng = np.random.default_rng(15)
    probs = np.where(rng.uniform(size=(16, 64)) < 0.8, 0.995, rng.choice([0.3, 0.99], size=(16, 64)))
    np.testing.assert_array_equal(np.asarray(filters.repetition_stop_index(probs, min_run=5)),
                                  _naive_stop(probs, 5, 0.99))


def test_dynamic_sampling_drops_all_correct_and_all_wrong():
    scores = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(filters.informative_groups(scores), [False, False, True, True])
    rng = np.random.default_rng(16)
    calls = []

    def sample_fn(n):
        calls.append(n)
        scores = rng.integers(0, 2, size=(n + 2, 4))
        scores[2:, 0], scores[2:, 1] = 1, 0  # informative ...
        scores[0], scores[1] = 1, 0  # ... except one all-correct and one all-wrong group per round
        if not calls[:-1]:
            scores[2] = 1  # and a third dropped group in the first round, so a refill round is needed
        groups = [(len(calls), i, tuple(s)) for i, s in enumerate(scores)]
        return groups, scores

    kept, stats = filters.collect_informative_groups(sample_fn, 10)
    assert len(kept) == 10 and stats["kept_groups"] == 10
    assert all(0 < sum(g[2]) < 4 for g in kept)
    assert calls == [10, 1] and stats["rounds"] == 2 and stats["sampled_groups"] == 12 + 3
    with pytest.raises(RuntimeError, match="informative"):
        filters.collect_informative_groups(lambda n: ([0] * n, np.ones((n, 4))), 3, max_rounds=2)
    kept, stats = filters.collect_informative_groups(lambda n: ([0] * n, np.ones((n, 4))), 3, max_rounds=2,
                                                     allow_partial=True)
    assert kept == [] and stats["sampled_groups"] == 6
