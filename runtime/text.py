"""Prompt tokenization and the prompt-embedding cache. Torch-free."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stdrc.runtime.errors import BundleError
from stdrc.runtime.schema import TextConfig

log = logging.getLogger(__name__)
PROMPT_CACHE_ENV = "STDRC_PROMPT_CACHE"
Embedding = tuple[np.ndarray, np.ndarray]  # context [1, L, D] float32, context_mask [1, L] int64


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
        except ImportError as e:
            raise BundleError(
                "this bundle's Gemma tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{path} is not a readable tokenizer.json ({e}): rebuild the bundle") from e
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(direction="left", pad_id=pad_id, length=max_length)

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self._tokenizer.encode(text.strip())
        return (np.array([encoding.ids], dtype=np.int64), np.array([encoding.attention_mask], dtype=np.int64))


def tokenizer_from_manifest(text: TextConfig, bundle_dir: Path
                            ) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    kind = text.tokenizer
    if kind == "bytes":
        return ByteTokenizer(max_length=text.max_length)
    if kind == "hf-tokenizers":
        from stdrc.runtime.manifest import bundle_path

        return JsonTokenizer(bundle_path(bundle_dir, text.file), text.max_length, text.pad_id)
    raise BundleError(
        f"bundle text side uses tokenizer {kind!r}, which this runtime cannot run: rebuild the bundle"
    )


def default_prompt_store_dir() -> Path:
    return Path(os.environ.get(PROMPT_CACHE_ENV) or Path.home() / ".cache" / "stdrc" / "prompts")


class PromptStore:
    """Prompt embeddings on disk, so a repeated or precomputed prompt never loads the text engines.

    One folder per text side: its key hashes both text engines' sha256 and the tokenizer (kind, file
    sha256, length), so another text side never reuses an entry. One `.npz` per prompt (no pickle),
    holding the prompt itself; an entry that does not load, names another prompt, or has the wrong
    shape is ignored (and rewritten by the next `put`). Writes go through a temp file and a rename.
    """

    def __init__(self, folder: str | os.PathLike, text_key: str, shape: tuple[int, int]):
        self.folder = Path(folder) / text_key[:32]
        self.shape = shape  # (L, D) of context

    @staticmethod
    def text_key(text_encoder_sha256: str, text: TextConfig) -> str:
        parts = [text_encoder_sha256, text.tokenizer, text.sha256 or "", str(text.max_length),
                 "" if text.pad_id is None else str(text.pad_id)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def path(self, prompt: str) -> Path:
        return self.folder / (hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest() + ".npz")

    def get(self, prompt: str) -> Embedding | None:
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored, context, mask = str(data["prompt"]), data["context"], data["context_mask"]
        except Exception as e:
            log.info("prompt cache entry %s ignored (%s)", path, type(e).__name__)
            return None
        length, width = self.shape
        if (stored != prompt or context.shape != (1, length, width) or mask.shape != (1, length)
                or context.dtype != np.float32 or not np.isfinite(context).all()):
            log.info("prompt cache entry %s ignored (mismatched)", path)
            return None
        return context, mask.astype(np.int64)

    def put(self, prompt: str, value: Embedding) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".prompt.", suffix=".npz", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, prompt=np.array(prompt), context=value[0].astype(np.float32),
                         context_mask=value[1].astype(np.int64))
            os.replace(tmp, self.path(prompt))
        except OSError as e:  # a read-only or full cache folder costs speed, never a generation
            log.warning("prompt embeddings not cached in %s: %s", self.folder, e)
            Path(locals().get("tmp", "")).unlink(missing_ok=True) if "tmp" in locals() else None


class PromptCache:
    """Text embeddings cached by prompt: in memory (LRU), then on disk (`store`), then encoded.

    `encode` takes every prompt still missing at once (the text engines then open once for them all). The
    empty prompt ("no text") is computed once. `encoded` counts prompts that reached the encoder.
    """

    def __init__(self, encode: Callable[[list[str]], list[Embedding]], capacity: int = 32,
                 store: PromptStore | None = None):
        self._encode = encode
        self._capacity = capacity
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self.store = store
        self.encoded = 0

    def cached(self, prompt: str) -> bool:
        return prompt in self._items or (self.store is not None and self.store.get(prompt) is not None)

    def __call__(self, prompt: str) -> Embedding:
        self.fill([prompt])
        self._items.move_to_end(prompt)
        return self._items[prompt]

    def fill(self, prompts: list[str]) -> None:
        """Every prompt of `prompts` in memory: from memory, from disk, else encoded, the missing ones in one call."""
        missing = []
        for prompt in dict.fromkeys(prompts):
            value = self._items.get(prompt)
            if value is None and self.store is not None:
                value = self.store.get(prompt)
            if value is None:
                missing.append(prompt)
            else:
                self._keep(prompt, value)
        for prompt, value in zip(missing, self._encode(missing) if missing else []):
            self.encoded += 1
            if self.store is not None:
                self.store.put(prompt, value)
            self._keep(prompt, value)

    def _keep(self, prompt: str, value: Embedding) -> None:
        self._items[prompt] = value
        self._items.move_to_end(prompt)
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
