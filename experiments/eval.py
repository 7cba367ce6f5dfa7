"""Held-out loss and task accuracy of the latest checkpoint in a training workdir.

  python experiments/eval.py --workdir=~/m1_jax_runs/tiny --num_examples=64 --max_new_tokens=64
Accuracy: greedy decoding (m1_jax.generate) of each held-out problem, checked by m1_jax.data.verify.
"""

import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", os.path.join(os.path.expanduser("~"), "m1_jax_runs", "tiny"),
                               "a train.py workdir (its config.json and latest checkpoint are used)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_NUM = flags.DEFINE_integer("num_examples", 64, "held-out problems for task accuracy")
_BATCHES = flags.DEFINE_integer("eval_batches", 8, "held-out batches for the loss")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "decode budget per problem")
_BATCH = flags.DEFINE_integer("decode_batch", 16, "problems decoded together")
_MESH = flags.DEFINE_string("mesh", None, "device mesh (default: all devices data-parallel)")


def teacher_forced_accuracy(cfg, params, tokenizer, examples):
    """Exact match of every answer token under argmax given the gold prefix; equals greedy-decode accuracy
    of the solution text (greedy reproduces the gold text iff every argmax along it is the gold token)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m1_jax.model import MiniMaxM1

    correct = 0
    for ex in examples:
        prompt = [tokenizer.bos_id, *tokenizer.encode(ex.prompt)]
        full = prompt + tokenizer.encode(ex.solution) + [tokenizer.eos_id]
        tokens = jnp.asarray([full], jnp.int32)
        logits, _ = jax.jit(lambda p, t: MiniMaxM1(cfg).apply({"params": p}, t))(params, tokens)
        pred = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1))
        correct += int(np.array_equal(pred, np.asarray(full[len(prompt):])))
    return correct / max(len(examples), 1)


def greedy_accuracy(cfg, params, tokenizer, examples, max_new_tokens, batch):
    from m1_jax.data import verify
    from m1_jax.generate import generate

    correct = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts = [[tokenizer.bos_id, *tokenizer.encode(ex.prompt)] for ex in chunk]
        out = generate(cfg, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for b, ex in enumerate(chunk):
            text = tokenizer.decode([t for t in out.generated(b) if t != tokenizer.eos_id])
            correct += int(verify(ex, text))
    return correct / max(len(examples), 1)


def main(argv):
    del argv
    import jax
    import ml_collections

    from m1_jax import sharding as sharding_lib
    from m1_jax.data import heldout_examples
    from m1_jax.train import loop, optimizer as opt_lib, state as state_lib, step as step_lib
    from m1_jax.train.checkpoint import Checkpointer

    workdir = os.path.expanduser(_WORKDIR.value)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        sys.exit(f"error: {config_path} not found; pass the --workdir of a train.py run")
    with open(config_path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    setup = loop.build_setup(config, _MESH.value)
    cfg = setup.model
    tx = opt_lib.make_optimizer(setup.optimizer)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = _STEP.value if _STEP.value is not None else ckpt.latest_step()
    if step is None:
        sys.exit(f"error: no checkpoint in {ckpt.directory}")
    shardings = state_lib.state_shardings(cfg, tx, setup.mesh)
    abstract = sharding_lib.with_shardings(state_lib.abstract_state(cfg, tx), shardings)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    params = state.params

    results = {"step": int(step)}
    batches = loop.eval_batches(config, setup, _BATCHES.value)
    eval_step = step_lib.make_eval_step(cfg, setup.mesh, loss_chunk_size=setup.loss_chunk_size)
    results.update(loop.heldout_loss(eval_step, params, batches, sharding_lib.batch_sharding(setup.mesh)))
    if config.data.source == "builtin":
        weights = None if config.data.task_weights is None else dict(config.data.task_weights)
        examples = heldout_examples(_NUM.value, seed=int(config.train.seed), task_weights=weights,
                                    heldout_fraction=float(config.data.heldout_fraction))
        try:
            import m1_jax.generate  # noqa: F401
            results["task_accuracy"] = greedy_accuracy(cfg, params, setup.tokenizer, examples, _MAX_NEW.value,
                                                       _BATCH.value)
            results["accuracy_method"] = "greedy decode + verify"
        except ImportError:
            results["task_accuracy"] = teacher_forced_accuracy(cfg, params, setup.tokenizer, examples)
            results["accuracy_method"] = "teacher-forced exact match of the solution (m1_jax.generate missing)"
        results["num_examples"] = len(examples)
    print(json.dumps(results, indent=1))
    with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
