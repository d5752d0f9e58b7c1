"""Prompt tokenization and the prompt-embedding cache. Torch-free."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stdrc.runtime.errors import BundleError


@dataclass(frozen=True)
class ByteTokenizer:
    """The tiny preset's tokenizer: UTF-8 bytes + BOS, left-padded like LTX-2's Gemma tokenizer."""

    max_length: int
    pad_id: int = 0
    bos_id: int = 1
    offset: int = 3

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.bos_id] + [b + self.offset for b in text.encode("utf-8")]
        ids = ids[: self.max_length]
        pad = self.max_length - len(ids)
        token_ids = np.array([[self.pad_id] * pad + ids], dtype=np.int64)
        mask = np.array([[0] * pad + [1] * len(ids)], dtype=np.int64)
        return token_ids, mask


class JsonTokenizer:
    """A `tokenizer.json` (Gemma's) run by `tokenizers`: no torch, no transformers.

    Same ids and mask as ltx-core's LTXVGemmaTokenizer: prompt stripped, BOS from the file's
    template, truncated to `max_length`, left-padded with `pad_id`.
    """

    def __init__(self, path: Path, max_length: int, pad_id: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BundleError("this bundle's Gemma tokenizer needs the `tokenizers` package: pip install tokenizers")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{path} is not a readable tokenizer.json ({e}): rebuild the bundle") from e
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(direction="left", pad_id=pad_id, length=max_length)

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self._tokenizer.encode(text.strip())
        return (np.array([encoding.ids], dtype=np.int64), np.array([encoding.attention_mask], dtype=np.int64))


def tokenizer_from_manifest(text: dict, bundle_dir: Path) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    kind = text.get("tokenizer")
    if kind == "bytes":
        return ByteTokenizer(max_length=int(text["max_length"]))
    if kind == "hf-tokenizers":
        from stdrc.runtime.manifest import bundle_path

        return JsonTokenizer(bundle_path(bundle_dir, text["file"]), int(text["max_length"]), int(text["pad_id"]))
    raise BundleError(
        f"bundle text side uses tokenizer {kind!r}, which this runtime cannot run: rebuild the bundle"
    )


class PromptCache:
    """Text embeddings cached by prompt (LRU): the empty prompt ("no text") is computed once."""

    def __init__(self, encode: Callable[[str], tuple[np.ndarray, np.ndarray]], capacity: int = 32):
        self._encode = encode
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        if prompt in self._items:
            self._items.move_to_end(prompt)
            return self._items[prompt]
        value = self._encode(prompt)
        self._items[prompt] = value
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)
