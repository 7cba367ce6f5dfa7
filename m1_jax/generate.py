"""Autoregressive generation for the hybrid model: cache, prefill, decode_step, sampling, generate.

The cache (`m1_jax.model.init_cache`) holds, per lightning layer, a float32 state [B, H, Dk, Dv] whose size
does not depend on the context length, and per softmax layer a KV cache [B, S, K, D]. Prompts of different
lengths are left-padded so every row writes the same cache slot at each step; padding is masked
(segment id 0) and each row's positions count from its own first real token.

`generate` runs prefill, then the whole decode loop inside one `lax.while_loop` (no host round-trip per
token), and stops early once every row is finished (EOS or M1's repetition truncation).
"""

from __future__ import annotations

import dataclasses
import functools

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.model import MiniMaxM1, check_tokens, init_cache

# M1 §3.2: stop once this many consecutive tokens each had probability above the threshold.
DEFAULT_REPETITION_MIN_RUN = 3000
DEFAULT_REPETITION_THRESHOLD = 0.99


# ---------------------------------------------------------------------------------------------------------
# Sampling: the distribution actually sampled from.


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) sampling settings. temperature == 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k restriction
    top_p: float = 1.0  # 1.0 = no nucleus restriction

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_logprobs(logits_BxV, sampling: SamplingConfig):
    """log p over the vocabulary of the distribution sampled from (-inf outside its support), float32.

    Order: temperature, then top-k (keep the k largest; ties with the k-th are kept), then top-p on the
    top-k-renormalised distribution (keep the smallest prefix of tokens, by decreasing probability, whose
    mass reaches top_p; the most likely token is always kept). Greedy (temperature 0) returns the model's
    own log-softmax (temperature 1, unrestricted): a point mass would carry no information.
    """
    x = logits_BxV.astype(jnp.float32)
    if sampling.greedy:
        return jax.nn.log_softmax(x, axis=-1)
    x = x / sampling.temperature
    vocab = x.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_Bx1 = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
        x = jnp.where(x >= kth_Bx1, x, -jnp.inf)
    if sampling.top_p < 1.0:
        sorted_desc = -jnp.sort(-x, axis=-1)
        probs_desc = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs_desc, axis=-1) - probs_desc
        keep_sorted = mass_before < sampling.top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        # The smallest kept logit is the cut; everything at or above it stays.
        cut_Bx1 = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= cut_Bx1, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def sample_token(logits_BxV, rng, sampling: SamplingConfig):
    """(token_B int32, logprob_B float32): a draw and its log-probability under `sampling_logprobs`."""
    logp_BxV = sampling_logprobs(logits_BxV, sampling)
    if sampling.greedy:
        token_B = jnp.argmax(logits_BxV, axis=-1)
    else:
        token_B = jax.random.categorical(rng, logp_BxV, axis=-1)
    token_B = token_B.astype(jnp.int32)
    return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# M1's repetition early truncation, online (the offline twin is m1_jax.rl.filters.repetition_stop_index).


