"""Parity with transformers' PyTorch MiniMaxForCausalLM, both checkpoint directions: our float32 logits
against transformers' float64 ones.

transformers 5.24 rotates the whole head (no partial RoPE), so these configs use rotary_dim == head_dim (partial
RoPE is tested against its formula in test_model.py). Its lightning decays follow its own convention, which
checkpoints of its format load with (test_transformers_checkpoint_with_any_head_count).
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from m1_jax import hf as hf_lib
from m1_jax.config import ModelConfig
from m1_jax.hf import load_checkpoint, save_checkpoint
from m1_jax.model import MiniMaxM1, init_params

import jax

REL_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    layer_types: tuple
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    block_size: int
    seq_len: int


CASES = [
    Case(("lightning", "softmax", "lightning", "lightning"), 4, 2, 4, 2, 16, 50),
    Case(("softmax", "lightning", "lightning"), 2, 1, 3, 2, 8, 37),
    Case(("lightning", "lightning", "softmax", "lightning", "lightning", "softmax"), 8, 8, 8, 2, 32, 70),
]


def _our_config(case: Case, seed: int) -> ModelConfig:
    rng = np.random.default_rng(seed)
    n = len(case.layer_types)
    return ModelConfig(
        vocab_size=97, hidden_size=32, num_layers=n, num_heads=case.heads, num_kv_heads=case.kv_heads,
        head_dim=8, layer_types=case.layer_types, rotary_dim=8, rope_theta=10_000.0,
        max_position_embeddings=4096, lightning_alpha=float(rng.uniform(0.5, 2)),
        lightning_beta=float(rng.uniform(0.5, 2)), softmax_alpha=float(rng.uniform(0.5, 2)),
        softmax_beta=float(rng.uniform(0.5, 2)), mlp_alpha=float(rng.uniform(0.5, 2)),
        mlp_beta=float(rng.uniform(0.5, 2)), num_experts=case.experts,
        num_experts_per_tok=case.top_k, expert_dim=48, dtype="float32", param_dtype="float32",
    ).replace(block_size=case.block_size, attention_block_q=16, attention_block_kv=16, remat_policy="none")


def _hf_model(hf_config: dict, seed: int):
    config = transformers.MiniMaxConfig(**{k: v for k, v in hf_config.items()
                                           if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MiniMaxForCausalLM(config).eval()
    with torch.no_grad():  # random weights well away from init (norm weights around 1)
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim > 1 else 0.2
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _assert_matches_transformers(ours, model, tokens):
    """Our float32 logits against transformers' in float64 (its eager expert loop: torch has no float64 grouped
    matmul): within REL_TOL, or, where rounding in six random layers amplifies beyond that, no farther from
    float64 than transformers' own float32 logits are."""
    fp64 = copy.deepcopy(model).double()
    fp64.config._experts_implementation = "eager"
    with torch.no_grad():
        truth = fp64(torch.as_tensor(tokens)).logits.numpy()
    bound = max(REL_TOL, _rel_err(_hf_logits(model, tokens), truth))
    assert _rel_err(ours, truth) <= bound, (_rel_err(ours, truth), bound)


# CI runs every case in at least one direction (case 0 in both); -m slow runs the rest.
@pytest.mark.parametrize("case_idx", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_hf_to_ours(tmp_path, case_idx):
    case = CASES[case_idx]
    cfg = _our_config(case, seed=case_idx)
    hf_model = _hf_model(hf_lib.config_to_hf(cfg), seed=case_idx)
    hf_model.save_pretrained(tmp_path)
    loaded_cfg, params = load_checkpoint(str(tmp_path), dtype="float32", attention_block_q=16,
                                         attention_block_kv=16, remat_policy="none")
    assert loaded_cfg.layer_types == cfg.layer_types
    tokens = np.random.default_rng(case_idx).integers(0, cfg.vocab_size, (2, case.seq_len))
    ours = np.asarray(jax.jit(MiniMaxM1(loaded_cfg).apply)({"params": params}, tokens)[0])
    _assert_matches_transformers(ours, hf_model, tokens)


@pytest.mark.parametrize("case_idx", [0, pytest.param(1, marks=pytest.mark.slow), 2])
def test_ours_to_hf(tmp_path, case_idx):
    case = CASES[case_idx]
    cfg = _our_config(case, seed=10 + case_idx)
    params = init_params(cfg.replace(initializer_range=0.1), jax.random.key(case_idx))
    # Norm weights away from 1 so a transposed or skipped norm would show.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape)
        if "norm" in str(path[-1]) else x, params)
    save_checkpoint(str(tmp_path), cfg, params)
    hf_model = transformers.MiniMaxForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    tokens = np.random.default_rng(100 + case_idx).integers(0, cfg.vocab_size, (2, case.seq_len))
    ours = np.asarray(jax.jit(MiniMaxM1(cfg).apply)({"params": params}, tokens)[0])
    _assert_matches_transformers(ours, hf_model, tokens)


# Keys of our config.json that transformers' MiniMaxConfig does not know: a checkpoint transformers itself writes
# has none of them (it then runs, and we must load, transformers' decay convention).
_NOT_TRANSFORMERS = ("attn_type_list", "rotary_dim", "postnorm", "shared_intermediate_size", "lightning_decay_convention",
                     *(f"layernorm_{a}_{b}" for a in ("linear_attention", "full_attention", "mlp") for b in ("alpha", "beta")))


@pytest.mark.parametrize("heads,kv_heads", [pytest.param(4, 2, marks=pytest.mark.slow),
                                             pytest.param(6, 2, marks=pytest.mark.slow), (12, 4)])
def test_transformers_checkpoint_with_any_head_count(tmp_path, heads, kv_heads):
    """A checkpoint of transformers' own making loads with transformers' decays (its slopes are not the
    official ones unless the head count is a power of two), and saves back to the same logits."""
    case = Case(("lightning", "softmax", "lightning"), heads, kv_heads, 4, 2, 16, 40)
    cfg = _our_config(case, seed=heads).replace(lightning_decay="transformers")
    native = {k: v for k, v in hf_lib.config_to_hf(cfg).items() if k not in _NOT_TRANSFORMERS}
    hf_model = _hf_model(native, seed=heads)
    hf_model.save_pretrained(tmp_path / "hf")
    loaded_cfg, params = load_checkpoint(str(tmp_path / "hf"), dtype="float32", attention_block_q=16,
                                         attention_block_kv=16, remat_policy="none")
    assert loaded_cfg.lightning_decay == "transformers"
    tokens = np.random.default_rng(heads).integers(0, cfg.vocab_size, (2, case.seq_len))
    logits = lambda c, p: np.asarray(jax.jit(MiniMaxM1(c).apply)({"params": p}, tokens)[0])  # noqa: E731
    ref = _hf_logits(hf_model, tokens)
    _assert_matches_transformers(logits(loaded_cfg, params), hf_model, tokens)
    official = _rel_err(logits(loaded_cfg.replace(lightning_decay="official"), params), ref)
    assert (official <= REL_TOL) == (heads & (heads - 1) == 0), official  # the conventions differ off powers of 2

    save_checkpoint(str(tmp_path / "ours"), loaded_cfg, params)
    again = transformers.MiniMaxForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager")
    assert _rel_err(_hf_logits(again.eval(), tokens), ref) <= REL_TOL
    assert load_checkpoint(str(tmp_path / "ours"))[0].lightning_decay == "transformers"
