"""Expert-parallel MoE on 8 fake CPU devices against the single-device dropless MoE and a float64 numpy
reference of the capacity/drop policy."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from m1_jax.config import get_config
from m1_jax.layers.expert_parallel import ExpertParallelMoE, capacity_per_expert, moe_expert_parallel
from m1_jax.layers.moe import MoE, aux_loss_from_stats, load_balance_stats, moe_dropless, route_top_k
import lowering

D, F, K = 16, 24, 2


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """Same result as lax.ragged_all_to_all (one slice per peer), built from all_gather so XLA:CPU runs it
    (every shard gathers everyone's operand and offsets: ep x the memory)."""
    del recv_sizes  # implied by the senders' send_sizes
    n = jax.lax.axis_size(axis_name)
    if input_offsets.shape[0] != n:
        raise ValueError("the emulated ragged_all_to_all supports exactly one slice per peer")
    me = jax.lax.axis_index(axis_name)
    all_op = jax.lax.all_gather(operand, axis_name)  # [src, N, ...]
    src_in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    src_size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    src_out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    rows = jnp.arange(output.shape[0])
    result = output
    for s in range(n):
        inside = (rows >= src_out_off[s]) & (rows < src_out_off[s] + src_size[s])
        src_rows = jnp.clip(src_in_off[s] + rows - src_out_off[s], 0, operand.shape[0] - 1)
        mask = inside.reshape((-1,) + (1,) * (output.ndim - 1))
        result = jnp.where(mask, all_op[s][src_rows], result)
    return result


def _mesh(shape, names):
    if len(jax.devices()) < math.prod(shape):
        raise RuntimeError("these tests need 8 devices: run them through pytest (tests/conftest.py sets XLA_FLAGS)")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _inputs(seed, T, E):
    # numpy draws: no per-shape compilation (this machine is slow and shared).
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    x, router = normal(T, D), normal(D, E)
    w_gate, w_up = normal(E, D, F, scale=D ** -0.5), normal(E, D, F, scale=D ** -0.5)
    w_down = normal(E, F, D, scale=F ** -0.5)
    mask = jnp.asarray((rng.uniform(size=T) > 0.25).astype(np.float32))
    probe = normal(T, D)
    return x, router, w_gate, w_up, w_down, mask, probe


def _single_device(x, router, w_gate, w_up, w_down, mask):
    logits = jnp.dot(x, router, precision=jax.lax.Precision.HIGHEST)
    weights, experts, probs = route_top_k(logits, K)
    y = moe_dropless(x, weights, experts, w_gate, w_up, w_down, impl="ragged_dot")
    return y, load_balance_stats(probs, experts, mask)


@pytest.mark.parametrize("mesh_shape,names,E,backend", [
    ((2, 4), ("data", "expert"), 8, "capacity"),
    ((8,), ("expert",), 16, "capacity"),
    ((2, 4), ("data", "expert"), 16, "ragged"),
    ((8,), ("expert",), 8, "ragged"),
])
def test_matches_single_device_outputs_stats_and_grads(mesh_shape, names, E, backend):
    """Ample capacity (or dropless ragged, via the all_gather emulation of ragged_all_to_all on CPU)."""
    mesh = _mesh(mesh_shape, names)
    T = 64
    x, router, w_gate, w_up, w_down, mask, probe = _inputs(E + len(mesh_shape), T, E)

    def loss_ep(x, router, w_gate, w_up, w_down):
        y, st = moe_expert_parallel(x, router, w_gate, w_up, w_down, mesh=mesh, k=K, backend=backend,
                                    capacity_factor=0.0, token_mask_T=mask,
                                    ragged_all_to_all=ragged_all_to_all_emulated)
        aux = aux_loss_from_stats(st["counts_E"], st["prob_sum_E"], st["num_tokens"])
        return jnp.sum(y * probe) + aux, (y, st)

    def loss_ref(x, router, w_gate, w_up, w_down):
        y, st = _single_device(x, router, w_gate, w_up, w_down, mask)
        return jnp.sum(y * probe) + aux_loss_from_stats(*st), (y, st)

    args = (x, router, w_gate, w_up, w_down)
    argnums = tuple(range(5))
    (_, (y, st)), grads = jax.jit(jax.value_and_grad(loss_ep, argnums, has_aux=True))(*args)
    (_, (y_ref, st_ref)), grads_ref = jax.jit(jax.value_and_grad(loss_ref, argnums, has_aux=True))(*args)

    chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((st["counts_E"], st["prob_sum_E"], st["num_tokens"]), st_ref, atol=1e-5, rtol=1e-5)
    assert float(st_ref[2]) == float(np.sum(mask)) < T  # the mask really removed tokens from the stats
    assert int(st["dropped"]) == 0 and float(st["drop_fraction"]) == 0.0
    assert int(st["total_copies"]) == T * K
    for g, g_ref in zip(grads, grads_ref):
        assert float(jnp.max(jnp.abs(g_ref))) > 0
        chex.assert_trees_all_close(g, g_ref, atol=2e-5, rtol=2e-5)


def _capacity_reference(x, router, w_gate, w_up, w_down, shards, C, group=1):
    """float64 numpy: token shard s holds tokens [s*T/shards, (s+1)*T/shards); each pool of `group`
    consecutive shards gives each expert C slots, filled shard by shard, rank-major within a shard (all
    top-1 copies in token order, then top-2); the rest drop. Weights are the renormalised top-k softmax
    (not renormalised over kept copies)."""
    x, router, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, router, w_gate, w_up, w_down))
    T, E = x.shape[0], router.shape[1]
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    top_p = np.take_along_axis(probs, top, -1)
    weights = top_p / top_p.sum(-1, keepdims=True)

    def expert(e, v):
        g, u = v @ w_gate[e], v @ w_up[e]
        return (g / (1 + np.exp(-g)) * u) @ w_down[e]

    y = np.zeros_like(x)
    kept = np.zeros((T, K), bool)
    t_loc = T // shards
    for pool in range(shards // group):
        used = np.zeros(E, int)
        for s in range(pool * group, (pool + 1) * group):
            for rank in range(K):
                for t in range(s * t_loc, (s + 1) * t_loc):
                    e = top[t, rank]
                    if used[e] < C:
                        used[e] += 1
                        kept[t, rank] = True
                        y[t] += weights[t, rank] * expert(e, x[t])
    return y, kept


def _drop_case(forced):
    T, E = 64, 8
    x, router, w_gate, w_up, w_down, _, _ = _inputs(3, T, E)
    if forced:
        # A constant feature with a huge router weight on experts 0 and 1: every token's top-2 is {0, 1}
        # (order and weights still set by the random part). Each shard sends 8 copies to each of them.
        x = x.at[:, 0].set(1.0)
        router = router.at[0].set(0.0).at[0, :2].set(30.0)
    return x, router, w_gate, w_up, w_down


def _check_drops(y, st, y_ref, kept):
    dropped_ref = int((~kept).sum())
    assert dropped_ref > 0
    assert int(st["dropped"]) == dropped_ref
    np.testing.assert_allclose(float(st["drop_fraction"]), dropped_ref / kept.size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=2e-5)
    fully_dropped = ~kept.any(-1)
    assert fully_dropped.any()  # those tokens get exactly zero
    assert np.all(np.asarray(y)[fully_dropped] == 0.0)
    return dropped_ref


@pytest.mark.parametrize("forced", [True, False])
def test_capacity_drops_match_reference(forced):
    mesh = _mesh((2, 4), ("data", "expert"))
    shards, t_loc = 8, 8
    args = _drop_case(forced)
    C = capacity_per_expert(t_loc, K, 8, 1.0)
    assert C == 2  # ceil(1.0 * 8 tokens * 2 / 8 experts)
    fn = jax.jit(lambda *a: moe_expert_parallel(*a, mesh=mesh, k=K, backend="capacity", capacity_factor=1.0))
    y, st = fn(*args)
    y_ref, kept = _capacity_reference(*args, shards, C)
    dropped = _check_drops(y, st, y_ref, kept)
    if forced:
        assert dropped == shards * 2 * (8 - C)  # by hand: per shard, 6 overflow copies for each of 2 experts


@pytest.mark.parametrize("forced", [True, False])
def test_ragged_global_capacity_matches_reference(forced):
    """MiniMax-01 global router: an expert's slots are shared by its whole expert-axis group."""
    mesh = _mesh((2, 4), ("data", "expert"))
    shards, group, t_loc = 8, 4, 8
    args = _drop_case(forced)
    C = capacity_per_expert(group * t_loc, K, 8, 1.0)
    assert C == 8  # ceil(1.0 * 32 tokens * 2 / 8 experts)
    fn = jax.jit(lambda *a: moe_expert_parallel(*a, mesh=mesh, k=K, backend="ragged", capacity_factor=1.0,
                                                ragged_all_to_all=ragged_all_to_all_emulated))
    y, st = fn(*args)
    y_ref, kept = _capacity_reference(*args, shards, C, group=group)
    dropped = _check_drops(y, st, y_ref, kept)
    if forced:
        assert dropped == 2 * 2 * (32 - C)  # by hand: per group, 24 overflow copies for each of 2 experts
    else:
        _, kept_local = _capacity_reference(*args, shards, capacity_per_expert(t_loc, K, 8, 1.0))
        assert dropped < int((~kept_local).sum())  # pooling the slots drops fewer copies


def test_emulated_ragged_all_to_all_follows_the_documented_semantics():
    """The example in lax.ragged_all_to_all's docstring (axis of size 2), through the CPU emulation."""

    mesh = _mesh((2,), ("x",))
    operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
    output = jnp.zeros((2, 4), jnp.float32)
    in_off = jnp.array([[0, 1], [0, 1]], jnp.int32)
    send = jnp.array([[1, 2], [1, 1]], jnp.int32)
    out_off = jnp.array([[0, 0], [1, 2]], jnp.int32)
    recv = jnp.array([[1, 1], [2, 1]], jnp.int32)

    def body(op, out, a, b, c, d):
        return ragged_all_to_all_emulated(op[0], out[0], a[0], b[0], c[0], d[0], axis_name="x")[None]

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))
    result = jax.jit(fn)(operand, output, in_off, send, out_off, recv)
    np.testing.assert_array_equal(np.asarray(result), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_ragged_backend_lowers_for_tpu(capacity_factor):
    mesh = AbstractMesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    T, E = 256, 16

    def loss(x, router, w_gate, w_up, w_down):
        y, st = moe_expert_parallel(x, router, w_gate, w_up, w_down, mesh=mesh, k=K, backend="ragged",
                                    capacity_factor=capacity_factor)
        return jnp.sum(y.astype(jnp.float32) ** 2) + st["counts_E"].sum()

    def sds(shape, spec, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    args = (sds((T, D), P(("data", "expert"))), sds((D, E), P(), jnp.float32),
            sds((E, D, F), P("expert")), sds((E, D, F), P("expert")), sds((E, F, D), P("expert")))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("ragged_all_to_all") >= 4  # forward and return trip, and both again in the backward
    # The local experts run the grouped matmul dispatcher's TPU kernels (megablox) inside the shard_map: at
    # least the lhs and rhs gradients of each of the 3 matmuls.
    assert text.count("tpu_custom_call") >= 6 and "ragged_dot" not in text


def test_linen_wrapper_matches_moe():
    cfg = get_config("tiny").replace(num_experts=8, num_experts_per_tok=2, expert_dim=32, dtype="float32")
    mesh = _mesh((2, 4), ("data", "expert"))
    B, L = 4, 16
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((B, L, cfg.hidden_size), dtype=np.float32))
    mask = jnp.asarray((rng.uniform(size=(B, L)) > 0.3).astype(np.int32))
    ref_mod = MoE(cfg)
    ep_mod = ExpertParallelMoE(cfg, mesh=mesh)
    key = jax.random.key(0)
    boxed_ref = jax.eval_shape(ref_mod.init, key, h, mask)["params"]
    boxed_ep = jax.eval_shape(ep_mod.init, key, h, mask)["params"]
    # Same names, shapes, dtypes and logical axes: a checkpoint of one loads into the other.
    assert nn.get_partition_spec(boxed_ep) == nn.get_partition_spec(boxed_ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(nn.unbox(boxed_ep), nn.unbox(boxed_ref))
    params = nn.unbox(jax.jit(ref_mod.init)(key, h, mask)["params"])

    y_ref, st_ref = jax.jit(lambda p: ref_mod.apply({"params": p}, h, mask))(params)
    (y, st), inter = jax.jit(lambda p: ep_mod.apply({"params": p}, h, mask, mutable=["intermediates"]))(params)
    chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(st, st_ref, atol=1e-5, rtol=1e-5)
    assert int(inter["intermediates"]["moe_dropped"][0]) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="dense"), "unknown expert-parallel backend"),
    (dict(capacity_factor=None), "capacity_factor must be >= 0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be >= 0"),
    (dict(expert_axis="ep"), "not a mesh axis"),
    (dict(batch_axes=("data",)), "must include the expert axis"),
])
def test_bad_arguments(kwargs, match):
    mesh = _mesh((2, 4), ("data", "expert"))
    x, router, w_gate, w_up, w_down, _, _ = _inputs(0, 64, 8)
    with pytest.raises(ValueError, match=match):
        moe_expert_parallel(x, router, w_gate, w_up, w_down, mesh=mesh, k=K, **kwargs)


