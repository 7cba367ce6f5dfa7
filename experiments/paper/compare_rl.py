"""CISPO vs DAPO vs GRPO from one warm start, several seeds each: eval accuracy against RL steps.

  python experiments/paper/compare_rl.py --config=experiments/configs/rl.py:digit_count \
      --config.loop.steps=80 --workdir=/tmp/compare_dc
  python experiments/paper/compare_rl.py --config=experiments/configs/rl.py:addition --config.rl.mu=8 \
      --workdir=/tmp/compare_add   # worked solutions of 36-108 tokens

Every run setting (task, steps, prompts x G, mu, lr, eval, the SFT warm-up, init_checkpoint) comes from the RL
experiment config that experiments/rl.py reads (experiments/configs/rl.py, overridden with --config.SECTION.FIELD);
each algorithm runs it with its own clip defaults and each seed with its own sampling seed (loop.seed). Writes
WORKDIR/compare_rl.png (sampled avg@k and greedy accuracy, reward, clipped and gradient-zeroed token fractions;
mean over seeds with a +-1 std band) and prints two markdown tables: accuracy at the start and the end, the first
eval step each run reaches the target (start accuracy + --target_gain, or --target), each algorithm's mean
steps-to-target divided by CISPO's (reported whichever algorithm wins), and per-step diagnostics. Each run lives
in WORKDIR/<algo>_seed<k> and resumes if interrupted; the warm start is WORKDIR/warm_start (or
config.init_checkpoint). All runs share the eval problems and the eval sampling keys.
"""

import dataclasses
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "rl.py")
config_flags.DEFINE_config_file("config", _CONFIG + ":digit_count", "RL experiment config (as experiments/rl.py)")
flags.DEFINE_string("workdir", "/tmp/compare_rl", "output dir")
flags.DEFINE_list("algos", ["cispo", "dapo", "grpo"], "algorithms")
flags.DEFINE_integer("seeds", 3, "sampling seeds per algorithm (loop.seed = 0 .. seeds - 1)")
flags.DEFINE_float("cispo_eps_high", None, "CISPO cap offset (cap = 1 + eps_high); default the algorithm's (4.0)")
flags.DEFINE_bool("dapo_dynamic_sampling", True, "DAPO with dynamic sampling")
flags.DEFINE_enum("metric", "sampled", ["sampled", "greedy"], "accuracy the target and the ratio are computed on")
flags.DEFINE_float("target", None, "absolute accuracy target (default: start accuracy + --target_gain)")
flags.DEFINE_float("target_gain", 0.08, "target = accuracy of the warm start + this")
flags.DEFINE_string("plot", None, "plot path (default WORKDIR/compare_rl.png)")

COLORS = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green"}


def steps_to_target(steps, accs, target):
    for s, a in zip(steps, accs):
        if a >= target:
            return s
    return None


def algo_config(rl, algo):
    """The experiment's RLConfig for one algorithm (clip offsets left unset take the algorithm's defaults)."""
    extra = {}
    if algo == "cispo" and FLAGS.cispo_eps_high is not None:
        extra["eps_high"] = FLAGS.cispo_eps_high
    if algo == "dapo":
        extra["dynamic_sampling"] = FLAGS.dapo_dynamic_sampling
    return dataclasses.replace(rl, algo=algo, **extra)


