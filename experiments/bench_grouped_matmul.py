r"""Grouped matmul (the MoE's experts) against lax.ragged_dot and the dense matmul of the same routed FLOPs.

  python experiments/bench_grouped_matmul.py                                  # slice-1b's MoE on one GPU/TPU
  python experiments/bench_grouped_matmul.py --tokens=2048 --K=512 --N=896 --dtype=float32   # CPU smoke run

Rows are `--tokens` x top-k expert-sorted copies routed to --E groups (sizes from a random top-k routing, so
uneven as in training), lhs [M, K] @ rhs [E, K, N]. Per impl: forward and forward+backward (d lhs and d rhs)
wall time (median of --repeats after warm-up) and the routed rate: 2 M K N FLOPs forward, 3x that forward +
backward, whatever the impl really computes (ragged_dot's dense expansion on CPU/GPU costs E x). "dense" is one
[M, K] @ [K, N] matmul: the rate a grouped matmul could at best reach. The last column is each rate as a share
of dense's; with the device's bf16 peak where known.
"""

from __future__ import annotations

import functools

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

import bench_harness
from pallas_kernels.grouped_matmul import grouped_matmul

_TOKENS = flags.DEFINE_integer("tokens", 16384, "tokens (slice-1b at B=4 x 4096)")
_TOPK = flags.DEFINE_integer("k", 2, "experts per token")
_E = flags.DEFINE_integer("E", 8, "experts (groups)")
_K = flags.DEFINE_integer("K", 2048, "contracting dim (hidden size)")
_N = flags.DEFINE_integer("N", 4096, "output dim (expert_dim)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "operand dtype")
_IMPLS = flags.DEFINE_list("impls", ["auto", "ragged_dot", "dense"], "grouped_matmul impls, and 'dense'")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed calls after compilation")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls; the median is reported")


def _fns(impl):
    if impl == "dense":
        matmul = lambda lhs, rhs, sizes: lhs @ rhs[0]  # noqa: E731  same FLOPs as the routed grouped matmul
    else:
        matmul = functools.partial(grouped_matmul, impl=impl)

    def fwd_bwd(lhs, rhs, sizes, d):
        out, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), lhs, rhs)
        return out, vjp(d)

    return jax.jit(matmul), jax.jit(fwd_bwd)


def main(argv):
    del argv
    M, K, N, E = _TOKENS.value * _TOPK.value, _K.value, _N.value, _E.value
    dtype = jnp.dtype(_DTYPE.value)
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((_TOKENS.value, E)), axis=1)[:, :_TOPK.value]  # distinct top-k per token
    sizes = jnp.asarray(np.bincount(experts.ravel(), minlength=E), jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((M, K)) / np.sqrt(K), dtype)
    rhs = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
    d = jnp.asarray(rng.standard_normal((M, N)), dtype)
    kind, peaks = bench_harness.jax_device()
    flops = 2.0 * M * K * N
    results = {}
    for impl in _IMPLS.value:
        fwd, fwd_bwd = _fns(impl)
        try:
            t_f = bench_harness.median_ms(bench_harness.timed(lambda: fwd(lhs, rhs, sizes), _WARMUP.value + 1,
                                                              _REPEATS.value))
            t_fb = bench_harness.median_ms(bench_harness.timed(lambda: fwd_bwd(lhs, rhs, sizes, d),
                                                               _WARMUP.value + 1, _REPEATS.value))
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("%s failed: %s", impl, str(e).splitlines()[0][:300])
            continue
        results[impl] = (t_f, flops / t_f / 1e9, t_fb, 3 * flops / t_fb / 1e9)
    dense = results.get("dense")
    print(f"\ndevice {kind} ({jax.default_backend()}, jax {jax.__version__}); M={M} (tokens {_TOKENS.value} x k "
          f"{_TOPK.value}), K={K}, N={N}, E={E}, {_DTYPE.value}, group sizes {np.asarray(sizes).tolist()}"
          + (f"; bf16 peak {peaks[0]:g} TFLOP/s" if peaks else "") + "\n")
    print("| impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs dense |"
          + (" fwd+bwd % of peak |" if peaks else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if peaks else ""))
    for impl, (t_f, r_f, t_fb, r_fb) in results.items():
        share = f"{100 * r_fb / dense[3]:.0f}%" if dense else "-"
        peak = f" {100 * r_fb / (peaks[0] * 1e3):.1f}% |" if peaks else ""
        print(f"| {impl} | {t_f:.3f} | {r_f / 1e3:.3g} | {t_fb:.3f} | {r_fb / 1e3:.3g} | {share} |{peak}")


if __name__ == "__main__":
    app.run(main)
