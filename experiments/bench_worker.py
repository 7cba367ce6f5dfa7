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
