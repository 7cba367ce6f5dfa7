"""Trains MiniMax-M1-style models. With no flags: the tiny hybrid MoE on the built-in tasks.

  python experiments/train.py
  python experiments/train.py --config=experiments/configs/tiny.py --config.train.steps=50 \
      --config.model.dtype=bfloat16 --workdir=/tmp/run --mesh=data=8
Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"), "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(os.path.expanduser("~"), "m1_jax_runs", "tiny"),
                               "checkpoints, metrics.jsonl and TensorBoard events go here; resumes from it")
_MESH = flags.DEFINE_string("mesh", None, "device mesh, e.g. '8x64' or 'data=8,expert=64' "
                            "(default: every local device data-parallel)")
_STEPS = flags.DEFINE_integer("steps", None, "overrides config.train.steps")
_SEED = flags.DEFINE_integer("seed", None, "overrides config.train.seed")
_CKPT = flags.DEFINE_integer("checkpoint_every", None, "overrides config.train.checkpoint_every (0: off)")
_LOG = flags.DEFINE_integer("log_every", None, "overrides config.train.log_every")
_EVAL = flags.DEFINE_integer("eval_every", None, "overrides config.train.eval_every (0: off)")
_CACHE = flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "m1_jax_xla"),
                             "persistent XLA compilation cache directory ('' turns it off)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a tqdm progress bar")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --steps=100")
    import jax  # after flag parsing, so --help is instant
    from tqdm import tqdm

    from m1_jax.train import loop

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = flags.FLAGS.config
    for flag, key in ((_STEPS, "steps"), (_SEED, "seed"), (_CKPT, "checkpoint_every"), (_LOG, "log_every"),
                      (_EVAL, "eval_every")):
        if flag.value is not None:
            config.train[key] = flag.value
    try:
        setup = loop.build_setup(config, _MESH.value)  # fail fast on bad configs, before any compile
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    del setup
    print(f"workdir: {_WORKDIR.value}", flush=True)
    bar = tqdm(total=int(config.train.steps), desc="train", dynamic_ncols=True,
               disable=not _PROGRESS.value, mininterval=1.0)
    try:
        result = loop.train(config, _WORKDIR.value, _MESH.value, progress=bar, log_fn=tqdm.write)
    finally:
        bar.close()
    m = result["last_metrics"]
    summary = ", ".join(f"{k}={m[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_sec") if m.get(k) is not None)
    status = "preempted" if result["preempted"] else "done"
    print(f"{status} at step {result['step']}: {summary}; metrics in "
          f"{os.path.join(_WORKDIR.value, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
