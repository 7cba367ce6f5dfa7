"""The RL loop on a mesh of fake CPU devices (conftest.py makes 8) against the single-device path.

- Placement helpers: interleaved rows + the strided split give back the single-device micro-batches; row counts
  that do not divide over the batch axes raise a ValueError naming the numbers.
- Two RL optimizer steps (micro-batched, MoE aux loss on) on a 2x2 data x expert mesh give the single-device
  loss, metrics and updated params; the params really are sharded.
- Sampling through the inference path on a mesh (rows padded to the batch parallelism) gives the single-device
  tokens and behaviour log-probs.
- (slow) run_rl on a 2-device mesh with GRPO's reference policy: metrics, checkpoints, and a killed run resumed
  onto the mesh reproduce the uninterrupted one.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax import sharding
from m1_jax.config import get_config
from m1_jax.data import load_tokenizer
from m1_jax.model import abstract_params
from m1_jax.rl import loop as loop_lib
from m1_jax.rl import rollout as rollout_lib
from m1_jax.rl import trainer as trainer_lib
from m1_jax.train import optimizer as opt_lib
from m1_jax.train.metrics import read_metrics
from m1_jax.train import state as state_lib
from m1_jax.train.state import TrainState
from m1_jax.train.step import split_micro_strided

# Two layers (1 lightning + 1 softmax), small blocks, a peaked random init; the MoE aux loss stays on (it is not
# additive over micro-batches, so it checks that the mesh step sees the single-device micro-batches).
CFG = get_config("tiny", num_layers=2, layer_types=("lightning", "softmax"), block_size=8, attention_block_q=8,
                 attention_block_kv=8, initializer_range=0.1)
TOK = load_tokenizer("byte")
P_WIDTH = 14
N_NEW = 5


@pytest.fixture(scope="module")
def params():
    """Normal(0, 0.1) weights, unit norm scales: numpy draws, no init compile (this machine is slow and shared)."""
    rng = np.random.default_rng(3)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, CFG.initializer_range, leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, abstract_params(CFG))


def _mesh(spec, n):
    return sharding.make_mesh(spec, jax.devices()[:n])


def _rl(**kw):
    base = dict(algo="cispo", group_size=4, prompts_per_step=4, mu=2, micro_batches=2, temperature=0.7, eps_high=0.28,
                max_new_tokens=N_NEW, max_prompt_len=P_WIDTH)
    return trainer_lib.RLConfig(**dict(base, **kw))


def fixed_rollout(groups=4, group_size=4, seed=0):
    """A numpy rollout (no sampling): left-padded prompts, varied lengths and rewards, behaviour log-probs near
    the random model's (about -5 nats a token) so ratios straddle the clip."""
    rng = np.random.default_rng(seed)
    B = groups * group_size
    prompt_lengths = rng.integers(3, P_WIDTH + 1, B).astype(np.int32)
    tokens = rng.integers(3, 256, (B, P_WIDTH + N_NEW)).astype(np.int32)
    tokens[:, :P_WIDTH][np.arange(P_WIDTH)[None] < (P_WIDTH - prompt_lengths)[:, None]] = TOK.pad_id
    lengths = rng.integers(1, N_NEW + 1, B).astype(np.int32)
    mask = (np.arange(N_NEW)[None] < lengths[:, None]).astype(np.float32)
    correct = rng.integers(0, 2, B).astype(np.float32)
    return rollout_lib.Rollout(
        tokens=tokens, prompt_lengths=prompt_lengths, response_mask=mask,
        behaviour_logp=(-rng.uniform(4.5, 6.5, (B, N_NEW)) * mask).astype(np.float32), lengths=lengths,
        finished=lengths < N_NEW, group_ids=np.repeat(np.arange(groups, dtype=np.int32), group_size),
        correct=correct, rewards=correct, completions=("",) * B)


