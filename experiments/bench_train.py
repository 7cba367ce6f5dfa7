"""Train-step throughput, MFU and peak memory: m1-jax vs transformers' PyTorch MiniMax, same config and batch.

  python experiments/bench_train.py --presets=tiny,cpu-100m --batch=2 --seq=256 --rounds=3        # CPU
  python experiments/bench_train.py --presets=slice-1b --batch=4 --seq=4096 --rounds=1            # one GPU/TPU
  python experiments/bench_train.py --presets=cpu-100m --batch=8 --seq=2048 --dtype=bfloat16      # one GPU

Each (framework, preset) runs in its own subprocess so peak memory is its own. One step = forward + backward +
AdamW update (MoE aux loss included on both sides). m1-jax runs on whatever jax's default backend is. PyTorch
runs on CUDA when torch sees a GPU (bf16 autocast, attn_implementation="sdpa", fused AdamW), else on the CPU in
float32; transformers' MiniMax lightning layers are plain PyTorch either way. MFU = model FLOPs of the step
(3 x the forward of m1_jax.flops: the active matmuls, i.e. 6 x active params x tokens, plus attention) / step
time / the device's dense bf16 peak (bench_harness.DEVICE_PEAKS; none on CPU). Peak memory: the device's peak
bytes in use on an accelerator; on CPU the process's peak RSS minus its RSS after imports.
"""

import os
import resource
import statistics
import time

from absl import app, flags

import bench_harness
from m1_jax.config import GROUPED_MATMUL_IMPLS

_PRESETS = flags.DEFINE_list("presets", ["tiny", "cpu-100m"], "m1_jax.config presets")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 256, "tokens per sequence")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the preset's)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps (JAX: includes compilation)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps; the median is reported")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "worker runs per side, alternating jax / torch; medians pool all rounds")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads on CPU (0: torch's default)")
_TORCH = flags.DEFINE_bool("torch", True, "also run transformers' PyTorch MiniMax")
_GROUPED = flags.DEFINE_enum("moe_grouped_matmul", "auto", list(GROUPED_MATMUL_IMPLS),
                             "m1-jax's MoE grouped matmul (ImplConfig.moe_grouped_matmul)")
_WORKER = flags.DEFINE_string("worker", None, "internal: 'jax:PRESET' or 'torch:PRESET'")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _overrides():
    return {"moe_grouped_matmul": _GROUPED.value, **({"dtype": _DTYPE.value} if _DTYPE.value else {})}


def _run_jax(preset, B, L, warmup, repeats):
    import jax
    import m1_jax.train.step  # noqa: F401  imported before the baseline, as the torch side imports first

    base = _rss_mb()
    step, state, batch = bench_harness.jax_train_step(preset, B, L, **_overrides())
    box = {"state": state}

    def one_step():
        box["state"], metrics = step(box["state"], batch)
        return box["state"], metrics

    times = bench_harness.timed(one_step, warmup, repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    peak_mb = stats["peak_bytes_in_use"] / 2**20 if stats else _peak_rss_mb() - base
    loss = float(one_step()[1]["loss"])
    return {"loss": loss, "times": times, "peak_mb": peak_mb, "device": device.device_kind}


def _run_torch(preset, B, L, warmup, repeats, threads):
    import torch
    from m1_jax.config import get_config

    cuda = torch.cuda.is_available()
    if threads and not cuda:
        torch.set_num_threads(threads)
    cfg = get_config(preset, **_overrides())
    base = _rss_mb()
    model = bench_harness.torch_minimax(cfg, "cuda" if cuda else "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=cuda)
    seq = torch.from_numpy(bench_harness.random_tokens(cfg.vocab_size, B, L).astype("int64"))
    ids = seq[:, :-1].to(model.device)  # transformers shifts labels itself: L - 1 of its L targets
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    box = {}

    def one_step():
        with autocast:
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        box["loss"] = out.loss
        return None

    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    times = bench_harness.timed(one_step, warmup, repeats, sync=sync)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - base
    return {"loss": float(box["loss"]), "times": times, "peak_mb": peak_mb, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv):
    del argv
    B, L, W, R = _BATCH.value, _SEQ.value, _WARMUP.value, _REPEATS.value
    if _WORKER.value:
        framework, preset = _WORKER.value.split(":")
        out = _run_jax(preset, B, L, W, R) if framework == "jax" else _run_torch(preset, B, L, W, R, _THREADS.value)
        bench_harness.emit(out)
        return
    from m1_jax.config import get_config
    from m1_jax.model import count_params

    sides = ("jax", "torch") if _TORCH.value else ("jax",)
    rows, ratios, kinds = [], {}, set()
    for preset in _PRESETS.value:
        cfg = get_config(preset, **_overrides())
        n = count_params(cfg)
        step_flops = bench_harness.train_step_flops(cfg, B, L)
        args = [f"--batch={B}", f"--seq={L}", f"--warmup={W}", f"--repeats={R}", f"--threads={_THREADS.value}",
                f"--moe_grouped_matmul={_GROUPED.value}"] + ([f"--dtype={_DTYPE.value}"] if _DTYPE.value else [])
        res = bench_harness.run_rounds(__file__, {fw: [f"--worker={fw}:{preset}", *args] for fw in sides},
                                       _ROUNDS.value, preset)
        round_ms = {fw: [bench_harness.median_ms(r["times"]) for r in res[fw]] for fw in res}
        if "torch" in res:
            ratios[preset] = [t / j for j, t in zip(round_ms["jax"], round_ms["torch"])]
        for framework in sides:
            runs = res[framework]
            med = statistics.median([t for r in runs for t in r["times"]])
            kinds.add(runs[0]["device"])
            util = bench_harness.mfu(step_flops, med, bench_harness.device_peaks(runs[0]["device"]))
            rows.append((preset, f"{n['total'] / 1e6:,.3g}M / {n['active'] / 1e6:,.3g}M", framework, B * L / med,
                         med * 1e3, "-" if util is None else f"{100 * util:.1f}%", max(r["peak_mb"] for r in runs),
                         runs[-1]["loss"]))
    print(f"\nbatch {B} x seq {L}, warm-up {W}, median of {R} steps x {_ROUNDS.value} rounds, devices "
          f"{sorted(kinds)} ({os.cpu_count()} host cores), m1-jax MoE grouped matmul {_GROUPED.value!r}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| preset | params total / active | framework | tokens/s | step ms (median) | MFU | peak MB | last loss |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for preset, params, fw, tps, ms, util, mb, loss in rows:
        name = "m1-jax (jit)" if fw == "jax" else "transformers MiniMax (sdpa)"
        print(f"| {preset} | {params} | {name} | {tps:,.0f} | {ms:,.1f} | {util} | {mb:,.0f} | {loss:.3f} |")
    print()
    for preset, r in ratios.items():
        print(f"{preset}: torch step / m1-jax step in each round: " + ", ".join(f"{x:.2f}" for x in r))


if __name__ == "__main__":
    app.run(main)
