"""Train-step throughput and peak memory: m1-jax vs transformers' PyTorch MiniMax, same config and batch.

  python experiments/bench_train.py --presets=tiny,cpu-100m --batch=2 --seq=256 --repeats=5 --rounds=3

Each (framework, preset) runs in its own subprocess so peak RSS is its own. One step = forward +
backward + AdamW update (MoE aux loss included on both sides). PyTorch uses attn_implementation="sdpa"
for the softmax layers (transformers' MiniMax lightning layers are plain PyTorch either way).
Peak memory: the process's peak RSS minus its RSS after imports (includes compiled code and caches).
"""

import os
import resource
import statistics
import time

from absl import app, flags

import bench_worker

_PRESETS = flags.DEFINE_list("presets", ["tiny", "cpu-100m"], "m1_jax.config presets")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 256, "tokens per sequence")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps (JAX: includes compilation)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps; the median is reported")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "worker runs per side, alternating jax / torch; medians pool all rounds")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default)")
_GROUPED = flags.DEFINE_enum("moe_grouped_matmul", "auto", ["auto", "blas", "bucketed", "tiled"],
                             "m1-jax's MoE grouped matmul on CPU (ModelConfig.moe_grouped_matmul)")
_WORKER = flags.DEFINE_string("worker", None, "internal: 'jax:PRESET' or 'torch:PRESET'")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_jax(preset, B, L, warmup, repeats):
    import jax
    import m1_jax.train.step  # noqa: F401  imported before the baseline, as the torch side imports first

    base = _rss_mb()
    step, state, batch = bench_worker.jax_train_step(preset, B, L, moe_grouped_matmul=_GROUPED.value)
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"loss": float(m["loss"]), "times": times, "peak_mb": _peak_mb() - base}


def _run_torch(preset, B, L, warmup, repeats, threads):
    import warnings
    import torch
    import transformers
    from m1_jax.config import get_config

    if threads:
        torch.set_num_threads(threads)
    cfg = get_config(preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.MiniMaxConfig(**cfg.to_hf())
    hf._attn_implementation = "sdpa"
    base = _rss_mb()
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    seq = torch.from_numpy(bench_worker.random_tokens(cfg.vocab_size, B, L).astype("int64"))
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        # transformers shifts labels itself: same inputs as the JAX side, L - 1 of its L targets.
        ids = seq[:, :-1]
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"loss": float(out.loss), "times": times, "peak_mb": _peak_mb() - base, "threads": torch.get_num_threads()}


def main(argv):
    del argv
    B, L, W, R = _BATCH.value, _SEQ.value, _WARMUP.value, _REPEATS.value
    if _WORKER.value:
        framework, preset = _WORKER.value.split(":")
        if framework == "jax":
            out = _run_jax(preset, B, L, W, R)
        else:
            out = _run_torch(preset, B, L, W, R, _THREADS.value)
        bench_worker.emit(out)
        return
    from m1_jax.config import get_config
    from m1_jax.model import count_params

    rows, ratios = [], {}
    for preset in _PRESETS.value:
        n = count_params(get_config(preset))
        args = [f"--batch={B}", f"--seq={L}", f"--warmup={W}", f"--repeats={R}", f"--threads={_THREADS.value}",
                f"--moe_grouped_matmul={_GROUPED.value}"]
        res = bench_worker.run_rounds(__file__, {fw: [f"--worker={fw}:{preset}", *args] for fw in ("jax", "torch")},
                                      _ROUNDS.value, preset)
        round_ms = {fw: [statistics.median(r["times"]) * 1e3 for r in res[fw]] for fw in res}
        ratios[preset] = [t / j for j, t in zip(round_ms["jax"], round_ms["torch"])]
        for framework in ("jax", "torch"):
            runs = res[framework]
            med = statistics.median([t for r in runs for t in r["times"]])
            rows.append((preset, f"{n['total'] / 1e6:.1f}M", framework, B * L / med, med * 1e3,
                         max(r["peak_mb"] for r in runs), runs[-1]["loss"]))
    print(f"\nbatch {B} x seq {L}, warm-up {W}, median of {R} steps x {_ROUNDS.value} alternating rounds, "
          f"CPU ({os.cpu_count()} cores), m1-jax MoE grouped matmul {_GROUPED.value!r}\n")
    print("| preset | params | framework | tokens/s | step ms (median) | peak RSS growth MB | last loss |")
    print("|---|---|---|---|---|---|---|")
    for preset, params, fw, tps, ms, mb, loss in rows:
        name = "m1-jax (jit)" if fw == "jax" else "transformers MiniMax (sdpa)"
        print(f"| {preset} | {params} | {name} | {tps:,.0f} | {ms:,.1f} | {mb:,.0f} | {loss:.3f} |")
    print()
    for preset, r in ratios.items():
        print(f"{preset}: torch step / m1-jax step in each round: " + ", ".join(f"{x:.2f}" for x in r))


if __name__ == "__main__":
    app.run(main)