def run_all(cfg, warm, tok, rl, ocfg, lc):
    """Runs every (algo, seed); returns ({(algo, seed): {step: eval record}}, {(algo, seed): {step: step record}})."""
    from m1_jax.rl.loop import run_rl
    from m1_jax.train.metrics import read_metrics

    runs, steps_by_run = {}, {}
    key = f"{'eval' if lc.eval_split == 'train' else 'heldout'}_sampled_accuracy"
    for algo in FLAGS.algos:
        for seed in range(FLAGS.seeds):
            wd = os.path.join(FLAGS.workdir, f"{algo}_seed{seed}")
            t0 = time.time()
            run_rl(cfg, algo_config(rl, algo), ocfg, dataclasses.replace(lc, seed=seed), wd, tok,
                   init_params=lambda: warm, log_fn=lambda line: print(f"{algo} seed {seed}: {line}", flush=True))
            recs = {r["step"]: r for r in read_metrics(wd)}
            runs[(algo, seed)] = {s: r for s, r in sorted(recs.items()) if any(k.endswith("_accuracy") and
                                                                                k != "accuracy" for k in r)}
            steps_by_run[(algo, seed)] = {s: r for s, r in sorted(recs.items()) if "clip_fraction" in r}
            print(f"{algo} seed {seed}: {key} " + " ".join(f"{s}:{r.get(key, float('nan')):.2f}"
                                                           for s, r in runs[(algo, seed)].items()) +
                  f"  ({time.time() - t0:.0f}s)", flush=True)
    return runs, steps_by_run


def curves(runs, algo, key):
    """(steps, accs [seeds, evals]) of one metric key."""
    per_seed = [runs[(algo, s)] for s in range(FLAGS.seeds)]
    steps = sorted(set.intersection(*(set(r) for r in per_seed)))
    return steps, np.array([[r[s][key] for s in steps] for r in per_seed])


