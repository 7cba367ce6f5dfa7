"""The dry run: abstract state, sharded compile, per-device memory table (tiny model; full M1 is `slow`)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from m1_jax.train.loop import build_setup
from m1_jax.train import dry_run as dry_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import tiny  # noqa: E402


def _env_without_fake_devices():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # train.py must add the fake devices itself
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_dry_run_numbers_against_hand_count():
    c = tiny.get_config()
    c.data.batch_size, c.data.seq_len = 8, 32
    setup = build_setup(c, "data=2,expert=4")
    out = dry_lib.dry_run(setup, groups=None, print_fn=lambda s: None)
    cfg = setup.model
    # Hand count of fp32 bytes per device (mesh data=2 x expert=4; embed split 8 ways, or 2 ways in the
    # experts' weights whose expert dim takes the expert axis; head-shaped norms are replicated).
    D, V, E, F, H, K, Dh, G = 64, 259, 4, 128, 4, 2, 16, 2
    per_layer_common = 2 * D / 8 + E * D / 8 + 3 * E * D * F / 8  # 2 norms, router, w_gate/w_up/w_down
    lightning = 3 * D * H * Dh / 8 + D * H * Dh / 8 + H * Dh + H * Dh * D / 8  # qkv, gate, norm, out
    softmax = D * H * Dh / 8 + 2 * D * K * Dh / 8 + H * Dh * D / 8
    elements = 2 * V * D / 8 + D / 8 + G * (2 * per_layer_common + lightning + softmax)
    assert cfg.num_groups == G and cfg.group_period == 2
    assert out["param_bytes"] == 4 * elements
    assert 2 * 4 * elements <= out["opt_bytes"] <= 2 * 4 * elements + 16  # Adam mu, nu (+ int32 step counts)
    # XLA's own plan agrees with the shard shapes: arguments are the state plus this device's batch rows.
    batch_bytes = 5 * 4 * (8 // 8) * 32
    scalars = 4 * 3 + 8 + 4  # step, bad_steps, first_bad_step, rng key, clip/adam counts
    args = out["compiled"]["argument_size_in_bytes"]
    assert out["param_bytes"] + out["opt_bytes"] + batch_bytes <= args <= \
        out["param_bytes"] + out["opt_bytes"] + batch_bytes + scalars + 64
    assert out["compiled"]["temp_size_in_bytes"] > 0 and out["fits"] == {"H100 80GB": True, "TPU v5p 95GB": True}
    assert out["depths"] == [G]


@pytest.mark.slow
def test_train_py_dry_run_fakes_devices_and_prints_table():
    # 16 devices > the 8 of this test process: train.py must fake them before importing jax.
    cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--mesh=4x4", "--dry_run",
           "--dry_run_groups=1", "--config.data.batch_size=16", "--config.data.seq_len=32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_fake_devices(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "mesh {'data': 4, 'expert': 4} over 16 cpu devices" in out
    assert "compiled 1 and 2 of 2 layer groups" in out and "extrapolated" in out
    for row in ("params (shard shapes)", "optimizer state (shard shapes)", "compiled temporaries",
                "peak = args + outputs - aliased + temps", "fits H100 80GB", "fits TPU v5p 95GB"):
        assert row in out, row


def test_train_py_dry_run_rejects_bad_mesh_before_compiling():
    cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--mesh=2x3", "--dry_run",
           "--config.data.batch_size=6"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_fake_devices(), timeout=300)
    assert res.returncode == 2
    # tiny has 4 experts: a 3-way expert axis cannot split them; the message names the parameter.
    assert "moe/w_gate" in res.stderr and "'experts', size 4) is not divisible by mesh axes ('expert',) (size 3)" \
        in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_full_m1_dry_run_fits():
    """python experiments/train.py --config=experiments/configs/minimax_m1.py --mesh=8x64 --dry_run --dry_run_groups=0

    Full depth: the 1-and-2-group extrapolation of the default is unreliable here (its temporaries shrink
    with depth), and the scanned groups compile in about the same time."""
    cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
           "--config=" + os.path.join(REPO, "experiments", "configs", "minimax_m1.py"), "--mesh=8x64", "--dry_run",
           "--dry_run_groups=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env_without_fake_devices(), timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "over 512 cpu devices" in res.stdout and "compiled the full depth (10 layer groups)" in res.stdout
    assert "fits H100 80GB" in res.stdout and "NO" not in res.stdout


@pytest.mark.slow  # about a minute of XLA:TPU compile on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e .[tpu])")
def test_tiny_train_step_compiles_for_a_real_tpu_topology():
    """XLA:TPU (not fake CPU devices) compiles the tiny train step for 4 v5p chips with the TPU kernels in it."""
    c = tiny.get_config()
    c.data.batch_size, c.data.seq_len = 8, 256
    setup = build_setup(c, "2x2", dry_lib.topology_devices("v5p:2x2x1"))
    assert {d.platform for d in setup.mesh.devices.flat} == {"tpu"}
    out = dry_lib.dry_run(setup, groups=None, print_fn=lambda s: None)
    assert out["tpu_kernels"] > 0 and out["fits"]["TPU v5p 95GB"]
    assert out["compiled"]["temp_size_in_bytes"] > 0 and out["model_flops"] > 0


@pytest.mark.slow  # about a minute of XLA:TPU compile on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e .[tpu])")
def test_context_parallel_train_step_compiles_for_a_real_tpu_topology():
    """XLA:TPU compiles the tiny train step with the sequence split over 4 v5p chips (LASP-2 around the Mosaic
    lightning kernel, gathered-KV softmax attention on our offset-taking Mosaic flash kernels: the step has
    more Mosaic kernels than with the blockwise softmax)."""
    kernels = {}
    for softmax_impl in ("auto", "blockwise"):
        c = tiny.get_config()
        c.data.batch_size, c.data.seq_len = 2, 1024
        c.model.impl.softmax_impl = softmax_impl
        setup = build_setup(c, "context=4", dry_lib.topology_devices("v5p:2x2x1"))
        out = dry_lib.dry_run(setup, groups=None, print_fn=lambda s: None)
        assert out["fits"]["TPU v5p 95GB"]
        kernels[softmax_impl] = out["tpu_kernels"]
    assert kernels["blockwise"] > 0 and kernels["auto"] > kernels["blockwise"]


def test_bad_topology_is_named():
    with pytest.raises(ValueError, match="v5q"):
        dry_lib.topology_devices("v5q:2x2x1")