def repetition_run_update(run_B, prob_B, threshold: float):
    """Length of the run of consecutive tokens with p > threshold, after one more token (p == threshold resets)."""
    return jnp.where(prob_B > threshold, run_B + 1, 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Prefill and one decode step.


def _pad_layout(prompt_lengths_B, padded_len: int):
    """segment ids (1 real, 0 left padding) and positions (index within the real prompt) [B, P]."""
    slot_P = jnp.arange(padded_len, dtype=jnp.int32)
    start_B = padded_len - prompt_lengths_B.astype(jnp.int32)
    segment_ids = (slot_P[None, :] >= start_B[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slot_P[None, :] - start_B[:, None], 0)
    return segment_ids, positions


def prefill_fn(cfg: ModelConfig, params, tokens_BxP, prompt_lengths_B, max_len: int):
    """Runs left-padded prompts through the model into a fresh cache of `max_len` slots.

    Returns (next-token logits_BxV float32, cache). Row b's prompt occupies the last prompt_lengths[b] slots.
    """
    B, P = tokens_BxP.shape
    segment_ids, positions = _pad_layout(prompt_lengths_B, P)
    cache = init_cache(cfg, B, max_len)
    logits, aux = MiniMaxM1(cfg).apply({"params": params}, tokens_BxP, segment_ids, positions, cache=cache)
    return logits[:, -1], aux["cache"]


def decode_step_fn(cfg: ModelConfig, params, cache, token_B, position_B):
    """One token per row: recurrent lightning update, attention over the KV cache. Returns (logits_BxV, cache)."""
    logits, aux = MiniMaxM1(cfg).apply({"params": params}, token_B[:, None], None, position_B[:, None],
                                       cache=cache)
    return logits[:, 0], aux["cache"]


prefill = jax.jit(prefill_fn, static_argnums=(0, 4))
decode_step = jax.jit(decode_step_fn, static_argnums=(0,))


# ---------------------------------------------------------------------------------------------------------
# generate


@flax.struct.dataclass
class GenerateResult:
    """tokens [B, P + N]: left-padded prompt (pad_id in padding) then N generated slots;
    logprobs [B, N] (0 after a row stops); lengths [B] generated tokens (EOS included);
    prompt_lengths [B]; finished [B] emitted EOS; truncated [B] stopped by the repetition rule."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    prompt_lengths: jax.Array
    finished: jax.Array
    truncated: jax.Array

    def generated(self, b: int) -> list[int]:
        """Row b's generated tokens, as a list (host)."""
        P = self.tokens.shape[1] - self.logprobs.shape[1]
        return np.asarray(self.tokens[b, P:P + int(self.lengths[b])]).tolist()


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens", "max_len"))
def _generate_jit(params, tokens_BxP, prompt_lengths_B, rng, eos_id, pad_id, min_run, threshold, *, cfg,
                  sampling, max_new_tokens, max_len):
    # eos_id (-1 = none), pad_id, min_run and threshold are traced so changing them does not recompile.
    B, _ = tokens_BxP.shape
    N = max_new_tokens
    logits_BxV, cache = prefill_fn(cfg, params, tokens_BxP, prompt_lengths_B, max_len)

    def emit(t, logits_BxV, state):
        """Samples generated token t for every still-running row and updates the stop bookkeeping."""
        out_tok, out_lp, done, finished, truncated, run, lengths = state
        token, logprob = sample_token(logits_BxV, jax.random.fold_in(rng, t), sampling)
        live = ~done
        token = jnp.where(live, token, pad_id)
        logprob = jnp.where(live, logprob, 0.0)
        lengths = lengths + live.astype(jnp.int32)
        hit_eos = live & (token == eos_id)
        run = repetition_run_update(run, jnp.exp(logprob), threshold)
        hit_run = live & (run >= min_run)
        state = (out_tok.at[:, t].set(token), out_lp.at[:, t].set(logprob), done | hit_eos | hit_run,
                 finished | hit_eos, truncated | (hit_run & ~hit_eos), run, lengths)
        return token, state

    zeros_B = jnp.zeros((B,), jnp.int32)
    false_B = jnp.zeros((B,), bool)
    state = (jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32), false_B, false_B, false_B,
             zeros_B, zeros_B)
    token, state = emit(0, logits_BxV, state)

    def cond(carry):
        t, _, _, state = carry
        return (t < N) & ~jnp.all(state[2])

    def body(carry):
        t, cache, token, state = carry
        # Generated token t-1 sits at position prompt_length + t - 1 of its row.
        logits_BxV, cache = decode_step_fn(cfg, params, cache, token, prompt_lengths_B + t - 1)
        token, state = emit(t, logits_BxV, state)
        return t + 1, cache, token, state

    _, _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token, state))
    out_tok, out_lp, _, finished, truncated, _, lengths = state
    return out_tok, out_lp, lengths, finished, truncated


def _as_padded(cfg: ModelConfig, prompts, pad_id: int):
    """Host side: (left-padded int32 [B, P] with pad_id in padding, lengths [B]) after validation."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts must be an int array [B, L] or a list of token lists; got shape {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"prompts must be non-empty; got shape {arr.shape} (every prompt needs >= 1 token)")
        check_tokens(cfg, arr)
        return arr.astype(np.int32), np.full(arr.shape[0], arr.shape[1], np.int32)
    rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is an empty list; pass at least one prompt")
    for b, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"prompt {b} must be a flat list of token ids, got shape {row.shape}")
        if row.size == 0:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token (e.g. BOS)")
        try:
            check_tokens(cfg, row)
        except ValueError as e:
            raise ValueError(f"prompt {b}: {e}") from None
    lengths = np.array([r.size for r in rows], np.int32)
    padded = np.full((len(rows), int(lengths.max())), pad_id, np.int32)
    for b, row in enumerate(rows):
        padded[b, padded.shape[1] - row.size:] = row
    return padded, lengths


def _pad_rows_to_multiple(x_Bx, multiple: int):
    """Repeats the last row until the row count divides by `multiple` (padding rows are dropped after)."""
    extra = -x_Bx.shape[0] % multiple
    return np.concatenate([x_Bx, np.repeat(x_Bx[-1:], extra, axis=0)]) if extra else x_Bx


def _shard_prompt_rows(tokens_BxP, lengths_B, mesh):
    """Prompt rows padded to the batch parallelism and split over the mesh's batch axes."""
    if sharding_lib.context_axes(mesh):
        raise ValueError(f"generation does not run with a context axis (mesh {dict(mesh.shape)}): decoding is one "
                         "token at a time; use a mesh without context=")
    ways = sharding_lib.batch_parallelism(mesh)
    rows = sharding_lib.batch_sharding(mesh, ndim=1)
    return (jax.device_put(_pad_rows_to_multiple(tokens_BxP, ways), rows),
            jax.device_put(_pad_rows_to_multiple(lengths_B, ways), rows))


