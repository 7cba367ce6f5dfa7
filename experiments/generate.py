"""Generate from a trained checkpoint, an HF directory, or a random-init preset, and report tokens/s.

  # a training run's latest checkpoint (WORKDIR/checkpoints, written by experiments/train.py)
  python experiments/generate.py --workdir=/tmp/run --prompt="2+3=" --max_new_tokens=64
  # an HF checkpoint directory (config.json + safetensors)
  python experiments/generate.py --hf_dir=/path/to/hf --token_ids="1,2,3;4,5" --temperature=0
  # random weights (smoke test of the whole path)
  python experiments/generate.py --config=tiny --prompt=hello --prompt=hi --max_new_tokens=32

Text prompts go through the byte tokenizer (--tokenizer=byte) or a local tokenizer.json.
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import numpy as np

from m1_jax.config import get_config
from m1_jax.data.tokenizer import load_tokenizer
from m1_jax.generate import generate
from m1_jax.model import init_params
from m1_jax.train import checkpoint as ckpt_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir; loads WORKDIR/checkpoints (Orbax)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + *.safetensors)")
_CONFIG = flags.DEFINE_string("config", None, "preset for random-init weights, e.g. 'tiny' (no checkpoint)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of random-init weights and of sampling")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "text prompt (repeat the flag for a batch)")
_TOKEN_IDS = flags.DEFINE_string("token_ids", None, "token-id prompts: '1,2,3;4,5' (';' separates prompts)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a path to tokenizer.json (or its directory)")
_BOS = flags.DEFINE_bool("add_bos", True, "prepend the tokenizer's BOS to text prompts")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass (1 = off)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "top-k (0 = off)")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "stop a row at the tokenizer's EOS")
_REP_RUN = flags.DEFINE_integer("repetition_min_run", 3000, "M1 early truncation run length (0 = off)")
_REP_P = flags.DEFINE_float("repetition_threshold", 0.99, "M1 early truncation probability threshold")
_REPEATS = flags.DEFINE_integer("timing_repeats", 1, "extra timed runs after the first (compiling) one")


def _load_model():
    chosen = [name for name, f in (("--workdir", _WORKDIR), ("--hf_dir", _HF_DIR), ("--config", _CONFIG))
              if f.value]
    if len(chosen) != 1:
        raise app.UsageError(f"pass exactly one of --workdir, --hf_dir, --config (got {chosen or 'none'})")
    if _WORKDIR.value:
        return ckpt_lib.load_params(_WORKDIR.value, step=_STEP.value)
    if _HF_DIR.value:
        from m1_jax.hf import load_checkpoint
        return load_checkpoint(_HF_DIR.value)
    cfg = get_config(_CONFIG.value)
    return cfg, init_params(cfg, jax.random.key(_SEED.value))


def main(argv):
    del argv
    cfg, params = _load_model()
    tok = load_tokenizer(_TOKENIZER.value)
    if _TOKEN_IDS.value:
        prompts = [[int(t) for t in row.split(",") if t.strip()] for row in _TOKEN_IDS.value.split(";")]
    elif _PROMPT.value:
        prompts = [([tok.bos_id] if _BOS.value else []) + tok.encode(text) for text in _PROMPT.value]
    else:
        raise app.UsageError("pass --prompt (text) or --token_ids")
    kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                  top_k=_TOP_K.value, eos_id=tok.eos_id if _STOP_AT_EOS.value else None, pad_id=tok.pad_id,
                  repetition_min_run=_REP_RUN.value or None, repetition_threshold=_REP_P.value)
    start = time.perf_counter()
    out = generate(cfg, params, prompts, rng=jax.random.key(_SEED.value), **kwargs)
    jax.block_until_ready(out.tokens)
    first = time.perf_counter() - start
    timings = []
    for r in range(_REPEATS.value):
        start = time.perf_counter()
        out = generate(cfg, params, prompts, rng=jax.random.key(_SEED.value + 1 + r), **kwargs)
        jax.block_until_ready(out.tokens)
        timings.append(time.perf_counter() - start)
    lengths = np.asarray(out.lengths)
    for b in range(len(prompts)):
        gen = out.generated(b)
        stop = "eos" if out.finished[b] else ("repetition" if out.truncated[b] else "max_new_tokens")
        print(f"--- prompt {b} ({len(prompts[b])} tokens) -> {lengths[b]} tokens, stopped by {stop}, "
              f"mean logprob {float(np.asarray(out.logprobs[b, :lengths[b]]).mean()):.3f}")
        print(f"{tok.decode(prompts[b])!r} -> {tok.decode(gen)!r}")
        print(f"ids: {gen}")
    total = int(lengths.sum())
    print(f"first call (compile + run): {first:.2f}s, {total / first:.1f} generated tokens/s")
    if timings:
        best = min(timings)
        print(f"warm call (best of {len(timings)}): {best:.3f}s, {total / best:.1f} generated tokens/s "
              f"(batch {len(prompts)}, {jax.devices()[0].platform})")


if __name__ == "__main__":
    app.run(main)
