"""Forward FLOPs of MiniMax-M1-style models, and the generation-FLOPs curves of the report's Figure 1 (right).

Convention ("ours"): 2 FLOPs per multiply-add, matmuls only (norms, activations, softmax exp, decay scaling
and the embedding gather are not counted; they are O(D) per token against O(D^2)).

Training / prefill (`forward_flops`, `forward_flops_per_token`), per layer and token:
  - projections:  2 * in * out for each weight matrix the token goes through (top-k experts only, router included);
  - softmax attention: query t (0-based) sees t + 1 keys, 2 * H * (d_qk + d_v) FLOPs per key (QK^T and PV).
    By default this is the exact causal count (model FLOPs, the MFU convention). With `softmax_blocks=True` it
    counts what `blockwise_attention` executes instead: every [block_q, block_kv] tile on or below the diagonal,
    in full;
  - lightning attention (blockwise algorithm, block C, padded to whole blocks): per block and head the intra-block
    (Q K^T) and (.. ) V products over the full C x C tile (2 C^2 d_k + 2 C^2 d_v; the kernel computes the masked
    tile whole), the inter-block Q S_prev (2 C d_k d_v) and the state update K^T V (2 C d_k d_v).
  - LM head 2 * D * V.

Generation (`generation_flops`): token-by-token decode from an empty prompt, the token at position t (0-based)
costs  linear + lightning_state + softmax_per_key * (t + 1), where lightning layers run the recurrence
(S = e^-l S + k^T v, o = q S: 4 d_k d_v per head) and softmax layers read t + 1 cached keys. Summed over N tokens
that is  a * N + c * N (N + 1) / 2.

The report's Figure 1 uses a different convention (spec section 7): F(N) = a N + b N^2 with a = 2 x active matmul
params (LM head in, embedding and routers out) and b = L_attn * h * (d_qk + 2 d_v). Ours counts 2 * h * (d_qk + d_v)
per key, i.e. b_ours = L_attn * h * (d_qk + d_v); `report_convention_coefficients` gives theirs, `REPORT_FITTED` the
coefficients fitted to the plotted curves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from m1_jax.config import LIGHTNING, SOFTMAX, ModelConfig, get_config

K_TOKENS = 1024  # the report's "K" on the generation-length axis


# ------------------------------------------------------------------ the two comparison architectures
@dataclasses.dataclass(frozen=True)
class MLAMoEConfig:
    """DeepSeek-V3 / R1: multi-head latent attention, dense first layers then routed + shared experts."""

    vocab_size: int = 129_280
    hidden_size: int = 7168
    num_layers: int = 61
    num_dense_layers: int = 3
    dense_ffn_dim: int = 18_432
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_routed_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    expert_dim: int = 2048


@dataclasses.dataclass(frozen=True)
class GQAMoEConfig:
    """Qwen3-MoE: grouped-query softmax attention in every layer, routed experts only."""

    vocab_size: int = 151_936
    hidden_size: int = 4096
    num_layers: int = 94
    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    expert_dim: int = 1536


ModelLike = Union[ModelConfig, MLAMoEConfig, GQAMoEConfig, str]

# Coefficients of F(N) = a N + b N^2 fitted to the report's plotted curves (spec section 7).
REPORT_FITTED = {
    "deepseek-r1": (7.54145e10, 3_497_984.0),
    "qwen3-235b-a22b": (4.30367e10, 2_310_144.0),
    "minimax-m1-80k": (1.04531e11, 196_608.0),
}


def resolve(model: ModelLike):
    """A config object from a config or one of the names "minimax-m1-80k", "deepseek-r1", "qwen3-235b-a22b"."""
    if isinstance(model, (ModelConfig, MLAMoEConfig, GQAMoEConfig)):
        return model
    if model == "deepseek-r1":
        return MLAMoEConfig()
    if model == "qwen3-235b-a22b":
        return GQAMoEConfig()
    if model == "minimax-m1-80k":
        return get_config("minimax-m1-80k")
    raise ValueError(f"unknown model {model!r}; pass a ModelConfig/MLAMoEConfig/GQAMoEConfig or one of "
                     "'minimax-m1-80k', 'deepseek-r1', 'qwen3-235b-a22b'")


# ------------------------------------------------------------------ per-token pieces
@dataclasses.dataclass(frozen=True)
class TokenProfile:
    """Per-token forward FLOPs pieces; the decode cost of position t is linear + lightning_state + per_key * (t+1)."""

    matmul_params: int  # active matmul params the token goes through, LM head and routers included
    router_params: int
    softmax_layers: int
    softmax_heads: int
    d_qk: int
    d_v: int
    lightning_layers: int
    lightning_heads: int
    d_k: int  # lightning key width
    d_lv: int  # lightning value width

    @property
    def linear(self) -> int:
        return 2 * self.matmul_params

    @property
    def softmax_per_key(self) -> int:
        return 2 * self.softmax_layers * self.softmax_heads * (self.d_qk + self.d_v)

    @property
    def lightning_state(self) -> int:
        """Recurrent decode: rank-1 state update k^T v (2 dk dv) and readout q S (2 dk dv) per head."""
        return self.lightning_layers * self.lightning_heads * 4 * self.d_k * self.d_lv


def _m1_profile(cfg: ModelConfig) -> TokenProfile:
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n_lin = sum(t == LIGHTNING for t in cfg.layer_types)
    n_soft = sum(t == SOFTMAX for t in cfg.layer_types)
    lightning = D * 3 * H * Dh + D * H * Dh + H * Dh * D  # qkv_proj, output_gate, out_proj
    softmax = D * H * Dh + 2 * D * K * Dh + H * Dh * D  # q, k, v, o
    router = D * cfg.num_experts
    experts = cfg.num_experts_per_tok * 3 * D * cfg.expert_dim
    head = D * cfg.vocab_size
    params = n_lin * lightning + n_soft * softmax + cfg.num_layers * (router + experts) + head
    return TokenProfile(params, cfg.num_layers * router, n_soft, H, Dh, Dh, n_lin, H, Dh, Dh)


def _mla_profile(c: MLAMoEConfig) -> TokenProfile:
    D, H = c.hidden_size, c.num_heads
    d_qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    # Naive (non-absorbed) MLA: q down/up, kv down (+ shared rope key), kv up to per-head k_nope and v, out.
    attn = (D * c.q_lora_rank + c.q_lora_rank * H * d_qk + D * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
    n_moe = c.num_layers - c.num_dense_layers
    dense_ffn = 3 * D * c.dense_ffn_dim
    moe = (c.num_experts_per_tok + c.num_shared_experts) * 3 * D * c.expert_dim
    router = D * c.num_routed_experts
    params = (c.num_layers * attn + c.num_dense_layers * dense_ffn + n_moe * (moe + router)
              + D * c.vocab_size)
    return TokenProfile(params, n_moe * router, c.num_layers, H, d_qk, c.v_head_dim, 0, 0, 0, 0)


def _gqa_profile(c: GQAMoEConfig) -> TokenProfile:
    D, H, K, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
    moe = c.num_experts_per_tok * 3 * D * c.expert_dim
    router = D * c.num_experts
    params = c.num_layers * (attn + moe + router) + D * c.vocab_size
    return TokenProfile(params, c.num_layers * router, c.num_layers, H, Dh, Dh, 0, 0, 0, 0)


def token_profile(model: ModelLike) -> TokenProfile:
    cfg = resolve(model)
    if isinstance(cfg, ModelConfig):
        return _m1_profile(cfg)
    if isinstance(cfg, MLAMoEConfig):
        return _mla_profile(cfg)
    return _gqa_profile(cfg)


def active_matmul_params(model: ModelLike, *, include_router: bool = False) -> int:
    """Active matmul parameters per token: LM head included, embedding excluded, routers optional."""
    p = token_profile(model)
    return p.matmul_params - (0 if include_router else p.router_params)


# ------------------------------------------------------------------ training / prefill forward
def softmax_attention_flops(seq_len: int, num_heads: int, d_qk: int, d_v: int, *, block_q=None,
                            block_kv=None) -> int:
    """One layer's QK^T + PV FLOPs over a causal sequence (the projections are counted elsewhere).

    block_q/block_kv None: exact causal count, sum_t (t + 1) keys. Given: the tiles `blockwise_attention`
    executes (key block j is skipped only when wholly in the future of query block i), each computed in full,
    on the sequence padded to a multiple of lcm(block_q, block_kv).
    """
    per_pair = 2 * num_heads * (d_qk + d_v)
    if block_q is None:
        return per_pair * seq_len * (seq_len + 1) // 2
    bq, bk = min(block_q, seq_len), min(block_kv, seq_len)
    step = math.lcm(bq, bk)
    padded = -(-seq_len // step) * step
    tiles = sum(1 for i in range(padded // bq) for j in range(padded // bk) if j * bk <= i * bq + bq - 1)
    return per_pair * tiles * bq * bk


def lightning_attention_flops(seq_len: int, num_heads: int, d_k: int, d_v: int, block_size: int) -> int:
    """One layer's blockwise lightning attention (no projections), the sequence padded to whole blocks."""
    C = min(block_size, seq_len)
    blocks = -(-seq_len // C)
    intra = 2 * C * C * d_k + 2 * C * C * d_v
    inter_and_state = 2 * (2 * C * d_k * d_v)
    return blocks * num_heads * (intra + inter_and_state)


def forward_flops(cfg: ModelLike, seq_len: int, *, softmax_blocks: bool = False) -> int:
    """Forward FLOPs of one whole sequence of `seq_len` tokens (batch 1), training/prefill mode.

    For M1-style configs lightning layers use the blockwise algorithm with cfg.impl.block_size. For R1/Qwen3 only
    softmax attention exists. softmax_blocks=True counts executed tiles of blockwise attention (M1 configs only).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    cfg = resolve(cfg)
    p = token_profile(cfg)
    total = p.linear * seq_len
    blocks = {}
    if softmax_blocks:
        if not isinstance(cfg, ModelConfig):
            raise ValueError("softmax_blocks=True needs a ModelConfig (it reads attention_block_q/kv)")
        blocks = dict(block_q=cfg.impl.attention_block_q, block_kv=cfg.impl.attention_block_kv)
    total += p.softmax_layers * softmax_attention_flops(seq_len, p.softmax_heads, p.d_qk, p.d_v, **blocks)
    if p.lightning_layers:
        total += p.lightning_layers * lightning_attention_flops(seq_len, p.lightning_heads, p.d_k, p.d_lv,
                                                                cfg.impl.block_size)
    return int(total)


def forward_flops_per_token(cfg: ModelLike, context_len: int) -> float:
    """Forward FLOPs per token, AVERAGED over a sequence of `context_len` tokens (= forward_flops / context_len).

    This is the per-token training cost of a packed sequence of that length; MFU uses 3x this (forward +
    backward), times tokens per second.
    """
    return forward_flops(cfg, context_len) / context_len


# ------------------------------------------------------------------ generation (Figure 1, right)
def generation_coefficients(model: ModelLike) -> tuple[float, float]:
    """(a, b) with our cumulative generation FLOPs = a N + b N^2 exactly (b N^2 + b N from the (t+1) keys)."""
    p = token_profile(model)
    b = p.softmax_per_key / 2
    return float(p.linear + p.lightning_state + b), float(b)


def generation_flops(model: ModelLike, num_tokens):
    """Cumulative forward FLOPs to generate `num_tokens` tokens one by one from an empty prompt (our convention).

    Token t (0-based) costs linear + lightning_state + softmax_per_key * (t + 1); the sum is
    N (linear + lightning_state) + softmax_per_key * N (N + 1) / 2. Works elementwise on numpy arrays.
    """
    p = token_profile(model)
    n = num_tokens
    return n * (p.linear + p.lightning_state) + p.softmax_per_key * n * (n + 1) / 2


def report_convention_coefficients(model: ModelLike) -> tuple[int, int]:
    """(a, b) under the convention the report's curves fit (spec section 7), from the architecture.

    a = 2 x active matmul params (LM head in, embedding and routers out); b = L_attn * h * (d_qk + 2 d_v).
    For M1 this uses all softmax layers of the config (10 for the real model; the plot's b matches 8).
    """
    p = token_profile(model)
    a = 2 * (p.matmul_params - p.router_params)
    b = p.softmax_layers * p.softmax_heads * (p.d_qk + 2 * p.d_v)
    return a, b


def fitted_generation_flops(name: str, num_tokens):
    """F(N) = a N + b N^2 with the coefficients fitted to the report's plotted curve of `name`."""
    if name not in REPORT_FITTED:
        raise ValueError(f"no fitted curve for {name!r}; have {sorted(REPORT_FITTED)}")
    a, b = REPORT_FITTED[name]
    return a * num_tokens + b * num_tokens * num_tokens
