r"""Benchmark lightning attention impls (and softmax attention) at M1's head shape; prints a markdown table.

  python experiments/bench_lightning.py --B=1 --H=64 --N=1024,4096,16384,65536,131072 --dtype=bfloat16
  python experiments/bench_lightning.py --H=4 --N=1024,2048,4096,8192 --impls=chunked,softmax   # CPU smoke run
  python experiments/bench_lightning.py --N=4096,16384,32768,65536 --impls=pallas_gpu,pallas_gpu_parallel,fla,softmax

impl "fla" times flash-linear-attention's chunk_simple_gla (the same fixed per-head decay: g_gamma = -lambda,
scale 1) in a torch subprocess (before jax takes the GPU), when torch sees a GPU and fla imports; otherwise its
row says why not. Name it explicitly: "auto" lists only the JAX impls.

Per (impl, N): forward and forward+backward wall time (warm-up, then the median of --repeats), achieved TFLOP/s
and GB/s, and (in brackets) their share of the device's ceilings (bench_harness.DEVICE_PEAKS; none shown where the device is unknown).
Counted work (per batch row, head and token; C = the chunk the impl uses, Dk = Dv = D):
  lightning fwd FLOPs = 2*C*D (causal half of QK^T and PV) + 4*D^2 (inter term and state update)
  softmax   fwd FLOPs = 2*N*D (causal half of QK^T and PV)
  fwd+bwd FLOPs = 3x fwd for lightning, 3.5x fwd for softmax (the usual conventions)
  fwd bytes = read q, k, v + write o; fwd+bwd adds read q, k, v, do + write dq, dk, dv (the minimum traffic).
"""

from __future__ import annotations


from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import bench_harness
from pallas_kernels.lightning_attention import lightning_attention

FLAGS = flags.FLAGS
flags.DEFINE_integer("B", 1, "batch size")
flags.DEFINE_integer("H", 64, "heads (M1: 64)")
flags.DEFINE_integer("D", 128, "head dim, Dk = Dv (M1: 128)")
flags.DEFINE_list("N", ["1024", "4096", "16384", "32768", "65536", "131072"], "sequence lengths")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q/k/v dtype")
flags.DEFINE_list("impls", ["auto"], "lightning impls to time, plus 'softmax' for jax.nn.dot_product_attention; "
                  "'auto' = every impl the backend can run (chunked, its Pallas kernel) and softmax")
flags.DEFINE_integer("block_size", 256, "lightning chunk size (pallas_gpu uses at most 64)")
flags.DEFINE_integer("warmup", 2, "untimed calls after compilation")
flags.DEFINE_integer("repeats", 5, "timed calls; the median is reported")
flags.DEFINE_integer("max_reference_n", 8192, "skip the quadratic reference above this N")
flags.DEFINE_bool("fla_worker", False, "internal: time fla's chunk_simple_gla in this (torch) process")

def available_impls(requested):
    backend = jax.default_backend()
    if requested != ["auto"]:
        return requested
    impls = ["chunked"]
    if backend == "tpu":
        impls.append("pallas_tpu")
    elif backend == "gpu":
        impls += ["pallas_gpu", "pallas_gpu_parallel"]
    return impls + ["softmax"]


def effective_chunk(impl, block_size):
    if impl in ("pallas_gpu", "pallas_gpu_parallel", "fla"):  # 64-token chunks (the parallel kernel's sub-chunk)
        return min(block_size, 64)
    return block_size


def fla_worker():
    """Emits {N: [fwd seconds, fwd+bwd seconds]} of fla's chunk_simple_gla on torch's GPU."""
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
    B, H, D = FLAGS.B, FLAGS.H, FLAGS.D
    dtype = getattr(torch, FLAGS.dtype)
    g_gamma = -torch.tensor(decays(H), device="cuda", dtype=torch.float32)
    out = {}
    for n in (int(x) for x in FLAGS.N):
        q, k, v, do = (torch.randn(B, n, H, D, device="cuda", dtype=dtype) / D ** 0.5 for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def fwd():
            with torch.no_grad():
                return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]

        def fwd_bwd():
            o = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]
            return torch.autograd.grad(o, (q, k, v), do)

        sync = lambda _: torch.cuda.synchronize()  # noqa: E731
        out[n] = [bench_harness.median_ms(bench_harness.timed(f, FLAGS.warmup + 1, FLAGS.repeats, sync)) / 1e3
                  for f in (fwd, fwd_bwd)]
    bench_harness.emit(out)


def fla_times():
    """{N: (t_fwd, t_fwd_bwd)} from the fla worker, or the reason it cannot run."""
    args = [f"--{name}={FLAGS[name].value}" for name in ("B", "H", "D", "dtype", "warmup", "repeats")]
    try:
        times = bench_harness.run(__file__, args + ["--N=" + ",".join(FLAGS.N), "--fla_worker"], "fla worker")
    except RuntimeError as e:
        return str(e).strip().splitlines()[-1][:120]
    return {int(n): t for n, t in times.items()}


