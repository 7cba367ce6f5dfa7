"""Training pipeline: loss falls, exact kill/resume, SIGTERM save/resume, fail-fast config errors,
corrupt/incompatible checkpoints, the non-finite guard and the optimizer pieces."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.config import get_config
from m1_jax.train.checkpoint import CheckpointError
from m1_jax.train.loop import build_setup, train
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train import step as step_lib
from m1_jax.train.metrics import expert_load_stats, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import tiny  # noqa: E402

STEPS = 8
ONE = jax.devices()[:1]  # conftest fakes 8 CPU devices; most tests want one


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    # Every run here compiles the same step; a persistent cache makes the second and later runs cheap.
    path = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def small_config(**train):
    c = tiny.get_config()
    c.data.batch_size, c.data.seq_len = 4, 64
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 1e-2, 0, "constant"
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = STEPS, 1, 0, 3
    c.train.tensorboard = False
    for k, v in train.items():
        c.train[k] = v
    return c


def losses(workdir):
    out = {}
    for r in read_metrics(workdir):  # a resumed run re-logs steps after its checkpoint; the last one counts
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, xla_cache):
    """An uninterrupted run and a run killed after step 5 (last checkpoint: step 3), then resumed."""
    root = tmp_path_factory.mktemp("runs")
    full, killed = str(root / "full"), str(root / "killed")
    train(small_config(), full, devices=ONE)
    first = train(small_config(), killed, devices=ONE, stop_at_step=5)
    second = train(small_config(), killed, devices=ONE)
    return {"full": full, "killed": killed, "first": first, "second": second}


def test_loss_falls_and_metrics_written(runs):
    by_step = losses(runs["full"])
    assert sorted(by_step) == list(range(1, STEPS + 1))
    # A byte model starts near ln(259) = 5.56 and learns the byte statistics within a few steps.
    assert abs(by_step[1] - np.log(259)) < 0.5
    assert np.mean([by_step[7], by_step[8]]) < by_step[1] - 0.5
    record = read_metrics(runs["full"])[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "expert_load_ratio_max"):
        assert key in record, key
    assert record["lr"] == pytest.approx(1e-2)
    assert len(record["expert_load_max_over_mean"]) == 4


def test_kill_and_resume_is_exact(runs):
    assert runs["first"]["step"] == 5 and runs["second"]["resumed_from"] == 3
    full, resumed = losses(runs["full"]), losses(runs["killed"])
    assert sorted(resumed) == sorted(full)
    for step in full:
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bitwise equal on CPU


def test_corrupt_checkpoint_names_step(runs, tmp_path):
    work = str(tmp_path / "w")
    shutil.copytree(runs["full"], work)
    ckpt = os.path.join(work, "checkpoints", str(STEPS))
    assert os.path.isdir(ckpt)
    # Truncate every array data file of the latest checkpoint.
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt, "state")) for f in fs
                  if "manifest" in f or d.endswith("d")]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) // 3))
    with pytest.raises(CheckpointError, match=f"step {STEPS}"):
        train(small_config(steps=STEPS + 2), work, devices=ONE)


def test_deleted_checkpoint_metadata_names_step(runs, tmp_path):
    work = str(tmp_path / "w")
    shutil.copytree(runs["full"], work)
    shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS), "meta"))
    with pytest.raises(CheckpointError, match=f"step {STEPS}"):
        train(small_config(steps=STEPS + 2), work, devices=ONE)


def test_incompatible_checkpoint_names_step(runs, tmp_path):
    work = str(tmp_path / "w")
    shutil.copytree(runs["full"], work)
    c = small_config(steps=STEPS + 2)
    c.model.expert_dim = 64
    with pytest.raises(CheckpointError, match=f"step {STEPS}.*incompatible"):
        train(c, work, devices=ONE)


def test_load_params_reads_a_train_run_and_a_params_save(runs, tmp_path):
    """One reader for every consumer (generate, RL warm starts): the params of a train run's last state (equal to
    the Orbax state restored whole), a save_params folder, and a clear error for another model's checkpoint."""
    from m1_jax.train import checkpoint as ckpt_lib
    from m1_jax.train.loop import model_config_from

    cfg, params = ckpt_lib.load_params(runs["full"])
    assert cfg == model_config_from(small_config())
    ckpt = ckpt_lib.Checkpointer(os.path.join(runs["full"], "checkpoints"), async_save=False)
    setup = build_setup(small_config(), devices=ONE)
    whole, _ = ckpt.restore(STEPS, state_lib.abstract_state(cfg, opt_lib.make_optimizer(setup.optimizer)))
    ckpt.close()
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ckpt_lib.save_params(str(tmp_path / "p"), params, {"model_config": dataclasses.asdict(cfg)})
    again_cfg, again = ckpt_lib.load_params(str(tmp_path / "p"))
    assert again_cfg == cfg
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(CheckpointError, match="shape"):
        ckpt_lib.load_params(runs["full"], cfg.replace(expert_dim=64))
    with pytest.raises(ValueError, match="no checkpoint|does not exist"):
        ckpt_lib.load_params(str(tmp_path / "nothing"))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.train.__setattr__("grad_accum_steps", 2) or c.data.__setattr__("batch_size", 3),
     "not divisible by train.grad_accum_steps"),
    (lambda c: c.train.__setattr__("grad_accum_steps", 2) or c.data.__setattr__("batch_size", 6),
     "divisible by the 8-way batch sharding"),
    (lambda c: c.model.__setattr__("num_kv_heads", 3), "num_heads .* divisible by num_kv_heads"),
    (lambda c: c.model.__setattr__("vocab_size", 100), "tokenizer .* 259 ids"),
    (lambda c: c.optimizer.__setattr__("schedule", "linear"), "schedule must be one of"),
    (lambda c: c.train.__setattr__("steps", 0), "train.steps must be >= 1"),
])
def test_bad_configs_fail_fast(change, message):
    c = small_config()
    c.data.batch_size = 8  # valid on the 8 fake devices until `change` breaks something
    change(c)
    with pytest.raises(ValueError, match=message):
        build_setup(c, None)  # 8 fake CPU devices, all data-parallel


