"""--mesh parsing, the logical rules, and a 2x4 (data x expert) train step against a 1-device run."""

import jax
import numpy as np
import pytest

from m1_jax import sharding
from m1_jax.config import get_config
from m1_jax.train import optimizer as opt_lib
from m1_jax.train import state as state_lib
from m1_jax.train import step as step_lib


def test_parse_mesh_shapes():
    assert sharding.parse_mesh_shape(None, 8) == {"data": 8}
    assert sharding.parse_mesh_shape("8x64", 512) == {"data": 8, "expert": 64}
    assert sharding.parse_mesh_shape("2x2x2", 8) == {"data": 2, "fsdp": 2, "expert": 2}
    assert sharding.parse_mesh_shape("data=2, expert=4", 8) == {"data": 2, "expert": 4}


@pytest.mark.parametrize("spec, message", [
    ("8x64", "needs 512 devices, found 8"),
    ("2xfoo", "'foo' is not an integer"),
    ("data=2,model=4", "unknown axis 'model'"),
    ("data=2,data=4", "given twice"),
    ("0x8", ">= 1"),
    ("1x1x1x1x8", "has 5 dims"),
])
def test_parse_mesh_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_shape(spec, 8)


def test_make_mesh_and_rules():
    mesh = sharding.make_mesh("2x4")
    assert dict(mesh.shape) == {"data": 2, "expert": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    rules = dict(sharding.logical_rules(mesh))
    assert rules["batch"] == ("data", "expert") and rules["experts"] == ("expert",) and rules["embed"] is None
    assert sharding.batch_parallelism(mesh) == 8


def _run(cfg, mesh, batches, steps):
    oc = opt_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", total_steps=steps)
    tx = opt_lib.make_optimizer(oc)
    shardings = state_lib.state_shardings(cfg, tx, mesh)
    state = state_lib.create_sharded_state(cfg, tx, 0, mesh)
    step = step_lib.make_train_step(cfg, tx, opt_lib.make_schedule(oc), grad_accum_steps=2, mesh=mesh,
                                    state_shardings=shardings)
    out = []
    for b in batches:
        state, m = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
        out.append(float(m["loss"]))
    return out, state


@pytest.mark.slow
def test_2x4_mesh_matches_one_device():
    cfg = get_config("tiny")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(0, 256, (16, 32)).astype(np.int32)
        seg = np.ones_like(tokens)
        seg[:, 20:] = 2  # two documents per row
        pos = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(16, 0).astype(np.int32)
        mask = rng.random(tokens.shape) < 0.8
        batches.append({"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": seg,
                        "positions": pos, "loss_mask": mask.astype(np.float32)})
    one, _ = _run(cfg, sharding.make_mesh(None, jax.devices()[:1]), batches, 3)
    many, state = _run(cfg, sharding.make_mesh("2x4"), batches, 3)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)
    # The experts really are split over the expert axis.
    w_up = state.params["groups"]["layer_0"]["moe"]["w_up"]
    assert w_up.sharding.spec[1] == "expert" and len(w_up.sharding.device_set) == 8