def generate(cfg: ModelConfig, params, prompts, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, rng=None, eos_id: int | None = None, pad_id: int | None = None,
             max_len: int | None = None, repetition_min_run: int | None = DEFAULT_REPETITION_MIN_RUN,
             repetition_threshold: float = DEFAULT_REPETITION_THRESHOLD, mesh=None) -> GenerateResult:
    """Samples max_new_tokens continuations of `prompts` (int array [B, L] or a list of token lists).

    Greedy when temperature == 0. `logprobs` are log-probabilities of the sampled tokens under the
    distribution sampled from (see `sampling_logprobs`; greedy reports the model's own log-softmax).
    A row stops after emitting eos_id, or once `repetition_min_run` consecutive tokens each had
    probability (exp(logprob)) > repetition_threshold (None disables); later slots hold pad_id (default:
    eos_id, else 0) with logprob 0. `max_len` is the cache length (default: longest prompt + max_new_tokens).
    mesh: run data-parallel over its batch axes (rows padded to a multiple of the batch parallelism, the
    padding dropped from the result) under its logical rules, with `params` placed as the caller placed them.
    """
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    sampling.validate()
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for name, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
        if tok is not None and not 0 <= int(tok) < cfg.vocab_size:
            raise ValueError(f"{name}={tok} is outside the vocabulary [0, {cfg.vocab_size})")
    if repetition_min_run is not None and repetition_min_run < 1:
        raise ValueError(f"repetition_min_run must be >= 1 or None (off), got {repetition_min_run}")
    if not 0 <= repetition_threshold <= 1:
        raise ValueError(f"repetition_threshold must lie in [0, 1], got {repetition_threshold}")
    pad_id = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
    tokens_BxP, lengths_B = _as_padded(cfg, prompts, pad_id)
    P = tokens_BxP.shape[1]
    # Decoding writes one slot per generated token but the last one, so P + N - 1 slots are used.
    needed = P + max_new_tokens - 1
    max_len = P + max_new_tokens if max_len is None else int(max_len)
    if needed > max_len:
        raise ValueError(f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) needs {needed} cache slots "
                         f"but max_len={max_len}; raise max_len or shorten the prompt / max_new_tokens")
    longest = int(lengths_B.max()) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({int(lengths_B.max())}) + max_new_tokens ({max_new_tokens}) = {longest} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}; shorten one of them")
    if rng is None:
        if not sampling.greedy:
            logging.warning("generate: no rng given; sampling with jax.random.key(0)")
        rng = jax.random.key(0)
    min_run = np.iinfo(np.int32).max if repetition_min_run is None else int(repetition_min_run)
    if mesh is None:
        tokens_in, lengths_in = jnp.asarray(tokens_BxP), jnp.asarray(lengths_B)
    else:
        tokens_in, lengths_in = _shard_prompt_rows(tokens_BxP, lengths_B, mesh)
    with sharding_lib.mesh_context(mesh):
        outs = _generate_jit(
            params, tokens_in, lengths_in, rng, jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
            jnp.int32(min_run), jnp.float32(repetition_threshold), cfg=cfg, sampling=sampling,
            max_new_tokens=int(max_new_tokens), max_len=max_len)
    B = tokens_BxP.shape[0]
    out_tok, out_lp, lengths, finished, truncated = (x[:B] for x in outs) if mesh is not None else outs
    tokens = jnp.concatenate([jnp.asarray(tokens_BxP), out_tok], axis=1)
    return GenerateResult(tokens, out_lp, lengths, jnp.asarray(lengths_B), finished, truncated)


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict[str, int]:
    """Bytes of the decode cache from shapes alone (no allocation): {"lightning", "softmax", "total"}."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch_size, max_len, dtype))
    out = {"lightning": 0, "softmax": 0}
    for entry in shapes:
        kind = "lightning" if isinstance(entry, jax.ShapeDtypeStruct) else "softmax"
        out[kind] += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(entry))
    out["total"] = out["lightning"] + out["softmax"]
    return out
