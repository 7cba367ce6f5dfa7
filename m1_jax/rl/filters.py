"""Sample shaping and filtering around the loss: DAPO dynamic sampling, DAPO's overlong penalty and
overlong filtering, and M1's repetition early-truncation rule (§3.2).

Lengths are always counted in tokens, never characters.
"""

from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO): keep only groups with 0 < #correct < G.


def informative_groups(scores_NxG) -> np.ndarray:
    """Bool [N]: True for groups whose scores are not all equal.

    For 0/1 correctness this is DAPO's 0 < #correct < G; all-correct and all-wrong groups give zero
    advantage and only dilute the batch. Pass correctness, not length-shaped rewards, to match DAPO.
    """
    scores_NxG = np.asarray(scores_NxG)
    if scores_NxG.ndim != 2:
        raise ValueError(f"scores must be [num_groups, G], got shape {scores_NxG.shape}")
    return scores_NxG.min(axis=1) != scores_NxG.max(axis=1)


def collect_informative_groups(sample_fn: Callable[[int], tuple[Sequence[Any], Any]], num_groups: int, *,
                               max_rounds: int = 16, allow_partial: bool = False):
    """Calls sample_fn until `num_groups` informative groups are collected (DAPO's oversample-and-refill).

    sample_fn(n) generates n new groups and returns (groups, scores_NxG): any per-group objects plus their
    correctness scores. Extra informative groups from the last round are dropped so exactly `num_groups`
    are returned (in sampling order), with stats {"rounds", "sampled_groups", "kept_groups"}.
    After max_rounds without enough groups it raises RuntimeError, or returns fewer if allow_partial.
    """
    if num_groups <= 0 or max_rounds <= 0:
        raise ValueError(f"num_groups ({num_groups}) and max_rounds ({max_rounds}) must be positive")
    kept: list[Any] = []
    sampled = 0
    rounds = 0
    while len(kept) < num_groups and rounds < max_rounds:
        groups, scores_NxG = sample_fn(num_groups - len(kept))
        rounds += 1
        keep_N = informative_groups(scores_NxG)
        if len(groups) != keep_N.shape[0]:
            raise ValueError(f"sample_fn returned {len(groups)} groups but scores for {keep_N.shape[0]}")
        sampled += len(groups)
        kept.extend(g for g, k in zip(groups, keep_N) if k)
    stats = {"rounds": rounds, "sampled_groups": sampled, "kept_groups": min(len(kept), num_groups)}
    if len(kept) < num_groups:
        message = (f"dynamic sampling found {len(kept)}/{num_groups} informative groups in {rounds} rounds "
                   f"({sampled} sampled); raise max_rounds or use easier/harder prompts")
        if not allow_partial:
            raise RuntimeError(message)
        logging.warning(message)
    return kept[:num_groups], stats


# ---------------------------------------------------------------------------------------------------------
# Overlong handling (DAPO §3.4).


def overlong_penalty(lengths, max_len: int, cache_len: int):
    """DAPO's soft overlong punishment, added to the reward.

    0 for |y| <= max_len - cache_len, ((max_len - cache_len) - |y|) / cache_len up to max_len (reaching -1
    at |y| = max_len), and -1 beyond. DAPO: max_len=20480, cache_len=4096.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len ({cache_len}) <= max_len ({max_len})")
    lengths = jnp.asarray(lengths, jnp.float32)
    expected_len = max_len - cache_len
    ramp = (expected_len - lengths) / cache_len
    return jnp.where(lengths <= expected_len, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


def overlong_filter_mask(lengths, max_len: int, finished=None):
    """Float [B]: 0 for truncated samples (no EOS within max_len), 1 otherwise; multiply into the loss mask.

    `finished` [B] (emitted EOS) is the authoritative signal when given; otherwise a sample that used all
    max_len tokens counts as truncated.
    """
    lengths = jnp.asarray(lengths)
    truncated = lengths >= max_len
    if finished is not None:
        truncated = jnp.logical_not(jnp.asarray(finished, bool))
    return jnp.where(truncated, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Repetition early truncation (M1 §3.2).


def repetition_stop_index(probs_BxT, *, min_run: int = 3000, threshold: float = 0.99, lengths=None):
    """Tokens to keep per sequence under M1's rule: stop once `min_run` consecutive tokens each had p > threshold.

    Returns int32 [B]: t + 1 where t is the position at which the run first reaches min_run tokens (the run
    itself is kept, generation stops after it), else T (or the sequence's length when `lengths` is given).
    A probability exactly equal to threshold does not count and resets the run.
    """
    if min_run < 1:
        raise ValueError(f"min_run={min_run} must be >= 1")
    probs_BxT = jnp.asarray(probs_BxT)
    if probs_BxT.ndim != 2:
        raise ValueError(f"probs must be [B, T], got shape {probs_BxT.shape}")
    _, seq_len = probs_BxT.shape
    pos_T = jnp.arange(seq_len, dtype=jnp.int32)
    # Run length at t = t - (index of the last token that broke the run), found with a running max.
    breaks_BxT = jnp.where(probs_BxT > threshold, -1, pos_T[None, :])
    last_break_BxT = jax.lax.cummax(breaks_BxT, axis=1)
    run_BxT = pos_T[None, :] - last_break_BxT
    hit_BxT = run_BxT >= min_run
    stop_B = jnp.where(jnp.any(hit_BxT, axis=1), jnp.argmax(hit_BxT, axis=1) + 1, seq_len).astype(jnp.int32)
    if lengths is not None:
        stop_B = jnp.minimum(stop_B, jnp.asarray(lengths, jnp.int32))
    return stop_B