def test_train_py_bad_flags_fail_fast(tmp_path):
    script = os.path.join(REPO, "experiments", "train.py")
    for args, message in ((["--mesh=3x5"], "needs 15 devices"), (["--config.train.nosuch=1"], "nosuch"),
                          (["--steps=0"], "train.steps must be >= 1")):
        proc = subprocess.run([sys.executable, script, f"--workdir={tmp_path}", "--compilation_cache=", *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode != 0, args
        assert message in proc.stderr + proc.stdout, (args, proc.stderr[-2000:])


def test_sigterm_saves_and_resumes(tmp_path, xla_cache):
    script = os.path.join(REPO, "experiments", "train.py")
    work = str(tmp_path / "run")
    common = [sys.executable, script, f"--workdir={work}", f"--compilation_cache={xla_cache}",
              "--config.data.batch_size=4", "--config.data.seq_len=64", "--log_every=1", "--eval_every=0",
              "--checkpoint_every=0", "--noprogress", "--config.train.tensorboard=False"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(common + ["--steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO)
    metrics = os.path.join(work, "metrics.jsonl")
    try:  # the run is endless until signalled: never leave it behind
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out
    saved = int(out.split("preempted at step ")[1].split(":")[0])
    assert saved >= 2 and os.path.isdir(os.path.join(work, "checkpoints", str(saved)))
    logged = [r["step"] for r in read_metrics(work)]
    assert logged[-1] == saved

    proc = subprocess.run(common + [f"--steps={saved + 2}"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from step {saved}" in proc.stdout + proc.stderr
    logged = [r["step"] for r in read_metrics(work)]
    assert logged[-2:] == [saved + 1, saved + 2]


def test_nonfinite_step_is_skipped_and_named(xla_cache):
    cfg = get_config("tiny")
    oc = opt_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", total_steps=STEPS)
    tx = opt_lib.make_optimizer(oc)
    state = state_lib.init_state(cfg, tx, 0)
    state = state.replace(params=dict(state.params, final_norm=state.params["final_norm"].at[0].set(jnp.nan)))
    before = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 16)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones_like(tokens),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
             "loss_mask": np.ones(tokens.shape, np.float32)}
    step = step_lib.make_train_step(cfg, tx, opt_lib.make_schedule(oc))
    state, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state.bad_steps) == 1 and int(state.first_bad_step) == 0 and int(state.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, before)


@pytest.mark.parametrize("accum", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_step_gradient_matches_dense_logit_loss(accum, xla_cache):
    # SGD makes the parameter change the gradient itself; the reference is the plain mean cross-entropy of
    # the model's dense logits (no chunked head, no custom VJP) plus the aux loss averaged over micro-batches.
    import optax
    from m1_jax.model import MiniMaxM1
    cfg = get_config("tiny")
    lr = 0.5
    tx = optax.sgd(lr)
    state = state_lib.init_state(cfg, tx, 3)
    rng = np.random.default_rng(accum)
    tokens = rng.integers(0, 256, (4, 24)).astype(np.int32)
    batch = {"tokens": tokens, "targets": rng.integers(0, 256, tokens.shape).astype(np.int32),
             "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(24, dtype=np.int32), (4, 1)),
             "loss_mask": (rng.random(tokens.shape) < 0.7).astype(np.float32)}

    def dense_loss(params):
        ce, aux = 0.0, 0.0
        for a in range(accum):  # the step's strided micro-batches: rows a, a + accum, ...
            micro = {k: v[a::accum] for k, v in batch.items()}
            logits, extra = MiniMaxM1(cfg).apply({"params": params}, micro["tokens"],
                                                 segment_ids_BxL=micro["segment_ids"],
                                                 positions_BxL=micro["positions"])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, micro["targets"][..., None], axis=-1)[..., 0]
            ce += jnp.sum(nll * micro["loss_mask"])
            aux += extra["moe_aux_loss"] / accum
        return ce / batch["loss_mask"].sum() + cfg.router_aux_loss_coef * aux

    want_loss, want_grads = jax.jit(jax.value_and_grad(dense_loss))(state.params)
    before = jax.tree.map(np.asarray, state.params)
    step = step_lib.make_train_step(cfg, tx, lambda s: lr, grad_accum_steps=accum)
    new_state, metrics = step(state, batch)
    assert float(metrics["total_loss"]) == pytest.approx(float(want_loss), rel=1e-5)
    got_grads = jax.tree.map(lambda b, a: (b - np.asarray(a)) / lr, before, new_state.params)
    flat_got, flat_want = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    scale = max(float(np.abs(g).max()) for g in flat_want)
    for g, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(g, np.asarray(w), atol=2e-4 * scale, rtol=1e-3)


def test_schedules_and_decay_mask():
    oc = opt_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cos = opt_lib.make_schedule(oc)
    for s in (0, 5, 10, 60, 110):
        want = s / 10 if s < 10 else 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 10) / 100))
        assert float(cos(s)) == pytest.approx(want, abs=1e-6), s
    wsd = opt_lib.make_schedule(oc.__class__(**{**oc.__dict__, "schedule": "constant_decay",
                                                "decay_fraction": 0.2}))
    # warmup 10, hold 80 steps at 1.0, then 20 linear steps down to 0.1.
    for s, want in ((50, 1.0), (90, 1.0), (100, 1.0 - 0.9 * 10 / 20), (110, 0.1)):
        assert float(wsd(s)) == pytest.approx(want, abs=1e-6), s
    mask = opt_lib.decay_mask({"final_norm": 0, "groups": {"layer_0": {"input_norm": 0, "w_up": 0}}, "embed": 0})
    assert mask == {"final_norm": False, "groups": {"layer_0": {"input_norm": False, "w_up": True}}, "embed": True}


def test_adamw_matches_numpy_reference():
    # One AdamW step (no clipping) against the textbook update in float64.
    oc = opt_lib.OptimizerConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", total_steps=5,
                                 eps=1e-15, weight_decay=0.1, clip_norm=0.0)
    tx = opt_lib.make_optimizer(oc)
    rng = np.random.default_rng(1)
    p = {"w": rng.normal(size=(3, 4)).astype(np.float32), "a_norm": rng.normal(size=(4,)).astype(np.float32)}
    g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    updates, _ = tx.update(g, tx.init(p), p)
    for name, decay in (("w", 0.1), ("a_norm", 0.0)):
        gg = g[name].astype(np.float64)
        m, v = 0.1 * gg / (1 - 0.9), 0.05 * gg ** 2 / (1 - 0.95)
        want = -0.1 * (m / (np.sqrt(v) + 1e-15) + decay * p[name])
        np.testing.assert_allclose(np.asarray(updates[name]), want, rtol=1e-5, atol=1e-6)


def test_expert_load_stats():
    counts = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    stats = expert_load_stats(counts)
    assert stats["expert_load_max_over_mean"] == [1.0, 4.0]
    assert stats["expert_load_ratio_max"] == 4.0 and stats["expert_load_ratio_mean"] == 2.5
