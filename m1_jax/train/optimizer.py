"""AdamW (betas 0.9/0.95, tiny eps as in the M1 report), LR schedules, clipping and the decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "constant_decay", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    schedule: str = "cosine"       # "cosine" | "constant_decay" (warmup, hold, linear decay) | "constant"
    warmup_steps: int = 20
    total_steps: int = 300
    decay_fraction: float = 0.2    # constant_decay: the last fraction of total_steps decays linearly
    min_lr_ratio: float = 0.1      # final lr = learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15             # the M1 report's AdamW epsilon
    weight_decay: float = 0.1
    clip_norm: float = 1.0         # global-norm clipping; <= 0 turns it off

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"optimizer config: {msg}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            bad(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            bad(f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            bad("decay_fraction and min_lr_ratio must lie in [0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps < 0 or self.weight_decay < 0:
            bad(f"need 0 <= b1, b2 < 1, eps >= 0, weight_decay >= 0; got b1={self.b1} b2={self.b2} "
                f"eps={self.eps} weight_decay={self.weight_decay}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1)
    final = peak * cfg.min_lr_ratio
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, total - warmup, alpha=cfg.min_lr_ratio)
    else:
        decay = max(1, int(round((total - warmup) * cfg.decay_fraction)))
        hold = total - warmup - decay
        rest = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)], [hold])
    return optax.join_schedules([warm, rest], [warmup])


def decay_mask(params):
    """True where weight decay applies: every weight except norm scales.

    Decided by name, not rank: scanned groups stack per-layer norm vectors into [G, D] (or [G, H, K]).
    """
    def decays(path, _):
        return "norm" not in str(getattr(path[-1], "key", path[-1]))
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, *, decay_mask_tree=None) -> optax.GradientTransformation:
    cfg.validate()
    schedule = make_schedule(cfg)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask_tree if decay_mask_tree is not None else decay_mask))
    return optax.chain(*parts)
