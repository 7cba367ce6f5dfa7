"""The policy-gradient step: recompute log pi on response tokens, the chosen policy loss, one optimizer update.

A rollout of `prompts_per_step` groups is split into `mu` minibatches of whole groups; each minibatch is one
optimizer update (off-policy after the first: old_logp stays the rollout's behaviour log-probs). Inside a
minibatch, `micro_batches` slices are accumulated by `lax.scan`; every slice uses the divisors
(`loss_denominators`) of the whole minibatch, so the accumulated loss and gradient equal the un-split ones.

Diagnostics, all over response tokens: clip fraction, approx KL, entropy of the trainer's sampling
distribution, and the sampler/trainer probability correlation (Pearson of exp(behaviour logp) and
exp(trainer logp); M1 §3.2, Fig. 3), accumulated as exact sums across micro-batches.

On a mesh (`make_rl_step(..., mesh=)`) the state keeps train.py's shardings and the minibatch rows are split over
the mesh's batch axes, interleaved on the host so that every device keeps its rows through the micro-batch split
and each micro-batch holds the same rows as on one device (the MoE aux loss, per micro-batch, is unchanged too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1_jax import sharding as sharding_lib
from m1_jax.config import ModelConfig
from m1_jax.generate import SamplingConfig, sampling_logprobs
from m1_jax.model import MiniMaxM1
from m1_jax.rl.advantages import group_advantages
from m1_jax.rl.losses import AGGREGATIONS, POLICY_LOSSES, loss_denominators
from m1_jax.rl.rollout import Rollout, sequence_layout
from m1_jax.train import state as state_lib
from m1_jax.train.state import TrainState
from m1_jax.train.step import accumulate_micro_batches, apply_if_finite, split_micro_strided

# The aggregation each paper uses (rl.md §1-2): M1 Eq. 4 per-group token mean, DAPO token mean over the
# batch, GRPO per-sequence mean.
DEFAULT_AGGREGATION = {"cispo": "token_mean_group", "dapo": "token_mean_batch", "grpo": "seq_mean_token_mean"}


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Static settings of the RL step and loop (hashable: closed over by jit)."""

    algo: str = "cispo"
    group_size: int = 8
    prompts_per_step: int = 32
    mu: int = 4                    # minibatches (= optimizer updates) per rollout
    micro_batches: int = 1         # gradient-accumulation slices per minibatch
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4
    max_prompt_len: int = 32       # fixed prompt width (tokens, BOS included)
    # Clip offsets from 1; None = the algorithm's default (cispo: high 4.0 / no low; dapo 0.2 / 0.28; grpo 0.2).
    eps_low: float | None = None
    eps_high: float | None = None
    aggregation: str | None = None  # None = DEFAULT_AGGREGATION[algo]
    kl_coef: float = 0.0           # GRPO's beta (k3 KL to the warm start); needs algo="grpo"
    adv_std: str = "unbiased"
    aux_loss_coef: float | None = None  # MoE load-balance loss; None = the model config's coefficient
    dynamic_sampling: bool = False
    dynamic_max_rounds: int = 8
    overlong_penalty: bool = False
    overlong_cache: int = 2        # DAPO's L_cache, in tokens; L_max = max_new_tokens
    overlong_filter: bool = False  # mask truncated (no EOS) responses out of the loss
    format_weight: float = 0.0

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"RL config: {msg}")
        if self.algo not in POLICY_LOSSES:
            bad(f"algo must be one of {sorted(POLICY_LOSSES)}, got {self.algo!r}")
        for name in ("group_size", "prompts_per_step", "mu", "micro_batches", "max_new_tokens", "max_prompt_len"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            bad(f"group_size={self.group_size}: group-relative advantages need >= 2 responses per prompt")
        if self.prompts_per_step % self.mu:
            bad(f"prompts_per_step={self.prompts_per_step} must be divisible by mu={self.mu} (minibatches hold whole "
                "groups)")
        rows = self.prompts_per_step // self.mu * self.group_size
        if rows % self.micro_batches:
            bad(f"a minibatch has {rows} responses, not divisible by micro_batches={self.micro_batches}")
        if not self.temperature > 0:
            bad(f"temperature must be > 0, got {self.temperature}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            bad(f"aggregation must be one of {AGGREGATIONS} or None, got {self.aggregation!r}")
        if self.kl_coef and self.algo != "grpo":
            bad(f"kl_coef={self.kl_coef} is only defined for algo='grpo' (CISPO and DAPO use no KL)")
        if self.overlong_penalty and not 0 < self.overlong_cache <= self.max_new_tokens:
            bad(f"overlong_cache={self.overlong_cache} must lie in [1, max_new_tokens={self.max_new_tokens}]")

    @property
    def agg(self) -> str:
        return self.aggregation or DEFAULT_AGGREGATION[self.algo]

    def loss_kwargs(self) -> dict[str, Any]:
        """Hyperparameters for POLICY_LOSSES[algo], defaults filled in."""
        if self.algo == "cispo":
            return {"eps_high": 4.0 if self.eps_high is None else self.eps_high, "eps_low": self.eps_low}
        if self.algo == "dapo":
            return {"eps_low": 0.2 if self.eps_low is None else self.eps_low,
                    "eps_high": 0.28 if self.eps_high is None else self.eps_high}
        if self.eps_low is not None and self.eps_high is not None and self.eps_low != self.eps_high:
            raise ValueError(f"GRPO's clip is symmetric; got eps_low={self.eps_low} != eps_high={self.eps_high}")
        eps = next((e for e in (self.eps_high, self.eps_low) if e is not None), 0.2)
        return {"eps": eps, "kl_coef": self.kl_coef}

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(float(self.temperature), int(self.top_k), float(self.top_p))


# ---------------------------------------------------------------------------------------------------------
# Log-probs of response tokens under the trainer.


def response_logits(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width: int):
    """Logits [B, N, V] predicting each of the N response slots, and the model's aux dict."""
    logits, aux = MiniMaxM1(cfg).apply({"params": params}, tokens_BxL[:, :-1], segment_ids_BxL=segment_ids_BxL[:, :-1],
                                       positions_BxL=positions_BxL[:, :-1])
    # Position t's logits predict token t + 1: slots P .. P+N-1 are predicted at P-1 .. P+N-2.
    return logits[:, prompt_width - 1:], aux


def response_logp(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width: int,
                  sampling: SamplingConfig):
    """(logp [B, N] of the response tokens under the sampling distribution, logp over vocab [B, N, V], aux)."""
    logits_BxNxV, aux = response_logits(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, prompt_width)
    logp_BxNxV = sampling_logprobs(logits_BxNxV, sampling)
    targets_BxN = tokens_BxL[:, prompt_width:]
    logp_BxN = jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]
    return logp_BxN, logp_BxNxV, aux


def token_entropy(logp_BxNxV):
    """Entropy per position of the distribution given by log-probs (-inf entries contribute 0)."""
    p = jnp.exp(logp_BxNxV)
    return -jnp.sum(jnp.where(p > 0, p * logp_BxNxV, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Host side: rollout -> advantages -> minibatches.

MINIBATCH_KEYS = ("tokens", "segment_ids", "positions", "response_mask", "old_logp", "advantages", "group_ids",
                  "denominator", "ref_logp")


def minibatches(rollout: Rollout, rl: RLConfig, ref_logp_BxN=None) -> list[dict[str, np.ndarray]]:
    """Group advantages over the whole rollout, then `mu` minibatches of whole groups with their divisors."""
    num_groups = rollout.num_groups
    if num_groups % rl.mu:
        raise ValueError(f"rollout has {num_groups} groups, not divisible by mu={rl.mu}")
    adv = np.asarray(group_advantages(rollout.rewards, rollout.group_ids, std=rl.adv_std), np.float32)
    mask = rollout.response_mask
    if rl.overlong_filter:
        mask = mask * rollout.finished[:, None].astype(np.float32)
    seg, pos = sequence_layout(rollout.prompt_lengths, rollout.prompt_width, rollout.tokens.shape[1])
    ref = np.zeros_like(rollout.behaviour_logp) if ref_logp_BxN is None else np.asarray(ref_logp_BxN, np.float32)
    per = num_groups // rl.mu
    out = []
    for m in range(rl.mu):
        rows = np.flatnonzero((rollout.group_ids >= m * per) & (rollout.group_ids < (m + 1) * per))
        mb_mask = mask[rows]
        denom = np.asarray(loss_denominators(mb_mask, rl.agg, rollout.group_ids[rows]), np.float32)
        out.append({"tokens": rollout.tokens[rows], "segment_ids": seg[rows], "positions": pos[rows],
                    "response_mask": mb_mask, "old_logp": rollout.behaviour_logp[rows], "advantages": adv[rows],
                    "group_ids": rollout.group_ids[rows], "denominator": denom, "ref_logp": ref[rows]})
    return out


# ---------------------------------------------------------------------------------------------------------
# Placement on a mesh: minibatch rows split over the batch axes.


def check_batch_rows(rows: int, mesh, what: str) -> None:
    """ValueError naming the numbers when `rows` responses cannot be split evenly over the batch axes."""
    ways = sharding_lib.batch_parallelism(mesh)
    if rows % ways:
        raise ValueError(f"{what} has {rows} responses, not divisible by the {ways}-way batch sharding (axes "
                         f"{sharding_lib.batch_axes(mesh)}) of mesh {dict(mesh.shape)}; change prompts_per_step, "
                         "group_size, mu, micro_batches or --mesh")


def check_mesh_divisibility(rl: RLConfig, mesh) -> None:
    """Host-side, before anything compiles: every minibatch and micro-batch splits over the batch axes."""
    rows = rl.prompts_per_step // rl.mu * rl.group_size
    check_batch_rows(rows, mesh, f"a minibatch (prompts_per_step / mu * group_size = {rl.prompts_per_step} / "
                                 f"{rl.mu} * {rl.group_size})")
    check_batch_rows(rows // rl.micro_batches, mesh, f"a micro-batch ({rows} / micro_batches={rl.micro_batches})")


def interleave_micro_batches(x_Bx: np.ndarray, num_micro: int) -> np.ndarray:
    """Row order under which the strided split (rows a, a+M, ...) gives back the contiguous micro-batches.

    Micro-batch a of the single-device step is rows [a*R, (a+1)*R); placing row a*R + j at j*M + a makes the
    sharded step's strided split (each device keeps its rows) pick exactly those rows, in the same order.
    """
    B = x_Bx.shape[0]
    return x_Bx.reshape((num_micro, B // num_micro) + x_Bx.shape[1:]).swapaxes(0, 1).reshape(x_Bx.shape)


def place_minibatch(minibatch: dict[str, np.ndarray], num_micro: int, mesh) -> dict[str, jax.Array]:
    """Host minibatch -> arrays split over the mesh's batch axes, rows interleaved for the strided split."""
    rows = int(np.shape(minibatch["tokens"])[0])
    check_batch_rows(rows, mesh, "a minibatch")
    check_batch_rows(rows // num_micro, mesh, f"a micro-batch ({rows} / micro_batches={num_micro})")
    host = {k: interleave_micro_batches(np.asarray(minibatch[k]), num_micro) for k in MINIBATCH_KEYS}
    return jax.device_put(host, sharding_lib.batch_sharding(mesh, ndim=1))


# ---------------------------------------------------------------------------------------------------------
# The jitted step.

_SUM_KEYS = ("loss", "aux_loss", "tokens", "clip", "zeroed", "approx_kl", "approx_kl_k3", "ratio", "entropy", "sx", "sy", "sxx",
             "syy", "sxy", "kl_ref", "token_mask")


def make_policy_loss(cfg: ModelConfig, rl: RLConfig, prompt_width: int):
    """loss(params, micro) -> (scalar for grad, dict of sums) for one micro-batch of a minibatch."""
    loss_fn = POLICY_LOSSES[rl.algo]
    kwargs = rl.loss_kwargs()
    aux_coef = cfg.router_aux_loss_coef if rl.aux_loss_coef is None else rl.aux_loss_coef
    sampling = rl.sampling
    use_ref = rl.kl_coef != 0.0

    def micro_loss(params, micro, num_micro):
        logp, logp_v, aux = response_logp(cfg, params, micro["tokens"], micro["segment_ids"], micro["positions"],
                                          prompt_width, sampling)
        mask = micro["response_mask"]
        extra = {"ref_logp": micro["ref_logp"]} if use_ref else {}
        loss, m = loss_fn(logp, micro["old_logp"], micro["advantages"], mask, aggregation=rl.agg,
                          denominator=micro["denominator"], **kwargs, **extra)
        total = loss + aux_coef * aux["moe_aux_loss"] / num_micro
        n = m["num_tokens"]
        x = jnp.exp(micro["old_logp"]) * mask
        y = jax.lax.stop_gradient(jnp.exp(logp)) * mask
        ent = jax.lax.stop_gradient(token_entropy(logp_v))
        sums = {"loss": loss, "aux_loss": aux["moe_aux_loss"] / num_micro, "tokens": n,
                "clip": m["clip_fraction"] * n, "zeroed": m["zeroed_fraction"] * n, "approx_kl": m["approx_kl"] * n, "approx_kl_k3": m["approx_kl_k3"] * n,
                "ratio": m["ratio_mean"] * n, "entropy": jnp.sum(ent * mask), "sx": jnp.sum(x), "sy": jnp.sum(y),
                "sxx": jnp.sum(x * x), "syy": jnp.sum(y * y), "sxy": jnp.sum(x * y),
                "kl_ref": m.get("kl_ref", 0.0) * n, "token_mask": m.get("token_mask_fraction", 0.0) * n}
        return total, (sums, m["ratio_max"])

    return micro_loss


def pearson_from_sums(n, sx, sy, sxx, syy, sxy):
    cov = sxy - sx * sy / n
    var_x = sxx - sx * sx / n
    var_y = syy - sy * sy / n
    return cov / jnp.sqrt(jnp.maximum(var_x * var_y, 1e-30))


def _split_micro_contiguous(x, num_micro: int):
    """[B, ...] -> [M, B/M, ...]: micro-batch a is rows a*B/M .. (a+1)*B/M - 1 (the single-device split)."""
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])


def make_grads_fn(cfg: ModelConfig, rl: RLConfig, prompt_width: int, *, mesh=None, param_shardings=None):
    """(params, minibatch) -> (grads summed over micro-batches, dict of metric sums, ratio_max); not jitted.

    With a mesh the minibatch must come from `place_minibatch` (rows interleaved so that the strided split
    keeps each device's rows local and still yields the single-device micro-batches); with param_shardings the
    gradient accumulators are kept sharded like the params.
    """
    rl.validate()
    num_micro = int(rl.micro_batches)
    grad_fn = jax.grad(make_policy_loss(cfg, rl, prompt_width), has_aux=True)

    def split(x):
        return _split_micro_contiguous(x, num_micro) if mesh is None else split_micro_strided(x, num_micro)

    def constrain_rows(micro):
        if mesh is None:
            return micro
        return {k: jax.lax.with_sharding_constraint(v, sharding_lib.batch_sharding(mesh, ndim=1))
                for k, v in micro.items()}

    def constrain_like_params(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def micro_grads(params, micro, i):
        del i
        grads, (sums, ratio_max) = grad_fn(params, constrain_rows(micro), num_micro)
        return grads, ({k: sums[k] for k in _SUM_KEYS}, ratio_max)

    def combine(acc, new):
        return {k: acc[0][k] + new[0][k] for k in _SUM_KEYS}, jnp.maximum(acc[1], new[1])

    def grads_and_sums(params, minibatch):
        micros = {k: split(jnp.asarray(minibatch[k])) for k in MINIBATCH_KEYS}
        aux0 = ({k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS}, jnp.full((), -jnp.inf, jnp.float32))
        grads, (sums, ratio_max) = accumulate_micro_batches(micro_grads, params, micros, num_micro, aux0, combine,
                                                            constrain_like_params)
        return grads, sums, ratio_max

    return grads_and_sums


def make_rl_step(cfg: ModelConfig, rl: RLConfig, optimizer: optax.GradientTransformation, prompt_width: int, *,
                 mesh=None, state_shardings=None):
    """Jitted `state, metrics = step(state, minibatch)`: micro-batched policy gradient, one optimizer update.

    The state is donated. metrics hold device scalars (read them with jax.device_get).
    mesh: the state must be placed with `state_shardings` (default: train.py's, `state_lib.state_shardings`);
    the step takes a host minibatch and splits its rows over the batch axes (`place_minibatch`).
    """
    if mesh is not None and state_shardings is None:
        state_shardings = state_lib.state_shardings(cfg, optimizer, mesh)
    grads_and_sums = make_grads_fn(cfg, rl, prompt_width, mesh=mesh,
                                   param_shardings=None if mesh is None else state_shardings.params)

    def step(state: TrainState, minibatch):
        grads, s, ratio_max = grads_and_sums(state.params, minibatch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        n = jnp.maximum(s["tokens"], 1.0)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(s["loss"]) & jnp.isfinite(grad_norm)
        new_state = apply_if_finite(state, optimizer, grads, finite)
        metrics = {"policy_loss": s["loss"], "aux_loss": s["aux_loss"], "grad_norm": grad_norm, "num_tokens": s["tokens"],
                   "clip_fraction": s["clip"] / n, "zeroed_fraction": s["zeroed"] / n, "approx_kl": s["approx_kl"] / n, "approx_kl_k3": s["approx_kl_k3"] / n,
                   "ratio_mean": s["ratio"] / n, "ratio_max": ratio_max, "entropy": s["entropy"] / n,
                   "prob_corr": pearson_from_sums(n, s["sx"], s["sy"], s["sxx"], s["syy"], s["sxy"]),
                   "kl_ref": s["kl_ref"] / n, "token_mask_fraction": s["token_mask"] / n, "finite": finite}
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    jitted = jax.jit(step, donate_argnums=0,
                     in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, ndim=1)),
                     out_shardings=(state_shardings, sharding_lib.replicated(mesh)))

    def run(state: TrainState, minibatch):
        placed = place_minibatch(minibatch, int(rl.micro_batches), mesh)
        with sharding_lib.mesh_context(mesh):
            return jitted(state, placed)

    run.jitted = jitted
    return run


def make_logp_fn(cfg: ModelConfig, rl: RLConfig, prompt_width: int, *, mesh=None):
    """Jitted (params, tokens, segment_ids, positions) -> trainer log-probs [B, N] (e.g. of a reference policy).

    mesh: the rows are split over its batch axes (their count must divide by the batch parallelism).
    """
    sampling = rl.sampling

    @jax.jit
    def logp_fn(params, tokens, segment_ids, positions):
        return response_logp(cfg, params, tokens, segment_ids, positions, prompt_width, sampling)[0]

    if mesh is None:
        return logp_fn

    def run(params, tokens, segment_ids, positions):
        check_batch_rows(int(np.shape(tokens)[0]), mesh, "the log-prob batch")
        placed = jax.device_put((np.asarray(tokens), np.asarray(segment_ids), np.asarray(positions)),
                                sharding_lib.batch_sharding(mesh, ndim=1))
        with sharding_lib.mesh_context(mesh):
            return logp_fn(params, *placed)

    return run
