"""HF checkpoint interop: names against the official index, errors, fused names, sharded streaming."""

import gzip
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from m1_jax.config import get_config
from m1_jax.hf import hf_tensor_shapes, load_checkpoint, save_checkpoint
from m1_jax.model import init_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "minimax_m1")  # the official files, committed


def test_names_match_official_index_exactly():
    with gzip.open(os.path.join(FIXTURES, "model.safetensors.index.json.gz"), "rt") as f:
        index = json.load(f)
    official = set(index["weight_map"])
    assert index["metadata"]["total_size"] == 912_210_767_872
    ours = hf_tensor_shapes(get_config("minimax-m1-80k"))
    assert len(official) == 8243
    assert set(ours) == official
    assert ours["model.layers.0.self_attn.qkv_proj.weight"] == (24576, 6144)
    assert ours["model.layers.7.self_attn.k_proj.weight"] == (1024, 6144)
    assert ours["model.layers.3.block_sparse_moe.experts.31.w2.weight"] == (6144, 9216)


def _tiny_checkpoint(tmp_path, seed=0):
    cfg = get_config("tiny")
    params = init_params(cfg, jax.random.key(seed))
    save_checkpoint(str(tmp_path), cfg, params, max_shard_bytes=200_000)  # several shards + index
    return cfg, params


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_sharded_files(tmp_path):
    cfg, params = _tiny_checkpoint(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    loaded_cfg, loaded = load_checkpoint(str(tmp_path), dtype=cfg.dtype, impl=cfg.impl)
    assert loaded_cfg == cfg
    _assert_same(params, loaded)


def test_layout_by_hand(tmp_path):
    # The fused qkv of the checkpoint is per head [q|k|v]; check one element by hand.
    cfg, params = _tiny_checkpoint(tmp_path)
    tensors = {}
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(tmp_path, f)))
    W = tensors["model.layers.2.self_attn.qkv_proj.weight"]  # layer 2 = group 1, position 0
    Dh = cfg.head_dim
    h, j, d = 3, 5, 7  # head 3, the k part (offset Dh), channel 5, input dim 7
    assert W[h * 3 * Dh + Dh + j, d] == np.asarray(params["groups"]["layer_0"]["attn"]["qkv_proj"])[1, d, h, Dh + j]
    w1 = tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"]  # [F, D]
    assert w1[4, 6] == np.asarray(params["groups"]["layer_1"]["moe"]["w_gate"])[0, 2, 6, 4]
    assert tensors["model.layers.1.block_sparse_moe.gate.weight"].dtype == np.float32


def _rewrite(tmp_path, edit):
    tensors = {}
    for f in sorted(os.listdir(tmp_path)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(tmp_path, f)))
            os.remove(os.path.join(tmp_path, f))
    os.remove(os.path.join(tmp_path, "model.safetensors.index.json"))
    edit(tensors)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))


def test_missing_tensor_named(tmp_path):
    _tiny_checkpoint(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.3.self_attn.o_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.3\.self_attn\.o_proj\.weight "
                                         r"\(expected shape \(64, 64\)\)"):
        load_checkpoint(str(tmp_path))


def test_unexpected_tensor_named(tmp_path):
    _tiny_checkpoint(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.bias": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.bias \(shape \(3,\)\)"):
        load_checkpoint(str(tmp_path))


def test_misshaped_tensor_named(tmp_path):
    _tiny_checkpoint(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(65,\), expected \(64,\)"):
        load_checkpoint(str(tmp_path))


def test_decay_buffers_ignored_and_fused_names_load(tmp_path):
    cfg, params = _tiny_checkpoint(tmp_path)
    F = cfg.expert_dim

    def to_fused(t):  # transformers' in-memory names: mlp.gate + fused gate_up_proj / down_proj
        for layer in range(cfg.num_layers):
            pre = f"model.layers.{layer}."
            experts = range(cfg.num_experts)
            w1 = [t.pop(f"{pre}block_sparse_moe.experts.{e}.w1.weight") for e in experts]
            w3 = [t.pop(f"{pre}block_sparse_moe.experts.{e}.w3.weight") for e in experts]
            w2 = [t.pop(f"{pre}block_sparse_moe.experts.{e}.w2.weight") for e in experts]
            t[f"{pre}mlp.experts.gate_up_proj"] = np.concatenate([np.stack(w1), np.stack(w3)], axis=1)
            t[f"{pre}mlp.experts.down_proj"] = np.stack(w2)
            t[f"{pre}mlp.gate.weight"] = t.pop(f"{pre}block_sparse_moe.gate.weight")
            t[f"{pre}self_attn.slope_rate"] = np.ones((cfg.num_heads, 1, 1), np.float32)
        assert t[f"{pre}mlp.experts.gate_up_proj"].shape == (cfg.num_experts, 2 * F, cfg.hidden_size)

    _rewrite(tmp_path, to_fused)
    _, loaded = load_checkpoint(str(tmp_path))
    _assert_same(params, loaded)


def test_streams_onto_a_mesh(tmp_path):
    cfg, params = _tiny_checkpoint(tmp_path)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    # experts over "model", the layer-group axis over "data": each device reads only its slice
    def spec(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        if names[-1] in ("w_gate", "w_up", "w_down"):
            return NamedSharding(mesh, PartitionSpec("data", "model"))
        return NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map_with_path(spec, params)
    _, loaded = load_checkpoint(str(tmp_path), shardings=shardings)
    w = loaded["groups"]["layer_0"]["moe"]["w_gate"]
    assert w.sharding == shardings["groups"]["layer_0"]["moe"]["w_gate"]
    assert w.addressable_shards[0].data.shape == (1, 1, cfg.hidden_size, cfg.expert_dim)
    _assert_same(params, loaded)
