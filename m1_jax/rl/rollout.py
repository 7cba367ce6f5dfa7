"""Rollouts: G sampled responses per prompt through the inference path, scored by the task verifiers.

A prompt is BOS + the task prompt (the layout `m1_jax.data.packing.encode_document` trains on), so an SFT
checkpoint from experiments/train.py continues it the way it learned to. Responses come from
`m1_jax.generate.generate`, which also records the behaviour log-probs of the sampled tokens under the
distribution actually sampled from (temperature T); the trainer must recompute log-probs at the same T.

Every rollout is laid out at one fixed width [B, P + N] (P = `prompt_width`, prompts left-padded;
N = max_new_tokens) so the jitted RL step compiles once however long the batch's prompts are.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.data import tasks as tasks_lib
from m1_jax.generate import generate
from m1_jax.rl.rewards import format_reward, task_reward


def encode_prompt(tokenizer, example: tasks_lib.Example) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(example.prompt)]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Host-side numpy arrays for B = groups * G responses; rows of a group are contiguous.

    tokens [B, P + N]: left-padded prompt (pad_id in padding), then the N generated slots (pad after a stop).
    prompt_lengths [B]: real prompt tokens (BOS included). response_mask [B, N]: 1 on generated tokens (EOS
    included). behaviour_logp [B, N]: the sampler's log-probs (0 outside the mask). lengths [B]: generated
    tokens. finished [B]: emitted EOS. group_ids [B]: the prompt's index in this rollout. correct [B]: the
    verifier's 0/1. rewards [B]: correct + format bonus + overlong penalty (whatever the caller shaped).
    """

    tokens: np.ndarray
    prompt_lengths: np.ndarray
    response_mask: np.ndarray
    behaviour_logp: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    group_ids: np.ndarray
    correct: np.ndarray
    rewards: np.ndarray
    completions: tuple[str, ...]

    @property
    def prompt_width(self) -> int:
        return self.tokens.shape[1] - self.response_mask.shape[1]

    @property
    def num_groups(self) -> int:
        return int(np.unique(self.group_ids).size)

    def take_groups(self, group_indices: Sequence[int]) -> "Rollout":
        """The listed groups, renumbered 0..len-1 in the given order."""
        rows = np.concatenate([np.flatnonzero(self.group_ids == g) for g in group_indices]).astype(np.int64)
        new_ids = np.concatenate([np.full(int(np.sum(self.group_ids == g)), i, np.int32)
                                  for i, g in enumerate(group_indices)])
        return _select(self, rows, new_ids)

    def replace(self, **changes) -> "Rollout":
        return dataclasses.replace(self, **changes)


