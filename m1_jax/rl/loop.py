"""The RL loop: rollout (with DAPO dynamic sampling / overlong shaping) -> mu updates -> metrics, eval, checkpoint.

Every random choice is a pure function of (seed, RL step, sampling round) and the prompt cursor, both saved in
the checkpoint metadata, so a resumed run reproduces the uninterrupted one exactly.

On a mesh (more than one device) the train state (and the GRPO reference params) are placed with train.py's
shardings (`state_lib.state_shardings`: params and Adam moments FSDP/expert/tensor sharded by the logical rules),
and rollout sampling, eval, reference log-probs and the optimizer steps run data-parallel over the mesh's batch
axes. Rollouts, rewards and advantages stay host-side numpy; minibatch rows are split over the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.data import sources
from m1_jax.model import abstract_params
from m1_jax.rl import filters
from m1_jax.rl import rollout as rollout_lib
from m1_jax.rl import trainer as trainer_lib
from m1_jax.train import checkpoint as ckpt_lib
from m1_jax.train import metrics as metrics_lib
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    task: str = "mod_sum"
    steps: int = 100               # RL steps (rollouts); each makes rl.mu optimizer updates
    seed: int = 0                  # sampling randomness
    data_seed: int = 0             # which problems (train prompts and the eval set)
    heldout_fraction: float = 0.1
    eval_split: str = "eval"       # "eval" (held-out problems) or "train" (for tiny problem spaces)
    num_eval: int = 64
    eval_samples: int = 4          # avg@k: k sampled completions per eval problem at the rollout temperature
    report_heldout: bool = True    # with eval_split="train", also score the held-out split (generalisation)
    eval_every: int = 10
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    tensorboard: bool = False

    def validate(self) -> None:
        if self.eval_split not in sources.SPLITS:
            raise ValueError(f"eval_split must be one of {sorted(sources.SPLITS)}, got {self.eval_split!r}")
        if self.steps < 1 or self.num_eval < 1:
            raise ValueError(f"steps ({self.steps}) and num_eval ({self.num_eval}) must be >= 1")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0 (0: greedy accuracy only), got {self.eval_samples}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0 (0 turns them off)")


# Problem spaces so small that a held-out split has only a handful of problems: eval on fresh train-split draws.
SMALL_TASKS = frozenset({"mod_sum"})


def default_eval_split(task: str) -> str:
    return "train" if task in SMALL_TASKS else "eval"


def eval_examples(lc: LoopConfig, split: str | None = None):
    weights = {lc.task: 1.0}
    if (split or lc.eval_split) == "eval":
        return sources.heldout_examples(lc.num_eval, seed=lc.data_seed, task_weights=weights,
                                        heldout_fraction=lc.heldout_fraction)
    # A fixed block far from the prompts RL trains on (those start at index 0).
    return sources.train_examples(lc.num_eval, seed=lc.data_seed + 1, task_weights=weights,
                                  heldout_fraction=lc.heldout_fraction)


class Sampler:
    """Draws one step's rollout: rounds of `prompts_per_step` prompts until enough informative groups."""

    def __init__(self, cfg: ModelConfig, rl: trainer_lib.RLConfig, lc: LoopConfig, tokenizer, mesh=None):
        self.cfg, self.rl, self.lc, self.tokenizer, self.mesh = cfg, rl, lc, tokenizer, mesh

    def _round(self, params, cursor: int, rng) -> rollout_lib.Rollout:
        rl = self.rl
        examples = sources.train_examples(rl.prompts_per_step, seed=self.lc.data_seed, start=cursor,
                                          task_weights={self.lc.task: 1.0}, heldout_fraction=self.lc.heldout_fraction)
        r = rollout_lib.sample_rollout(self.cfg, params, self.tokenizer, examples, group_size=rl.group_size,
                                       max_new_tokens=rl.max_new_tokens, prompt_width=rl.max_prompt_len,
                                       temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, rng=rng,
                                       format_weight=rl.format_weight, mesh=self.mesh)
        if rl.overlong_penalty:
            penalty = np.asarray(filters.overlong_penalty(r.lengths, rl.max_new_tokens, rl.overlong_cache), np.float32)
            r = r.replace(rewards=r.rewards + penalty)
        return r

    def sample(self, params, cursor: int, rng) -> tuple[rollout_lib.Rollout, int, dict[str, float]]:
        """(rollout of exactly prompts_per_step groups, new cursor, stats)."""
        rl = self.rl
        if not rl.dynamic_sampling:
            r = self._round(params, cursor, rng)
            return r, cursor + rl.prompts_per_step, {"sampled_groups": rl.prompts_per_step, "rounds": 1}
        rounds: list[rollout_lib.Rollout] = []
        state = {"cursor": cursor}

        def sample_fn(_):
            # Always a full round: one generate shape, one compile.
            r = self._round(params, state["cursor"], jax.random.fold_in(rng, len(rounds)))
            state["cursor"] += rl.prompts_per_step
            rounds.append(r)
            G = rl.group_size
            groups = [(len(rounds) - 1, g) for g in range(rl.prompts_per_step)]
            return groups, r.correct.reshape(rl.prompts_per_step, G)

        kept, stats = filters.collect_informative_groups(sample_fn, rl.prompts_per_step,
                                                         max_rounds=rl.dynamic_max_rounds, allow_partial=True)
        if len(kept) < rl.prompts_per_step:
            # Top up with uninformative groups (zero advantage: no gradient, but fixed shapes).
            kept_set = set(kept)
            spare = [(i, g) for i in range(len(rounds)) for g in range(rl.prompts_per_step) if (i, g) not in kept_set]
            kept = kept + spare[:rl.prompts_per_step - len(kept)]
        parts = [rounds[i].take_groups([g]) for i, g in kept]
        stats = {"sampled_groups": stats["sampled_groups"], "rounds": stats["rounds"],
                 "informative_groups": stats["kept_groups"]}
        return rollout_lib.concat_rollouts(parts), state["cursor"], stats


