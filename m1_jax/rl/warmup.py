"""The RL warm start: a short teacher-forced SFT on one task's worked solutions, or params from a checkpoint.

SFT rows are BOS + prompt + solution + EOS with the loss on solution and EOS only (the layout of
`m1_jax.data.packing.encode_document`, which experiments/train.py trains on), so RL prompts (BOS + prompt)
continue the way SFT taught. SFT stops as soon as the eval accuracy reaches a target: RL needs a policy that is
sometimes right and sometimes wrong (rl.md §7: 20-40%). The target is on *sampled* accuracy (avg@k at the RL
temperature) by default, because that is the reward RL sees: a greedy 30% can be a sampled 15%.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from absl import logging
import jax
import numpy as np

from m1_jax.config import ModelConfig
from m1_jax.data import packing
from m1_jax.data import sources
from m1_jax.rl.rollout import greedy_accuracy, sampled_accuracy
from m1_jax.train import checkpoint as ckpt_lib
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    task: str = "mod_sum"
    seed: int = 0
    max_steps: int = 400
    batch_size: int = 32
    seq_len: int = 32
    learning_rate: float = 3e-3
    eval_every: int = 10
    target_accuracy: float = 0.3   # stop once the target_metric accuracy reaches this
    target_metric: str = "sampled"  # "sampled" (avg@k at `temperature`) or "greedy"
    eval_samples: int = 4          # k of avg@k
    temperature: float = 1.0       # the RL sampling temperature
    num_eval: int = 64
    max_new_tokens: int = 4
    heldout_fraction: float = 0.1
    eval_split: str = "eval"       # "eval" (held-out problems) or "train" (tiny problem spaces like mod_sum)


def sft_batch(tokenizer, examples, seq_len: int) -> dict[str, np.ndarray]:
    """One unpacked [B, seq_len] teacher-forcing batch (one example per row, right-padded)."""
    B = len(examples)
    batch = {"tokens": np.full((B, seq_len), tokenizer.pad_id, np.int32),
             "targets": np.full((B, seq_len), tokenizer.pad_id, np.int32),
             "segment_ids": np.zeros((B, seq_len), np.int32), "positions": np.zeros((B, seq_len), np.int32),
             "loss_mask": np.zeros((B, seq_len), np.float32)}
    for b, e in enumerate(examples):
        doc = packing.encode_document(tokenizer, e.prompt, e.solution, mask_prompt=True)
        n = len(doc)
        if n > seq_len + 1:
            raise ValueError(f"SFT example has {n} tokens, more than seq_len + 1 = {seq_len + 1}; raise seq_len")
        batch["tokens"][b, :n - 1] = doc.tokens[:-1]
        batch["targets"][b, :n - 1] = doc.tokens[1:]
        batch["segment_ids"][b, :n - 1] = 1
        batch["positions"][b, :n - 1] = np.arange(n - 1)
        batch["loss_mask"][b, :n - 1] = doc.trainable[1:]
    return batch


def sft_warmup(cfg: ModelConfig, tokenizer, wc: WarmupConfig, *, log_fn: Callable[[str], None] = logging.info):
    """(params, history) after SFT from a fresh init (seed wc.seed) until the target accuracy is reached."""
    if wc.target_metric not in ("sampled", "greedy"):
        raise ValueError(f"target_metric must be 'sampled' or 'greedy', got {wc.target_metric!r}")
    ocfg = opt_lib.OptimizerConfig(learning_rate=wc.learning_rate, schedule="constant", warmup_steps=10,
                                   total_steps=wc.max_steps, weight_decay=0.0)
    tx = opt_lib.make_optimizer(ocfg)
    state = state_lib.init_state(cfg, tx, wc.seed)
    step_fn = step_lib.make_train_step(cfg, tx, opt_lib.make_schedule(ocfg))
    weights = {wc.task: 1.0}
    if wc.eval_split == "eval":
        heldout = sources.heldout_examples(wc.num_eval, seed=wc.seed, task_weights=weights,
                                           heldout_fraction=wc.heldout_fraction)
    else:
        heldout = sources.train_examples(wc.num_eval, seed=wc.seed + 1, task_weights=weights,
                                         heldout_fraction=wc.heldout_fraction)
    history = []
    for step in range(wc.max_steps + 1):
        if step % wc.eval_every == 0 or step == wc.max_steps:
            record = {"step": step, "greedy_accuracy": greedy_accuracy(cfg, state.params, tokenizer, heldout,
                                                                       max_new_tokens=wc.max_new_tokens)}
            if wc.target_metric == "sampled":
                record["sampled_accuracy"] = sampled_accuracy(
                    cfg, state.params, tokenizer, heldout, samples=wc.eval_samples, max_new_tokens=wc.max_new_tokens,
                    temperature=wc.temperature, rng=jax.random.fold_in(jax.random.PRNGKey(wc.seed), step))
            history.append(record)
            acc = record[f"{wc.target_metric}_accuracy"]
            log_fn(f"sft warm-up step {step}: {wc.eval_split}-split accuracy greedy {record['greedy_accuracy']:.3f}"
                   + (f" sampled {record['sampled_accuracy']:.3f}" if "sampled_accuracy" in record else "")
                   + f" (target {wc.target_metric} {wc.target_accuracy})")
            if acc >= wc.target_accuracy or step == wc.max_steps:
                break
        examples = sources.train_examples(wc.batch_size, seed=wc.seed, start=step * wc.batch_size, task_weights=weights,
                                          heldout_fraction=wc.heldout_fraction)
        state, _ = step_fn(state, sft_batch(tokenizer, examples, wc.seq_len))
    return state.params, history


def save_params(directory: str, cfg: ModelConfig, params, meta: dict | None = None) -> None:
    """A one-step checkpoint {"params": ...} that `checkpoint.load_params` reads (like experiments/train.py's)."""
    ckpt_lib.save_params(directory, params, dict(meta or {}, model_config=dataclasses.asdict(cfg)))


def warm_start(cfg: ModelConfig, tokenizer, wc: WarmupConfig, directory: str, *,
               log_fn: Callable[[str], None] = logging.info):
    """The params saved in `directory` by an earlier call, or a fresh `sft_warmup` saved there."""
    if os.path.isdir(directory):
        return ckpt_lib.load_params(directory, cfg)[1]
    params, _ = sft_warmup(cfg, tokenizer, wc, log_fn=log_fn)
    save_params(directory, cfg, params)
    return params
