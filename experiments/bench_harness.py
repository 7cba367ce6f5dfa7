"""What every experiments/bench_*.py shares: timing (warm-up, repeats, median), device peaks and MFU, the m1-jax
train step and transformers' PyTorch MiniMax built from the same config, and the worker protocol.

Worker protocol: a benchmark that measures each side in a fresh subprocess (so peak memory and thread pools are
its own) runs a worker that prints one RESULT line of JSON; the parent runs it and parses that line.
`run_rounds` alternates the sides (A B A B ...) so a shared machine's drifting speed falls on both alike.
"""

import json
import os
import statistics
import subprocess
import sys
import time

_PREFIX = "RESULT "

# Dense bf16 TFLOP/s and HBM TB/s by device kind (a substring of jax's / torch's device name), from the vendors'
# data sheets. CPUs have no entry: MFU is not reported there.
DEVICE_PEAKS = {
    "H100": (989.0, 3.35),
    "H200": (989.0, 4.8),
    "A100": (312.0, 2.0),
    "TPU v5p": (459.0, 2.76),
    "TPU v5 lite": (197.0, 0.82),
    "TPU v6": (918.0, 1.64),
    "TPU v4": (275.0, 1.2),
}


def device_peaks(kind: str):
    """(bf16 TFLOP/s, HBM TB/s) of a device kind, or None when it is not in DEVICE_PEAKS."""
    for name, peaks in DEVICE_PEAKS.items():
        if name.lower() in kind.lower():
            return peaks
    return None


def jax_device():
    """(device kind, its peaks or None) of jax's first device."""
    import jax
    kind = jax.devices()[0].device_kind
    return kind, device_peaks(kind)


def timed(fn, warmup: int, repeats: int, sync=None):
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed ones (the first compiles). `sync`
    waits for fn's result (default: jax.block_until_ready)."""
    if sync is None:
        import jax
        sync = jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times


def median_ms(times) -> float:
    return statistics.median(times) * 1e3


def train_step_flops(cfg, batch: int, seq_len: int) -> float:
    """Model FLOPs of one train step: 3 x the forward (forward + backward), the FLOPs model's count of the
    active matmuls (6 x active params x tokens) plus attention, remat recomputation excluded (MFU convention)."""
    from m1_jax import flops
    return 3.0 * batch * flops.forward_flops(cfg, seq_len)


def mfu(step_flops: float, seconds: float, peaks) -> float | None:
    """Model FLOPs utilisation against the device's bf16 peak; None where the peak is unknown (CPU)."""
    return None if peaks is None else step_flops / seconds / (peaks[0] * 1e12)


def emit(result) -> None:
    """In the worker: hand `result` (JSON-serialisable) to the parent."""
    print(_PREFIX + json.dumps(result), flush=True)


def run(script: str, args: list[str], what: str, env=None):
    """In the parent: runs `python script *args` (the parent's environment, updated with `env`) and returns its
    emitted result."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_PREFIX):])


def run_rounds(script: str, args_by_side: dict[str, list[str]], rounds: int, what: str, env=None):
    """Every side's worker `rounds` times, alternating sides; {side: [result of each round]}."""
    out = {side: [] for side in args_by_side}
    for r in range(rounds):
        for side, args in args_by_side.items():
            print(f"{what}: {side}, round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            out[side].append(run(script, args, f"{what} {side} (round {r + 1}/{rounds})", env))
    return out


def random_tokens(vocab, B, L):
    """[B, L + 1] int32 tokens, the same on both sides of a benchmark."""
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (B, L + 1)).astype(np.int32)


def jax_train_step(preset, B, L, **overrides):
    """(step, state, batch): the jitted m1-jax train step on `preset` (ModelConfig overrides applied) with the
    benchmark's optimizer and batch."""
    import jax
    import numpy as np
    from m1_jax.config import get_config
    from m1_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib

    cfg = get_config(preset, **overrides)
    oc = opt_lib.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant", total_steps=100,
                                 eps=1e-8, clip_norm=0.0)
    tx = opt_lib.make_optimizer(oc)
    state = state_lib.init_state(cfg, tx, 0)
    seq = random_tokens(cfg.vocab_size, B, L)
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "segment_ids": np.ones((B, L), np.int32),
             "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)), "loss_mask": np.ones((B, L), np.float32)}
    return step_lib.make_train_step(cfg, tx, opt_lib.make_schedule(oc)), state, jax.device_put(batch)


def torch_minimax(cfg, device: str = "cpu", attn: str = "sdpa"):
    """transformers' MiniMaxForCausalLM with cfg's architecture (float32 weights) on `device`, in train mode."""
    import warnings
    import torch
    import transformers
    from m1_jax import hf as hf_lib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.MiniMaxConfig(**hf_lib.config_to_hf(cfg))
    hf._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.MiniMaxForCausalLM(hf).float().to(device).train()
