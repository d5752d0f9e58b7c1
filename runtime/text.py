"""Prompt tokenization and the prompt-embedding cache. Torch-free."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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


def tokenizer_from_manifest(text: dict) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    kind = text.get("tokenizer")
    if kind == "bytes":
        return ByteTokenizer(max_length=int(text["max_length"]))
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