@functools.lru_cache(maxsize=16)
def cached_rl_step(cfg: ModelConfig, rl: trainer_lib.RLConfig, ocfg: opt_lib.OptimizerConfig, prompt_width: int,
                   mesh=None):
    """One compiled step per (model, RL, optimizer config, mesh): runs in one process (seeds, resumes) share it."""
    return trainer_lib.make_rl_step(cfg, rl, opt_lib.make_optimizer(ocfg), prompt_width, mesh=mesh)


def multi_device(mesh):
    """The mesh when it spans several devices, else None: one device keeps the plain (unsharded) path."""
    return mesh if mesh is not None and mesh.size > 1 else None


def check_mesh(cfg: ModelConfig, rl: trainer_lib.RLConfig, mesh) -> None:
    """Host-side, before any compile: batch rows, parameter and activation dims all divide over the mesh."""
    if multi_device(mesh) is None:
        return
    if sharding_lib.context_axes(mesh):
        raise ValueError(f"RL does not run with a context axis (mesh {dict(mesh.shape)}): rollouts decode one token "
                         "at a time, which sequence parallelism does not split; drop context= from --mesh")
    trainer_lib.check_mesh_divisibility(rl, mesh)
    sharding_lib.check_activation_divisibility(cfg, mesh)
    sharding_lib.check_param_divisibility(abstract_params(cfg, boxed=True), mesh)


_EVAL_KEY = 20250613  # eval sampling keys, independent of the run's sampling seed


def format_eval(record: dict[str, Any]) -> str:
    """ "eval greedy 0.31 sampled 0.27 | heldout greedy ..." for the keys present."""
    parts = []
    for prefix in ("eval", "heldout"):
        if f"{prefix}_accuracy" in record:
            text = f"{prefix} greedy {record[f'{prefix}_accuracy']:.3f}"
            if f"{prefix}_sampled_accuracy" in record:
                text += f" sampled {record[f'{prefix}_sampled_accuracy']:.3f}"
            parts.append(text)
    return " | ".join(parts)


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else float("nan")