def decays(H):
    # M1's decays for layer 0: lambda_h = 2^(-(h+1)/8) * (1 + 1e-5); their exact values do not affect speed.
    return (2.0 ** (-(np.arange(H) + 1) / 8.0) * (1 + 1e-5)).astype(np.float32)


def make_fn(impl, block_size):
    if impl == "softmax":
        kwargs = {"implementation": "cudnn"} if jax.default_backend() == "gpu" else {}
        return lambda q, k, v, decay: jax.nn.dot_product_attention(q, k, v, is_causal=True, **kwargs)
    return lambda q, k, v, decay: lightning_attention(q, k, v, decay, impl=impl, block_size=block_size)


def time_call(fn, args, warmup, repeats):
    return bench_harness.median_ms(bench_harness.timed(lambda: fn(*args), warmup + 1, repeats)) / 1e3


def work(impl, B, N, H, D, itemsize, block_size):
    per_token = 2 * N * D if impl == "softmax" else 2 * effective_chunk(impl, block_size) * D + 4 * D * D
    fwd_flops = B * H * N * per_token
    bwd_factor = 3.5 if impl == "softmax" else 3.0
    fwd_bytes = B * N * H * 4 * D * itemsize
    bwd_bytes = B * N * H * 7 * D * itemsize
    return (fwd_flops, fwd_bytes), (bwd_factor * fwd_flops, fwd_bytes + bwd_bytes)


def fmt_rate(value, peak):
    return f"{value:.3g}" if peak is None else f"{value:.3g} ({100 * value / peak:.1f}%)"


def row(impl, n, t_fwd, t_fb, fwd_flops, fwd_bytes, fb_flops, fb_bytes, flop_peak, bw_peak):
    return (f"| {impl} | {n} | {1e3 * t_fwd:.3f} | {fmt_rate(fwd_flops / t_fwd / 1e12, flop_peak)} | "
            f"{fmt_rate(fwd_bytes / t_fwd / 1e9, bw_peak)} | {1e3 * t_fb:.3f} | "
            f"{fmt_rate(fb_flops / t_fb / 1e12, flop_peak)} | {fmt_rate(fb_bytes / t_fb / 1e9, bw_peak)} |")


def main(argv):
    del argv
    if FLAGS.fla_worker:
        return fla_worker()
    # fla first: its torch worker needs the GPU memory this process's jax client takes once it starts.
    fla = fla_times() if "fla" in FLAGS.impls else None
    dtype = jnp.dtype(FLAGS.dtype)
    kind, peaks = bench_harness.jax_device()
    flop_peak, bw_peak = (peaks[0], 1e3 * peaks[1]) if peaks else (None, None)  # TFLOP/s, GB/s
    B, H, D = FLAGS.B, FLAGS.H, FLAGS.D
    rng = np.random.default_rng(0)
    decay = jnp.asarray(decays(H))
    rows = []
    for impl in available_impls(FLAGS.impls):
        for n in (int(x) for x in FLAGS.N):
            (fwd_flops, fwd_bytes), (fb_flops, fb_bytes) = work(impl, B, n, H, D, dtype.itemsize, FLAGS.block_size)
            if impl == "fla":
                if isinstance(fla, str):
                    rows.append(f"| fla | {n} | not run: {fla} | | | | | |")
                    continue
                t_fwd, t_fb = fla[n]
                rows.append(row(impl, n, t_fwd, t_fb, fwd_flops, fwd_bytes, fb_flops, fb_bytes, flop_peak, bw_peak))
                continue
            if impl == "reference" and n > FLAGS.max_reference_n:
                continue
            q, k, v, do = (jnp.asarray(rng.normal(size=(B, n, H, D)) / np.sqrt(D), dtype) for _ in range(4))
            fn = make_fn(impl, FLAGS.block_size)
            fwd = jax.jit(fn)

            @jax.jit
            def fwd_bwd(q, k, v, decay, do, fn=fn):
                o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, decay), q, k, v)
                return o, vjp(do)

            try:
                t_fwd = time_call(fwd, (q, k, v, decay), FLAGS.warmup, FLAGS.repeats)
                t_fb = time_call(fwd_bwd, (q, k, v, decay, do), FLAGS.warmup, FLAGS.repeats)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("%s at N=%d failed: %s", impl, n, str(e).splitlines()[0][:200])
                rows.append(f"| {impl} | {n} | failed | | | | | |")
                continue
            rows.append(row(impl, n, t_fwd, t_fb, fwd_flops, fwd_bytes, fb_flops, fb_bytes, flop_peak, bw_peak))
    print(f"\ndevice: {kind} (backend {jax.default_backend()}, jax {jax.__version__}); B={B} H={H} D={D} "
          f"dtype={FLAGS.dtype} block_size={FLAGS.block_size}; ceilings: "
          f"{f'{flop_peak:g} TFLOP/s, {bw_peak:g} GB/s' if peaks else 'unknown'}\n")
    print("| impl | N | fwd ms | fwd TFLOP/s | fwd GB/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
