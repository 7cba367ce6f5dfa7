"""Metrics: WORKDIR/metrics.jsonl, TensorBoard events, expert-load statistics, FLOPs and MFU."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from m1_jax.config import LIGHTNING, ModelConfig

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind (lower-case). CPUs have no entry:
# pass train.peak_tflops to get an MFU there.
_PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "v5p": 459e12, "v5 lite": 197e12,
               "v5e": 197e12, "v6": 918e12, "v4": 275e12}


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key, value in _PEAK_FLOPS.items():
        if key in kind:
            return value
    return None


def local_forward_flops_per_token(cfg: ModelConfig, context_len: int) -> float:
    """2 * active params (incl. LM head) + attention: softmax QK^T and PV over the causal context
    (average context_len / 2 keys), lightning state readout and update (2 * H * K * V each)."""
    from m1_jax.model import count_params
    active = count_params(cfg)["active"] + cfg.hidden_size * cfg.vocab_size  # LM head matmul
    flops = 2.0 * active
    hk = cfg.num_heads * cfg.head_dim
    for kind in cfg.layer_types:
        if kind == LIGHTNING:
            flops += 2 * 2 * hk * cfg.head_dim
        else:
            flops += 2 * 2 * hk * (context_len / 2)
    return flops


def train_flops_per_token(cfg: ModelConfig, context_len: int) -> tuple[float, str]:
    """3 x forward FLOPs (backward = 2 x forward); uses m1_jax.flops if it exists."""
    try:
        from m1_jax import flops as flops_lib  # written concurrently; optional
        return 3.0 * float(flops_lib.forward_flops_per_token(cfg, context_len)), "m1_jax.flops"
    except (ImportError, AttributeError):
        return 3.0 * local_forward_flops_per_token(cfg, context_len), "local estimate"


def expert_load_stats(counts_LxE: np.ndarray) -> dict[str, Any]:
    """max/mean expert load per layer (1.0 = perfectly balanced) and its max and mean over layers."""
    counts = np.asarray(counts_LxE, np.float64)
    mean = np.maximum(counts.mean(axis=-1), 1e-9)
    ratio = counts.max(axis=-1) / mean
    return {"expert_load_max_over_mean": ratio.tolist(), "expert_load_ratio_max": float(ratio.max()),
            "expert_load_ratio_mean": float(ratio.mean())}


class MetricsWriter:
    """One JSON object per logged step in WORKDIR/metrics.jsonl, mirrored to TensorBoard scalars. On several
    hosts only process 0 writes (every process computes the same metrics)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                logging.warning("tensorboardX is not installed; writing metrics.jsonl only")

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in record.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/layer_{i}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v):
    if isinstance(v, np.ndarray) or hasattr(v, "tolist"):
        v = np.asarray(v).tolist()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)  # "nan"/"inf": JSON has no literal for them
    return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_params_str(cfg: ModelConfig) -> str:
    from m1_jax.model import count_params
    n = count_params(cfg)
    return f"{n['total'] / 1e6:.3g}M params ({n['active'] / 1e6:.3g}M active without embeddings/head)"
