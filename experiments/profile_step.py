"""Where a train step's time goes: the m1-jax step profiled on CPU, its time split by layer kind and op.

  python experiments/profile_step.py --preset=cpu-100m --batch=2 --seq=256

Traces --steps steps with jax.profiler after a warm-up, then maps every executed XLA op back to the model
op that produced it through the optimised HLO (dumped by XLA for this one program): its `op_name` says
forward or backward (`transpose(...)`), the layer's module (attn, moe, ...) and the jnp op. Prints the
summed thread time per step by phase and module, then the costliest ops. Thread time adds both cores'
busy time, so it can exceed the wall time; the wall time is printed beside it.
"""

import collections
import glob
import os
import re
import tempfile
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "cpu-100m", "model preset")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 256, "tokens per sequence")
_STEPS = flags.DEFINE_integer("steps", 3, "profiled steps (after 2 warm-up steps)")
_TOP = flags.DEFINE_integer("top", 25, "how many single ops to list")
_OUT = flags.DEFINE_string("out_dir", None, "where the trace and HLO dump go (default: a temporary folder)")

# Events that contain other events (or wait on them); only the leaves are summed.
_CONTAINERS = ("ThunkExecutor", "cond", "while", "Slinky", "Threadpool")


def op_sources(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """HLO instruction name -> (phase, module, op) from its metadata op_name."""
    sources = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
        name, op_name = m.groups()
        phase = "bwd" if "transpose(" in op_name else "fwd"
        layer = re.search(r"layer_\d+/(.*)", op_name)
        if layer:  # a submodule (attn, moe, ...), or the decoder layer's own norms and residual adds
            module = layer.group(1).split("/")[0] if "/" in layer.group(1) else "layer"
        elif "MiniMaxM1" in op_name:
            module = "model"  # embedding, layer loop, final norm
        else:
            phase, module = "-", "step"  # loss, gradient norm, optimizer update
        sources[name] = (phase, module, "/".join(op_name.split("/")[-2:]))
    return sources


def summarise(events, sources, steps):
    """(per (phase, module) ms, per (phase, module, op) [ms, count]) per step, from (name, duration_ns) leaves."""
    by_module, by_op = collections.Counter(), collections.defaultdict(lambda: [0.0, 0])
    for name, duration_ns in events:
        phase, module, op = sources.get(name, ("?", "unmapped", re.sub(r"[.\d]+$", "", name)))
        ms = duration_ns / 1e6 / steps
        by_module[(phase, module)] += ms
        by_op[(phase, module, op)][0] += ms
        by_op[(phase, module, op)][1] += 1
    return by_module, by_op


def main(argv):
    del argv
    out = _OUT.value or tempfile.mkdtemp(prefix="m1_profile_")
    dump = os.path.join(out, "hlo")
    # Before jax starts: XLA reads its flags once. Only the train step's module is dumped.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=jit_step")
    import jax
    from jax._src.lib import _profile_data  # jax's own reader of the xplane protobuf

    import bench_harness

    step, state, batch = bench_harness.jax_train_step(_PRESET.value, _BATCH.value, _SEQ.value)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    steps = _STEPS.value
    print(f"profiling {steps} steps of {_PRESET.value}, batch {_BATCH.value} x {_SEQ.value} -> {out}", flush=True)
    with jax.profiler.trace(os.path.join(out, "trace")):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        wall_ms = (time.perf_counter() - start) * 1e3 / steps

    hlo_files = glob.glob(os.path.join(dump, "*jit_step*after_optimizations.txt"))
    xplanes = glob.glob(os.path.join(out, "trace", "**", "*.xplane.pb"), recursive=True)
    if not hlo_files or not xplanes:
        raise SystemExit(f"no HLO dump or trace under {out}: was jax already started with other XLA_FLAGS?")
    with open(max(hlo_files, key=os.path.getsize)) as f:
        sources = op_sources(f.read())
    profile = _profile_data.ProfileData.from_file(xplanes[0])
    events = [(ev.name, ev.duration_ns) for plane in profile.planes for line in plane.lines
              if "XLAEigen" in line.name for ev in line.events if not ev.name.startswith(_CONTAINERS)]
    by_module, by_op = summarise(events, sources, steps)
    total = sum(by_module.values())
    print(f"\nwall {wall_ms:,.1f} ms per step (profiled); summed thread time {total:,.1f} ms per step\n")
    print("| phase | module | thread ms per step | share |\n|---|---|---:|---:|")
    for (phase, module), ms in by_module.most_common():
        print(f"| {phase} | {module} | {ms:,.1f} | {ms / total:.0%} |")
    print(f"\n| phase | module | op | thread ms per step | calls per step |\n|---|---|---|---:|---:|")
    for (phase, module, op), (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:_TOP.value]:
        print(f"| {phase} | {module} | {op} | {ms:,.2f} | {n / steps:g} |")


if __name__ == "__main__":
    app.run(main)
