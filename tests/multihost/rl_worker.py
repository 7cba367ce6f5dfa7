"""One process of a multi-process CPU RL run (tests/test_multihost.py launches several).

argv: process_id num_processes port mesh workdir; each process has 2 CPU devices, gloo collectives. Process 0
writes the per-step records to WORKDIR/history.json.
"""

import json
import os
import sys

pid, num, port, mesh_spec, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=num, process_id=pid)

from m1_jax import sharding  # noqa: E402
from m1_jax.config import get_config  # noqa: E402
from m1_jax.data import load_tokenizer  # noqa: E402
from m1_jax.model import init_params  # noqa: E402
from m1_jax.rl import loop as loop_lib, trainer as trainer_lib  # noqa: E402
from m1_jax.train import optimizer as opt_lib  # noqa: E402

cfg = get_config("tiny")
rl = trainer_lib.RLConfig(algo="cispo", group_size=4, prompts_per_step=8, mu=2, max_new_tokens=4)
ocfg = opt_lib.OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0)
lc = loop_lib.LoopConfig(task="digit_max", steps=2, num_eval=8, eval_samples=2, eval_every=2, checkpoint_every=2)
mesh = sharding.make_mesh(mesh_spec, num_experts=cfg.num_experts)
out = loop_lib.run_rl(cfg, rl, ocfg, lc, os.path.join(workdir, "run"), load_tokenizer("byte"),
                      init_params=lambda: init_params(cfg, jax.random.key(0)), mesh=mesh, log_fn=print)
if pid == 0:
    with open(os.path.join(workdir, "history.json"), "w") as f:
        json.dump(out["history"], f)
print(f"process {pid} done", flush=True)
