"""Mesh parsing, expert-axis factoring, the FSDP/tensor rules and their divisibility errors, multi-host
detection, and train.py's loop on a 4x2 mesh against a 1x1 mesh."""

import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1_jax import sharding
from m1_jax.config import get_config
from m1_jax.model import abstract_params, init_params
from m1_jax.train import distributed
from m1_jax.train.loop import train
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import tiny  # noqa: E402


def test_parse_positional_and_named():
    assert sharding.parse_mesh_shape("8x64", 512) == {"data": 8, "expert": 64}
    assert sharding.parse_mesh_shape("data=8,expert=64", 512) == {"data": 8, "expert": 64}
    assert sharding.parse_mesh_shape("2x2x2x4", 32) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 4}
    assert sharding.parse_mesh_shape("tensor=2,data=4", 8) == {"tensor": 2, "data": 4}
    assert sharding.mesh_device_count("8x64") == 512 and sharding.mesh_device_count(None) is None


@pytest.mark.parametrize("spec, n, message", [
    ("8x64", 8, "needs 512 devices, found 8"),
    ("data=8,expert=64", 256, "needs 512 devices, found 256"),
    ("8x", 8, "'' is not an integer"),
    ("data=2,pipeline=4", 8, "unknown axis 'pipeline'"),
    ("expert=2,expert=4", 8, "given twice"),
    ("8x-1", 8, ">= 1"),
])
def test_parse_errors(spec, n, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_shape(spec, n)


def test_expert_axis_factored_past_num_experts():
    assert sharding.factor_expert_axis({"data": 8, "expert": 64}, 32) == {"data": 8, "expert": 32, "expert_ffn": 2}
    assert sharding.factor_expert_axis({"data": 8, "expert": 64}, 64) == {"data": 8, "expert": 64}
    assert sharding.factor_expert_axis({"data": 2, "expert": 12}, 8) == {"data": 2, "expert": 4, "expert_ffn": 3}
    mesh = sharding.make_mesh("2x4", num_experts=2)
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "expert_ffn": 2}
    # expert_ffn is the fastest-varying sub-axis: device ids 0..7 laid out data-major.
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, np.arange(8).reshape(2, 2, 2))
    assert sharding.batch_parallelism(mesh) == 8


def test_param_specs_by_hand():
    mesh = sharding.abstract_mesh("8x64", 512, num_experts=32)
    # experts take `expert`, the FFN width `expert_ffn`, embed (FSDP) what is left: data.
    assert sharding.param_spec(("layers", "experts", "embed", "expert_mlp"), mesh) == \
        P(None, "expert", "data", "expert_ffn")
    assert sharding.param_spec(("layers", "experts", "expert_mlp", "embed"), mesh) == \
        P(None, "expert", "expert_ffn", "data")
    # Non-expert weights are FSDP-sharded over every batch axis (512 ways).
    assert sharding.param_spec(("vocab", "embed"), mesh) == P(None, ("data", "expert", "expert_ffn"))
    assert sharding.param_spec(("layers", "embed", "heads", "head_dim"), mesh) == \
        P(None, ("data", "expert", "expert_ffn"), None, None)
    mesh4 = sharding.abstract_mesh("2x2x2x4", 32)
    assert sharding.param_spec(("embed", "heads", "head_dim"), mesh4) == P(("fsdp", "data", "expert"), "tensor", None)
    assert sharding.param_spec(("experts", "embed", "expert_mlp"), mesh4) == P("expert", ("fsdp", "data"), "tensor")
    assert sharding.param_spec(("embed", "vocab"), mesh4) == P(("fsdp", "data", "expert"), "tensor")
    with pytest.raises(ValueError, match="'pipeline' has no rule"):
        sharding.param_spec(("embed", "pipeline"), mesh4)


def test_m1_fits_at_8x64():
    """The 456B model's fp32 params + Adam moments at 8x64, from shard shapes against a hand count."""
    cfg = get_config("minimax-m1-80k")
    mesh = sharding.abstract_mesh("8x64", 512, num_experts=cfg.num_experts)
    is_box = lambda x: hasattr(x, "names")  # noqa: E731
    boxed = abstract_params(cfg, boxed=True)
    sharding.check_param_divisibility(boxed, mesh)
    per_device, total = 0, 0
    for b in jax.tree.leaves(boxed, is_leaf=is_box):
        shard = NamedSharding(mesh, sharding.param_spec(b.names, mesh)).shard_shape(b.value.shape)
        per_device += int(np.prod(shard))
        total += int(np.prod(b.value.shape))
    # Hand count of the big pieces: 80 layers x 32 experts x 3 x 6144 x 9216 expert weights, 200064 x 6144
    # embedding and LM head, attention 6144 x 64 x 128 x (3 + 1 + 1) per layer (lightning: qkv, gate, out;
    # softmax: q, k, v (8 kv heads), o is less). All of these divide 512 ways.
    experts = 80 * 32 * 3 * 6144 * 9216
    assert 450e9 < total < 460e9 and experts < total
    assert per_device * 512 >= total and per_device < total / 512 * 1.01  # everything big is split 512 ways
    assert 12 * per_device < 12e9  # fp32 param + 2 moments: ~10.7 GB of 80