def initial_tree(cfg: ModelConfig, tx, lc: LoopConfig, use_ref: bool, ckpt, run_meta, mesh, init_params,
                 log_fn) -> tuple[dict[str, Any], int, int, int | None]:
    """(tree, rl step, data cursor, resumed-from step): the latest checkpoint restored (placed on the mesh), or a
    fresh state (and frozen reference params for a KL penalty) from init_params()."""
    def fresh(params):
        params = jax.tree.map(jnp.copy, params)  # the step donates the state; keep the caller's arrays alive
        tree = {"state": TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                    rng=jax.random.PRNGKey(lc.seed), bad_steps=jnp.zeros((), jnp.int32),
                                    first_bad_step=jnp.full((), -1, jnp.int32))}
        if use_ref:
            tree["ref_params"] = jax.tree.map(jnp.copy, params)
        return tree

    tree_shardings = None
    if mesh is not None:
        state_shardings = state_lib.state_shardings(cfg, tx, mesh)
        tree_shardings = {"state": state_shardings, **({"ref_params": state_shardings.params} if use_ref else {})}
    latest = ckpt.latest_step()
    if latest is None:
        if mesh is None:
            return fresh(init_params()), 0, 0, None
        # jit outputs are new buffers, so donating the state never frees the caller's params.
        params = jax.device_put(init_params(), tree_shardings["state"].params)
        return jax.jit(fresh, out_shardings=tree_shardings)(params), 0, 0, None
    abstract = jax.eval_shape(lambda: fresh(jax.tree.map(jnp.zeros_like, abstract_params(cfg))))
    if mesh is not None:
        abstract = sharding_lib.with_shardings(abstract, tree_shardings)
    tree, meta = ckpt.restore(latest, abstract, expect=run_meta)
    log_fn(f"resumed RL from step {latest} in {ckpt.directory}")
    return tree, int(meta["rl_step"]), int(meta["cursor"]), latest


def evaluate_policy(cfg: ModelConfig, rl: trainer_lib.RLConfig, lc: LoopConfig, tokenizer, params, eval_sets,
                    rl_step: int, mesh) -> dict[str, float]:
    """Greedy accuracy and, at the rollout temperature, avg@k (the quantity RL raises directly) per eval set."""
    record = {}
    for i, (prefix, examples) in enumerate(eval_sets.items()):
        record[f"{prefix}_accuracy"] = rollout_lib.greedy_accuracy(cfg, params, tokenizer, examples,
                                                                   max_new_tokens=rl.max_new_tokens, mesh=mesh)
        if lc.eval_samples:
            # Common random numbers: every run (algorithm, seed) draws its eval samples with the same keys at the
            # same step, so differences between runs are less noisy.
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(_EVAL_KEY + lc.data_seed), rl_step), i)
            record[f"{prefix}_sampled_accuracy"] = rollout_lib.sampled_accuracy(
                cfg, params, tokenizer, examples, samples=lc.eval_samples, max_new_tokens=rl.max_new_tokens,
                temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, rng=key, mesh=mesh)
    return record


def step_record(rollout, per_minibatch, lr: float, skipped: int, use_ref: bool) -> dict[str, float]:
    """The logged metrics of one RL step from its rollout and the metrics of each minibatch update."""
    first = per_minibatch[0]
    record = {
        "reward": float(np.mean(rollout.rewards)), "accuracy": float(np.mean(rollout.correct)),
        "response_length": float(np.mean(rollout.lengths)), "finished_fraction": float(np.mean(rollout.finished)),
        "prob_corr": float(first["prob_corr"]),  # sampler vs trainer, on-policy minibatch (M1 §3.2)
        "first_clip_fraction": float(first["clip_fraction"]), "first_approx_kl": float(first["approx_kl"]),
        "ratio_max": float(np.max([m["ratio_max"] for m in per_minibatch])), "lr": lr, "skipped_updates": skipped}
    for key in ("clip_fraction", "zeroed_fraction", "approx_kl", "entropy", "policy_loss", "grad_norm") + (("kl_ref",) if use_ref else ()):
        record[key] = _mean([m[key] for m in per_minibatch])
    return record


