"""ModelConfig: presets, official/transformers config mapping, validation, exact parameter counts."""

import json
import os
import warnings

import numpy as np
import pytest

from m1_jax import hf as hf_lib
from m1_jax.config import LIGHTNING, SOFTMAX, ModelConfig, get_config
from m1_jax.model import count_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "minimax_m1")  # the official files, committed


def _official():
    with open(os.path.join(FIXTURES, "config.json")) as f:
        return json.load(f)


def test_official_config_reads_as_m1_preset():
    cfg = hf_lib.config_from_hf(_official())
    assert cfg == get_config("minimax-m1-80k")
    assert cfg.layer_types.count(SOFTMAX) == 10 and cfg.layer_types.count(LIGHTNING) == 70
    assert [i for i, t in enumerate(cfg.layer_types) if t == SOFTMAX] == list(range(7, 80, 8))
    assert cfg.rotary_dim == 64 and cfg.rope_theta == 1e7 and cfg.lightning_norm_eps == 1e-6
    assert cfg.lightning_alpha == pytest.approx((2 * 80) ** 0.25)
    assert cfg.group_period == 8 and cfg.num_groups == 10


def test_presets_share_one_architecture():
    m1 = get_config("minimax-m1-80k")
    assert get_config("minimax-m1-40k") == m1 == get_config("minimax-text-01")
    with pytest.raises(ValueError, match="unknown config"):
        get_config("minimax-m2")


def test_m1_parameter_counts_exact():
    # Spec §6: 456,089,655,296 total; 45,944,920,064 active (top-2 experts, no embedding or head).
    assert count_params(get_config("minimax-m1-80k")) == {"total": 456_089_655_296, "active": 45_944_920_064}


def test_parameter_count_by_hand_tiny():
    cfg = get_config("tiny")
    D, V, H, K, Dh, E, F, k = (cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                               cfg.num_experts, cfg.expert_dim, cfg.num_experts_per_tok)
    lightning = 3 * H * Dh * D + H * Dh * D + H * Dh + H * Dh * D
    softmax = 2 * H * Dh * D + 2 * K * Dh * D
    per_layer = 2 * D + D * E + 3 * E * D * F
    n_l, n_s = cfg.layer_types.count(LIGHTNING), cfg.layer_types.count(SOFTMAX)
    total = 2 * V * D + D + n_l * lightning + n_s * softmax + cfg.num_layers * per_layer
    active = total - 2 * V * D - cfg.num_layers * (E - k) * 3 * D * F
    assert count_params(cfg) == {"total": total, "active": active}


def test_official_round_trip_and_transformers_keys():
    cfg = get_config("minimax-m1-80k")
    assert hf_lib.config_from_hf(hf_lib.config_to_hf(cfg, "official")) == cfg
    with pytest.warns(UserWarning, match="transformers 5.24"):
        hf = hf_lib.config_to_hf(cfg)
    assert hf["layer_types"][7] == "full_attention" and hf["layer_types"][0] == "linear_attention"
    assert hf["rotary_dim"] == 64 and hf["linear_attn_alpha_factor"] == cfg.lightning_alpha
    # transformers-only keys (no attn_type_list, no rotary_dim) read back to the same model
    tf_only = {k: v for k, v in hf.items() if k not in ("attn_type_list",) and not k.startswith("layernorm_")}
    assert hf_lib.config_from_hf(tf_only) == cfg


def test_whole_head_rope_when_no_rotary_key():
    hf = hf_lib.config_to_hf(get_config("tiny"), "official")
    del hf["rotary_dim"]
    assert hf_lib.config_from_hf(hf).rotary_dim == hf["head_dim"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    assert hf_lib.config_from_hf(hf).rotary_dim == hf["head_dim"] // 2


def test_no_warning_for_whole_head_rope():
    cfg = get_config("tiny").replace(rotary_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_lib.config_to_hf(cfg)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=4), "divisible by num_kv_heads"),
    (dict(rotary_dim=7), "rotary_dim must be even"),
    (dict(rotary_dim=32), "rotary_dim must be even"),
    (dict(num_layers=5), "len\\(layer_types\\)=4 != num_layers=5"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok \\(5\\) > num_experts \\(4\\)"),
    (dict(layer_types=("lightning", "mamba", "lightning", "softmax")), "unknown layer type"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(remat_policy="some"), "remat_policy"),
])
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **changes)


def test_bad_attn_type_code():
    hf = hf_lib.config_to_hf(get_config("tiny"), "official")
    hf["attn_type_list"] = [0, 2, 0, 1]
    with pytest.raises(ValueError, match="attn_type_list holds 2"):
        hf_lib.config_from_hf(hf)


def test_decay_slopes_match_official_formula():
    # ALiBi slopes 2^(-8(h+1)/H) for power-of-two H; the official interleave for other H.
    cfg = get_config("minimax-m1-80k")
    np.testing.assert_allclose(cfg.head_slopes(), 2.0 ** (-(np.arange(64) + 1) / 8), rtol=1e-12)
    odd = get_config("tiny").replace(num_heads=6, num_kv_heads=2)
    base4 = 2.0 ** (-2.0 * (np.arange(4) + 1))  # power-of-two part for 4 heads
    base8 = 2.0 ** (-1.0 * (np.arange(8) + 1))
    np.testing.assert_allclose(odd.head_slopes(), np.concatenate([base4, base8[0::2][:2]]), rtol=1e-12)
    decays = cfg.lightning_decays()
    np.testing.assert_allclose(decays[0], cfg.head_slopes() * (1 + 1e-5))
    np.testing.assert_allclose(decays[79], cfg.head_slopes() * 1e-5)
    np.testing.assert_allclose(decays[40], cfg.head_slopes() * (1 - 40 / 79 + 1e-5))


def test_transformers_decay_convention_by_hand():
    # transformers: 2^(-8(h+1)/H) for every H (no interleave), layer factor 1 - l / (L - 1 + 1e-5) + 1e-5.
    odd = get_config("tiny").replace(num_heads=6, num_kv_heads=2, lightning_decay="transformers")
    np.testing.assert_allclose(odd.head_slopes(), 2.0 ** (-8.0 * np.arange(1, 7) / 6), rtol=1e-12)
    np.testing.assert_allclose(odd.lightning_decays()[3], odd.head_slopes() * (1 - 3 / (3 + 1e-5) + 1e-5), rtol=1e-12)


def test_decay_convention_follows_the_checkpoint_format():
    assert hf_lib.config_from_hf(_official()).lightning_decay == "official"
    native = {k: v for k, v in hf_lib.config_to_hf(get_config("tiny")).items() if k != "lightning_decay_convention"}
    assert hf_lib.config_from_hf(native).lightning_decay == "transformers"  # model_type "minimax": transformers' code
    for convention in ("official", "transformers"):  # our own files say which, in either style
        cfg = get_config("tiny", num_heads=6, num_kv_heads=2, lightning_decay=convention)
        assert hf_lib.config_from_hf(hf_lib.config_to_hf(cfg, convention)).lightning_decay == convention
        other = "transformers" if convention == "official" else "official"
        # The other format's code would compute other decays for 6 heads: refused, not written.
        with pytest.raises(ValueError, match=f"{other} code computes decays"):
            hf_lib.config_to_hf(cfg, other)
    with pytest.raises(ValueError, match="lightning_decay must be one of"):
        get_config("tiny", lightning_decay="fla")