def _select(r: Rollout, rows: np.ndarray, group_ids: np.ndarray) -> Rollout:
    return Rollout(tokens=r.tokens[rows], prompt_lengths=r.prompt_lengths[rows], response_mask=r.response_mask[rows],
                   behaviour_logp=r.behaviour_logp[rows], lengths=r.lengths[rows], finished=r.finished[rows],
                   group_ids=group_ids, correct=r.correct[rows], rewards=r.rewards[rows],
                   completions=tuple(r.completions[i] for i in rows))


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rollouts of the same [P + N] layout, groups renumbered consecutively."""
    if not parts:
        raise ValueError("concat_rollouts needs at least one rollout")
    widths = {(p.tokens.shape[1], p.response_mask.shape[1]) for p in parts}
    if len(widths) != 1:
        raise ValueError(f"rollouts have different layouts {sorted(widths)}; sample them with one prompt_width "
                         "and max_new_tokens")
    ids, offset = [], 0
    for p in parts:
        _, inverse = np.unique(p.group_ids, return_inverse=True)
        ids.append(inverse.astype(np.int32) + offset)
        offset += p.num_groups
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
    return Rollout(tokens=cat("tokens"), prompt_lengths=cat("prompt_lengths"), response_mask=cat("response_mask"),
                   behaviour_logp=cat("behaviour_logp"), lengths=cat("lengths"), finished=cat("finished"),
                   group_ids=np.concatenate(ids), correct=cat("correct"), rewards=cat("rewards"),
                   completions=tuple(c for p in parts for c in p.completions))


def sequence_layout(prompt_lengths_B, prompt_width: int, total_len: int):
    """segment ids (1 from the prompt's first real token on, 0 on left padding) and positions [B, total_len].

    Positions count from each row's first real token, as in generate's prefill and decode.
    """
    slot = np.arange(total_len, dtype=np.int32)[None, :]
    start_B1 = (prompt_width - np.asarray(prompt_lengths_B, np.int32))[:, None]
    segment_ids = (slot >= start_B1).astype(np.int32)
    positions = np.maximum(slot - start_B1, 0).astype(np.int32)
    return segment_ids, positions


def completion_texts(tokenizer, tokens_BxN: np.ndarray, lengths_B: np.ndarray, finished_B: np.ndarray):
    """Decoded responses, cut before EOS."""
    texts = []
    for row, n, fin in zip(tokens_BxN, lengths_B, finished_B):
        ids = row[:int(n) - 1] if fin else row[:int(n)]
        texts.append(tokenizer.decode(ids))
    return texts


def score_completions(examples_B: Sequence[tasks_lib.Example], completions_B: Sequence[str], *,
                      format_weight: float = 0.0):
    """(correct [B] float32 0/1 from the task verifier, reward [B] = correct + format_weight * format)."""
    correct = np.array([task_reward(e, c) for e, c in zip(examples_B, completions_B)], np.float32)
    rewards = correct.copy()
    if format_weight:
        fmt = np.array([0.0 if e.task in tasks_lib.DIRECT_ANSWER_TASKS else format_reward(c)
                        for e, c in zip(examples_B, completions_B)], np.float32)
        rewards = rewards + np.float32(format_weight) * fmt
    return correct, rewards


def sample_rollout(cfg: ModelConfig, params, tokenizer, examples: Sequence[tasks_lib.Example], *, group_size: int,
                   max_new_tokens: int, prompt_width: int, temperature: float, rng, top_p: float = 1.0,
                   top_k: int = 0, format_weight: float = 0.0, mesh=None) -> Rollout:
    """G responses for each example (rows g*G .. g*G+G-1 answer examples[g]), scored and laid out.

    mesh: sample data-parallel over its batch axes (see `generate`); the rollout comes back to the host.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not temperature > 0:
        raise ValueError(f"RL samples at temperature > 0 (got {temperature}); greedy responses have no "
                         "behaviour distribution to correct for")
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    longest = max(len(p) for p in prompts)
    if longest > prompt_width:
        raise ValueError(f"a prompt has {longest} tokens but prompt_width={prompt_width}; raise --max_prompt_len")
    rows = [p for p in prompts for _ in range(group_size)]
    out = generate(cfg, params, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, rng=rng, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, mesh=mesh)
    out = sharding_lib.to_host(out)
    B, N = out.logprobs.shape
    P_batch = out.tokens.shape[1] - N
    # Re-pad the prompt block from this batch's width to the fixed prompt_width.
    tokens = np.full((B, prompt_width + N), tokenizer.pad_id, np.int32)
    tokens[:, prompt_width - P_batch:] = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths, np.int32)
    response_mask = (np.arange(N)[None, :] < lengths[:, None]).astype(np.float32)
    finished = np.asarray(out.finished, bool)
    completions = completion_texts(tokenizer, tokens[:, prompt_width:], lengths, finished)
    examples_B = [e for e in examples for _ in range(group_size)]
    correct, rewards = score_completions(examples_B, completions, format_weight=format_weight)
    return Rollout(tokens=tokens, prompt_lengths=np.asarray(out.prompt_lengths, np.int32), response_mask=response_mask,
                   behaviour_logp=np.asarray(out.logprobs, np.float32) * response_mask, lengths=lengths,
                   finished=finished, group_ids=np.repeat(np.arange(len(examples), dtype=np.int32), group_size),
                   correct=correct, rewards=rewards, completions=tuple(completions))


def _verified_fraction(cfg: ModelConfig, params, tokenizer, examples: Sequence[tasks_lib.Example], *,
                       max_new_tokens: int, mesh=None, **sampling) -> float:
    """Fraction of completions of `examples` (one each, in order) that the verifier accepts."""
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    out = sharding_lib.to_host(generate(cfg, params, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id, mesh=mesh, **sampling))
    N = out.logprobs.shape[1]
    texts = completion_texts(tokenizer, np.asarray(out.tokens)[:, -N:], np.asarray(out.lengths),
                             np.asarray(out.finished))
    correct, _ = score_completions(examples, texts)
    return float(np.mean(correct))


def greedy_accuracy(cfg: ModelConfig, params, tokenizer, examples: Sequence[tasks_lib.Example], *,
                    max_new_tokens: int, mesh=None) -> float:
    """Fraction of examples whose greedy (temperature 0) completion the verifier accepts."""
    return _verified_fraction(cfg, params, tokenizer, examples, max_new_tokens=max_new_tokens, temperature=0.0,
                              mesh=mesh)


def sampled_accuracy(cfg: ModelConfig, params, tokenizer, examples: Sequence[tasks_lib.Example], *, samples: int,
                     max_new_tokens: int, temperature: float, rng, top_p: float = 1.0, top_k: int = 0,
                     mesh=None) -> float:
    """avg@k: the mean verifier score of `samples` completions per example at the rollout temperature.

    RL sharpens the sampling distribution; the M1 report measures it this way (avg@k at temperature 1), and
    greedy accuracy can stay flat while the policy's expected reward rises.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not temperature > 0:
        raise ValueError(f"sampled accuracy needs temperature > 0, got {temperature}; use greedy_accuracy")
    return _verified_fraction(cfg, params, tokenizer, [e for e in examples for _ in range(samples)],
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              rng=rng, mesh=mesh)