def test_divisibility_error_names_param_dim_and_axis():
    cfg = get_config("tiny").replace(hidden_size=36)  # 36 is not divisible by the 8-way FSDP split
    mesh = sharding.make_mesh("data=2,expert=4")
    with pytest.raises(ValueError, match=r"parameter embed \(259, 36\): dim 1 \('embed', size 36\) is not "
                                         r"divisible by mesh axes \('data', 'expert'\) \(size 8\)"):
        sharding.check_param_divisibility(abstract_params(cfg, boxed=True), mesh)
    cfg = get_config("tiny").replace(num_experts=3)
    with pytest.raises(ValueError, match=r"groups/layer_0/moe/w_gate .*'experts', size 3\) is not divisible by "
                                         r"mesh axes \('expert',\) \(size 4\)"):
        sharding.check_param_divisibility(abstract_params(cfg, boxed=True), mesh)
    with pytest.raises(ValueError, match=r"'heads' \(num_heads = 4\) is not divisible by mesh axes \('tensor',\)"):
        sharding.check_activation_divisibility(get_config("tiny"), sharding.make_mesh("data=1,tensor=8"))
    with pytest.raises(ValueError, match=r"'batch' \(micro-batch size .* = 4\) is not divisible"):
        sharding.check_activation_divisibility(get_config("tiny"), sharding.make_mesh("2x4"), 4)


def test_fsdp_shards_of_tiny_params():
    cfg = get_config("tiny")  # d=64, 4 experts of width 128, 4 heads of 16, vocab 259, 2 groups of 2 layers
    mesh = sharding.make_mesh("data=2,expert=4", num_experts=cfg.num_experts)
    tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig())
    state = state_lib.create_sharded_state(cfg, tx, 0, mesh)
    params = state.params
    expected = {  # hand-computed: embed split 8 ways (data x expert) unless expert is taken by the experts
        ("embed",): ((259, 64), (259, 8)),
        ("lm_head",): ((64, 259), (8, 259)),
        ("final_norm",): ((64,), (8,)),
        ("groups", "layer_0", "moe", "w_up"): ((2, 4, 64, 128), (2, 1, 32, 128)),
        ("groups", "layer_0", "moe", "w_down"): ((2, 4, 128, 64), (2, 1, 128, 32)),
        ("groups", "layer_0", "moe", "router"): ((2, 64, 4), (2, 8, 4)),
        ("groups", "layer_1", "attn", "q_proj"): ((2, 64, 4, 16), (2, 8, 4, 16)),
        ("groups", "layer_1", "attn", "o_proj"): ((2, 4, 16, 64), (2, 4, 16, 8)),
    }
    reference = init_params(cfg, jax.random.split(jax.random.PRNGKey(0))[0])  # unsharded, one device
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    for path, (shape, shard) in expected.items():
        leaf, ref, m = params, reference, mu
        for k in path:
            leaf, ref, m = leaf[k], ref[k], m[k]
        assert leaf.shape == shape, path
        assert {s.data.shape for s in leaf.addressable_shards} == {shard}, path
        assert {s.data.shape for s in m.addressable_shards} == {shard}, path  # moments sharded like params
        assert len(leaf.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))  # same values, only split


def test_multi_host_detection():
    assert distributed.multi_host_reason({}) is None
    assert distributed.multi_host_reason({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    assert "SLURM_NTASKS=16" in distributed.multi_host_reason({"SLURM_NTASKS": "16"})
    assert "2 TPU workers" in distributed.multi_host_reason({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"})
    assert distributed.multi_host_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.multi_host_reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) is not None
    assert distributed.should_initialize("on", {}) and not distributed.should_initialize("off", {"SLURM_NTASKS": "8"})
    assert distributed.should_initialize("auto", {"SLURM_NTASKS": "8"})
    with pytest.raises(ValueError, match="auto"):
        distributed.should_initialize("yes", {})


def test_train_loop_4x2_matches_1x1(tmp_path):
    """The loop train.py runs: same seed and global batch on 8 devices (4x2) and on one (1x1)."""
    def config():
        c = tiny.get_config()
        c.data.batch_size, c.data.seq_len = 8, 32
        c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 1e-2, 0, "constant"
        c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 3, 1, 0, 0
        c.train.tensorboard, c.train.async_checkpoint = False, False
        return c

    def losses(workdir):
        return [r["loss"] for r in read_metrics(workdir) if "loss" in r]

    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    train(config(), one, "1x1", devices=jax.devices()[:1])
    train(config(), many, "4x2")
    a, b = losses(one), losses(many)
    assert len(a) == 3 and len(b) == 3
    assert a[0] != a[2]  # it trains
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
