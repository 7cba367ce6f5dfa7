"""CISPO vs DAPO vs GRPO from one warm start, several seeds each: eval accuracy against RL steps.

  python experiments/compare_rl.py --workdir=/tmp/compare_rl --steps=20 --seeds=3
Writes WORKDIR/compare_rl.png and prints a markdown table: accuracy at the end, the first step each run
reaches --target, and the steps-to-target ratio against CISPO (reported whichever algorithm wins). Each run
lives in WORKDIR/<algo>_seed<k> and resumes if interrupted; the warm start is WORKDIR/warm_start (or
--init_checkpoint).
"""

import os
import time

from absl import app, flags, logging
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/compare_rl", "output dir")
flags.DEFINE_string("init_checkpoint", None, "warm start (default: SFT warm-up saved to WORKDIR/warm_start)")
flags.DEFINE_string("task", "mod_sum", "task")
flags.DEFINE_list("algos", ["cispo", "dapo", "grpo"], "algorithms")
flags.DEFINE_integer("seeds", 3, "sampling seeds per algorithm")
flags.DEFINE_integer("steps", 20, "RL steps per run")
flags.DEFINE_integer("group_size", 8, "G")
flags.DEFINE_integer("prompts_per_step", 8, "prompts per rollout")
flags.DEFINE_integer("mu", 2, "minibatches per rollout (mu > 1 makes the algorithms differ, rl.md §6.9)")
flags.DEFINE_float("lr", 3e-3, "learning rate")
flags.DEFINE_float("cispo_eps_high", 4.0, "CISPO cap offset (cap = 1 + eps_high)")
flags.DEFINE_bool("dapo_dynamic_sampling", True, "DAPO with dynamic sampling")
flags.DEFINE_integer("num_eval", 64, "eval problems")
flags.DEFINE_integer("eval_every", 5, "eval every N steps")
flags.DEFINE_float("target", 0.5, "eval-accuracy target for steps-to-target")
flags.DEFINE_integer("max_new_tokens", 4, "response budget")
flags.DEFINE_float("warmup_target", 0.3, "SFT warm-up target accuracy")


def steps_to_target(steps, accs, target):
    for s, a in zip(steps, accs):
        if a >= target:
            return s
    return None


def main(argv):
    del argv
    import jax
    from m1_jax.config import get_config
    from m1_jax.data import load_tokenizer
    from m1_jax.rl import warmup as warmup_lib
    from m1_jax.rl.loop import LoopConfig, run_rl
    from m1_jax.rl.trainer import RLConfig
    from m1_jax.train.metrics import read_metrics
    from m1_jax.train.optimizer import OptimizerConfig

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "m1_jax_xla"))
    t_start = time.time()
    tok = load_tokenizer("byte")
    split = "train" if FLAGS.task == "mod_sum" else "eval"
    if FLAGS.init_checkpoint:
        cfg, warm = warmup_lib.load_params(FLAGS.init_checkpoint)
    else:
        cfg = get_config("tiny")
        warm_dir = os.path.join(FLAGS.workdir, "warm_start")
        if os.path.isdir(warm_dir):
            warm = warmup_lib.load_params(warm_dir, cfg)[1]
        else:
            wc = warmup_lib.WarmupConfig(task=FLAGS.task, max_steps=800, target_accuracy=FLAGS.warmup_target,
                                         eval_every=25, max_new_tokens=FLAGS.max_new_tokens, eval_split=split)
            warm, _ = warmup_lib.sft_warmup(cfg, tok, wc, log_fn=print)
            warmup_lib.save_params(warm_dir, cfg, warm)
    ocfg = OptimizerConfig(learning_rate=FLAGS.lr, schedule="constant", warmup_steps=0, total_steps=FLAGS.steps * FLAGS.mu,
                           weight_decay=0.0)
    metric = "heldout_accuracy" if split == "eval" else "eval_accuracy"
    curves = {}
    for algo in FLAGS.algos:
        extra = {"eps_high": FLAGS.cispo_eps_high} if algo == "cispo" else {}
        if algo == "dapo":
            extra["dynamic_sampling"] = FLAGS.dapo_dynamic_sampling
        rl = RLConfig(algo=algo, group_size=FLAGS.group_size, prompts_per_step=FLAGS.prompts_per_step, mu=FLAGS.mu,
                      max_new_tokens=FLAGS.max_new_tokens, **extra)
        for seed in range(FLAGS.seeds):
            lc = LoopConfig(task=FLAGS.task, steps=FLAGS.steps, seed=seed, eval_split=split, num_eval=FLAGS.num_eval,
                            eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.eval_every)
            wd = os.path.join(FLAGS.workdir, f"{algo}_seed{seed}")
            t0 = time.time()
            run_rl(cfg, rl, ocfg, lc, wd, tok, init_params=lambda: warm, log_fn=lambda s: None)
            recs = {r["step"]: r for r in read_metrics(wd)}
            pts = sorted((s, r[metric]) for s, r in recs.items() if metric in r)
            curves[(algo, seed)] = pts
            print(f"{algo} seed {seed}: {metric} " + " ".join(f"{s}:{a:.2f}" for s, a in pts) +
                  f"  ({time.time() - t0:.0f}s)", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green"}
    rows = []
    cispo_steps = None
    for algo in FLAGS.algos:
        runs = [curves[(algo, s)] for s in range(FLAGS.seeds)]
        steps = [s for s, _ in runs[0]]
        accs = np.array([[a for _, a in run] for run in runs])
        for run in accs:
            ax.plot(steps, run, color=colors.get(algo), alpha=0.25)
        ax.plot(steps, accs.mean(0), color=colors.get(algo), label=algo, lw=2)
        hits = [steps_to_target(steps, run, FLAGS.target) for run in accs]
        reached = [h for h in hits if h is not None]
        mean_hit = float(np.mean(reached)) if reached else None
        if algo == "cispo":
            cispo_steps = mean_hit
        rows.append((algo, accs[:, 0].mean(), accs[:, -1].mean(), accs[:, -1].std(), len(reached), mean_hit))
    ax.axhline(FLAGS.target, color="gray", ls=":")
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"{metric} (greedy, {FLAGS.num_eval} problems)")
    ax.set_title(f"{FLAGS.task}: {FLAGS.seeds} seeds, {FLAGS.prompts_per_step}x{FLAGS.group_size}, mu={FLAGS.mu}")
    ax.legend()
    png = os.path.join(FLAGS.workdir, "compare_rl.png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"\nplot: {png}; wall time {time.time() - t_start:.0f}s\n")
    print(f"| algo | {metric} start | end (mean ± std) | seeds reaching {FLAGS.target} | mean steps to target | "
          "steps / CISPO's |")
    print("|---|---|---|---|---|---|")
    for algo, start, end, std, n, hit in rows:
        ratio = f"{hit / cispo_steps:.2f}" if hit is not None and cispo_steps else "n/a"
        print(f"| {algo} | {start:.3f} | {end:.3f} ± {std:.3f} | {n}/{FLAGS.seeds} | "
              f"{'never' if hit is None else f'{hit:.1f}'} | {ratio} |")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
