"""What the softmax layers buy: recall at growing context lengths, pure softmax vs pure lightning vs 7:1 hybrid.

    python experiments/long_context.py --quick                 # ~ a few minutes on a 2-core CPU
    python experiments/long_context.py                         # the default sweep (target: < 1 hour on CPU)
    python experiments/long_context.py --lengths=64,128 --steps=300 --out=/tmp/lc.png

Three 8-layer models of (nearly) equal parameter count: the MLP width of each variant is chosen so the totals
match (a lightning layer has 5 D A attention params, a softmax layer with K = H has 4 D A). Each (variant, task,
length) is trained from scratch with AdamW on freshly sampled synthetic sequences, then scored on held-out ones:
  - mqar: multi-query associative recall. n key-value pairs, filler, then every key again; predict its value.
    Score: accuracy over the queried values.
  - passkey: a marked 4-token passkey hidden at a random depth in filler; after a query token, repeat it.
    Score: exact match of all 4 tokens.
Loss is on the answer tokens only. All seeds are fixed (--seed); the same data stream is used for every variant.
"""

from __future__ import annotations

import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1_jax.config import LIGHTNING, SOFTMAX, get_config
from m1_jax.model import MiniMaxM1, count_params, init_params

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sweep that finishes in a few minutes.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths (default 64,128,256,512; quick: 64,128).")
_TASKS = flags.DEFINE_list("tasks", ["mqar", "passkey"], "Tasks to run.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per run (default 800; quick: 100).")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per step.")
_PAIRS = flags.DEFINE_integer("pairs", 8, "Key-value pairs for mqar.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data and init.")
_OUT = flags.DEFINE_string("out", "/tmp/long_context.png", "Plot path.")

# Token layout of the synthetic vocabulary (model vocab 128).
VOCAB = 128
MARK, QUERY = 1, 2
KEYS = (4, 36)  # mqar keys
FILLER = (36, 64)
VALUES = (64, 128)  # mqar values and passkey tokens
PASSKEY_LEN = 4
VARIANTS = {
    "softmax": (SOFTMAX,) * 8,
    "lightning": (LIGHTNING,) * 8,
    "hybrid7:1": tuple(SOFTMAX if i % 8 == 7 else LIGHTNING for i in range(8)),
}


# ------------------------------------------------------------------ tasks (numpy, seeded)
def mqar_batch(rng: np.random.Generator, batch: int, length: int, pairs: int):
    """tokens [B, L] and loss mask [B, L] (1 where the NEXT token is an answer)."""
    if 4 * pairs > length:
        raise ValueError(f"mqar needs length >= 4 * pairs = {4 * pairs}, got {length}; lower --pairs")
    tokens = rng.integers(*FILLER, size=(batch, length))
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        keys = rng.choice(np.arange(*KEYS), pairs, replace=False)
        vals = rng.integers(*VALUES, size=pairs)
        tokens[b, 0:2 * pairs:2], tokens[b, 1:2 * pairs:2] = keys, vals
        order = rng.permutation(pairs)
        start = length - 2 * pairs
        tokens[b, start::2], tokens[b, start + 1::2] = keys[order], vals[order]
        mask[b, start::2] = 1.0
    return tokens.astype(np.int32), mask


def passkey_batch(rng: np.random.Generator, batch: int, length: int):
    n = PASSKEY_LEN
    if length < 2 * n + 4:
        raise ValueError(f"passkey needs length >= {2 * n + 4}, got {length}")
    tokens = rng.integers(*FILLER, size=(batch, length))
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        key = rng.integers(*VALUES, size=n)
        at = rng.integers(0, length - 2 * n - 2)  # anywhere before the question
        tokens[b, at], tokens[b, at + 1:at + 1 + n] = MARK, key
        q = length - n - 1
        tokens[b, q], tokens[b, q + 1:] = QUERY, key
        mask[b, q:length - 1] = 1.0
    return tokens.astype(np.int32), mask


def make_batch(task: str, rng, batch: int, length: int, pairs: int):
    return mqar_batch(rng, batch, length, pairs) if task == "mqar" else passkey_batch(rng, batch, length)


