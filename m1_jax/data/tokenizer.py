"""Tokenizers: a byte-level default and a wrapper around a local HF `tokenizer.json`.

Both expose the same small interface (`encode`, `decode`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`)
so the pipeline, the RL rollout and generation never care which one is in use.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

from absl import logging


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: Sequence[int]) -> str:
        ...


class ByteTokenizer:
    """ids 0..255 are the utf-8 bytes; 256, 257, 258 are PAD, BOS, EOS."""

    num_bytes = 256
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials (and anything out of range, e.g. sampled from a padded vocab) carry no text.
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.num_bytes)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


# Spellings of the special tokens in common tokenizer.json files, tried in order when neither the
# caller nor a tokenizer_config.json names them. MiniMax uses <beginning_of_sentence>/<end_of_sentence>.
_BOS_CANDIDATES = ("<beginning_of_sentence>", "<s>", "<bos>", "[BOS]", "<|begin_of_text|>",
                   "<|startoftext|>", "<|im_start|>")
_EOS_CANDIDATES = ("<end_of_sentence>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>",
                   "<|eot_id|>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


def _special_name(value) -> str | None:
    """tokenizer_config.json stores specials as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A local `tokenizer.json` loaded with the `tokenizers` library (no network, no transformers)."""

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist; pass the path of a tokenizer.json "
                             "(or a directory holding one), or 'byte' for the byte-level tokenizer")
        import tokenizers  # Imported here so the byte tokenizer works without the dependency.

        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        config = {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)

        def find(explicit, key, candidates):
            names = [explicit] if explicit is not None else [_special_name(config.get(key)), *candidates]
            for name in names:
                if name is not None and self._tok.token_to_id(name) is not None:
                    return self._tok.token_to_id(name)
            if explicit is not None:
                raise ValueError(f"{key} {explicit!r} is not in the vocabulary of {path}; pass a token it has")
            return None

        eos_id = find(eos_token, "eos_token", _EOS_CANDIDATES)
        if eos_id is None:
            raise ValueError(f"could not find an end-of-sequence token in {path}; pass eos_token=... "
                             f"(tried tokenizer_config.json and {_EOS_CANDIDATES})")
        bos_id = find(bos_token, "bos_token", _BOS_CANDIDATES)
        if bos_id is None:
            logging.info("tokenizer %s has no BOS token; using EOS (%d) as BOS", path, eos_id)
            bos_id = eos_id
        pad_id = find(pad_token, "pad_token", _PAD_CANDIDATES)
        if pad_id is None:
            logging.info("tokenizer %s has no PAD token; using EOS (%d) as PAD", path, eos_id)
            pad_id = eos_id
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        kept = [int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self.vocab_size]
        return self._tok.decode(kept, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | None) -> Tokenizer:
    """None or "byte" -> ByteTokenizer; anything else is a path to a tokenizer.json (or its directory)."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
