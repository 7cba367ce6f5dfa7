"""RL (CISPO / DAPO / GRPO) of the tiny hybrid MoE on a verifiable task, from an SFT warm start.

  python experiments/rl.py --workdir=/tmp/rl_cispo
  python experiments/rl.py --config.rl.algo=dapo --config.rl.dynamic_sampling=True \
      --config.rl.overlong_penalty=True --config.init_checkpoint=/tmp/sft_run
  python experiments/rl.py --config=experiments/configs/rl.py:digit_count --config.loop.steps=100

Every setting is in the ml_collections config (experiments/configs/rl.py: the rl, loop, optimizer, warmup and
model sections), overridden with --config.SECTION.FIELD=VALUE as in experiments/train.py. With no
init_checkpoint it first runs its own SFT warm-up (fixed seed, stopped at warmup.target_accuracy) and saves
it to WORKDIR/warm_start. Rerunning the same command resumes from the latest checkpoint in --workdir. Metrics
(reward, accuracy, response length, clip fraction, entropy, sampler/trainer probability correlation, eval
accuracy greedy and sampled avg@k) go to WORKDIR/metrics.jsonl.

With the defaults (task digit_max, tiny model) it takes about 2 minutes on a 2-core CPU: an SFT warm-up that
stops once held-out sampled accuracy reaches 0.3 (about 50 steps), then 40 CISPO steps on fresh train-split
problems, which raise the held-out accuracy (docs/RESULTS.md, RL). digit_count is the harder variant used for
the CISPO/DAPO/GRPO comparison: its SFT plateaus for ~900 steps before it learns the rule, and when it crosses
the 0.3 target varies between runs (raise warmup.max_steps, or pass init_checkpoint). For mod_sum (100
problems) the eval set is fresh draws of the training problems, and the 12 held-out problems are scored too
(reported as heldout_*).

On several devices of one host:
  python experiments/rl.py --mesh=data=4 --workdir=/tmp/rl_mesh
On several hosts: the same command on every host (--distributed=auto initialises jax.distributed as
experiments/train.py does; the default mesh is then every device, data parallel) with an init checkpoint on
storage every host sees; rollouts are sampled and updates computed sharded over all hosts, and the sampled
arrays are gathered to every host (sharding.to_host).
shards the train state like experiments/train.py (params and Adam moments by the logical-axis rules) and runs
rollout sampling, eval, log-probs and the optimizer steps data-parallel over the mesh's batch axes; every
minibatch and micro-batch (prompts_per_step / mu * group_size / micro_batches responses) must divide by the
batch parallelism. The SFT warm-up, when it runs, stays on one device. Default: one device.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "rl.py"), "RL experiment config file")
flags.DEFINE_string("workdir", os.path.join(os.path.expanduser("~"), "m1_jax_runs", "rl"), "output/resume dir")
flags.DEFINE_string("mesh", None, "device mesh of this host's devices, e.g. 'data=4' or '2x2' (data x expert), "
                    "as in experiments/train.py; default: one device")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = when launched on several hosts (as experiments/train.py)")
flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "m1_jax_xla"),
                    "persistent XLA compilation cache directory ('' turns it off)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax

    from m1_jax import sharding as sharding_lib
    from m1_jax.data import load_tokenizer
    from m1_jax.data.tasks import TASKS
    from m1_jax.rl import warmup as warmup_lib
    from m1_jax.rl.experiment import build_configs, experiment_model
    from m1_jax.rl.loop import check_mesh, format_eval, run_rl

    from m1_jax.train import distributed
    multi_host = distributed.maybe_initialize(FLAGS.distributed)  # before any backend use
    config = FLAGS.config
    if multi_host and not config.init_checkpoint and not os.path.isdir(os.path.join(FLAGS.workdir, "warm_start")):
        print("error: on several hosts pass --config.init_checkpoint (the SFT warm-up runs on one device of one "
              "host); e.g. run the warm-up once on one host first", file=sys.stderr)
        sys.exit(2)
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if config.loop.task not in TASKS:
        print(f"error: unknown config.loop.task={config.loop.task}; choose from {sorted(TASKS)}", file=sys.stderr)
        sys.exit(2)
    tokenizer = load_tokenizer("byte")
    try:
        rl, ocfg, lc, wc = build_configs(config)
        cfg, params = experiment_model(config)
        # Default: one device on one host; every device of every host (data parallel) on several.
        one_device = FLAGS.mesh is None and jax.process_count() == 1
        mesh = sharding_lib.make_mesh(FLAGS.mesh, jax.devices()[:1] if one_device else None,
                                      num_experts=cfg.num_experts)
        check_mesh(cfg, rl, mesh)  # before the warm-up and any compile
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    def init():
        if params is not None:
            return params
        return warmup_lib.warm_start(cfg, tokenizer, wc, os.path.join(FLAGS.workdir, "warm_start"), log_fn=print)

    print(f"workdir: {FLAGS.workdir}; mesh {dict(mesh.shape)}", flush=True)
    result = run_rl(cfg, rl, ocfg, lc, FLAGS.workdir, tokenizer, init_params=init, mesh=mesh, log_fn=print)
    m = result["last_metrics"]
    print(f"done at step {result['step']}: " + ", ".join(f"{k}={m[k]:.4g}" for k in
          ("reward", "accuracy", "prob_corr", "entropy") if k in m), flush=True)
    first = next((h for h in result["history"] if h["step"] == 0), None)
    if first is not None and m:
        print(f"eval at step 0: {format_eval(first)}\neval at step {result['step']}: {format_eval(m)}", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
