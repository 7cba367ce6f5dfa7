"""One process of a multi-process CPU training run (tests/test_multihost.py launches several).

argv: process_id num_processes port mesh workdir; each process has 2 CPU devices, gloo collectives. Process 0
writes the per-step losses to WORKDIR/losses.json.
"""

import json
import os
import sys

pid, num, port, mesh_spec, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import faulthandler  # noqa: E402
import jax  # noqa: E402

if os.environ.get("M1_MULTIHOST_DEBUG"):
    faulthandler.dump_traceback_later(int(os.environ["M1_MULTIHOST_DEBUG"]), exit=True)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=num, process_id=pid)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import tiny  # noqa: E402

from m1_jax.train.loop import train  # noqa: E402
from m1_jax.train.metrics import read_metrics  # noqa: E402

c = tiny.get_config()
c.data.batch_size, c.data.seq_len = 4, 64
c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 3, 1, 0, 3
c.train.tensorboard = False
run_dir = os.path.join(workdir, "run")  # one directory for all processes, as on a pod's shared filesystem
train(c, run_dir, mesh_spec)
if pid == 0:
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    with open(os.path.join(workdir, "losses.json"), "w") as f:
        json.dump(losses, f)
print(f"process {pid} done", flush=True)
