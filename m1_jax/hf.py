"""HF-format checkpoints: load the official MiniMax-M1 (or transformers') weights, save ones transformers loads.

Names: the official checkpoint (and transformers' `save_pretrained`) use per-expert tensors
`model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight`; transformers 5.x holds them fused in memory
as `mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj` [E, D, F]. Both load. PyTorch weights
are [out, in]; ours are [in, ...out] and stacked over layer groups (the model scans over groups).

Loading is tensor by tensor: each parameter leaf is assembled from only the tensors it needs, cast, and
placed on device (optionally straight onto a target sharding, shard by shard, through
`jax.make_array_from_callback`), so a 456B checkpoint streams onto a mesh without ever being whole in host
memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from safetensors import safe_open
from safetensors.numpy import save_file

from m1_jax.config import LIGHTNING, SOFTMAX, ImplConfig, ModelConfig

_OFFICIAL_CODE = {LIGHTNING: 0, SOFTMAX: 1}  # attn_type_list
_HF_NAME = {LIGHTNING: "linear_attention", SOFTMAX: "full_attention"}  # transformers' layer_types

# Buffers transformers saves for lightning layers; recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------- config.json
def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """The ModelConfig of an official (MiniMax-AI) or transformers-style config.json dict."""
    hf = dict(hf)
    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
    if "attn_type_list" in hf:
        codes = {0: LIGHTNING, 1: SOFTMAX}
        try:
            layer_types = tuple(codes[int(c)] for c in hf["attn_type_list"])
        except KeyError as e:
            raise ValueError(f"attn_type_list holds {e.args[0]!r}; expected 0 (lightning) or 1 (softmax)") from None
    elif "layer_types" in hf and hf["layer_types"] is not None:
        names = {v: k for k, v in _HF_NAME.items()}
        try:
            layer_types = tuple(names[t] for t in hf["layer_types"])
        except KeyError as e:
            raise ValueError(f"layer_types holds {e.args[0]!r}; expected one of {list(names)}") from None
    else:
        # transformers' default when neither key is present: full attention at even layers.
        layer_types = tuple(SOFTMAX if (i + 1) % 2 else LIGHTNING for i in range(num_layers))

    rope = hf.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    if hf.get("rotary_dim") is not None:
        rotary_dim = int(hf["rotary_dim"])
    elif rope.get("partial_rotary_factor") is not None or hf.get("partial_rotary_factor") is not None:
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        rotary_dim = int(head_dim * float(factor))
    else:
        rotary_dim = head_dim  # what transformers computes with neither key: whole-head RoPE

    def pick(official, hf_key, default=1.0):
        for key in (official, hf_key):
            if hf.get(key) is not None:
                return float(hf[key])
        return default

    if hf.get("shared_intermediate_size"):
        raise ValueError(f"shared experts (shared_intermediate_size={hf['shared_intermediate_size']}) "
                                          "are not supported; MiniMax-M1 has none")
    if hf.get("postnorm") is False:
        raise ValueError("postnorm=false is not supported; MiniMax-M1 uses post-norm residuals")
    kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            layer_types=layer_types,
            rotary_dim=rotary_dim,
            rope_theta=rope_theta,
            max_position_embeddings=int(hf.get("max_position_embeddings", 10_240_000)),
            lightning_alpha=pick("layernorm_linear_attention_alpha", "linear_attn_alpha_factor"),
            lightning_beta=pick("layernorm_linear_attention_beta", "linear_attn_beta_factor"),
            softmax_alpha=pick("layernorm_full_attention_alpha", "full_attn_alpha_factor"),
            softmax_beta=pick("layernorm_full_attention_beta", "full_attn_beta_factor"),
            mlp_alpha=pick("layernorm_mlp_alpha", "mlp_alpha_factor"),
            mlp_beta=pick("layernorm_mlp_beta", "mlp_beta_factor"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            num_experts=int(hf.get("num_local_experts", hf.get("num_experts", 8))),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            expert_dim=int(hf["intermediate_size"]),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            router_jitter_noise=float(hf.get("router_jitter_noise", 0.0)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            # Our own key when we wrote the file; otherwise the convention of the code that runs this format.
            lightning_decay=hf.get("lightning_decay_convention") or (
                    "transformers" if hf.get("model_type") == "minimax" else "official"),
    )
    cfg = ModelConfig(**kwargs, impl=ImplConfig(block_size=int(hf.get("block_size", 256))))
    return cfg.replace(**overrides)


def config_to_hf(cfg: ModelConfig, style: str = "transformers") -> dict[str, Any]:
    """cfg as a config.json dict.

    style="transformers": keys transformers 5.24's MiniMaxConfig reads (`layer_types`, `*_alpha_factor`,
    `rope_parameters`), plus the official keys so the official code reads it too.
    style="official": only the MiniMax-AI keys.
    """
    if style not in ("transformers", "official"):
        raise ValueError(f"style must be 'transformers' or 'official', got {style!r}")
    # The code that reads this format computes its own decays: refuse where they are not this model's (head
    # counts that are not powers of two). Elsewhere the conventions differ by < 1e-5 in lambda (the layer
    # factor's denominator), far below what the logits resolve.
    gap = np.max(np.abs(cfg.replace(lightning_decay=style).lightning_decays() - cfg.lightning_decays()))
    if gap > 1e-5:
        raise ValueError(
                f"lightning_decay={cfg.lightning_decay!r} with {cfg.num_heads} heads: {style} code computes "
                f"decays up to {gap:.2g} away from this model's, so a {style}-style config.json would load as a "
                f"different model; write style={cfg.lightning_decay!r} (save_checkpoint(..., style=...))")
    out: dict[str, Any] = {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.expert_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps,
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "router_jitter_noise": cfg.router_jitter_noise,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "initializer_range": cfg.initializer_range,
            "attention_dropout": 0.0,
            "sliding_window": None,
            "shared_intermediate_size": 0,
            "postnorm": True,
            "rotary_dim": cfg.rotary_dim,
            "rope_theta": cfg.rope_theta,
            "attn_type_list": [_OFFICIAL_CODE[t] for t in cfg.layer_types],
            "layernorm_linear_attention_alpha": cfg.lightning_alpha,
            "layernorm_linear_attention_beta": cfg.lightning_beta,
            "layernorm_full_attention_alpha": cfg.softmax_alpha,
            "layernorm_full_attention_beta": cfg.softmax_beta,
            "layernorm_mlp_alpha": cfg.mlp_alpha,
            "layernorm_mlp_beta": cfg.mlp_beta,
            "bos_token_id": None,
            "eos_token_id": None,
            "lightning_decay_convention": cfg.lightning_decay,
    }
    if style == "official":
        out.update(model_type="minimax_m1", architectures=["MiniMaxM1ForCausalLM"])
        return out
    if cfg.rotary_dim < cfg.head_dim:
        warnings.warn(
                f"rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim}: written as the official `rotary_dim` "
                "key, but transformers 5.24's MiniMax ignores it and rotates the whole head, so its outputs "
                "will differ from this model's", stacklevel=2)
    out.update(
            model_type="minimax",
            architectures=["MiniMaxForCausalLM"],
            layer_types=[_HF_NAME[t] for t in cfg.layer_types],
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            linear_attn_alpha_factor=cfg.lightning_alpha,
            linear_attn_beta_factor=cfg.lightning_beta,
            full_attn_alpha_factor=cfg.softmax_alpha,
            full_attn_beta_factor=cfg.softmax_beta,
            mlp_alpha_factor=cfg.mlp_alpha,
            mlp_beta_factor=cfg.mlp_beta,
            block_size=cfg.impl.block_size,
    )
    return out


# ---------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class _Source:
    """How one slice of a parameter leaf comes from one HF tensor."""

    name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> our per-layer (per-expert) layout
    to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(out_shape_ours, hf_shape):
    """A torch Linear weight [out, in] <-> ours [in, *out]."""
    return (lambda w: w.T.reshape(out_shape_ours)), (lambda w: w.reshape(w.shape[0], -1).T.reshape(hf_shape))


def _layer_sources(cfg: ModelConfig, layer: int, kind: str, fused_experts: bool) -> dict[str, list[_Source]]:
    """Our leaf path (within layer_j) -> its HF source for global layer `layer` (a list, one per expert,
    for unfused experts)."""
    D, H, K, Dh, E, F = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts,
                         cfg.expert_dim)
    pre = f"model.layers.{layer}."
    ident = (lambda w: w, lambda w: w)

    def src(name, hf_shape, fns):
        return _Source(pre + name, hf_shape, *fns)

    def out_proj(in_shape_ours):  # torch [D, in] <-> ours [*in, D]
        return (lambda w: w.T.reshape(*in_shape_ours, D)), (lambda w: w.reshape(-1, D).T)

    out = {
        "input_norm": src("input_layernorm.weight", (D,), ident),
        "post_attention_norm": src("post_attention_layernorm.weight", (D,), ident),
    }
    if kind == LIGHTNING:
        out.update({
            "attn/qkv_proj": src("self_attn.qkv_proj.weight", (3 * H * Dh, D), _linear((D, H, 3 * Dh), (3 * H * Dh, D))),
            "attn/output_gate": src("self_attn.output_gate.weight", (H * Dh, D), _linear((D, H, Dh), (H * Dh, D))),
            "attn/norm": src("self_attn.norm.weight", (H * Dh,), (lambda w: w.reshape(H, Dh), lambda w: w.reshape(-1))),
            "attn/out_proj": src("self_attn.out_proj.weight", (D, H * Dh), out_proj((H, Dh))),
        })
    else:
        out.update({
            "attn/q_proj": src("self_attn.q_proj.weight", (H * Dh, D), _linear((D, H, Dh), (H * Dh, D))),
            "attn/k_proj": src("self_attn.k_proj.weight", (K * Dh, D), _linear((D, K, Dh), (K * Dh, D))),
            "attn/v_proj": src("self_attn.v_proj.weight", (K * Dh, D), _linear((D, K, Dh), (K * Dh, D))),
            "attn/o_proj": src("self_attn.o_proj.weight", (D, H * Dh), out_proj((H, Dh))),
        })
    router_name = "mlp.gate.weight" if fused_experts else "block_sparse_moe.gate.weight"
    out["moe/router"] = src(router_name, (E, D), (lambda w: w.T, lambda w: w.T))
    if fused_experts:
        # One fused tensor covers every expert: the leaf's expert axis comes from inside the tensor.
        out["moe/w_gate"] = src("mlp.experts.gate_up_proj", (E, 2 * F, D),
                                (lambda w: np.swapaxes(w[:, :F], 1, 2), None))
        out["moe/w_up"] = src("mlp.experts.gate_up_proj", (E, 2 * F, D),
                              (lambda w: np.swapaxes(w[:, F:], 1, 2), None))
        out["moe/w_down"] = src("mlp.experts.down_proj", (E, D, F), (lambda w: np.swapaxes(w, 1, 2), None))
    else:
        for ours, theirs, shape in (("w_gate", "w1", (F, D)), ("w_up", "w3", (F, D)), ("w_down", "w2", (D, F))):
            out[f"moe/{ours}"] = [
                _Source(f"{pre}block_sparse_moe.experts.{e}.{theirs}.weight", shape, lambda w: w.T, lambda w: w.T)
                for e in range(E)]
    return out


def _top_sources(cfg: ModelConfig) -> dict[str, _Source]:
    V, D = cfg.vocab_size, cfg.hidden_size
    ident = (lambda w: w, lambda w: w)
    out = {"embed": _Source("model.embed_tokens.weight", (V, D), *ident),
           "final_norm": _Source("model.norm.weight", (D,), *ident)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = _Source("lm_head.weight", (V, D), lambda w: w.T, lambda w: w.T)
    return out


def hf_tensor_shapes(cfg: ModelConfig, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor name (and torch shape) of an HF checkpoint of this config."""
    shapes = {s.name: s.hf_shape for s in _top_sources(cfg).values()}
    for layer, kind in enumerate(cfg.layer_types):
        for sources in _layer_sources(cfg, layer, kind, fused_experts).values():
            sources = [sources] if isinstance(sources, _Source) else sources
            shapes.update({s.name: s.hf_shape for s in sources})
    return shapes


