"""The training loop: build everything from an experiment config, resume, step, log, evaluate, save.

One jitted step per batch; the host only reads device values every `log_every` steps (metrics, the
non-finite check) and at eval/checkpoint steps. SIGTERM/SIGINT finish the current step, save a
checkpoint and return (preemption); the next run in the same workdir resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.data import load_tokenizer, make_train_iterator
from m1_jax.model import abstract_params
from m1_jax.train import checkpoint as ckpt_lib
from m1_jax.train import loss as loss_lib
from m1_jax.train import metrics as metrics_lib
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train import step as step_lib


@dataclasses.dataclass
class Setup:
    """Everything built from the experiment config before the first step (all validated on the host)."""
    model: ModelConfig
    optimizer: opt_lib.OptimizerConfig
    mesh: Any
    tokenizer: Any
    batch_size: int
    seq_len: int
    grad_accum_steps: int
    loss_chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE


def model_config_from(config) -> ModelConfig:
    fields = config.model.to_dict()  # nested: the impl section becomes a dict, which ModelConfig converts
    if "layer_types" in fields:
        fields["layer_types"] = tuple(fields["layer_types"])
    return ModelConfig(**fields)


def build_setup(config, mesh_spec: str | None = None, devices=None) -> Setup:
    """Validates the experiment config on the host (fails fast, before any compile)."""
    model = model_config_from(config)
    t, d = config.train, config.data
    for name in ("steps", "log_every", "grad_accum_steps"):
        if int(t[name]) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
    for name in ("checkpoint_every", "eval_every", "eval_batches"):
        if int(t[name]) < 0:
            raise ValueError(f"train.{name} must be >= 0 (0 turns it off), got {t[name]}")
    chunk = int(t.get("loss_chunk_size", loss_lib.DEFAULT_CHUNK_SIZE))
    if chunk < 1:
        raise ValueError(f"train.loss_chunk_size must be >= 1, got {chunk}")
    opt_fields = dict(config.optimizer)
    if not opt_fields.get("total_steps"):
        opt_fields["total_steps"] = int(t.steps)  # the schedule spans the run unless set explicitly
    optimizer = opt_lib.OptimizerConfig(**opt_fields)
    optimizer.validate()
    mesh = sharding_lib.make_mesh(mesh_spec, devices, num_experts=model.num_experts)
    accum, batch = int(t.grad_accum_steps), int(d.batch_size)
    if batch % accum:
        raise ValueError(f"data.batch_size={batch} is not divisible by train.grad_accum_steps={accum}")
    ways = sharding_lib.batch_parallelism(mesh)
    if (batch // accum) % ways:
        raise ValueError(f"micro-batch size {batch // accum} (data.batch_size / train.grad_accum_steps) must be "
                         f"divisible by the {ways}-way batch sharding of mesh {dict(mesh.shape)}; change "
                         "--config.data.batch_size or --mesh")
    # Every parameter and activation dim against the mesh axes it maps to, before anything is traced.
    sharding_lib.check_param_divisibility(abstract_params(model, boxed=True), mesh)
    sharding_lib.check_activation_divisibility(model, mesh, batch // accum, int(d.seq_len))
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is "
                         f"{model.vocab_size}; set --config.model.vocab_size>={tokenizer.vocab_size}")
    return Setup(model, optimizer, mesh, tokenizer, batch, int(d.seq_len), accum, chunk)


def _iterator(config, setup: Setup, split: str):
    d = config.data
    weights = None if d.task_weights is None else dict(d.task_weights)
    # Each host loads its block of rows (hosts holding the same rows load the same ones; put_batch keeps each
    # host's part of the length and assembles the global batch).
    index, count, _ = sharding_lib.host_share(sharding_lib.batch_sharding(setup.mesh), (setup.batch_size,
                                                                                        setup.seq_len))
    return make_train_iterator(d.source, setup.tokenizer, batch_size=setup.batch_size // count,
                               seq_len=setup.seq_len,
                               seed=int(config.train.seed), mask_prompt=bool(d.mask_prompt), split=split,
                               task_weights=weights, heldout_fraction=float(d.heldout_fraction),
                               shard_index=index, shard_count=count)


def eval_batches(config, setup: Setup, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` held-out batches (builtin source) or training-file batches (other sources)."""
    split = "eval" if config.data.source == "builtin" else "train"
    it = _iterator(config, setup, split)
    out = []
    for _ in range(num_batches):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def put_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Host batch -> global sharded arrays. On several hosts each contributes the rows it loaded (its block, see
    `_iterator`) and its devices' part of the length."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows, seq_len = next(iter(batch.values())).shape
    # The row blocks and the length slice depend only on the mesh: probe with one row per batch shard.
    _, count, length = sharding_lib.host_share(sharding, (sharding_lib.batch_parallelism(sharding.mesh), seq_len))
    global_shape = (rows * count, seq_len)
    return {k: jax.make_array_from_process_local_data(sharding, v[:, length], global_shape) for k, v in batch.items()}