def test_bad_shapes():
    mesh = _mesh((2, 4), ("data", "expert"))
    x, router, w_gate, w_up, w_down, _, _ = _inputs(0, 60, 6)
    with pytest.raises(ValueError, match="experts do not split"):
        moe_expert_parallel(x, router, w_gate, w_up, w_down, mesh=mesh, k=K)
    x, router, w_gate, w_up, w_down, _, _ = _inputs(0, 60, 8)
    with pytest.raises(ValueError, match="tokens do not split"):
        moe_expert_parallel(x, router, w_gate, w_up, w_down, mesh=mesh, k=K)


def test_capacity_rule():
    # ceil(cf * t * k / E), clamped to [1, t]; 0 means no drops (t slots).
    assert capacity_per_expert(8, 2, 8, 1.25) == 3
    assert capacity_per_expert(8, 2, 64, 0.1) == 1
    assert capacity_per_expert(8, 2, 2, 4.0) == 8
    assert capacity_per_expert(8, 2, 8, 0) == 8


@pytest.mark.parametrize("backend", ["capacity", "ragged"])
def test_grouped_matmul_impl_reaches_the_local_experts(backend):
    """moe_expert_parallel's grouped_matmul_impl is the one the local experts run (no hard-coded ragged_dot)."""
    T, E = 64, 8

    def text(impl, platform):
        # The Triton lowering targets the mesh's device (an H100 here; jax >= 0.11 needs one named).
        mesh = AbstractMesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2,
                            abstract_device=lowering.H100 if platform == "cuda" else None)
        sds = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
        args = (sds((T, D), P(("data", "expert"))), sds((D, E), P()), sds((E, D, F), P("expert")),
                sds((E, D, F), P("expert")), sds((E, F, D), P("expert")))
        fn = lambda *a: moe_expert_parallel(*a, mesh=mesh, k=K, backend=backend, grouped_matmul_impl=impl)[0]
        return lowering.lower_text(jax.jit(fn), *args, platform=platform, mesh=mesh)

    assert "ragged_dot" in text("ragged_dot", "tpu")
    assert "tpu_custom_call" in text("auto", "tpu") and "ragged_dot" not in text("auto", "tpu")
    assert "__gpu$xla.gpu.triton" in text("auto", "cuda")