def test_interleaved_rows_split_into_the_contiguous_micro_batches():
    x_BxT = np.arange(24 * 3).reshape(24, 3)
    for num_micro in (1, 2, 3):
        micros = np.asarray(split_micro_strided(jnp.asarray(trainer_lib.interleave_micro_batches(x_BxT, num_micro)),
                                                num_micro))
        np.testing.assert_array_equal(micros, x_BxT.reshape(num_micro, 24 // num_micro, 3))


def test_indivisible_rows_raise_with_the_numbers():
    mesh = _mesh("data=2,expert=2", 4)
    trainer_lib.check_mesh_divisibility(_rl(), mesh)  # 8-row minibatches, 4-row micro-batches: fine
    with pytest.raises(ValueError, match=r"a micro-batch \(8 / micro_batches=4\) has 2 responses, not divisible by "
                                         r"the 4-way batch sharding"):
        trainer_lib.check_mesh_divisibility(_rl(micro_batches=4), mesh)
    with pytest.raises(ValueError, match=r"a minibatch \(prompts_per_step / mu \* group_size = 2 / 1 \* 3\) has 6 "
                                         r"responses, not divisible by the 4-way"):
        trainer_lib.check_mesh_divisibility(_rl(prompts_per_step=2, mu=1, group_size=3, micro_batches=1), mesh)
    mb = trainer_lib.minibatches(fixed_rollout(groups=3, group_size=2), _rl(prompts_per_step=3, mu=1, group_size=2))[0]
    with pytest.raises(ValueError, match="a minibatch has 6 responses, not divisible by the 4-way"):
        trainer_lib.place_minibatch(mb, 1, mesh)
    with pytest.raises(ValueError, match="a minibatch .* has 6 responses"):
        loop_lib.check_mesh(CFG, _rl(prompts_per_step=2, mu=1, group_size=3, micro_batches=1), mesh)


def _fresh_state(params, tx):
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(0), bad_steps=jnp.zeros((), jnp.int32),
                      first_bad_step=jnp.full((), -1, jnp.int32))


def _run_steps(step, state, minibatches):
    metrics = []
    for mb in minibatches:
        state, m = step(state, mb)
        metrics.append(jax.device_get(m))
    return state, metrics


def test_mesh_step_matches_single_device(params):
    rl = _rl()
    tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0,
                                                        weight_decay=0.0))
    mbs = trainer_lib.minibatches(fixed_rollout(), rl)  # 2 minibatches of 8 rows, 2 micro-batches of 4 each

    one_state, one = _run_steps(trainer_lib.make_rl_step(CFG, rl, tx, P_WIDTH), _fresh_state(params, tx), mbs)
    mesh = _mesh("data=2,expert=2", 4)  # 4-way batch; experts over `expert`, embed dims over both (FSDP)
    placed = jax.device_put(_fresh_state(params, tx), state_lib.state_shardings(CFG, tx, mesh))
    mesh_state, many = _run_steps(trainer_lib.make_rl_step(CFG, rl, tx, P_WIDTH, mesh=mesh), placed, mbs)

    assert max(m["clip_fraction"] for m in one) > 0 and one[0]["aux_loss"] > 0  # clip and aux loss both active
    for a, b in zip(one, many):
        assert bool(a["finite"]) and bool(b["finite"])
        for k in a:
            if k != "finite":
                # prob_corr is a Pearson correlation in [-1, 1] from raw sums (cancellation): an absolute bound.
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5 if k == "prob_corr" else 1e-7, err_msg=k)
    for (path, x), y, x0 in zip(jax.tree_util.tree_flatten_with_path(one_state.params)[0],
                                jax.tree.leaves(mesh_state.params), jax.tree.leaves(params)):
        assert np.any(np.asarray(x) != np.asarray(x0)), jax.tree_util.keystr(path)  # every tensor was updated
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5 * float(np.max(np.abs(x))),
                                   err_msg=jax.tree_util.keystr(path))
    w_up = mesh_state.params["groups"]["layer_0"]["moe"]["w_up"]
    assert w_up.sharding.spec[1] == "expert" and len(w_up.sharding.device_set) == 4
    assert int(mesh_state.step) == 2


def test_mesh_sampling_matches_single_device(params):
    """3 prompts x G=2 = 6 rows on a 4-way mesh: padded to 8 for sampling, the padding dropped again."""
    examples = loop_lib.eval_examples(loop_lib.LoopConfig(task="mod_sum", eval_split="train", num_eval=3))
    kw = dict(group_size=2, max_new_tokens=3, prompt_width=P_WIDTH, temperature=0.7, rng=jax.random.key(5))
    one = rollout_lib.sample_rollout(CFG, params, TOK, examples, **kw)
    mesh = _mesh("data=4", 4)
    sharded_params = jax.device_put(params, sharding.logical_shardings(abstract_params(CFG, boxed=True), mesh))
    many = rollout_lib.sample_rollout(CFG, sharded_params, TOK, examples, mesh=mesh, **kw)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    np.testing.assert_array_equal(many.lengths, one.lengths)
    np.testing.assert_allclose(many.behaviour_logp, one.behaviour_logp, atol=1e-5)


def _records(workdir):
    # A step re-run after a kill overwrites its first record.
    return {rec["step"]: rec for rec in read_metrics(str(workdir))}


@pytest.mark.slow
def test_run_rl_on_mesh_resumes(params, tmp_path):
    """GRPO with a KL to the (sharded) reference params, eval with padded rows, checkpoints restored onto the mesh."""
    rl = trainer_lib.RLConfig(algo="grpo", kl_coef=0.01, group_size=4, prompts_per_step=2, mu=1, max_new_tokens=3,
                              max_prompt_len=P_WIDTH)
    ocfg = opt_lib.OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0)
    lc = loop_lib.LoopConfig(task="mod_sum", steps=3, eval_split="train", num_eval=3, eval_samples=0, eval_every=2,
                             checkpoint_every=1)
    mesh = _mesh("data=2", 2)
    run = lambda workdir, **kw: loop_lib.run_rl(CFG, rl, ocfg, lc, str(workdir), TOK, mesh=mesh,
                                                log_fn=lambda s: None, **kw)
    full = run(tmp_path / "full", init_params=lambda: params)
    killed = run(tmp_path / "split", init_params=lambda: params, stop_at_step=2)
    assert killed.get("killed") and killed["step"] == 2
    resumed = run(tmp_path / "split", init_params=None)
    assert resumed["resumed_from"] == 1 and resumed["step"] == 3
    a, b = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert "eval_accuracy" in a[2] and a[3]["kl_ref"] > 0 and a[1]["grad_norm"] > 0
    for s in a:
        for k, v in a[s].items():
            if k not in ("step_time", "sample_time"):
                assert b[s][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (s, k)
    shardings = state_lib.state_shardings(CFG, opt_lib.make_optimizer(ocfg), mesh).params
    leaves = zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"]), jax.tree.leaves(shardings))
    for x, y, sh in leaves:
        assert y.sharding.is_equivalent_to(sh, y.ndim)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
