r"""Per-token decode latency and cache bytes against context length: hybrid vs pure lightning vs pure softmax.

  python experiments/bench_decode.py --contexts=1024,4096,16384,32768,131072 --plot=/tmp/bench_decode.png

Each variant is the same small config with layer_types all one kind (or M1's 7:1 hybrid). A cache that
already holds `context` tokens is timed while decoding --steps more tokens inside one jitted loop (as in
`generate`); per-token latency = (time(2 + steps) - time(2)) / steps, which cancels the one-off copy of the
input cache. Decode cost does not depend on the cache's values, so the context is not prefilled: the
softmax KV cache is marked valid up to `context`, and the lightning state is random.
Also prints the analytic cache size of the full M1 config at --m1_tokens against a softmax-only model of
the same shape (from shapes, nothing allocated).
"""

from __future__ import annotations


from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_harness
from m1_jax.config import LIGHTNING, SOFTMAX, ModelConfig, get_config
from m1_jax.generate import cache_bytes, decode_step_fn
from m1_jax.model import init_cache, init_params
from m1_jax.layers.softmax_attention import KVCache

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "16384", "32768"], "context lengths (tokens)")
_VARIANTS = flags.DEFINE_list("variants", ["hybrid", "lightning", "softmax"], "which layer mixes to time")
_STEPS = flags.DEFINE_integer("steps", 32, "decode steps per timed call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per point; the median is reported")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_M1_TOKENS = flags.DEFINE_integer("m1_tokens", 1 << 20, "context for the analytic full-M1 cache size")
_PLOT = flags.DEFINE_string("plot", "/tmp/bench_decode.png", "PNG path for the plot ('' = none)")


def small_config() -> ModelConfig:
    """cpu-100m's shapes with a smaller MoE, so per-token time is dominated by what we are measuring."""
    return get_config("cpu-100m", expert_dim=512, max_position_embeddings=1 << 22)


def variant(cfg: ModelConfig, name: str) -> ModelConfig:
    if name == "hybrid":
        return cfg
    if name in (LIGHTNING, SOFTMAX):
        return cfg.replace(layer_types=(name,) * cfg.num_layers)
    raise ValueError(f"unknown variant {name!r}; use hybrid, lightning or softmax")


def filled_cache(cfg: ModelConfig, batch: int, context: int, max_len: int, rng):
    """A cache as if `context` tokens had been prefilled (random lightning state, KV valid up to context)."""
    cache = []
    for entry in init_cache(cfg, batch, max_len):
        if isinstance(entry, KVCache):
            valid = jnp.broadcast_to(jnp.arange(max_len) < context, entry.valid.shape)
            cache.append(KVCache(entry.k, entry.v, valid, jnp.full_like(entry.index, context)))
        else:
            rng, key = jax.random.split(rng)
            cache.append(0.01 * jax.random.normal(key, entry.shape, entry.dtype))
    return cache


def make_decode_loop(cfg: ModelConfig):
    @jax.jit
    def run(params, cache, token_B, start, steps):
        def body(i, carry):
            cache, token_B = carry
            logits, cache = decode_step_fn(cfg, params, cache, token_B, jnp.full_like(token_B, start + i))
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, token_B))[1]
    return run


def time_per_token(run, params, cache, token, context, steps, repeats):
    """Seconds per decoded token: the median time of 2 + steps tokens minus that of 2 (launch and the loop's
    fixed cost cancel), over `steps`."""
    def median_s(n):
        return bench_harness.median_ms(bench_harness.timed(lambda: run(params, cache, token, context, n),
                                                           warmup=1, repeats=repeats)) / 1e3

    return max(median_s(2 + steps) - median_s(2), 0.0) / steps


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def main(argv):
    del argv
    base = small_config()
    contexts = [int(c) for c in _CONTEXTS.value]
    B, steps = _BATCH.value, _STEPS.value
    rows, results = [], {}
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); batch {B}; {steps} steps per call; "
          f"config: cpu-100m shapes, expert_dim={base.expert_dim}", flush=True)
    for name in _VARIANTS.value:
        cfg = variant(base, name)
        params = init_params(cfg, jax.random.key(0))
        run = make_decode_loop(cfg)
        token = jnp.ones((B,), jnp.int32)
        for context in contexts:
            max_len = context + 2 + steps
            cache = filled_cache(cfg, B, context, max_len, jax.random.key(1))
            ms = 1e3 * time_per_token(run, params, cache, token, context, steps, _REPEATS.value)
            nbytes = cache_bytes(cfg, B, max_len)["total"]
            results.setdefault(name, []).append((context, ms, nbytes))
            rows.append(f"| {name} | {context} | {ms:.2f} | {_fmt_bytes(nbytes)} |")
            print(rows[-1], flush=True)
            del cache

    print("\n| variant | context | ms / token | cache |\n|---|---|---|---|")
    print("\n".join(rows))

    m1 = get_config("minimax-m1-80k")
    n = _M1_TOKENS.value
    print(f"\nFull MiniMax-M1 config, one sequence of {n} tokens, KV in {m1.dtype}, lightning state float32 "
          "(analytic, from shapes):\n\n| model | lightning state | KV cache | total |\n|---|---|---|---|")
    for label, cfg in (("M1 hybrid (70 lightning + 10 softmax)", m1),
                       ("softmax-only, same shape (80 softmax)", variant(m1, SOFTMAX)),
                       ("lightning-only, same shape (80 lightning)", variant(m1, LIGHTNING))):
        b = cache_bytes(cfg, 1, n)
        print(f"| {label} | {_fmt_bytes(b['lightning'])} | {_fmt_bytes(b['softmax'])} | {_fmt_bytes(b['total'])} |")

    if _PLOT.value:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for name, pts in results.items():
            c, ms, nb = zip(*pts)
            ax_t.plot(c, ms, "o-", label=name)
            ax_m.plot(c, np.asarray(nb) / 2**20, "o-", label=name)
        for ax, ylabel in ((ax_t, "ms per decoded token"), (ax_m, "cache MiB (batch %d)" % B)):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        ax_m.set_yscale("log")
        fig.suptitle(f"decode cost vs context ({jax.devices()[0].device_kind})")
        fig.tight_layout()
        fig.savefig(_PLOT.value, dpi=120)
        print(f"\nplot: {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
