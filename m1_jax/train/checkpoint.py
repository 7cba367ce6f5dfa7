"""Orbax checkpoints of the train state plus JSON metadata (data-iterator position, config, leaf layout).

The state is saved as a flat {"leaf_00000": array, ...} dict so any pytree (optax namedtuples, flax
structs) round-trips; the metadata lists each leaf's path and shape, which turns a checkpoint written
by a different model or optimizer into a clear error instead of a shape mismatch deep inside Orbax.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupt or incompatible)."""


def load_params(directory: str, cfg=None, step: int | None = None):
    """(cfg, params) from a checkpoint folder: experiments/train.py's WORKDIR (or its checkpoints/), or a
    `save_params` folder; the latest step unless `step`. cfg defaults to the saved model config."""
    from m1_jax.config import ModelConfig  # here, not at the top: the model is only needed by this reader
    from m1_jax.model import abstract_params

    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} does not exist; pass the --workdir of a training run or a save_params folder")
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {directory}; pass the --workdir of experiments/train.py (or its "
                             "checkpoints/ folder) or a warm-start folder written by experiments/rl.py")
        meta = ckpt.meta(step)
        if cfg is None:
            if "model_config" not in meta:
                raise ValueError(f"checkpoint {directory}/{step} names no model_config; pass the model config")
            cfg = ModelConfig(**meta["model_config"])
        params, _ = ckpt.restore_params(step, abstract_params(cfg), meta=meta)
    finally:
        ckpt.close()
    return cfg, params


def save_params(directory: str, params, meta: dict[str, Any]) -> None:
    """A one-step checkpoint {"params": ...} with `meta` (it should hold model_config) that load_params reads."""
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=False)
    ckpt.save(0, {"params": params}, meta, wait=True)
    ckpt.close()


def _leaf_layout(tree) -> tuple[list[str], list[list[int]], Any, list]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    shapes = [list(leaf.shape) for _, leaf in leaves_with_path]
    return paths, shapes, treedef, [leaf for _, leaf in leaves_with_path]


def _flat(leaves) -> dict[str, Any]:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}


class Checkpointer:
    """Async saves every N steps, keep-last-k, restore of the latest step."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any], *, wait: bool = False) -> None:
        paths, shapes, _, leaves = _leaf_layout(state)
        meta = dict(meta, step=int(step), leaf_paths=paths, leaf_shapes=shapes)
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(leaves)),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, *, expect: dict[str, Any] | None = None):
        """(state, meta) of `step`. abstract_state: ShapeDtypeStructs (with shardings) of the state.

        expect: metadata entries that must match (e.g. the model config); a mismatch is a CheckpointError.
        """
        where = f"checkpoint at step {step} in {self.directory}"
        fix = (f"delete {os.path.join(self.directory, str(step))} to resume from the previous checkpoint, "
               "or pass a fresh --workdir")
        try:
            meta = self.meta(step)
        except Exception as e:  # Orbax raises many types for missing/garbled files.
            raise CheckpointError(f"{where} is corrupt: its metadata could not be read ({type(e).__name__}: "
                                  f"{_short(e)}); {fix}") from e
        paths, shapes, treedef, leaves = _leaf_layout(abstract_state)
        if meta.get("leaf_paths") != paths or meta.get("leaf_shapes") != shapes:
            diff = _first_difference(meta.get("leaf_paths", []), meta.get("leaf_shapes", []), paths, shapes)
            raise CheckpointError(f"{where} is incompatible with this model/optimizer ({diff}); {fix}")
        for key, value in (expect or {}).items():
            if meta.get(key) != value:
                raise CheckpointError(f"{where} is incompatible: its {key} differs from this run's "
                                      f"(checkpoint: {_short(meta.get(key))}; run: {_short(value)}); {fix}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_flat(leaves))))["state"]
            arrays = [restored[f"leaf_{i:05d}"] for i in range(len(leaves))]
        except Exception as e:
            raise CheckpointError(f"{where} is corrupt: its arrays could not be read ({type(e).__name__}: "
                                  f"{_short(e)}); {fix}") from e
        for path, arr, want in zip(paths, arrays, leaves):
            if tuple(arr.shape) != tuple(want.shape) or arr.dtype != want.dtype:
                raise CheckpointError(f"{where} is corrupt: {path} restored as {arr.dtype}{list(arr.shape)}, "
                                      f"expected {want.dtype}{list(want.shape)}; {fix}")
        logging.info("restored %s", where)
        return jax.tree_util.tree_unflatten(treedef, arrays), meta

    def restore_params(self, step: int, abstract_params, *, meta: dict[str, Any] | None = None):
        """(params, meta) of `step` with only the parameters taken: the `.params` leaves of a train state, or
        the tree of a {"params": ...} save (`save_params`). abstract_params: the model's parameter shapes;
        meta: the step's metadata when the caller has read it already."""
        where = f"checkpoint at step {step} in {self.directory}"
        meta = self.meta(step) if meta is None else meta
        index = {}
        for i, path in enumerate(meta.get("leaf_paths", [])):
            for prefix in (".params", "['params']"):  # TrainState's field / save_params' dict key
                if path.startswith(prefix):
                    index[path[len(prefix):]] = i
        paths, _, treedef, wants = _leaf_layout(abstract_params)
        missing = [p for p in paths if p not in index]
        if missing:
            raise CheckpointError(f"{where} lacks params {missing[:3]} of this model config; it was written for a "
                                  "different model (or not by m1_jax)")
        raw = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        leaves = []
        for path, want in zip(paths, wants):
            arr = np.asarray(raw[f"leaf_{index[path]:05d}"])
            if arr.shape != tuple(want.shape):
                raise CheckpointError(f"{where}: param {path} has shape {arr.shape}, the model wants "
                                      f"{tuple(want.shape)}")
            leaves.append(jax.numpy.asarray(arr, want.dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(x, n: int = 300) -> str:
    s = str(x)
    return s if len(s) <= n else s[:n] + "..."


def _first_difference(old_paths, old_shapes, new_paths, new_shapes) -> str:
    if len(old_paths) != len(new_paths):
        return f"{len(old_paths)} saved arrays, this run has {len(new_paths)}"
    for op, os_, np_, ns in zip(old_paths, old_shapes, new_paths, new_shapes):
        if op != np_:
            return f"saved {op}, this run expects {np_}"
        if os_ != ns:
            return f"{op} saved with shape {os_}, this run expects {ns}"
    return "layout differs"
