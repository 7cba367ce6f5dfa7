"""Forward + backward time and memory against sequence length: pure softmax, pure lightning, 7:1 hybrid.

    python experiments/bench_scaling.py --min_len=1024 --max_len=65536       # the full sweep (GPU)
    python experiments/bench_scaling.py --min_len=1024 --max_len=8192        # a few minutes on a 2-core CPU

One jitted step = loss + grads of the whole MiniMaxM1 model (batch 1) for each variant at each length. Time is
the median of --repeats runs after a compile-and-warm-up run. Memory is XLA's compiled memory analysis (temp +
arguments + outputs: what the executable needs, deterministic on every backend); on GPU/TPU the device's
peak_bytes_in_use is printed too. Growth exponents are least-squares slopes of log(y) against log(L). A variant
whose step exceeds --max_step_s stops growing (its longer lengths are left blank).
"""


from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bench_harness
from m1_jax.config import LIGHTNING, SOFTMAX, get_config
from m1_jax.model import MiniMaxM1, init_params

_MIN_LEN = flags.DEFINE_integer("min_len", 1024, "Shortest sequence (powers of two from here).")
_MAX_LEN = flags.DEFINE_integer("max_len", 65536, "Longest sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (median).")
_MAX_STEP_S = flags.DEFINE_float("max_step_s", 60.0, "Stop growing a variant once one step takes longer.")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "Remat policy of the layer groups.")
_D = flags.DEFINE_integer("hidden", 256, "Model width.")

VARIANTS = {
    "softmax": lambda n: (SOFTMAX,) * n,
    "lightning": lambda n: (LIGHTNING,) * n,
    "hybrid7:1": lambda n: tuple(SOFTMAX if i % 8 == 7 else LIGHTNING for i in range(n)),
}


def variant_config(kind: str, hidden: int, remat: str):
    heads, head_dim = hidden // 64, 64
    return get_config("tiny").replace(
        hidden_size=hidden, num_layers=8, num_heads=heads, num_kv_heads=heads, head_dim=head_dim, rotary_dim=32,
        layer_types=VARIANTS[kind](8), block_size=256, attention_block_q=512, attention_block_kv=512,
        num_experts=1, num_experts_per_tok=1, expert_dim=4 * hidden, max_position_embeddings=1 << 20,
        remat_policy=remat, lightning_alpha=16**0.25, softmax_alpha=16**0.25, mlp_alpha=16**0.25)


def make_step(cfg):
    model = MiniMaxM1(cfg)

    def loss_fn(params, tokens):
        logits, _ = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss_fn))


def measure(cfg, seq_len: int, repeats: int):
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, seq_len + 1), 0, cfg.vocab_size)
    step = make_step(cfg)
    compiled = step.lower(params, tokens).compile()
    mem = compiled.memory_analysis()
    mem_bytes = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                          + mem.output_size_in_bytes)
    times = bench_harness.timed(lambda: compiled(params, tokens), warmup=1, repeats=repeats)
    stats = jax.devices()[0].memory_stats() or {}
    return bench_harness.median_ms(times) / 1e3, mem_bytes, stats.get("peak_bytes_in_use")


def growth_exponent(lengths, values) -> float:
    pts = [(l, v) for l, v in zip(lengths, values) if v]
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def main(argv):
    del argv
    lengths = []
    n = _MIN_LEN.value
    while n <= _MAX_LEN.value:
        lengths.append(n)
        n *= 2
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), d_model {_D.value}, 8 layers, "
          f"remat {_REMAT.value}, batch 1")
    results = {}
    for kind in VARIANTS:
        cfg = variant_config(kind, _D.value, _REMAT.value)
        results[kind] = {}
        for L in lengths:
            t, mem, peak = measure(cfg, L, _REPEATS.value)
            results[kind][L] = (t, mem, peak)
            print(f"  {kind:10s} L={L:6d}  {t * 1e3:9.1f} ms  mem {mem / 2**20 if mem else float('nan'):8.1f} MiB"
                  + (f"  peak {peak / 2**20:.1f} MiB" if peak else ""), flush=True)
            if t > _MAX_STEP_S.value:
                break

    print("\n| L | " + " | ".join(f"{k} ms | {k} MiB" for k in VARIANTS) + " |")
    print("|---" * (1 + 2 * len(VARIANTS)) + "|")
    for L in lengths:
        cells = []
        for kind in VARIANTS:
            r = results[kind].get(L)
            cells += ["" if r is None else f"{r[0] * 1e3:.1f}", "" if r is None or not r[1] else f"{r[1] / 2**20:.1f}"]
        print(f"| {L} | " + " | ".join(cells) + " |")
    cells = []
    for kind in VARIANTS:
        ls = sorted(results[kind])
        cells += [f"{growth_exponent(ls, [results[kind][l][0] for l in ls]):.2f}",
                  f"{growth_exponent(ls, [results[kind][l][1] for l in ls]):.2f}"]
    print("| exponent | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
