r"""Context parallelism: communication volume and step time against the context size.

  python experiments/bench_context_parallel.py                       # tiny, 1-8 fake CPU devices, 512 tokens each
  python experiments/bench_context_parallel.py --preset=cpu-100m --chunk=1024 --contexts=1,2,4

For each context size P the sequence is P x --chunk tokens on a `context=P` mesh (weak scaling: fixed tokens per
device). It compiles the model's loss and gradients (packed documents, every parameter replicated so the only
collectives are the sequence-parallel ones and the gradient all-reduce), and reports per device:
- the bytes each kind of collective produces in the compiled program, split into the lightning layers' state
  all-gathers (LASP-2: P states of [B, H, K, V] float32 per layer, independent of the length), the softmax
  layers' key/value all-gathers (they grow with the length), and the rest (gradient reductions);
- the same counts by formula, so a mismatch shows;
- the median step time (fake CPU devices share the host's cores: the time shows overheads, not speed-up).
"""

from __future__ import annotations

import re

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bench_harness
from m1_jax import sharding
from m1_jax.config import get_config
from m1_jax.model import MiniMaxM1, init_params, lm_head_weight
from m1_jax.train.loss import chunked_cross_entropy

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "context sizes (devices)")
_CHUNK = flags.DEFINE_integer("chunk", 512, "tokens per device")
_BATCH = flags.DEFINE_integer("batch", 1, "sequences")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps after compiling")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps; the median is reported")

_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "f64": 8}


def collectives(hlo: str):
    """[(kind, result bytes, result dims)] of every collective in a compiled HLO text (async starts once)."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None or "-done" in line.split("=")[1].split("(")[0]:
            continue
        for dtype, dims in _ARRAY.findall(m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            out.append((m.group(2), _BYTES[dtype] * int(np.prod(shape)), shape))
    return out


def measure(cfg, P_ctx: int, chunk: int, B: int):
    mesh = Mesh(np.asarray(jax.devices()[:P_ctx]), ("context",))
    L = P_ctx * chunk
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, L + 1)).astype(np.int32)
    starts = np.zeros((B, L), bool)
    starts[:, rng.integers(1, L, 4 * P_ctx)] = True  # documents cross device boundaries
    seg = (1 + np.cumsum(starts, axis=1)).astype(np.int32)
    params = init_params(cfg, jax.random.key(0))

    def loss(params, tokens, targets, seg):
        h = MiniMaxM1(cfg).apply({"params": params}, tokens, seg, return_hidden=True)[0]
        return jnp.mean(chunked_cross_entropy(cfg, h, lm_head_weight(cfg, params), targets))

    with sharding.mesh_context(mesh if P_ctx > 1 else None):
        tok = NamedSharding(mesh, P(None, "context" if P_ctx > 1 else None))
        args = (jax.device_put(params, NamedSharding(mesh, P())),
                *(jax.device_put(x, tok) for x in (tokens[:, :-1], tokens[:, 1:], seg)))
        step = jax.jit(jax.grad(loss))
        compiled = step.lower(*args).compile()
        times = bench_harness.timed(lambda: step(*args), _WARMUP.value, _REPEATS.value)
    found = collectives(compiled.as_text())
    H, K, V = cfg.num_heads, cfg.head_dim, cfg.head_dim
    state_dims = (P_ctx, B, H, K, V)
    kv_dims = {(B, L, cfg.num_kv_heads, cfg.head_dim)}
    lightning = sum(b for kind, b, s in found if kind == "all-gather" and s == state_dims)
    softmax = sum(b for kind, b, s in found if kind == "all-gather" and s in kv_dims)
    other = sum(b for _, b, _ in found) - lightning - softmax
    n_lightning = sum(t == "lightning" for t in cfg.layer_types)
    n_softmax = len(cfg.layer_types) - n_lightning
    # Forward once, and again in the backward where the layer is rematerialised (the gather is recomputed).
    expect_state = 4 * P_ctx * B * H * K * V * n_lightning if P_ctx > 1 else 0
    expect_kv = 2 * np.dtype(cfg.dtype).itemsize * B * L * cfg.num_kv_heads * cfg.head_dim * n_softmax if P_ctx > 1 else 0
    return dict(P=P_ctx, L=L, lightning=lightning, softmax=softmax, other=other, expect_state=expect_state,
                expect_kv=expect_kv, ms=bench_harness.median_ms(times))


def main(argv):
    del argv
    cfg = get_config(_PRESET.value)
    contexts = [int(c) for c in _CONTEXTS.value]
    if max(contexts) > jax.device_count():
        raise SystemExit(f"--contexts up to {max(contexts)} need that many devices; found {jax.device_count()} "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    print(f"{_PRESET.value}, {_BATCH.value} x (P x {_CHUNK.value}) tokens, {jax.devices()[0].device_kind}; MiB per "
          "device of collective results in the compiled fwd+bwd program (expected: once per layer)")
    print("| P | tokens | lightning state all-gathers (expected) | softmax K/V all-gathers (expected) | other | "
          "step ms |")
    print("|---|---|---|---|---|---|")
    for c in contexts:
        r = measure(cfg, c, _CHUNK.value, _BATCH.value)
        print(f"| {r['P']} | {r['L']} | {mb(r['lightning'])} ({mb(r['expect_state'])}) | {mb(r['softmax'])} "
              f"({mb(r['expect_kv'])}) | {mb(r['other'])} | {r['ms']:.1f} |", flush=True)


if __name__ == "__main__":
    import os
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    app.run(main)