def _band(ax, steps, per_seed, color, label, smooth=1):
    """Mean over seeds with a +-1 std band (optionally a trailing moving average over `smooth` points)."""
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        per_seed = np.stack([np.convolve(np.pad(r, (smooth - 1, 0), mode="edge"), kernel, "valid") for r in per_seed])
    mean, std = per_seed.mean(0), per_seed.std(0)
    ax.plot(steps, mean, color=color, label=label, lw=2)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def plot(runs, steps_by_run, prefix, path, rl, lc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, kind in zip(axes[0], ("sampled", "greedy")):
        key = f"{prefix}_sampled_accuracy" if kind == "sampled" else f"{prefix}_accuracy"
        for algo in FLAGS.algos:
            _band(ax, *curves(runs, algo, key), COLORS.get(algo), algo)
        label = f"avg@{lc.eval_samples} at T={rl.temperature:g}" if kind == "sampled" else "greedy"
        ax.set_ylabel(f"{prefix} accuracy ({label}, {lc.num_eval} problems)")
        ax.legend()
    reward_ax, clip_ax = axes[1]
    for algo in FLAGS.algos:
        _band(reward_ax, *curves(steps_by_run, algo, "reward"), COLORS.get(algo), algo, smooth=5)
        steps, clip = curves(steps_by_run, algo, "clip_fraction")
        _, zeroed = curves(steps_by_run, algo, "zeroed_fraction")
        clip_ax.plot(steps, clip.mean(0), color=COLORS.get(algo), lw=2, label=f"{algo}: clipped")
        clip_ax.plot(steps, zeroed.mean(0), color=COLORS.get(algo), lw=1, ls="--", label=f"{algo}: gradient zeroed")
    reward_ax.set_ylabel("rollout reward (train prompts, 5-step mean)")
    clip_ax.set_ylabel("fraction of response tokens (mean of seeds)")
    clip_ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    fig.suptitle(f"{lc.task}: {FLAGS.seeds} seeds each (band: +-1 std), {rl.prompts_per_step} prompts x "
                 f"G={rl.group_size}, mu={rl.mu}, lr {FLAGS.config.optimizer.learning_rate:g}, "
                 f"up to {rl.max_new_tokens} new tokens")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def diagnostics_table(steps_by_run):
    """Per-step diagnostics, mean over every step of every seed."""
    keys = ("clip_fraction", "zeroed_fraction", "ratio_max", "response_length", "entropy")
    print("\n| algo | clipped tokens | gradient zeroed | largest IS ratio (max) | response length | entropy first -> last |")
    print("|---|---|---|---|---|---|")
    for algo in FLAGS.algos:
        vals = {k: curves(steps_by_run, algo, k)[1] for k in keys}
        print(f"| {algo} | {vals['clip_fraction'].mean():.4f} | {vals['zeroed_fraction'].mean():.4f} | "
              f"{vals['ratio_max'].max():.2f} | {vals['response_length'].mean():.0f} | "
              f"{vals['entropy'][:, 0].mean():.3f} -> {vals['entropy'][:, -1].mean():.3f} |")


def table(runs, prefix):
    main_key = f"{prefix}_sampled_accuracy" if FLAGS.metric == "sampled" else f"{prefix}_accuracy"
    start = float(np.mean([runs[(a, s)][0][main_key] for a in FLAGS.algos for s in range(FLAGS.seeds)]))
    target = FLAGS.target if FLAGS.target is not None else start + FLAGS.target_gain
    rows, hits_by_algo = [], {}
    for algo in FLAGS.algos:
        steps, main = curves(runs, algo, main_key)
        hits = [steps_to_target(steps, run, target) for run in main]
        reached = [h for h in hits if h is not None]
        hits_by_algo[algo] = float(np.mean(reached)) if reached else None
        row = {"algo": algo, "hits": hits, "reached": len(reached)}
        for name, key in (("sampled", f"{prefix}_sampled_accuracy"), ("greedy", f"{prefix}_accuracy"),
                          ("heldout_sampled", "heldout_sampled_accuracy")):
            if key in runs[(algo, 0)][0] and not (name == "heldout_sampled" and prefix == "heldout"):
                _, accs = curves(runs, algo, key)
                row[name] = (accs[:, 0].mean(), accs[:, -1].mean(), accs[:, -1].std())
        rows.append(row)
    last = max(curves(runs, FLAGS.algos[0], main_key)[0])
    print(f"target: {FLAGS.metric} {prefix} accuracy >= {target:.3f}; final step {last}\n")
    cols = [c for c in ("sampled", "greedy", "heldout_sampled") if c in rows[0]]
    header = "| algo | " + " | ".join(f"{prefix if c != 'heldout_sampled' else 'held-out'} "
                                       f"{c.replace('heldout_', '')} start | end (mean ± std)" for c in cols)
    print(header + " | seeds reaching target | steps to target (per seed) | mean steps / CISPO's |")
    print("|---" * (2 + 2 * len(cols) + 2) + "|")
    cispo = hits_by_algo.get("cispo")
    for row in rows:
        hit = hits_by_algo[row["algo"]]
        ratio = f"{hit / cispo:.2f}" if hit is not None and cispo else "n/a"
        cells = " | ".join(f"{row[c][0]:.3f} | {row[c][1]:.3f} ± {row[c][2]:.3f}" for c in cols)
        per_seed = ", ".join("never" if h is None else str(h) for h in row["hits"])
        print(f"| {row['algo']} | {cells} | {row['reached']}/{FLAGS.seeds} | {per_seed} | {ratio} |")


def main(argv):
    del argv
    import jax
    from m1_jax.data import load_tokenizer
    from m1_jax.rl import warmup as warmup_lib
    from m1_jax.rl.experiment import build_configs, experiment_model

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "m1_jax_xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t_start = time.time()
    tok = load_tokenizer("byte")
    rl, ocfg, lc, wc = build_configs(FLAGS.config)
    for algo in FLAGS.algos:
        algo_config(rl, algo).validate()  # before the warm-up
    cfg, warm = experiment_model(FLAGS.config)
    if warm is None:
        warm = warmup_lib.warm_start(cfg, tok, wc, os.path.join(FLAGS.workdir, "warm_start"), log_fn=print)
    runs, steps_by_run = run_all(cfg, warm, tok, rl, ocfg, lc)
    prefix = "eval" if lc.eval_split == "train" else "heldout"
    path = FLAGS.plot or os.path.join(FLAGS.workdir, "compare_rl.png")
    plot(runs, steps_by_run, prefix, path, rl, lc)
    print(f"\nplot: {path}; wall time {time.time() - t_start:.0f}s\n")
    table(runs, prefix)
    diagnostics_table(steps_by_run)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
