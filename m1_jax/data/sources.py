"""Random-access sources of text records {"prompt": str, "completion": str} for the pipeline.

The built-in task mixture is infinite and generates record i from (seed, split, i), so any index can be
read in any order and the stream is reproducible. Local text and JSONL files are read into memory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np

from m1_jax.data import tasks as tasks_lib

SPLITS = {"train": 0, "eval": 1}
# Large enough never to run out, small enough for len() (grain's MapDataset needs a length).
INFINITE_LEN = 2 ** 62
_MAX_TRIES = 10_000


def is_heldout(example: tasks_lib.Example, heldout_fraction: float) -> bool:
    """Stable hash split: a problem belongs to eval or train by its text, so the two never share one."""
    digest = zlib.crc32(f"{example.task}\0{example.prompt}".encode("utf-8"))
    return digest < heldout_fraction * 2 ** 32


class BuiltinTaskSource:
    """An infinite, index-addressable mixture of the procedural tasks.

    Record i draws its task (by `weights`) and its problem from `np.random.default_rng((seed, split, i))`.
    Problems are assigned to the "eval" split by a hash of their prompt (`heldout_fraction` of them), and
    each split rejects the other's problems, so held-out problems are never trained on.
    """

    def __init__(self, seed: int, *, split: str = "train",
                 weights: Mapping[str, float] | None = None,
                 tasks: Mapping[str, Callable[[np.random.Generator], tasks_lib.Example]] | None = None,
                 heldout_fraction: float = 0.1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 0.0 <= heldout_fraction < 1.0 or (split == "eval" and heldout_fraction == 0.0):
            raise ValueError(f"heldout_fraction must be in [0, 1) (and > 0 for the eval split), "
                             f"got {heldout_fraction}")
        self.tasks = dict(tasks if tasks is not None else tasks_lib.TASKS)
        weights = dict(weights) if weights is not None else {name: 1.0 for name in self.tasks}
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from {sorted(self.tasks)}")
        self.names = [name for name in weights if weights[name] > 0]
        if not self.names or any(w < 0 for w in weights.values()):
            raise ValueError(f"task weights must be >= 0 with at least one > 0, got {weights}")
        total = sum(weights[name] for name in self.names)
        self.probs = np.array([weights[name] / total for name in self.names])
        self.seed, self.split, self.heldout_fraction = int(seed), split, heldout_fraction

    def __len__(self) -> int:
        return INFINITE_LEN

    def example(self, index: int) -> tasks_lib.Example:
        rng = np.random.default_rng((self.seed, SPLITS[self.split], int(index)))
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        want_heldout = self.split == "eval"
        for _ in range(_MAX_TRIES):
            example = self.tasks[name](rng)
            if is_heldout(example, self.heldout_fraction) == want_heldout:
                return example
        raise ValueError(f"task {name!r} produced no {self.split} problem in {_MAX_TRIES} tries; its "
                         f"problem space is too small for heldout_fraction={self.heldout_fraction}")

    def __getitem__(self, index: int) -> dict:
        example = self.example(index)
        return {"prompt": example.prompt, "completion": example.solution}


def heldout_examples(num: int, *, seed: int, task_weights: dict[str, float] | None = None,
                     heldout_fraction: float = 0.1) -> list[tasks_lib.Example]:
    """The first `num` held-out builtin problems (never seen by the train split), for eval and RL."""
    source = BuiltinTaskSource(seed, split="eval", weights=task_weights,
                               heldout_fraction=heldout_fraction)
    return [source.example(i) for i in range(num)]


def train_examples(num: int, *, seed: int, start: int = 0, task_weights: dict[str, float] | None = None,
                   heldout_fraction: float = 0.1) -> list[tasks_lib.Example]:
    """Train-split builtin problems start..start+num-1 as `Example`s (e.g. RL prompts)."""
    source = BuiltinTaskSource(seed, split="train", weights=task_weights,
                               heldout_fraction=heldout_fraction)
    return [source.example(i) for i in range(start, start + num)]


def read_text_documents(paths: Sequence[str], *, per: str = "file") -> list[dict]:
    """One record per file, or per blank-line-separated block (`per="block"`)."""
    if per not in ("file", "block"):
        raise ValueError(f"per must be 'file' or 'block', got {per!r}")
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        parts = [text] if per == "file" else re.split(r"\n\s*\n", text)
        records.extend({"prompt": "", "completion": p.strip()} for p in parts if p.strip())
    return records


def read_jsonl_documents(paths: Sequence[str]) -> list[dict]:
    """One record per line: {"text": ...} or {"prompt": ..., "completion": ...}."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "prompt" in row and "completion" in row:
                    records.append({"prompt": str(row["prompt"]), "completion": str(row["completion"])})
                elif "text" in row:
                    records.append({"prompt": "", "completion": str(row["text"])})
                else:
                    raise ValueError(f"{path}:{line_no} has neither a 'text' field nor 'prompt' and "
                                     f"'completion' fields (keys: {sorted(row)})")
    return records


def _expand(paths: str | Sequence[str]) -> list[str]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    files = []
    for p in paths:
        if os.path.isdir(p):
            files.extend(sorted(f for f in glob.glob(os.path.join(p, "*"))
                                if f.endswith((".txt", ".jsonl", ".md"))))
        elif any(c in p for c in "*?["):
            files.extend(sorted(glob.glob(p)))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"data path {p!r} does not exist; pass 'builtin', files, a directory or a glob")
    if not files:
        raise ValueError(f"no .txt/.jsonl/.md files found under {paths}")
    return files


def read_file_documents(paths: str | Sequence[str], *, text_per: str = "file") -> list[dict]:
    """Reads .jsonl files as JSONL and every other file as plain text."""
    records = []
    for path in _expand(paths):
        if path.endswith(".jsonl"):
            records.extend(read_jsonl_documents([path]))
        else:
            records.extend(read_text_documents([path], per=text_per))
    if not records:
        raise ValueError(f"the files {paths} hold no documents")
    return records
