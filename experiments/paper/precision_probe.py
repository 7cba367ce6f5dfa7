r"""The report's precision finding (section 3.2): training-side against rollout-side token probabilities with a
bf16 and a float32 LM head (the report: correlation 0.9x with bf16, 0.99x after the fix), on our model.

  python experiments/paper/precision_probe.py --out=docs/figures/precision_probe.png
  python experiments/paper/precision_probe.py --init_checkpoint=/tmp/rl/warm_start --task=digit_count

Both sides run in bfloat16 compute: the sampler decodes token by token with the KV cache and the recurrent
lightning state (m1_jax.generate), the trainer scores the same sequences in one forward pass (the RL loss's
path), and only the LM head's matmul precision differs between the two settings. Without --init_checkpoint it
first runs a short float32 SFT warm-up on --task (the probabilities of an untrained model are near uniform).
Prints Pearson's r of the probabilities (and of the log-probabilities) per setting; writes a scatter plot.
"""

from __future__ import annotations

from absl import app, flags
import jax
import numpy as np

_TASK = flags.DEFINE_string("task", "addition", "built-in task (its answers are several tokens long)")
_INIT = flags.DEFINE_string("init_checkpoint", None, "params to probe (train.py workdir or a warm_start folder)")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 300, "SFT steps when no --init_checkpoint")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "prompts sampled per setting")
_GROUP = flags.DEFINE_integer("group_size", 4, "responses per prompt")
_NEW = flags.DEFINE_integer("max_new_tokens", 96, "response budget (addition's worked solutions take 40-90)")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature")
_OUT = flags.DEFINE_string("out", "/tmp/precision_probe.png", "PNG path ('' = none)")


def probe(cfg, params, tokenizer, rl, lc, seed):
    """(sampler probabilities, trainer probabilities) of every generated token, one rollout of cfg."""
    from m1_jax.rl import loop as loop_lib
    from m1_jax.rl import rollout as rollout_lib
    from m1_jax.rl import trainer as trainer_lib

    r, _, _ = loop_lib.Sampler(cfg, rl, lc, tokenizer).sample(params, 0, jax.random.key(seed))
    seg, pos = rollout_lib.sequence_layout(r.prompt_lengths, r.prompt_width, r.tokens.shape[1])
    trainer = np.asarray(trainer_lib.make_logp_fn(cfg, rl, r.prompt_width)(params, r.tokens, seg, pos))
    mask = r.response_mask.astype(bool)
    return np.exp(r.behaviour_logp[mask]), np.exp(trainer[mask])


def main(argv):
    del argv
    from m1_jax.config import get_config
    from m1_jax.data import load_tokenizer
    from m1_jax.rl import loop as loop_lib
    from m1_jax.rl import trainer as trainer_lib
    from m1_jax.rl import warmup as warmup_lib
    from m1_jax.train import checkpoint as ckpt_lib

    tokenizer = load_tokenizer("byte")
    if _INIT.value:
        cfg, params = ckpt_lib.load_params(_INIT.value)
    else:
        cfg = get_config("tiny", dtype="float32")
        wc = warmup_lib.WarmupConfig(task=_TASK.value, max_steps=_WARMUP_STEPS.value, target_accuracy=2.0,
                                     eval_every=_WARMUP_STEPS.value, max_new_tokens=_NEW.value, num_eval=32,
                                     seq_len=160)
        params, _ = warmup_lib.sft_warmup(cfg, tokenizer, wc, log_fn=print)
    rl = trainer_lib.RLConfig(group_size=_GROUP.value, prompts_per_step=_PROMPTS.value, mu=1,
                              max_new_tokens=_NEW.value, temperature=_TEMPERATURE.value, max_prompt_len=48)
    lc = loop_lib.LoopConfig(task=_TASK.value)
    results = {}
    # (compute dtype, LM head): the report's two settings, and an all-float32 control.
    for dtype, head in (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")):
        probed = cfg.replace(dtype=dtype, fp32_lm_head=head == "float32")
        p_sampler, p_trainer = probe(probed, params, tokenizer, rl, lc, seed=0)
        r = float(np.corrcoef(p_sampler, p_trainer)[0, 1])
        r_log = float(np.corrcoef(np.log(p_sampler), np.log(p_trainer))[0, 1])
        gap = np.abs(p_sampler - p_trainer)
        name = f"{dtype} model, {head} LM head"
        results[name] = (p_sampler, p_trainer, r)
        print(f"{name}: {p_sampler.size} tokens, Pearson r(p) = {r:.5f}, r(log p) = {r_log:.5f}, "
              f"|p_sampler - p_trainer| median {np.median(gap):.2e} max {gap.max():.2e}", flush=True)
    if _OUT.value:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4.2), sharex=True, sharey=True)
        for ax, (name, (ps, pt, r)) in zip(axes, results.items()):
            ax.scatter(ps, pt, s=4, alpha=0.4)
            ax.plot([0, 1], [0, 1], color="gray", lw=0.8)
            ax.set_title(f"{name}: r = {r:.5f}", fontsize=10)
            ax.set_xlabel("rollout (decode) probability")
        axes[0].set_ylabel("training (full forward) probability")
        fig.suptitle(f"tiny model on {_TASK.value}: training vs rollout token probabilities")
        fig.tight_layout()
        fig.savefig(_OUT.value, dpi=120)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
