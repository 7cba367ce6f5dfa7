"""The default RL experiment: CISPO on digit_max from an SFT warm start (about 2 minutes on a 2-core CPU).

python experiments/rl.py --workdir=/tmp/rl
python experiments/rl.py --config=experiments/configs/rl.py:digit_count --config.rl.algo=dapo \
    --config.rl.dynamic_sampling=True --config.init_checkpoint=/tmp/dc_warm
python experiments/rl.py --config=experiments/configs/rl.py:addition   # worked solutions of 36-108 tokens
python experiments/rl.py --config=experiments/configs/rl.py:digit_chain   # 200-260-token chains

Sections: `rl` holds every RLConfig field (m1_jax/rl/trainer.py), `loop` every LoopConfig field
(m1_jax/rl/loop.py; eval_split "auto" = train for mod_sum, whose 100 problems leave no held-out split, else
eval), `optimizer` the AdamW settings (constant learning rate, so a finished run extends by raising
loop.steps), `warmup` the SFT warm start run when no init_checkpoint is given, `model` the preset and the two
settings RL studies (compute dtype, float32 LM head).
"""

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from m1_jax.rl.loop import LoopConfig
from m1_jax.rl.trainer import RLConfig

# RLConfig fields whose default None means "the algorithm's default": typed placeholders so flags can set them.
_OPTIONAL = {"eps_low": float, "eps_high": float, "aggregation": str, "aux_loss_coef": float}


def _fields(instance, optional=None) -> ml_collections.ConfigDict:
    optional = optional or {}
    return ml_collections.ConfigDict({f.name: placeholder(optional[f.name]) if getattr(instance, f.name) is None
                                      else getattr(instance, f.name) for f in dataclasses.fields(instance)})


def get_config(task: str = "digit_max") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(preset="tiny", fp32_lm_head=True))
    c.model.dtype = placeholder(str)  # None: the preset's (tiny: float32); bfloat16 for the FP32-head study
    c.init_checkpoint = placeholder(str)  # experiments/train.py --workdir or a warm_start folder; None: warm up

    c.rl = _fields(RLConfig(), _OPTIONAL)
    c.loop = _fields(LoopConfig(task=task, steps=40, num_eval=256, eval_samples=8, eval_every=10,
                                checkpoint_every=10))
    c.loop.eval_split = "auto"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4  # 1e-3 collapses the entropy on digit_count and mod_sum
    c.optimizer.clip_norm = 1.0

    c.warmup = ml_collections.ConfigDict()
    c.warmup.max_steps = 1500         # digit_count needs ~900-1500
    c.warmup.target_accuracy = 0.3    # stop once held-out accuracy (target_metric) reaches this
    c.warmup.target_metric = "sampled"  # "sampled" avg@k at rl.temperature (the reward RL sees) or "greedy"
    c.warmup.learning_rate = 3e-3
    c.warmup.eval_every = 25
    if task == "addition":  # worked column-by-column solutions of 36-108 tokens
        c.rl.max_new_tokens = 112
        c.rl.max_prompt_len = 16
        c.warmup.eval_every = 100
        c.optimizer.learning_rate = 1e-4  # 3e-4 collapses the policy within one rollout at mu = 8 (RESULTS)
    # 200-260-token chains whose every line needs only the line before it: RL at reasoning length on the tiny model
    if task == "digit_chain":
        c.rl.max_new_tokens = 272
        c.rl.max_prompt_len = 40
        c.optimizer.learning_rate = 3e-5  # 1e-4 sent one of two CISPO seeds from 0.32 to 0.09 in 15 steps (RESULTS)
        c.warmup.max_steps = 1500         # reaches sampled 0.3 at ~500
        c.warmup.eval_every = 100
    # ~230-token worked traces: room for them, and a longer SFT (the tiny model was still at chance on the digits
    # after 400 steps: docs/RESULTS.md, RL with worked solutions)
    if task == "running_sum":
        c.rl.max_new_tokens = 256
        c.rl.max_prompt_len = 64
        c.warmup.max_steps = 3000
        c.warmup.eval_every = 200
    return c