def run_rl(cfg: ModelConfig, rl: trainer_lib.RLConfig, ocfg: opt_lib.OptimizerConfig, lc: LoopConfig,
           workdir: str, tokenizer, *, init_params: Callable[[], Any], stop_at_step: int | None = None,
           mesh=None, log_fn: Callable[[str], None] = logging.info) -> dict[str, Any]:
    """Runs RL until lc.steps (resuming from the latest checkpoint in workdir/checkpoints).

    init_params: called only when there is no checkpoint (so a resumed run skips the warm start).
    stop_at_step: return after that step without saving (simulates a hard kill; for tests).
    mesh: a jax Mesh to shard over (see the module docstring); None or a 1-device mesh runs on one device.
    Returns {"step", "last_metrics", "resumed_from", "history"}.
    """
    rl.validate()
    lc.validate()
    ocfg.validate()
    mesh = multi_device(mesh)
    check_mesh(cfg, rl, mesh)
    os.makedirs(workdir, exist_ok=True)
    tx = opt_lib.make_optimizer(ocfg)
    schedule = opt_lib.make_schedule(ocfg)
    use_ref = rl.kl_coef != 0.0
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=lc.keep_checkpoints)
    run_meta = {"model_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                "rl_config": dataclasses.asdict(rl), "optimizer_config": dataclasses.asdict(ocfg),
                "seed": lc.seed, "data_seed": lc.data_seed, "task": lc.task}
    tree, rl_step, cursor, resumed_from = initial_tree(cfg, tx, lc, use_ref, ckpt, run_meta, mesh, init_params,
                                                       log_fn)
    sampler = Sampler(cfg, rl, lc, tokenizer, mesh)
    prompt_width = rl.max_prompt_len
    step_fn = cached_rl_step(cfg, rl, ocfg, prompt_width, mesh)
    ref_logp_fn = trainer_lib.make_logp_fn(cfg, rl, prompt_width, mesh=mesh) if use_ref else None
    eval_sets = {"heldout" if lc.eval_split == "eval" else "eval": eval_examples(lc)}
    if lc.report_heldout and lc.eval_split == "train":
        eval_sets["heldout"] = eval_examples(lc, "eval")
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=lc.tensorboard)
    history: list[dict[str, Any]] = []
    evaluate = lambda: evaluate_policy(cfg, rl, lc, tokenizer, tree["state"].params, eval_sets, rl_step,  # noqa: E731
                                       mesh)

    def save():
        ckpt.save(rl_step, tree, dict(run_meta, rl_step=rl_step, cursor=cursor), wait=False)

    last: dict[str, Any] = {}
    try:
        if rl_step == 0 and lc.eval_every:
            record = evaluate()
            writer.write(0, record)
            history.append(dict(record, step=0))
            log_fn(f"rl step 0: {format_eval(record)}")
        while rl_step < lc.steps:
            t0 = time.perf_counter()
            state: TrainState = tree["state"]
            r, cursor, sample_stats = sampler.sample(state.params, cursor, jax.random.fold_in(state.rng, rl_step))
            t_sample = time.perf_counter() - t0
            ref_logp = None
            if use_ref:
                seg, pos = rollout_lib.sequence_layout(r.prompt_lengths, r.prompt_width, r.tokens.shape[1])
                ref_logp = sharding_lib.to_host(ref_logp_fn(tree["ref_params"], r.tokens, seg, pos)) * r.response_mask
            per_mb = []
            for mb in trainer_lib.minibatches(r, rl, ref_logp):
                state, m = step_fn(state, mb)
                per_mb.append(m)
            tree["state"] = state
            rl_step += 1
            record = dict(step_record(r, jax.device_get(per_mb), float(schedule(int(state.step) - 1)),
                                      int(jax.device_get(state.bad_steps)), use_ref),
                          sample_time=t_sample, step_time=time.perf_counter() - t0, **sample_stats)
            if lc.eval_every and (rl_step % lc.eval_every == 0 or rl_step == lc.steps):
                record.update(evaluate())
            writer.write(rl_step, record)
            history.append(dict(record, step=rl_step))
            last = dict(record, step=rl_step)
            log_fn(f"rl step {rl_step}: reward {record['reward']:.3f} acc {record['accuracy']:.3f} "
                   f"corr {record['prob_corr']:.4f} clip {record['clip_fraction']:.3f} ent {record['entropy']:.3f}"
                   + (f" | {format_eval(record)}" if "heldout_accuracy" in record or "eval_accuracy" in record else ""))
            if stop_at_step is not None and rl_step >= stop_at_step:
                return {"step": rl_step, "last_metrics": last, "resumed_from": resumed_from, "history": history,
                        "killed": True}
            if lc.checkpoint_every and rl_step % lc.checkpoint_every == 0:
                save()
        if lc.checkpoint_every and (ckpt.latest_step() or 0) != rl_step:
            save()
    finally:
        ckpt.close()
        writer.close()
    return {"step": rl_step, "last_metrics": last, "resumed_from": resumed_from, "history": history,
            "params": tree["state"].params}
