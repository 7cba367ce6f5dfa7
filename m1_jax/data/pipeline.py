"""The deterministic, checkpointable training input pipeline (grain).

    records (builtin tasks | text | JSONL) -> shuffle/repeat (files) -> shard -> tokenize  [MapDataset]
      -> to_iter_dataset -> pack into [B, L] batches                                       [IterDataset]

The iterator's `get_state()` is a small JSON-serialisable dict; `set_state()` on a fresh iterator built
with the same arguments resumes with exactly the batches the uninterrupted run would have produced.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from absl import logging
import grain.python as grain
import numpy as np

from m1_jax.data import packing
from m1_jax.data import sources


class PackedBatchIterDataset(grain.IterDataset):
    """Packs a stream of `packing.Document`s into batches of [batch_size, seq_len] rows."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int, pad_id: int,
                 overflow: str = "split"):
        super().__init__(parent)
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
        if overflow not in packing.OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {packing.OVERFLOW_MODES}, got {overflow!r}")
        self.batch_size, self.seq_len, self.pad_id, self.overflow = batch_size, seq_len, pad_id, overflow

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(batch_size={self.batch_size}, seq_len={self.seq_len})"


class _PackedBatchIterator(grain.DatasetIterator):
    """State: the parent's state before the first document not yet fully packed, the index of its next
    chunk, and the overflow counters as they were before that document was read."""

    def __init__(self, parent: grain.DatasetIterator, ds: PackedBatchIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._stats = packing.PackStats()
        self._resume_chunk = 0
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._chunks: list[packing.Document] | None = None
        self._chunk = 0
        self._parent_state_before = None
        self._stats_before = None

    def _read_document(self) -> bool:
        self._parent_state_before = copy.deepcopy(self._parent.get_state())
        self._stats_before = dataclasses.replace(self._stats)
        try:
            doc = next(self._parent)
        except StopIteration:
            self._clear_pending()
            return False
        ds = self._ds
        self._stats.record(len(doc), ds.seq_len, ds.overflow)
        if len(doc) > ds.seq_len and ds.overflow == "truncate" and self._stats.truncated == 1:
            logging.warning("truncating documents longer than seq_len=%d (first one has %d tokens); "
                            "see the iterator's .stats for counts", ds.seq_len, len(doc))
        self._chunks = packing.split_document(doc, ds.seq_len, ds.overflow)
        self._chunk, self._resume_chunk = self._resume_chunk, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        packer = packing.RowPacker(ds.batch_size, ds.seq_len)
        while True:
            if self._chunks is None and not self._read_document():
                if packer.is_empty:
                    raise StopIteration
                break
            if not packer.add(self._chunks[self._chunk]):
                break  # this chunk opens the next batch
            self._chunk += 1
            if self._chunk == len(self._chunks):
                self._clear_pending()
        return packer.to_batch(ds.pad_id)

    @property
    def stats(self) -> packing.PackStats:
        return dataclasses.replace(self._stats)

    def get_state(self) -> dict[str, Any]:
        if self._chunks is None:
            parent, chunk, stats = self._parent.get_state(), self._resume_chunk, self._stats
        else:
            parent, chunk, stats = self._parent_state_before, self._chunk, self._stats_before
        return {"parent": copy.deepcopy(parent), "chunk": int(chunk), "stats": dataclasses.asdict(stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._stats = packing.PackStats(**state["stats"])
        self._clear_pending()
        self._resume_chunk = int(state["chunk"])


def _records(source, *, seed: int, split: str, text_per: str, task_weights, heldout_fraction):
    """The record MapDataset for a source spec, and whether it is already infinite and seeded."""
    if isinstance(source, str) and source == "builtin":
        builtin = sources.BuiltinTaskSource(seed, split=split, weights=task_weights,
                                            heldout_fraction=heldout_fraction)
        return grain.MapDataset.source(builtin), True
    if isinstance(source, sources.BuiltinTaskSource):
        return grain.MapDataset.source(source), True
    if isinstance(source, (str, list, tuple)):
        return grain.MapDataset.source(sources.read_file_documents(source, text_per=text_per)), False
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return grain.MapDataset.source(source), False
    raise ValueError(f"unknown data source {source!r}; pass 'builtin', file paths, or a sequence of "
                     "{'prompt', 'completion'} records")


def make_train_iterator(source: Any, tokenizer, *, batch_size: int, seq_len: int, seed: int,
                        mask_prompt: bool = True, overflow: str = "split",
                        num_epochs: int | None = None, split: str = "train",
                        task_weights: dict[str, float] | None = None,
                        heldout_fraction: float = 0.1, text_per: str = "file",
                        shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """Batches {"tokens", "targets", "segment_ids", "positions": int32 [B, L], "loss_mask": float32 [B, L]}.

    Args:
      source: "builtin" (the task mixture; `split` picks train or held-out eval problems), a
        `sources.BuiltinTaskSource`, text/JSONL file paths (a path, directory, glob or list), or any
        sequence of {"prompt": str, "completion": str} records.
      tokenizer: from `tokenizer.load_tokenizer`.
      seed: fixes the builtin problems and the file shuffle.
      mask_prompt: train only on completion tokens (and EOS), not on the prompt.
      overflow: "split" or "truncate" documents longer than seq_len.
      num_epochs: passes over a finite file source (None: forever). The builtin source is infinite.
      shard_index, shard_count: this host's share of the records (one shard per data-loading process).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    ds, infinite = _records(source, seed=seed, split=split, text_per=text_per,
                            task_weights=task_weights, heldout_fraction=heldout_fraction)
    if not infinite:
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]

    def tokenize(record: dict) -> packing.Document:
        return packing.encode_document(tokenizer, record["prompt"], record["completion"],
                                       mask_prompt=mask_prompt)

    # Generating and tokenising is cheap Python; threads would only contend for the GIL.
    docs = ds.map(tokenize).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    packed = PackedBatchIterDataset(docs, batch_size=batch_size, seq_len=seq_len,
                                    pad_id=tokenizer.pad_id, overflow=overflow)
    return iter(packed)