# ------------------------------------------------------------------ models of equal size
def variant_config(kind: str, hidden: int, ffn: int, heads: int, head_dim: int, max_len: int):
    """8 layers; the MLP width absorbs the attention-parameter difference (lightning 5 D A, softmax 4 D A)."""
    A = heads * head_dim
    n_soft = VARIANTS[kind].count(SOFTMAX)
    # Per model: 8*3*D*F + attention; match the all-lightning total 8*(5 D A + 3 D ffn).
    ffn_v = ffn + round(n_soft * A / (3 * 8))
    alpha = 16**0.25
    return get_config("tiny").replace(
        vocab_size=VOCAB, hidden_size=hidden, num_layers=8, num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, rotary_dim=head_dim // 2, layer_types=VARIANTS[kind], block_size=64,
        attention_block_q=512, attention_block_kv=512, num_experts=1, num_experts_per_tok=1, expert_dim=ffn_v,
        max_position_embeddings=max(4096, 2 * max_len), remat_policy="none", dtype="float32",
        lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha)


# ------------------------------------------------------------------ train / eval
def masked_xent(logits_BxLxV, tokens_BxL, mask_BxL):
    logits, targets, mask = logits_BxLxV[:, :-1], tokens_BxL[:, 1:], mask_BxL[:, :-1]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(xent * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_and_eval(cfg, task: str, length: int, steps: int, batch: int, pairs: int, lr: float, seed: int):
    model = MiniMaxM1(cfg)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.1),
                                  b1=0.9, b2=0.95, weight_decay=0.01))
    params = init_params(cfg, jax.random.key(seed))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, tokens, mask):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, tokens)
            return masked_xent(logits, tokens, mask), jnp.argmax(logits, axis=-1)

        (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state, loss, pred

    rng = np.random.default_rng([seed, length, 0 if task == "mqar" else 1])
    loss = float("nan")
    for _ in range(steps):
        tokens, mask = make_batch(task, rng, batch, length, pairs)
        params, opt_state, loss, _ = train_step(params, opt_state, tokens, mask)
    # Evaluate with the same compiled step (one compile per run) and DISCARD its updated params: pure functions.
    eval_rng = np.random.default_rng([seed + 1, length, 7])
    correct, total = 0.0, 0.0
    for _ in range(max(1, 256 // batch)):
        tokens, mask = make_batch(task, eval_rng, batch, length, pairs)
        pred = np.asarray(train_step(params, opt_state, tokens, mask)[3])[:, :-1]
        m = mask[:, :-1]
        right = pred == tokens[:, 1:]
        if task == "mqar":  # per queried value
            correct += float(np.sum(right * m))
            total += float(np.sum(m))
        else:  # the whole passkey must be right
            correct += float(np.sum(np.all(right | (m == 0), axis=1)))
            total += tokens.shape[0]
    return correct / total, float(loss)


def main(argv):
    del argv
    quick = _QUICK.value
    lengths = [int(x) for x in (_LENGTHS.value or (["64", "128"] if quick else ["64", "128", "256", "512"]))]
    steps = _STEPS.value or (100 if quick else 800)
    hidden, ffn, heads, head_dim = (64, 128, 2, 32)
    print(f"backend {jax.default_backend()}, steps {steps}, batch {_BATCH.value}, lengths {lengths}, "
          f"seed {_SEED.value}")
    for kind in VARIANTS:
        cfg = variant_config(kind, hidden, ffn, heads, head_dim, max(lengths))
        print(f"  {kind:10s} params {count_params(cfg)['total']:,} (mlp width {cfg.expert_dim})")
    results = {}
    for task in _TASKS.value:
        for kind in VARIANTS:
            cfg = variant_config(kind, hidden, ffn, heads, head_dim, max(lengths))
            for L in lengths:
                t0 = time.time()
                acc, loss = train_and_eval(cfg, task, L, steps, _BATCH.value, _PAIRS.value, _LR.value, _SEED.value)
                results[(task, kind, L)] = acc
                print(f"  {task:8s} {kind:10s} L={L:5d} acc {acc:6.1%} final loss {loss:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)

    for task in _TASKS.value:
        print(f"\n{task}: accuracy")
        print("| variant | " + " | ".join(f"L={L}" for L in lengths) + " |")
        print("|---" * (1 + len(lengths)) + "|")
        for kind in VARIANTS:
            print(f"| {kind} | " + " | ".join(f"{results[(task, kind, L)]:.1%}" for L in lengths) + " |")
    _plot(results, lengths, _OUT.value)
    print(f"\nwrote {_OUT.value}")


def _plot(results, lengths, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _TASKS.value
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind in VARIANTS:
            ax.plot(lengths, [results[(task, kind, L)] for L in lengths], "o-", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