def heldout_loss(eval_step, params, batches, batch_sharding) -> dict[str, float]:
    ce, n, correct = 0.0, 0.0, 0.0
    for b in batches:
        ce_sum, count, corr = eval_step(params, put_batch(b, batch_sharding))
        ce, n, correct = ce + float(ce_sum), n + float(count), correct + float(jnp.sum(corr))
    n = max(n, 1.0)
    return {"eval_loss": ce / n, "eval_token_accuracy": correct / n}


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        logging.warning("received signal %d: saving a checkpoint after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config, workdir: str, mesh_spec: str | None = None, *, devices=None, stop_at_step: int | None = None,
          progress: Any = None, log_fn: Callable[[str], None] = logging.info) -> dict[str, Any]:
    """Trains until config.train.steps (resuming from the latest checkpoint in workdir).

    devices: the devices the mesh spans (default: all).
    stop_at_step: return after that step without saving (simulates a hard kill; for tests).
    progress: optional tqdm-like object (update(n), set_postfix(dict)).
    Returns {"step", "preempted", "last_metrics", "resumed_from"}.
    """
    setup = build_setup(config, mesh_spec, devices)
    cfg, t = setup.model, config.train
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=1, default=str)

    tx = opt_lib.make_optimizer(setup.optimizer)
    schedule = opt_lib.make_schedule(setup.optimizer)
    mesh = setup.mesh
    shardings = state_lib.state_shardings(cfg, tx, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    train_it = _iterator(config, setup, "train")

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                                 async_save=bool(t.async_checkpoint))
    model_meta = json.loads(json.dumps(dataclasses.asdict(cfg)))
    latest = ckpt.latest_step()
    if latest is None:
        state = state_lib.create_sharded_state(cfg, tx, int(t.seed), mesh)
        resumed_from = None
    else:
        shapes = state_lib.abstract_state(cfg, tx)
        abstract = sharding_lib.with_shardings(shapes, shardings)
        state, meta = ckpt.restore(latest, abstract, expect={"model_config": model_meta, "seed": int(t.seed)})
        try:
            train_it.set_state(meta["data_state"])
        except Exception as e:
            raise ckpt_lib.CheckpointError(f"checkpoint at step {latest} in {ckpt.directory}: its data-iterator "
                                           f"position does not fit this data config ({e}); use the data config "
                                           "it was written with or a fresh --workdir") from e
        resumed_from = latest
        log_fn(f"resumed from step {latest} in {ckpt.directory}")

    step_fn = step_lib.make_train_step(cfg, tx, schedule, grad_accum_steps=setup.grad_accum_steps, mesh=mesh,
                                       state_shardings=shardings, loss_chunk_size=setup.loss_chunk_size)
    eval_step = step_lib.make_eval_step(cfg, mesh, loss_chunk_size=setup.loss_chunk_size)
    held_out = eval_batches(config, setup, int(t.eval_batches)) if t.eval_every and t.eval_batches else []
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=bool(t.tensorboard))
    flops_per_token, flops_source = metrics_lib.train_flops_per_token(cfg, setup.seq_len)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, float(t.peak_tflops))
    log_fn(f"model {cfg.num_layers} layers, {metrics_lib.count_params_str(cfg)}; mesh {dict(mesh.shape)}; "
           f"train FLOPs/token {flops_per_token:.3g} ({flops_source})")

    saved = {"step": resumed_from}

    def save(step: int, *, wait: bool = False):
        saved["step"] = step
        ckpt.save(step, state, {"data_state": train_it.get_state(), "model_config": model_meta,
                                "seed": int(t.seed)}, wait=wait)

    step = int(jax.device_get(state.step))
    total = int(t.steps)
    if progress is not None:
        progress.update(step)
    last_metrics: dict[str, Any] = {}
    preempted = False
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_step = setup.batch_size * setup.seq_len
    try:
        with _StopFlag() as stop:
            while step < total:
                try:
                    batch = next(train_it)
                except StopIteration:
                    log_fn(f"data exhausted after step {step}")
                    break
                state, metrics = step_fn(state, put_batch(batch, batch_sharding))
                step += 1
                window_steps += 1
                record = None
                if step % int(t.log_every) == 0 or step == total:
                    host = jax.device_get(metrics)
                    bad, first_bad = (int(x) for x in jax.device_get((state.bad_steps, state.first_bad_step)))
                    if bad and not t.skip_nonfinite:
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {first_bad + 1} (loss={host['loss']}, "
                            f"grad_norm={host['grad_norm']}); that update was not applied. Lower the learning "
                            "rate, check the data, or pass --config.train.skip_nonfinite=True to skip such steps")
                    elapsed = time.perf_counter() - window_start
                    tps = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    record = {k: float(host[k]) for k in ("loss", "aux_loss", "total_loss", "grad_norm", "lr")}
                    record.update(tokens_per_sec=tps, step_time=elapsed / window_steps, skipped_steps=bad,
                                  target_tokens=float(host["num_tokens"]),
                                  **metrics_lib.expert_load_stats(host["expert_counts"]))
                    record["tflops_per_sec"] = flops_per_token * tps / 1e12
                    record["mfu"] = None if peak is None else flops_per_token * tps / (peak * jax.device_count())
                    window_start, window_steps = time.perf_counter(), 0
                if held_out and step % int(t.eval_every) == 0:
                    record = dict(record or {}, **heldout_loss(eval_step, state.params, held_out, batch_sharding))
                if record is not None:
                    writer.write(step, record)
                    last_metrics = dict(record, step=step)
                    if progress is not None:
                        progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "eval_loss") if k in record})
                if progress is not None:
                    progress.update(1)
                if stop_at_step is not None and step >= stop_at_step:
                    return {"step": step, "preempted": False, "last_metrics": last_metrics,
                            "resumed_from": resumed_from, "killed": True}
                if stop.signum is not None:
                    save(step, wait=True)
                    log_fn(f"signal {stop.signum}: saved checkpoint at step {step} in {ckpt.directory}; "
                           "rerun the same command to resume")
                    preempted = True
                    break
                if t.checkpoint_every and step % int(t.checkpoint_every) == 0:
                    save(step)
            if not preempted and saved["step"] != step:
                save(step)
    finally:
        ckpt.close()
        writer.close()
    return {"step": step, "preempted": preempted, "last_metrics": last_metrics, "resumed_from": resumed_from}
