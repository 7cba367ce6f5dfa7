"""The default experiment: the tiny hybrid MoE on the built-in task mixture (minutes on a 2-core CPU).

python experiments/train.py --config=experiments/configs/tiny.py --config.train.steps=100
"""

import dataclasses

import ml_collections

from m1_jax.config import get_config as get_model_config


def base_config(model_preset: str) -> ml_collections.ConfigDict:
    """Every section with its defaults; presets change a few values."""
    c = ml_collections.ConfigDict()
    # Every ModelConfig field, so any of them can be overridden: --config.model.dtype=bfloat16.
    c.model = ml_collections.ConfigDict(dataclasses.asdict(get_model_config(model_preset)))

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"       # "builtin" | text/JSONL path, directory or glob
    c.data.tokenizer = "byte"       # "byte" | path to a tokenizer.json
    c.data.batch_size = 8
    c.data.seq_len = 256
    c.data.mask_prompt = True
    c.data.heldout_fraction = 0.1
    c.data.task_weights = ml_collections.config_dict.placeholder(dict)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"   # "cosine" | "constant_decay" | "constant"
    c.optimizer.warmup_steps = 20
    c.optimizer.total_steps = 0       # 0: follow train.steps
    c.optimizer.decay_fraction = 0.2
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-15           # the M1 report's AdamW epsilon
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.seed = 0
    c.train.grad_accum_steps = 1
    c.train.loss_chunk_size = 1024  # LM head + cross-entropy over this many positions at a time
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.skip_nonfinite = False
    c.train.tensorboard = True
    c.train.peak_tflops = 0.0         # per device; 0: look up the device kind (none known for CPUs)
    return c


def get_config() -> ml_collections.ConfigDict:
    return base_config("tiny")
