"""Per-layer forward and forward+backward time: m1-jax modules against transformers' MiniMax modules on CPU.

  python experiments/bench_layers.py --preset=cpu-100m --batch=1 --seq=128

Times one MoE block, one lightning-attention and one softmax-attention module alone (jit / torch autograd,
loss = sum of squared outputs, gradients for the input and every weight), median of --repeats after --warmup
calls, each framework in its own subprocess. Shows where a train step's time goes (docs/RESULTS.md, train step).
"""

import statistics
import time
import warnings

from absl import app, flags

import bench_harness

_PRESET = flags.DEFINE_string("preset", "cpu-100m", "model preset")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_SEQ = flags.DEFINE_integer("seq", 128, "sequence length")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed calls")
_REPEATS = flags.DEFINE_integer("repeats", 9, "timed calls")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "worker runs per side, alternating jax / torch; the median round is shown")
_WORKER = flags.DEFINE_enum("worker", None, ["jax", "torch"], "internal: run one framework and print RESULT")

MODULES = ("moe", "lightning", "softmax")


def _median_ms(fn):
    for _ in range(_WARMUP.value):
        fn()
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _run_jax(cfg, B, L):
    import jax
    import jax.numpy as jnp
    from m1_jax.layers.lightning import LightningAttention
    from m1_jax.layers.moe import MoE
    from m1_jax.layers.rope import rope_cos_sin
    from m1_jax.layers.softmax_attention import SoftmaxAttention

    x = jax.random.normal(jax.random.PRNGKey(0), (B, L, cfg.hidden_size), jnp.float32)
    seg = jnp.ones((B, L), jnp.int32)
    cos_sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(L), (B, L)), cfg.rotary_dim, cfg.rope_theta)
    decay = jnp.asarray(cfg.head_slopes(), jnp.float32)
    cases = {"moe": (MoE(cfg), (seg != 0,)), "lightning": (LightningAttention(cfg), (decay, seg)),
             "softmax": (SoftmaxAttention(cfg), (cos_sin, seg))}
    out = {}
    for name in MODULES:
        module, extra = cases[name]
        params = module.init(jax.random.PRNGKey(1), x, *extra)["params"]
        apply = lambda p, x, module=module, extra=extra: module.apply({"params": p}, x, *extra)[0]
        fwd = jax.jit(apply)
        grad = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))
        out[name] = (_median_ms(lambda: jax.block_until_ready(fwd(params, x))),
                     _median_ms(lambda: jax.block_until_ready(grad(params, x))))
    return out


def _run_torch(cfg, B, L):
    import torch
    import transformers
    from m1_jax.config import LIGHTNING, SOFTMAX
    from m1_jax import hf as hf_lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.MiniMaxConfig(**hf_lib.config_to_hf(cfg))
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(hf).float().train()
    kinds = list(cfg.layer_types)
    lightning, softmax = (model.model.layers[kinds.index(k)] for k in (LIGHTNING, SOFTMAX))
    x = torch.randn(B, L, cfg.hidden_size, requires_grad=True)
    rope = model.model.rotary_emb(x, torch.arange(L)[None].expand(B, L))
    calls = {"moe": lambda: lightning.mlp(x),
             "lightning": lambda: lightning.self_attn(x, position_embeddings=rope, attention_mask=None),
             "softmax": lambda: softmax.self_attn(x, position_embeddings=rope, attention_mask=None)}
    out = {}
    for name in MODULES:
        call = calls[name]

        def fwd(call=call):
            with torch.no_grad():
                call()

        def fwd_bwd(call=call):
            y = call()
            (y[0] if isinstance(y, tuple) else y).pow(2).sum().backward()

        out[name] = (_median_ms(fwd), _median_ms(fwd_bwd))
    return out


def main(argv):
    del argv
    from m1_jax.config import LIGHTNING, SOFTMAX, get_config
    cfg = get_config(_PRESET.value)
    B, L = _BATCH.value, _SEQ.value
    if _WORKER.value:
        result = (_run_jax if _WORKER.value == "jax" else _run_torch)(cfg, B, L)
        bench_harness.emit(result)
        return
    args = [f"--preset={_PRESET.value}", f"--batch={B}", f"--seq={L}", f"--warmup={_WARMUP.value}",
            f"--repeats={_REPEATS.value}"]
    rounds = bench_harness.run_rounds(__file__, {fw: [f"--worker={fw}", *args] for fw in ("jax", "torch")},
                                     _ROUNDS.value, "bench_layers")
    # Per module and column, the median over rounds of each round's median.
    results = {fw: {name: [statistics.median(r[name][i] for r in runs) for i in (0, 1)] for name in MODULES}
               for fw, runs in rounds.items()}
    counts = {"moe": cfg.num_layers, "lightning": list(cfg.layer_types).count(LIGHTNING),
              "softmax": list(cfg.layer_types).count(SOFTMAX)}
    print(f"\n{_PRESET.value}, batch {B} x seq {L}, median of {_REPEATS.value} after {_WARMUP.value} warm-up calls, "
          f"median of {_ROUNDS.value} alternating rounds\n")
    print("| module (layers) | m1-jax fwd ms | m1-jax fwd+bwd ms | torch fwd ms | torch fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|")
    for name in MODULES:
        (jf, jb), (tf, tb) = results["jax"][name], results["torch"][name]
        print(f"| {name} (x {counts[name]}) | {jf:.1f} | {jb:.1f} | {tf:.1f} | {tb:.1f} |")


if __name__ == "__main__":
    app.run(main)
