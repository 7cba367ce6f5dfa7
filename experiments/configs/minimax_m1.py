"""The full MiniMax-M1 architecture (456B total, 45.9B active; 80 layers, 32 experts, top-2).

Needs a pod: e.g. --mesh=8x64 (data x expert; 512 chips); add --dry_run to compile it on a CPU.
bf16 compute, fp32 master weights and moments (ZeRO-3 sharded), full remat per layer group, the report's
AdamW (betas 0.9/0.95, eps 1e-15) and the MiniMax tokenizer.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import tiny  # noqa: E402


def get_config():
    c = tiny.base_config("minimax-m1-80k")
    c.model.dtype = "bfloat16"
    c.model.impl.remat_policy = "full"
    # Expert parallelism (shard_map all-to-all over the mesh's expert axis): the dropless single-device MoE's
    # global sort cannot be split by GSPMD (~20 TB of temporaries per device on 8x64). Capacity 1.25 as in
    # GShard/MaxText; "ragged" is the dropless-capable backend on GPU/TPU (XLA:CPU cannot compile it).
    c.model.impl.moe_impl = "expert_parallel"
    c.model.impl.moe_backend = "capacity"
    c.model.impl.moe_capacity_factor = 1.25
    c.data.tokenizer = "byte"        # point at MiniMax's tokenizer.json for real runs
    c.data.batch_size = 512
    c.data.seq_len = 8192
    c.optimizer.learning_rate = 3e-4
    c.optimizer.schedule = "constant_decay"
    c.optimizer.warmup_steps = 2000
    c.optimizer.min_lr_ratio = 0.1
    c.train.steps = 100_000
    c.train.grad_accum_steps = 1   # micro-batch 512 = one 8192-token row per device on 8x64
    # LM head + cross-entropy 1024 positions at a time: [1024, 200064] float32 logits per device, not [8192, ...].
    c.train.loss_chunk_size = 1024
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.checkpoint_every = 500
    return c
