"""What the softmax layers buy: recall at growing context lengths, pure softmax vs pure lightning vs hybrid.

    python experiments/paper/long_context.py --quick    # 2 layers (1:1 hybrid), L in {64,128}, 600 steps: ~6 min, loaded CPU
    python experiments/paper/long_context.py            # 8 layers (7:1 hybrid), L in {64,128,256}, 1500 steps: 42 CPU-min
    python experiments/paper/long_context.py --layers=4 --lengths=64,128,256 --steps=2000 --out=/tmp/lc.png

Three models of (nearly) equal parameter count: pure softmax, pure lightning, and the M1 hybrid (one softmax
layer closing a group of `--layers` layers: 7:1 at 8 layers, 3:1 at 4, 1:1 at 2). The MLP width of each variant
absorbs the attention-parameter difference (a lightning layer has 5 D A attention params, a softmax layer with
K = H has 4 D A). Each variant is trained ONCE (one compiled step) on a mixture of both tasks at all lengths:
every row of a batch is max(lengths) tokens packed with max_len / L documents of one length L (segment ids keep
documents apart: softmax is masked, the lightning state resets; positions restart per document). It is then
scored per (task, length) on held-out documents with the same compiled step (its updates are discarded).
  - mqar: multi-query associative recall. P = L // pair_ratio key-value pairs (32 keys, 16 values), filler, then
    every key again (shuffled) followed by its value: the pairs grow with the length, so a fixed-size state must
    hold more. Score: accuracy over the queried values (chance 1/16).
  - passkey: MARK + a 4-token passkey at a random depth in filler; after QUERY, repeat it.
    Score: exact match of all 4 tokens (chance 16^-4).
Loss is on the answer tokens only. All seeds are fixed (--seed); every variant sees the same data stream.
The weights start at std 0.1 (--init_std) and the rate is constant after warmup: in short CPU trials the presets'
0.02 and a cosine decay kept these tiny models on the chance plateau for most of the budget.
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1_jax.config import LIGHTNING, SOFTMAX, get_config
from m1_jax.model import MiniMaxM1, count_params, init_params

_QUICK = flags.DEFINE_bool("quick", False, "Small sweep for a loaded CPU (minutes).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Document lengths, each dividing the largest "
                             "(default 64,128,256; quick: 64,128).")
_TASKS = flags.DEFINE_list("tasks", ["mqar", "passkey"], "Tasks to train on jointly and score.")
_VARIANTS = flags.DEFINE_list("variants", ["softmax", "lightning", "hybrid"], "Model variants.")
_LAYERS = flags.DEFINE_integer("layers", None, "Layers per model; the hybrid is (layers-1):1 (default 8; quick 4).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per variant (default 1500; quick 400).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows of max(lengths) tokens per step.")
_PAIR_RATIO = flags.DEFINE_integer("pair_ratio", 8, "mqar key-value pairs per document = length // pair_ratio.")
_LR = flags.DEFINE_float("lr", 3e-3, "Learning rate (AdamW, linear warmup, then constant).")
_INIT = flags.DEFINE_float("init_std", 0.1, "Std of the weight init (the presets' 0.02 stalls tiny models).")
_EVAL = flags.DEFINE_integer("eval_docs", 128, "Held-out documents per (task, length).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data and init.")
_OUT = flags.DEFINE_string("out", "/tmp/long_context.png", "Plot path.")

# Token layout of the synthetic vocabulary. 0 is never used (segment id 0 would be padding, not a token).
MARK, QUERY = 1, 2
NUM_KEYS = 32
KEYS = (4, 4 + NUM_KEYS)  # mqar keys
VALUES = (KEYS[1], KEYS[1] + 16)  # mqar values and passkey tokens
FILLER = (VALUES[1], VALUES[1] + 16)
VOCAB = FILLER[1]
PASSKEY_LEN = 4
TASK_IDS = {"mqar": 0, "passkey": 1}


# ------------------------------------------------------------------ tasks (numpy, seeded)
def mqar_doc(rng: np.random.Generator, length: int, pairs: int):
    """One mqar document: tokens [L] int32 and answer mask [L] (1 where the NEXT token is a queried value)."""
    if not 1 <= pairs <= NUM_KEYS:
        raise ValueError(f"mqar needs 1 <= pairs <= {NUM_KEYS}, got {pairs}; change --pair_ratio or the length")
    if 4 * pairs > length:
        raise ValueError(f"mqar needs length >= 4 * pairs = {4 * pairs}, got {length}; raise --pair_ratio")
    tokens = rng.integers(*FILLER, size=length)
    mask = np.zeros(length, np.float32)
    keys = rng.choice(np.arange(*KEYS), pairs, replace=False)
    vals = rng.integers(*VALUES, size=pairs)
    tokens[0:2 * pairs:2], tokens[1:2 * pairs:2] = keys, vals
    order = rng.permutation(pairs)
    start = length - 2 * pairs
    tokens[start::2], tokens[start + 1::2] = keys[order], vals[order]
    mask[start::2] = 1.0
    return tokens.astype(np.int32), mask


def passkey_doc(rng: np.random.Generator, length: int):
    """One passkey document: MARK key... somewhere in filler, then QUERY key at the end; mask as mqar_doc."""
    n = PASSKEY_LEN
    if length < 2 * n + 4:
        raise ValueError(f"passkey needs length >= {2 * n + 4}, got {length}")
    tokens = rng.integers(*FILLER, size=length)
    mask = np.zeros(length, np.float32)
    key = rng.integers(*VALUES, size=n)
    at = rng.integers(0, length - 2 * n - 1)  # MARK + key end before the QUERY
    tokens[at], tokens[at + 1:at + 1 + n] = MARK, key
    q = length - n - 1
    tokens[q], tokens[q + 1:] = QUERY, key
    mask[q:length - 1] = 1.0
    return tokens.astype(np.int32), mask


def make_doc(task: str, rng, length: int, pair_ratio: int):
    if task == "mqar":
        return mqar_doc(rng, length, length // pair_ratio)
    if task == "passkey":
        return passkey_doc(rng, length)
    raise ValueError(f"unknown task {task!r}; use one of {sorted(TASK_IDS)}")


def packed_rows(rng, tasks_R: list, lengths_R: list, max_len: int, pair_ratio: int):
    """Rows of max_len tokens, row r packed with max_len // lengths_R[r] documents of length lengths_R[r].

    tasks_R[r] is a task name, or None to draw each document's task uniformly. Returns a dict of numpy arrays
    [R, max_len]: tokens, mask (answer positions), segment_ids (1.. per document), positions (restart at 0),
    doc (document index within the row), task (task id per token).
    """
    rows = {k: [] for k in ("tokens", "mask", "segment_ids", "positions", "doc", "task")}
    task_names = sorted(TASK_IDS)
    for task, length in zip(tasks_R, lengths_R):
        if max_len % length:
            raise ValueError(f"length {length} must divide the largest length {max_len}")
        n_docs = max_len // length
        parts = {k: [] for k in rows}
        for d in range(n_docs):
            t = task or task_names[rng.integers(len(task_names))]
            tok, m = make_doc(t, rng, length, pair_ratio)
            parts["tokens"].append(tok)
            parts["mask"].append(m)
            parts["segment_ids"].append(np.full(length, d + 1, np.int32))
            parts["positions"].append(np.arange(length, dtype=np.int32))
            parts["doc"].append(np.full(length, d, np.int32))
            parts["task"].append(np.full(length, TASK_IDS[t], np.int32))
        for k in rows:
            rows[k].append(np.concatenate(parts[k]))
    return {k: np.stack(v) for k, v in rows.items()}


# ------------------------------------------------------------------ models of equal size
def layer_types(kind: str, layers: int):
    if kind == "softmax":
        return (SOFTMAX,) * layers
    if kind == "lightning":
        return (LIGHTNING,) * layers
    if kind == "hybrid":  # the M1 pattern: the last layer of each group of `layers` is softmax
        return tuple(SOFTMAX if i == layers - 1 else LIGHTNING for i in range(layers))
    raise ValueError(f"unknown variant {kind!r}; use softmax, lightning or hybrid")


def variant_name(kind: str, layers: int) -> str:
    return f"hybrid{layers - 1}:1" if kind == "hybrid" else kind


def variant_config(kind: str, layers: int, max_len: int, hidden: int = 64, heads: int = 4, head_dim: int = 16,
                   ffn: int = 128, init_std: float = 0.1):
    """The MLP width absorbs the attention-parameter difference (lightning 5 D A, softmax 4 D A, A = H Dh)."""
    types = layer_types(kind, layers)
    A = heads * head_dim
    ffn_v = ffn + round(types.count(SOFTMAX) * A / (3 * layers))  # 3 D params per unit of MLP width
    alpha = (2 * layers)**0.25
    return get_config("tiny").replace(
        vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, rotary_dim=head_dim // 2, layer_types=types, block_size=64,
        attention_block_q=max_len, attention_block_kv=max_len, num_experts=1, num_experts_per_tok=1,
        expert_dim=ffn_v, max_position_embeddings=max(4096, 2 * max_len), remat_policy="none", dtype="float32",
        lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha, initializer_range=init_std)


# ------------------------------------------------------------------ train / eval
def masked_xent(logits_BxLxV, tokens_BxL, mask_BxL):
    """Mean cross-entropy of predicting token t+1 at the positions t where mask is 1."""
    logits, targets, mask = logits_BxLxV[:, :-1], tokens_BxL[:, 1:], mask_BxL[:, :-1]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(xent * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(cfg, steps: int, lr: float):
    model = MiniMaxM1(cfg)
    # Constant after warmup: a decaying rate stalls these small models just after the recall circuit forms.
    schedule = optax.warmup_constant_schedule(0.0, lr, max(1, steps // 10))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, batch["tokens"], segment_ids_BxL=batch["segment_ids"],
                                    positions_BxL=batch["positions"])
            return masked_xent(logits, batch["tokens"], batch["mask"]), jnp.argmax(logits, axis=-1)

        (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state, loss, pred

    return opt, train_step


def score(pred_BxL, batch) -> tuple[float, float]:
    """(correct, total): mqar counts each queried value; passkey counts documents with every token right."""
    right = (pred_BxL[:, :-1] == batch["tokens"][:, 1:]) | (batch["mask"][:, :-1] == 0)
    answers = batch["mask"][:, :-1] > 0
    task = batch["task"][:, :-1]
    if np.all(task[answers] == TASK_IDS["mqar"]):
        return float(np.sum(right & answers)), float(np.sum(answers))
    doc = batch["doc"][:, :-1]
    correct = total = 0.0
    for r in range(pred_BxL.shape[0]):
        for d in np.unique(doc[r][answers[r]]):
            correct += float(np.all(right[r][doc[r] == d]))
            total += 1.0
    return correct, total


def _feed(batch):
    return {k: batch[k] for k in ("tokens", "mask", "segment_ids", "positions")}


def train_and_eval(kind: str, layers: int, tasks, lengths, steps: int, batch: int, pair_ratio: int, lr: float,
                   eval_docs: int, seed: int, init_std: float = 0.1, log=print):
    max_len = max(lengths)
    cfg = variant_config(kind, layers, max_len, init_std=init_std)
    opt, train_step = make_train_step(cfg, steps, lr)
    params = init_params(cfg, jax.random.key(seed))
    opt_state = opt.init(params)
    rng = np.random.default_rng([seed, 0])  # same stream for every variant
    t0, losses = time.time(), []
    for step in range(steps):
        lengths_R = [lengths[i] for i in rng.integers(len(lengths), size=batch)]
        rows = packed_rows(rng, [None] * batch if len(tasks) > 1 else [tasks[0]] * batch, lengths_R, max_len,
                           pair_ratio)
        params, opt_state, loss, _ = train_step(params, opt_state, _feed(rows))
        losses.append(loss)
        if step == 0:
            log(f"    first step (compile) {time.time() - t0:.0f}s")
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"    step {step + 1:5d} loss {np.mean([float(x) for x in losses[-20:]]):.3f} "
                f"({time.time() - t0:.0f}s)")
    train_s = time.time() - t0
    # Score with the same compiled step (no second compile) and DISCARD its updated params.
    eval_rng = np.random.default_rng([seed, 1])
    acc = {}
    for task in tasks:
        for length in lengths:
            n_rows = -(-eval_docs * length // max_len)
            correct = total = 0.0
            for r0 in range(0, n_rows, batch):
                rows = packed_rows(eval_rng, [task] * batch, [length] * batch, max_len, pair_ratio)
                pred = np.asarray(train_step(params, opt_state, _feed(rows))[3])
                c, t = score(pred, rows)
                correct, total = correct + c, total + t
            acc[(task, length)] = correct / total
    return acc, train_s, time.time() - t0 - train_s, count_params(cfg)["total"], cfg.expert_dim


def main(argv):
    del argv
    quick = _QUICK.value
    lengths = sorted(int(x) for x in (_LENGTHS.value or (["64", "128"] if quick else ["64", "128", "256"])))
    layers = _LAYERS.value or (2 if quick else 8)
    steps = _STEPS.value or (600 if quick else 1500)
    batch = _BATCH.value
    tasks = list(_TASKS.value)
    t_start = time.time()
    print(f"backend {jax.default_backend()}, layers {layers}, steps {steps}, batch {batch} x {max(lengths)} tokens, "
          f"lengths {lengths}, tasks {tasks}, mqar pairs = L // {_PAIR_RATIO.value}, seed {_SEED.value}", flush=True)
    results, names = {}, []
    for kind in _VARIANTS.value:
        name = variant_name(kind, layers)
        names.append(name)
        print(f"  {name}", flush=True)
        acc, train_s, eval_s, n_params, width = train_and_eval(
            kind, layers, tasks, lengths, steps, batch, _PAIR_RATIO.value, _LR.value, _EVAL.value, _SEED.value,
            _INIT.value, log=lambda s: print(s, flush=True))
        for (task, length), a in acc.items():
            results[(task, name, length)] = a
        print(f"    {n_params:,} params (mlp width {width}); train {train_s:.0f}s, eval {eval_s:.0f}s; "
              + ", ".join(f"{t}@{L} {a:.1%}" for (t, L), a in acc.items()), flush=True)

    print(f"\ntotal {time.time() - t_start:.0f}s")
    print(markdown_tables(results, tasks, names, lengths, _PAIR_RATIO.value))
    _plot(results, tasks, names, lengths, _OUT.value)
    print(f"\nwrote {_OUT.value}")


def markdown_tables(results, tasks, names, lengths, pair_ratio) -> str:
    out = []
    for task in tasks:
        chance = f"chance {1 / (VALUES[1] - VALUES[0]):.1%}" if task == "mqar" else "chance ~0%"
        extra = f", {pair_ratio and 'pairs = L // ' + str(pair_ratio)}" if task == "mqar" else ""
        out.append(f"\n{task}: accuracy ({chance}{extra})\n")
        out.append("| variant | " + " | ".join(f"L={L}" for L in lengths) + " |")
        out.append("|---" * (1 + len(lengths)) + "|")
        for name in names:
            out.append(f"| {name} | " + " | ".join(f"{results[(task, name, L)]:.1%}" for L in lengths) + " |")
    return "\n".join(out)


def _plot(results, tasks, names, lengths, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name in names:
            ax.plot(lengths, [results[(task, name, L)] for L in lengths], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
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
