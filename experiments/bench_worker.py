"""Benchmarks that measure each side in a fresh subprocess (so peak memory and thread pools are its own):
the worker prints one RESULT line of JSON, the parent runs it and parses that line. `run_rounds` alternates
the sides (A B A B ...) so a shared machine's drifting speed falls on both alike."""

import json
import os
import subprocess
import sys

_PREFIX = "RESULT "


def emit(result) -> None:
    """In the worker: hand `result` (JSON-serialisable) to the parent."""
    print(_PREFIX + json.dumps(result), flush=True)


def run(script: str, args: list[str], what: str):
    """In the parent: runs `python script *args` on the CPU backend and returns its emitted result."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_PREFIX):])


def run_rounds(script: str, args_by_side: dict[str, list[str]], rounds: int, what: str) -> dict[str, list]:
    """Every side's worker `rounds` times, alternating sides; {side: [result of each round]}."""
    out = {side: [] for side in args_by_side}
    for r in range(rounds):
        for side, args in args_by_side.items():
            print(f"{what}: {side}, round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            out[side].append(run(script, args, f"{what} {side} (round {r + 1}/{rounds})"))
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
