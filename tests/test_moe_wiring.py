"""The model with moe_impl="expert_parallel" (shard_map all-to-all MoE) against moe_impl="dropless" (the
single-device MoE) on 8 fake CPU devices, and the errors when the expert-parallel MoE has no usable mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax import sharding as sharding_lib
from m1_jax.config import get_config
from m1_jax.model import MiniMaxM1, abstract_params, init_params
from m1_jax.train.step import mesh_context, token_cross_entropy

B, L = 8, 16


def _batch(seed, vocab):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(B, L)).astype(np.int32)
    targets = rng.integers(0, vocab, size=(B, L)).astype(np.int32)
    # Two documents per row and some right padding, so the MoE's token mask matters for the aux loss.
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[:, L // 2:] = 2
    segment_ids[::3, -3:] = 0
    positions = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(tokens=tokens, targets=targets, segment_ids=segment_ids,
                                               positions=positions).items()}


def _loss_fn(cfg):
    def loss(params, batch):
        logits, aux = MiniMaxM1(cfg).apply({"params": params}, batch["tokens"], segment_ids_BxL=batch["segment_ids"],
                                           positions_BxL=batch["positions"])
        ce = token_cross_entropy(logits, batch["targets"]) * (batch["segment_ids"] != 0)
        return jnp.sum(ce) / B + cfg.router_aux_loss_coef * aux["moe_aux_loss"], (logits, aux)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.slow
def test_expert_parallel_model_matches_dropless():
    # One layer group (lightning + softmax) of the tiny model keeps the two compiles fast; a large aux
    # coefficient so the router gradients see the aux loss.
    dense = get_config("tiny", num_layers=2, layer_types=("lightning", "softmax"), router_aux_loss_coef=0.5)
    ep = dense.replace(moe_impl="expert_parallel", moe_backend="capacity", moe_capacity_factor=0.0)
    params = init_params(dense, jax.random.key(3))
    # Fresh weights: scale the experts up so the MoE branch is not negligible next to the residual.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 4.0 if "moe" in jax.tree_util.keystr(p) else x, params)
    batch = _batch(0, dense.vocab_size)
    mesh = sharding_lib.make_mesh("data=2,expert=4")

    (loss_d, (logits_d, aux_d)), grads_d = _loss_fn(dense)(params, batch)
    fn_ep = _loss_fn(ep)
    with mesh_context(mesh):
        (loss_e, (logits_e, aux_e)), grads_e = fn_ep(params, batch)
        hlo = fn_ep.lower(params, batch).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo, "the expert-parallel model did not use an all-to-all"

    np.testing.assert_allclose(logits_e, logits_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_e, loss_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux_e["moe_aux_loss"], aux_d["moe_aux_loss"], rtol=1e-5)
    np.testing.assert_array_equal(aux_e["expert_counts"], aux_d["expert_counts"])
    flat_d = jax.tree_util.tree_leaves_with_path(grads_d)
    flat_e = dict(jax.tree_util.tree_leaves_with_path(grads_e))
    assert len(flat_d) == len(flat_e)
    for path, g_d in flat_d:
        g_e = flat_e[path]
        scale = float(jnp.max(jnp.abs(g_d))) + 1e-12
        err = float(jnp.max(jnp.abs(g_e - g_d)))
        assert err <= 1e-5 * max(scale, 1.0), f"grad {jax.tree_util.keystr(path)}: max err {err}, scale {scale}"
        assert scale > 0 or "router" in jax.tree_util.keystr(path), f"grad {jax.tree_util.keystr(path)} is all zero"


def test_expert_parallel_without_expert_mesh_raises():
    cfg = get_config("tiny", num_layers=2, layer_types=("lightning", "softmax"), moe_impl="expert_parallel")
    params = abstract_params(cfg)  # init traces the dense math: no mesh needed
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(B, L)), jnp.int32)
    # The error is raised while tracing: eval_shape traces without compiling.
    apply = lambda p, t: jax.eval_shape(lambda p, t: MiniMaxM1(cfg).apply({"params": p}, t)[0], p, t)  # noqa: E731
    with pytest.raises(ValueError, match="needs a mesh with an 'expert' axis.*no mesh set"):
        apply(params, tokens)
    with mesh_context(sharding_lib.make_mesh("data=8")):
        with pytest.raises(ValueError, match=r"needs a mesh with an 'expert' axis.*\('data',\)"):
            apply(params, tokens)


def test_moe_impl_fields_are_validated():
    with pytest.raises(ValueError, match="moe_impl must be one of"):
        get_config("tiny", moe_impl="expert-parallel")
    with pytest.raises(ValueError, match="moe_backend must be one of"):
        get_config("tiny", moe_backend="dense")
    with pytest.raises(ValueError, match="moe_capacity_factor must be >= 0"):
        get_config("tiny", moe_capacity_factor=-1.0)
    # Fields that only the expert-parallel MoE reads are rejected with the single-device one, not ignored.
    with pytest.raises(ValueError, match="apply to moe_impl='expert_parallel' only"):
        get_config("tiny", moe_capacity_factor=1.25)
    with pytest.raises(ValueError, match="apply to moe_impl='expert_parallel' only"):
        get_config("tiny", moe_backend="ragged")
    with pytest.raises(ValueError, match="moe_grouped_matmul must be one of"):
        get_config("tiny", moe_grouped_matmul="tiled")
    get_config("tiny", moe_impl="expert_parallel", moe_backend="ragged", moe_capacity_factor=1.25)  # valid