class _TensorReader:
    """Lazy access to the tensors of a directory of safetensors files (one or many, with an index)."""

    def __init__(self, path: str):
        index = os.path.join(path, _INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files and no {_INDEX} in {path}")
            weight_map = {}
            for fname in files:
                with safe_open(os.path.join(path, fname), framework="numpy") as f:
                    weight_map.update({k: fname for k in f.keys()})
        self._path, self.weight_map, self._handles = path, weight_map, {}
        self.shapes = {}
        for fname in sorted(set(weight_map.values())):
            handle = self._open(fname)
            for name in handle.keys():
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def _open(self, fname):
        if fname not in self._handles:
            full = os.path.join(self._path, fname)
            if not os.path.exists(full):
                raise FileNotFoundError(f"{_INDEX} names shard {fname}, which is missing from {self._path}")
            self._handles[fname] = safe_open(full, framework="numpy")
        return self._handles[fname]

    def get(self, name: str) -> np.ndarray:
        return self._open(self.weight_map[name]).get_tensor(name)


def _check_names(reader: _TensorReader, expected: dict[str, tuple[int, ...]]) -> None:
    present = {k: v for k, v in reader.shapes.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    problems = [f"missing tensor {n} (expected shape {expected[n]})" for n in missing[:10]]
    problems += [f"unexpected tensor {n} (shape {present[n]})" for n in unexpected[:10]]
    problems += [f"tensor {n} has shape {present[n]}, expected {shape}"
                 for n, shape in expected.items() if n in present and tuple(present[n]) != tuple(shape)]
    if problems:
        extra = len(missing) + len(unexpected) - min(len(missing), 10) - min(len(unexpected), 10)
        more = f"\n  ... and {extra} more missing/unexpected" if extra > 0 else ""
        raise ValueError("checkpoint does not match the config:\n  " + "\n  ".join(problems[:30]) + more)


def _leaf_plan(cfg: ModelConfig, fused_experts: bool):
    """Our flat leaf path -> list over groups (and experts) of sources, plus whether a leaf is stacked."""
    plan: dict[tuple[str, ...], Any] = {}
    for key, source in _top_sources(cfg).items():
        plan[(key,)] = source
    p = cfg.group_period
    for j in range(p):
        per_group = [_layer_sources(cfg, g * p + j, cfg.layer_types[j], fused_experts) for g in range(cfg.num_groups)]
        for leaf in per_group[0]:
            plan[("groups", f"layer_{j}", *leaf.split("/"))] = [group[leaf] for group in per_group]
    return plan


def _read_leaf(reader, spec, index=None) -> np.ndarray:
    """Assembles (a slice of) one leaf. `spec` is a _Source or [group][expert-or-one] sources."""
    if isinstance(spec, _Source):
        arr = spec.to_ours(reader.get(spec.name))
        return arr if index is None else arr[index]
    index = index or ()
    group_sel = range(len(spec))[index[0]] if index else range(len(spec))
    rest = index[1:]
    rows = []
    for g in group_sel:
        sources = spec[g]
        if isinstance(sources, _Source):
            arr = sources.to_ours(reader.get(sources.name))
            rows.append(arr[rest] if rest else arr)
        else:  # one source per expert: only read the experts this slice needs
            expert_sel = range(len(sources))[rest[0]] if rest else range(len(sources))
            inner = rest[1:]
            rows.append(np.stack([sources[e].to_ours(reader.get(sources[e].name))[inner] for e in expert_sel]))
    return np.stack(rows)


def load_checkpoint(path: str, *, shardings=None, param_dtype: str | None = None, **config_overrides):
    """(cfg, params) from an HF-format directory (config.json + *.safetensors [+ index]).

    `shardings`: optional pytree of jax.sharding.Sharding matching the params; each leaf is then built
    shard by shard on its devices. `param_dtype` (default the config's) is the dtype params are stored in.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    overrides = dict(config_overrides)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = config_from_hf(hf_config, **overrides)
    reader = _TensorReader(path)
    fused = any(name.endswith("mlp.experts.gate_up_proj") for name in reader.shapes)
    _check_names(reader, hf_tensor_shapes(cfg, fused))

    from m1_jax.model import abstract_params  # local import: model imports nothing from here
    abstract = abstract_params(cfg)
    plan = _leaf_plan(cfg, fused)
    flat_abstract = {tuple(str(getattr(k, "key", k)) for k in path): leaf
                     for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    if set(flat_abstract) != set(plan):
        raise AssertionError(f"internal: leaf plan mismatch {set(flat_abstract) ^ set(plan)}")
    flat_shardings = None
    if shardings is not None:
        flat_shardings = {tuple(str(getattr(k, "key", k)) for k in path): s
                          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    loaded = {}
    for i, (key, leaf) in enumerate(sorted(flat_abstract.items())):
        spec = plan[key]
        dtype = leaf.dtype
        if flat_shardings is None:
            arr = _read_leaf(reader, spec).astype(dtype)
            if arr.shape != leaf.shape:
                raise AssertionError(f"internal: {'/'.join(key)} assembled as {arr.shape}, expected {leaf.shape}")
            loaded[key] = jax.device_put(arr)
        else:
            loaded[key] = jax.make_array_from_callback(
                leaf.shape, flat_shardings[key],
                lambda idx, spec=spec, dtype=dtype: _read_leaf(reader, spec, idx).astype(dtype))
        logging.log_every_n(logging.INFO, "loaded %d/%d leaves", 10, i + 1, len(flat_abstract))
    params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(abstract),
        [loaded[tuple(str(getattr(k, "key", k)) for k in path)]
         for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]])
    return cfg, params


def save_checkpoint(path: str, cfg: ModelConfig, params, *, dtype: str | None = None,
                    max_shard_bytes: int = 2 << 30, style: str = "transformers") -> None:
    """Writes config.json (`config_to_hf(cfg, style)`) + sharded safetensors with the official per-expert names.

    transformers' `MiniMaxForCausalLM.from_pretrained` loads the result of style "transformers" (it converts
    per-expert tensors into its fused layout); style "official" is the official checkpoint's format. Routers are
    written in float32, as in the official checkpoint; other tensors in `dtype` (default: the params' own dtype).
    """
    config = config_to_hf(cfg, style)  # before any file is written: raises if the format cannot hold this model
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    plan = _leaf_plan(cfg, fused_experts=False)
    flat = {tuple(str(getattr(k, "key", k)) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(flat) != set(plan):
        raise ValueError(f"params do not match the config: differing leaves {sorted(set(flat) ^ set(plan))[:10]}")

    def tensors():
        for key in sorted(plan):
            spec, leaf = plan[key], np.asarray(jax.device_get(flat[key]))
            out_dtype = np.float32 if key[-1] == "router" else (np.dtype(dtype) if dtype else leaf.dtype)
            if isinstance(spec, _Source):
                yield spec.name, np.ascontiguousarray(spec.to_hf(leaf)).astype(out_dtype)
                continue
            for g, sources in enumerate(spec):
                if isinstance(sources, _Source):
                    yield sources.name, np.ascontiguousarray(sources.to_hf(leaf[g])).astype(out_dtype)
                    continue
                for e, s in enumerate(sources):
                    yield s.name, np.ascontiguousarray(s.to_hf(leaf[g, e])).astype(out_dtype)

    weight_map, shard, shard_bytes, shard_files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            shard_files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    total = 0
    for name, arr in tensors():
        if shard_bytes + arr.nbytes > max_shard_bytes:
            flush()
        shard[name], shard_bytes, total = arr, shard_bytes + arr.nbytes, total + arr.nbytes
    flush()
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
