"""Trains MiniMax-M1-style models. With no flags: the tiny hybrid MoE on the built-in tasks.

  python experiments/train.py
  python experiments/train.py --config=experiments/configs/tiny.py --config.train.steps=50 \
      --config.model.dtype=bfloat16 --workdir=/tmp/run --mesh=data=8
Rerunning the same command resumes from the latest checkpoint in --workdir.

Dry run of the full model (no allocation; compiles the sharded step on 512 fake CPU devices):
  python experiments/train.py --config=experiments/configs/minimax_m1.py --mesh=8x64 --dry_run
  python experiments/train.py --config=experiments/configs/minimax_m1.py --mesh=8x64 --dry_run \
      --dry_run_topology=v5p:8x8x8     # XLA:TPU for 512 real v5p chips, from a CPU host (libtpu)
Multi-host: launch the same command on every host; --distributed=auto (default) calls
jax.distributed.initialize() when it sees a TPU pod, SLURM_NTASKS>1 or JAX_COORDINATOR_ADDRESS.
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
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = when launched on several hosts")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build the model abstractly, shard it, compile the train step and "
                             "print per-device memory; allocates and runs nothing (fakes CPU devices if needed)")
_DRY_GROUPS = flags.DEFINE_integer("dry_run_groups", 1, "dry run: compile this many layer groups (and one more) "
                                   "and extrapolate to the full depth; 0 compiles the full depth")
_TOPOLOGY = flags.DEFINE_string("dry_run_topology", None, "dry run: compile through XLA:TPU for this real TPU "
                                "topology, e.g. v5p:8x8x8 (512 chips), instead of on fake CPU devices; needs libtpu "
                                "(pip install -e .[tpu]) and no TPU")


def _fake_devices_for_dry_run(mesh_spec):
    """Before jax is imported: enough fake host (CPU) devices for the mesh. Only the CPU platform uses the
    flag, so on a GPU/TPU host the accelerators stay the default and the CPU ones serve the dry run."""
    from m1_jax import sharding as sharding_lib  # no jax backend touched yet

    needed = sharding_lib.mesh_device_count(mesh_spec)
    if needed is None or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={needed}").strip()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --steps=100")
    if _TOPOLOGY.value and not _DRY_RUN.value:
        raise app.UsageError("--dry_run_topology needs --dry_run")
    if _DRY_RUN.value and not _TOPOLOGY.value:
        try:
            _fake_devices_for_dry_run(_MESH.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    import jax  # after flag parsing (and XLA_FLAGS), so --help is instant
    from tqdm import tqdm

    from m1_jax.train import distributed, loop

    if not _DRY_RUN.value:
        distributed.maybe_initialize(_DISTRIBUTED.value)  # before any backend use

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = flags.FLAGS.config
    for flag, key in ((_STEPS, "steps"), (_SEED, "seed"), (_CKPT, "checkpoint_every"), (_LOG, "log_every"),
                      (_EVAL, "eval_every")):
        if flag.value is not None:
            config.train[key] = flag.value
    devices = None
    if _TOPOLOGY.value:
        from m1_jax.train import dry_run

        try:
            devices = dry_run.topology_devices(_TOPOLOGY.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    elif _DRY_RUN.value:
        needed = loop.sharding_lib.mesh_device_count(_MESH.value)
        if needed is not None and jax.device_count() < needed:
            devices = jax.devices("cpu")  # accelerators too few: the fake CPU devices
    try:
        setup = loop.build_setup(config, _MESH.value, devices)  # fail fast on bad configs, before any compile
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if _DRY_RUN.value:
        from m1_jax.train import dry_run

        print(f"command: {' '.join(sys.argv)}", flush=True)
        dry_run.dry_run(setup, groups=_DRY_GROUPS.value or None, print_fn=lambda s: print(s, flush=True))
        return
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
