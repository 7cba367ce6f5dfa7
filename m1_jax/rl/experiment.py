"""An RL experiment config (experiments/configs/rl.py: sections rl, loop, optimizer, warmup) as validated dataclasses.

experiments/rl.py runs one such config; experiments/paper/compare_rl.py runs it for several algorithms and seeds.
"""

from __future__ import annotations

from m1_jax.config import ModelConfig, get_config
from m1_jax.rl.loop import LoopConfig, default_eval_split
from m1_jax.rl.trainer import RLConfig
from m1_jax.rl.warmup import WarmupConfig
from m1_jax.train import checkpoint as ckpt_lib
from m1_jax.train.optimizer import OptimizerConfig


def build_configs(config) -> tuple[RLConfig, OptimizerConfig, LoopConfig, WarmupConfig]:
    """(RLConfig, OptimizerConfig, LoopConfig, WarmupConfig) of an experiment config, validated."""
    rl = RLConfig(**config.rl.to_dict())
    # A constant learning rate: the run's length does not enter the optimizer config (which resume checks), so a
    # finished run can be extended by rerunning with a larger loop.steps.
    ocfg = OptimizerConfig(learning_rate=config.optimizer.learning_rate, schedule="constant", warmup_steps=0,
                           total_steps=1, weight_decay=0.0, clip_norm=config.optimizer.clip_norm)
    loop = config.loop.to_dict()
    if loop["eval_split"] == "auto":
        loop["eval_split"] = default_eval_split(loop["task"])
    lc = LoopConfig(**loop)
    w = config.warmup
    wc = WarmupConfig(task=lc.task, seed=lc.data_seed, max_steps=w.max_steps, learning_rate=w.learning_rate,
                      target_accuracy=w.target_accuracy, target_metric=w.target_metric, eval_every=w.eval_every,
                      max_new_tokens=rl.max_new_tokens, seq_len=rl.max_prompt_len + rl.max_new_tokens,
                      num_eval=lc.num_eval, eval_split=lc.eval_split,
                      eval_samples=max(lc.eval_samples, 1), temperature=rl.temperature)
    rl.validate()
    ocfg.validate()
    lc.validate()
    return rl, ocfg, lc, wc


def experiment_model(config) -> tuple[ModelConfig, object]:
    """(model config, params): config.init_checkpoint's, or the preset with params None (the caller warms up),
    either way with the experiment's compute dtype and LM head precision."""
    overrides = {"fp32_lm_head": config.model.fp32_lm_head,
                 **({"dtype": config.model.dtype} if config.model.dtype else {})}
    if config.init_checkpoint:
        cfg, params = ckpt_lib.load_params(config.init_checkpoint)
        return cfg.replace(**overrides), params
    return get_config(config.model.preset, **overrides), None
