"""ModelConfig: every architectural constant of MiniMax-M1; ImplConfig (its `impl` field): how it is computed;
presets.

Frozen, hashable dataclasses (static under jit). Presets come from `get_config(name)`: an architecture with an
implementation profile (IMPL_PROFILES). The config.json mapping (official and transformers keys) is in hf.py
(`config_from_hf`, `config_to_hf`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

LIGHTNING = "lightning"
SOFTMAX = "softmax"
LAYER_TYPES = (LIGHTNING, SOFTMAX)

# Official attn_type_list codes and transformers' layer_types names for our two layer kinds.

_DTYPES = ("float32", "bfloat16", "float16")
# How the lightning decays are computed (head_slopes, layer_decay_factor): "official" as MiniMax's own code,
# "transformers" as transformers' MiniMax port; they differ for head counts that are not powers of two.
DECAY_CONVENTIONS = ("official", "transformers")
MOE_IMPLS = ("dropless", "expert_parallel")
MOE_BACKENDS = ("capacity", "ragged")
# pallas_kernels.grouped_matmul.IMPLS (listed here so that this module needs no jax; a test keeps them equal).
GROUPED_MATMUL_IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "bucketed", "blas", "ragged_dot", "reference")
MATMUL_PRECISIONS = ("auto", "default", "high", "highest")
SOFTMAX_IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "blockwise", "reference")  # pallas_kernels.softmax_attention
LIGHTNING_IMPLS = ("auto", "reference", "chunked", "pallas_tpu", "pallas_gpu", "pallas_gpu_parallel")  # .lightning_attention


@dataclasses.dataclass(frozen=True)
class ImplConfig:
    """How the model is computed: kernels, tiles, MoE parallelism, remat, precision, scan unrolling. These change
    speed and memory, never the function (beyond rounding), except moe_capacity_factor > 0, which drops tokens.

    `ModelConfig.impl` holds one; `ModelConfig.replace` and `get_config` take these fields by name too.
    IMPL_PROFILES names the tuned sets (the accelerator defaults, and "cpu" for the CPU presets).
    """

    # Lightning attention's block (chunk) length in tokens; the official code's block_size.
    block_size: int = 256
    # MoE implementation: "dropless" (moe.py, single-device math; GSPMD cannot split its global sort) or
    # "expert_parallel" (expert_parallel.py, shard_map all-to-all over the "expert" axis of the mesh set
    # with jax.set_mesh; needed for pod-scale meshes). The next two fields only apply to "expert_parallel"
    # (validate() rejects them with "dropless"): moe_backend "capacity" (all_to_all, runs everywhere) or
    # "ragged" (ragged_all_to_all, GPU/TPU only); moe_capacity_factor > 0 caps each expert's slots (dropped
    # copies contribute 0), 0 = dropless.
    moe_impl: str = "dropless"
    moe_backend: str = "capacity"
    moe_capacity_factor: float = 0.0
    # The experts' grouped matmul on every MoE path (pallas_kernels/grouped_matmul): "auto" picks by the
    # platform compiled for: Pallas Triton on CUDA, megablox on TPU, pure-JAX "bucketed" on CPU.
    moe_grouped_matmul: str = "auto"
    # Default precision of every matmul (jax.default_matmul_precision around the model): "auto" = "highest" for a
    # float32 dtype (on GPU, float32 matmuls otherwise run in TF32) and "default" for bf16/fp16.
    matmul_precision: str = "auto"
    # Softmax-attention tile for the memory-efficient (flash-style) path. Large tiles suit accelerators; on
    # CPU, 256 x 128 keeps the score tile in L2 (measured fastest for the CPU presets).
    attention_block_q: int = 512
    attention_block_kv: int = 512
    # Lightning-attention implementation: "auto" (Pallas kernel on the TPU/CUDA platform compiled for, chunked JAX
    # elsewhere), "chunked", "pallas_gpu", "pallas_gpu_parallel", "pallas_tpu". Under a mesh the model runs it per device (shard_map).
    lightning_impl: str = "auto"
    # Softmax-attention implementation (pallas_kernels.softmax_attention): "auto" = splash on TPU, Triton flash on
    # CUDA, the blockwise pure-JAX path elsewhere; under a mesh it runs per device (shard_map), like lightning.
    softmax_impl: str = "auto"
    # Rematerialise each scanned layer group in the backward pass ("none" | "full" | "dots").
    remat_policy: str = "full"
    # Layer groups per iteration of the scan over groups: 1 keeps the compiled model one group long (fast
    # compiles at 80 layers); num_groups unrolls it (the tiny preset: 1.5x faster fwd+bwd on XLA:CPU).
    scan_unroll: int = 1

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"ImplConfig: {msg}")

        for name in ("block_size", "attention_block_q", "attention_block_kv"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.lightning_impl not in LIGHTNING_IMPLS:
            bad(f"lightning_impl must be one of {LIGHTNING_IMPLS}, got {self.lightning_impl!r}")
        if self.softmax_impl not in SOFTMAX_IMPLS:
            bad(f"softmax_impl must be one of {SOFTMAX_IMPLS}, got {self.softmax_impl!r}")
        if self.remat_policy not in ("none", "full", "dots"):
            bad(f"remat_policy must be 'none', 'full' or 'dots', got {self.remat_policy!r}")
        if not (isinstance(self.scan_unroll, int) and self.scan_unroll >= 1):
            bad(f"scan_unroll must be an int >= 1, got {self.scan_unroll!r}")
        if self.moe_impl not in MOE_IMPLS:
            bad(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.moe_backend not in MOE_BACKENDS:
            bad(f"moe_backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
        if self.moe_grouped_matmul not in GROUPED_MATMUL_IMPLS:
            bad(f"moe_grouped_matmul must be one of {GROUPED_MATMUL_IMPLS}, got {self.moe_grouped_matmul!r}")
        if not self.moe_capacity_factor >= 0:
            bad(f"moe_capacity_factor must be >= 0 (0 = dropless), got {self.moe_capacity_factor!r}")
        if self.moe_impl == "dropless" and (self.moe_backend != "capacity" or self.moe_capacity_factor != 0):
            bad(f"moe_backend={self.moe_backend!r} and moe_capacity_factor={self.moe_capacity_factor!r} apply to "
                "moe_impl='expert_parallel' only; moe_impl='dropless' never drops (leave them at 'capacity' and 0, "
                "or set moe_impl='expert_parallel')")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            bad(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")


IMPL_FIELDS = frozenset(f.name for f in dataclasses.fields(ImplConfig))
IMPL_PROFILES = {
    "accelerator": ImplConfig(),
    # XLA:CPU: lightning block 64 (the chunked path's fwd+bwd is 2.3x faster than 256 at 4 x 256 tokens),
    # 256 x 128 softmax tiles (the score tile stays in L2), no remat (small models), two layer groups per scan
    # iteration (the tiny preset's fwd+bwd 1.5x faster). Results differ from the defaults only by rounding.
    "cpu": ImplConfig(block_size=64, attention_block_q=256, attention_block_kv=128, remat_policy="none",
                      scan_unroll=2),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a MiniMax-M1-style hybrid lightning/softmax MoE decoder."""

    vocab_size: int = 200_064
    hidden_size: int = 6144
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 128
    # Layer kinds, one per layer: "lightning" (linear attention with decay) or "softmax".
    layer_types: tuple[str, ...] = tuple(SOFTMAX if i % 8 == 7 else LIGHTNING for i in range(80))
    # RoPE on the first rotary_dim dims of each softmax head (rotate-half within that slice).
    rotary_dim: int = 64
    rope_theta: float = 10_000_000.0
    max_position_embeddings: int = 10_240_000
    # Post-norm residual scales: x' = alpha * norm(x) + beta * f(norm(x)).
    lightning_alpha: float = 3.5565588200778455
    lightning_beta: float = 1.0
    softmax_alpha: float = 3.5565588200778455
    softmax_beta: float = 1.0
    mlp_alpha: float = 3.5565588200778455
    mlp_beta: float = 1.0
    rms_norm_eps: float = 1e-5
    # The official code never passes the config eps to the lightning output norm, so it keeps 1e-6.
    lightning_norm_eps: float = 1e-6
    # Lightning decay convention (DECAY_CONVENTIONS). hf.config_from_hf sets it from the checkpoint's format: transformers'
    # (model_type "minimax") decays for a transformers checkpoint, the official ones for the official checkpoint.
    lightning_decay: str = "official"
    # MoE.
    num_experts: int = 32
    num_experts_per_tok: int = 2
    expert_dim: int = 9216
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    # M1's fix for the train/inference probability mismatch: the LM head matmul runs in float32.
    fp32_lm_head: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    # How it is computed (kernels, tiles, remat, precision); see ImplConfig.
    impl: ImplConfig = ImplConfig()

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.impl, dict):  # from JSON (checkpoint metadata) or an ml_collections config
            object.__setattr__(self, "impl", ImplConfig(**self.impl))
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                  "num_experts", "num_experts_per_tok", "expert_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            bad(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if len(self.layer_types) != self.num_layers:
            bad(f"len(layer_types)={len(self.layer_types)} != num_layers={self.num_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            bad(f"unknown layer type(s) {unknown}; use {LAYER_TYPES}")
        if self.num_experts_per_tok > self.num_experts:
            bad(f"num_experts_per_tok ({self.num_experts_per_tok}) > num_experts ({self.num_experts})")
        for name in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                bad(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.router_aux_loss_coef < 0 or self.router_jitter_noise < 0:
            bad("router_aux_loss_coef and router_jitter_noise must be >= 0")
        if self.lightning_decay not in DECAY_CONVENTIONS:
            bad(f"lightning_decay must be one of {DECAY_CONVENTIONS}, got {self.lightning_decay!r}")
        if not isinstance(self.impl, ImplConfig):
            bad(f"impl must be an ImplConfig, got {type(self.impl).__name__}")
        self.impl.validate()

    # ---------------------------------------------------------------- derived facts
    @property
    def attention_dim(self) -> int:
        """Inner width of attention (num_heads * head_dim); 8192 for M1, not hidden_size."""
        return self.num_heads * self.head_dim

    @property
    def group_period(self) -> int:
        """Smallest period p of layer_types that divides num_layers (8 for M1: 7 lightning + 1 softmax).

        The model scans over num_layers // p identical groups of p layers, so an 80-layer model compiles
        one group. A non-periodic pattern gives p = num_layers (one group, layers unrolled).
        """
        types = self.layer_types
        for p in range(1, self.num_layers + 1):
            if self.num_layers % p == 0 and all(types[i] == types[i % p] for i in range(self.num_layers)):
                return p
        return self.num_layers

    @property
    def num_groups(self) -> int:
        return self.num_layers // self.group_period

    def head_slopes(self) -> np.ndarray:
        """Per-head slopes s_h. official: the ALiBi sequence of the official code (with its interleaving
        workaround for head counts that are not powers of two); transformers: 2^(-8 (h + 1) / H) for every H."""
        if self.lightning_decay == "transformers":
            return 2.0 ** (-8.0 * (np.arange(self.num_heads, dtype=np.float64) + 1) / self.num_heads)
        return np.asarray(_alibi_slopes(self.num_heads), np.float64)

    def layer_decay_factor(self, layer_idx):
        """Per-layer decay multiplier; works on traced l. official: 1 - l / (L - 1) + 1e-5 (1 + 1e-5 for one
        layer); transformers: 1 - l / (L - 1 + 1e-5) + 1e-5."""
        if self.lightning_decay == "transformers":
            return 1.0 - layer_idx / (self.num_layers - 1 + 1e-5) + 1e-5
        if self.num_layers <= 1:
            return 1.0 + 1e-5
        return 1.0 - layer_idx / (self.num_layers - 1) + 1e-5

    def lightning_decays(self) -> np.ndarray:
        """lambda[l, h] for every layer (rows of softmax layers are unused), float64."""
        layers = np.arange(self.num_layers, dtype=np.float64)
        return np.asarray(self.layer_decay_factor(layers))[:, None] * self.head_slopes()[None, :]

    @property
    def default_matmul_precision(self) -> str:
        """The matmul precision the model runs under: matmul_precision, with "auto" resolved by dtype."""
        if self.impl.matmul_precision != "auto":
            return self.impl.matmul_precision
        return "highest" if self.dtype == "float32" else "default"

    def replace(self, **changes) -> "ModelConfig":
        """A copy with fields changed: ModelConfig fields, and ImplConfig fields by name (into `impl`)."""
        impl = {k: changes.pop(k) for k in list(changes) if k in IMPL_FIELDS}
        if impl:
            changes["impl"] = dataclasses.replace(changes.get("impl", self.impl), **impl)
        return dataclasses.replace(self, **changes)


def _alibi_slopes(n: int) -> list[float]:
    def power_of_2(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def _hybrid_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """M1's pattern: softmax at layer i when i % period == period - 1, lightning elsewhere."""
    return tuple(SOFTMAX if i % period == period - 1 else LIGHTNING for i in range(num_layers))


def _m1() -> ModelConfig:
    return ModelConfig()


def _tiny() -> ModelConfig:
    # Trains in seconds on a laptop CPU: 2 groups of (1 lightning + 1 softmax), byte-level vocabulary.
    return ModelConfig(
            vocab_size=259, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
            layer_types=_hybrid_types(4, period=2), rotary_dim=8, rope_theta=10_000.0,
            max_position_embeddings=65_536, lightning_alpha=(2 * 4) ** 0.25, softmax_alpha=(2 * 4) ** 0.25,
            mlp_alpha=(2 * 4) ** 0.25, num_experts=4, num_experts_per_tok=2, expert_dim=128, dtype="float32")


def _cpu_100m() -> ModelConfig:
    # ~100M total parameters (98.2M; 31.9M active): 8 layers, one M1 group of 7 lightning + 1 softmax.
    return ModelConfig(
            vocab_size=259, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
            layer_types=_hybrid_types(8), rotary_dim=32, rope_theta=10_000.0, max_position_embeddings=1_048_576,
            lightning_alpha=(2 * 8) ** 0.25, softmax_alpha=(2 * 8) ** 0.25, mlp_alpha=(2 * 8) ** 0.25,
            num_experts=8, num_experts_per_tok=2, expert_dim=896, dtype="float32")


def _slice_1b() -> ModelConfig:
    # One M1 group (7 lightning + 1 softmax) at single-GPU width, for MFU: 1.77B total, 560M active parameters
    # (byte vocabulary, so the embedding and head are negligible and the MoE dominates). bf16 compute.
    return ModelConfig(
            vocab_size=259, hidden_size=2048, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=128,
            layer_types=_hybrid_types(8), rotary_dim=64, rope_theta=10_000_000.0,
            max_position_embeddings=1_048_576, lightning_alpha=(2 * 8) ** 0.25, softmax_alpha=(2 * 8) ** 0.25,
            mlp_alpha=(2 * 8) ** 0.25, num_experts=8, num_experts_per_tok=2, expert_dim=4096, dtype="bfloat16")


# name -> (architecture, the IMPL_PROFILES entry it runs with by default). The CPU-sized presets default to the
# CPU profile (they are run on CPUs: tests, the laptop job, bench_train against torch on CPU); pass
# impl="accelerator" (or any ImplConfig fields) to get_config to change it.
PRESETS = {
        "minimax-m1-80k": (_m1, "accelerator"),
        "minimax-m1-40k": (_m1, "accelerator"),
        "minimax-text-01": (_m1, "accelerator"),
        "tiny": (_tiny, "cpu"),
        "cpu-100m": (_cpu_100m, "cpu"),
        "slice-1b": (_slice_1b, "accelerator"),
}


def get_config(name: str, impl: str | None = None, **overrides) -> ModelConfig:
    """A preset by name with its default implementation profile (or `impl`, a name in IMPL_PROFILES), and optional
    field overrides (ModelConfig or ImplConfig fields)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    arch, profile = PRESETS[name]
    profile = profile if impl is None else impl
    if profile not in IMPL_PROFILES:
        raise ValueError(f"unknown implementation profile {profile!r}; profiles: {sorted(IMPL_PROFILES)}")
    return arch().replace(impl=IMPL_PROFILES[profile], **overrides)
