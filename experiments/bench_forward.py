"""Forward time and peak memory: m1-jax against transformers' PyTorch MiniMax, same config, same CPU.

Each (framework, length) runs in a fresh subprocess so its peak RSS is its own; within one invocation the
two frameworks alternate at every length, so their ratio is measured side by side.

    python experiments/bench_forward.py --lengths=1024,2048,4096,8192,16384,32768
"""

import os
import resource

from absl import app, flags

import bench_harness

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "m1_jax preset")
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("repeats", 5, "timed repeats (median reported) after one warm-up")
flags.DEFINE_string("torch_attn", "sdpa", "transformers attn_implementation")
flags.DEFINE_string("worker", "", "internal: run one measurement ('jax' or 'torch') and print JSON")
flags.DEFINE_integer("length", 0, "internal: the length of a worker run")


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _time(fn, repeats):
    return bench_harness.median_ms(bench_harness.timed(fn, warmup=1, repeats=repeats, sync=lambda x: x)) / 1e3


def _worker_jax(cfg, tokens):
    import jax
    from m1_jax.model import MiniMaxM1, init_params

    params = init_params(cfg, jax.random.key(0))
    forward = jax.jit(lambda p, t: MiniMaxM1(cfg).apply({"params": p}, t)[0])
    tokens = jax.numpy.asarray(tokens)
    base = _rss_mb()
    seconds = _time(lambda: forward(params, tokens).block_until_ready(), FLAGS.repeats)
    return seconds, base


def _worker_torch(cfg, tokens):
    import torch

    model = bench_harness.torch_minimax(cfg, "cpu", attn=FLAGS.torch_attn).eval()
    tokens = torch.as_tensor(tokens)
    base = _rss_mb()

    def run():
        with torch.no_grad():
            model(tokens, use_cache=False).logits.float()

    return _time(run, FLAGS.repeats), base


def _worker():
    import warnings

    import numpy as np

    from m1_jax.config import get_config

    warnings.simplefilter("ignore")
    cfg = get_config(FLAGS.config)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (FLAGS.batch, FLAGS.length))
    seconds, base = (_worker_jax if FLAGS.worker == "jax" else _worker_torch)(cfg, tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bench_harness.emit({"seconds": seconds, "peak_mb": peak, "delta_mb": peak - base})


def _measure(kind, length):
    args = [f"--worker={kind}", f"--length={length}", f"--config={FLAGS.config}", f"--batch={FLAGS.batch}",
            f"--repeats={FLAGS.repeats}", f"--torch_attn={FLAGS.torch_attn}"]
    try:
        return bench_harness.run(__file__, args, f"{kind} forward at {length} tokens")
    except RuntimeError as e:  # e.g. out of memory at a long length: report it in the table and go on
        return {"error": str(e).strip().splitlines()[-1]}


def main(_):
    if FLAGS.worker:
        return _worker()
    print(f"config={FLAGS.config} batch={FLAGS.batch} repeats={FLAGS.repeats} torch attn={FLAGS.torch_attn}",
          flush=True)
    print("| tokens | m1-jax ms | torch ms | speed-up | m1-jax tok/s | m1-jax peak RSS / +fwd MB | "
          "torch peak RSS / +fwd MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for length in map(int, FLAGS.lengths):
        ours, theirs = _measure("jax", length), _measure("torch", length)
        if "error" in ours or "error" in theirs:
            print(f"| {length} | {ours} | {theirs} |", flush=True)
            continue
        tok_s = FLAGS.batch * length / ours["seconds"]
        print(f"| {length} | {ours['seconds'] * 1e3:.1f} | {theirs['seconds'] * 1e3:.1f} | "
              f"{theirs['seconds'] / ours['seconds']:.2f}x | {tok_s:,.0f} | "
              f"{ours['peak_mb']:.0f} / {ours['delta_mb']:.0f} | {theirs['peak_mb']:.0f} / {theirs['delta_mb']:.0f} |",
              flush=True)


if __name__ == "__main__":
    app.run(main)
