"""Packing tokenised documents into fixed [B, L] rows with segment ids, positions and a loss mask.

A document is its token ids plus a per-token `trainable` flag saying whether that token may be a
*target* (False for prompt tokens when only the completion is trained). Inside a row each document keeps
all of its tokens; the target of position t is the token at t+1 of the same document, so the last token
of a document (and padding) has no target and a zero loss mask. Nothing crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

OVERFLOW_MODES = ("split", "truncate")


@dataclasses.dataclass(frozen=True)
class Document:
    tokens: np.ndarray     # int32 [n]
    trainable: np.ndarray  # bool [n]: token i may be a training target

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.tokens.shape != self.trainable.shape:
            raise ValueError(f"tokens {self.tokens.shape} and trainable {self.trainable.shape} must be equal 1-D")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def encode_document(tokenizer, prompt: str, completion: str, *, mask_prompt: bool) -> Document:
    """BOS + prompt + completion + EOS; with `mask_prompt` only completion tokens and EOS are targets."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    completion_ids = tokenizer.encode(completion) if completion else []
    tokens = np.array([tokenizer.bos_id, *prompt_ids, *completion_ids, tokenizer.eos_id], np.int32)
    trainable = np.ones(tokens.shape, bool)
    if mask_prompt:
        trainable[:1 + len(prompt_ids)] = False
    return Document(tokens, trainable)


def split_document(doc: Document, seq_len: int, overflow: str = "split") -> list[Document]:
    """Cuts a document longer than `seq_len` into rows that fit.

    "split": chunks of seq_len tokens with a stride of seq_len - 1, so consecutive chunks share one token
    and every next-token target of the document is trained exactly once.
    "truncate": keeps the first seq_len tokens (the caller counts the rest as dropped).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to hold a token and its target, got {seq_len}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    n = len(doc)
    if n <= seq_len:
        return [doc]
    if overflow == "truncate":
        return [Document(doc.tokens[:seq_len], doc.trainable[:seq_len])]
    chunks = []
    for start in range(0, n - 1, seq_len - 1):
        stop = min(start + seq_len, n)
        chunks.append(Document(doc.tokens[start:stop], doc.trainable[start:stop]))
    return chunks


def rows_to_batch(rows: Sequence[Sequence[Document]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lays out rows of documents as the arrays the train step consumes."""
    num_rows = len(rows)
    tokens = np.full((num_rows, seq_len), pad_id, np.int32)
    targets = np.full((num_rows, seq_len), pad_id, np.int32)
    segment_ids = np.zeros((num_rows, seq_len), np.int32)
    positions = np.zeros((num_rows, seq_len), np.int32)
    loss_mask = np.zeros((num_rows, seq_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for seg, doc in enumerate(row, start=1):
            n = len(doc)
            if at + n > seq_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than seq_len={seq_len}")
            tokens[r, at:at + n] = doc.tokens
            targets[r, at:at + n - 1] = doc.tokens[1:]
            segment_ids[r, at:at + n] = seg
            positions[r, at:at + n] = np.arange(n)
            loss_mask[r, at:at + n - 1] = doc.trainable[1:]
            at += n
    return {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


class RowPacker:
    """Greedy first-fit of documents into `num_rows` rows of `seq_len` tokens (one batch)."""

    def __init__(self, num_rows: int, seq_len: int):
        if num_rows < 1:
            raise ValueError(f"num_rows (the batch size) must be >= 1, got {num_rows}")
        self.seq_len = seq_len
        self.rows: list[list[Document]] = [[] for _ in range(num_rows)]
        self._used = [0] * num_rows

    def add(self, doc: Document) -> bool:
        """Places `doc` in the first row with room; False if no row has room."""
        if len(doc) > self.seq_len:
            raise ValueError(f"document of {len(doc)} tokens exceeds seq_len={self.seq_len}; split it first")
        for r, used in enumerate(self._used):
            if used + len(doc) <= self.seq_len:
                self.rows[r].append(doc)
                self._used[r] += len(doc)
                return True
        return False

    @property
    def is_empty(self) -> bool:
        return not any(self._used)

    def to_batch(self, pad_id: int) -> dict[str, np.ndarray]:
        return rows_to_batch(self.rows, self.seq_len, pad_id)


@dataclasses.dataclass
class PackStats:
    """Counters for documents that did not fit a row as they were."""
    documents: int = 0
    split: int = 0            # documents cut into several rows (no token lost)
    truncated: int = 0        # documents cut short
    dropped_tokens: int = 0   # tokens lost to truncation

    def record(self, doc_len: int, seq_len: int, overflow: str) -> None:
        self.documents += 1
        if doc_len > seq_len:
            if overflow == "split":
                self.split += 1
            else:
                self.truncated += 1
                self.dropped_tokens += doc_len - seq_len


def pack_documents(docs: Iterable[Document], *, batch_size: int, seq_len: int, pad_id: int,
                   overflow: str = "split") -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Packs a finite stream of documents, in order, into batches (the last one may be partly padding).

    A batch closes when the next document fits none of its rows; that document opens the next batch.
    """
    stats = PackStats()
    batches = []
    packer = RowPacker(batch_size, seq_len)
    for doc in docs:
        chunks = split_document(doc, seq_len, overflow)
        stats.record(len(doc), seq_len, overflow)
        for chunk in chunks:
            if not packer.add(chunk):
                batches.append(packer.to_batch(pad_id))
                packer = RowPacker(batch_size, seq_len)
                packer.add(chunk)
    if not packer.is_empty:
        batches.append(packer.to_batch(pad_id))
    return batches, stats
