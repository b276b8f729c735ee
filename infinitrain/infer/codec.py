"""Text <-> token ids for inference: a ``tokenizer.json`` (Hugging Face ``tokenizers``) or UTF-8 bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, the ids ``infinitrain train --data file.txt`` trains on; the HF call shapes."""

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return _Encoding(list(text.encode("utf-8")))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return 256


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids for inference. ``tokenizer`` has the Hugging Face ``tokenizers`` call shapes."""

    tokenizer: Any
    eos_id: int | None
    source: str  # the tokenizer.json path, or "bytes"
    bos_id: int | None = None  # put before every document and prompt (the model's training data had it there)

    def encode(self, text: str) -> list[int]:
        """The ids of a piece of text (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_document(self, text: str) -> list[int]:
        """The ids of a whole document or prompt: BOS first when the model was trained with one at document starts."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos: bool | None = None) -> "Codec":
        """bos: whether documents start with the tokenizer's BOS, as recorded where the model was trained (the data's
        index, an export's config.json); None: as the tokenizer's own template says (``doc_start_bos``)."""
        from infinitrain.data_tools.tokenizer import load_tokenizer

        tok, info = load_tokenizer(path)
        bos = info.bos_at_doc_start if bos is None else bos
        return cls(tok, info.eos_id, info.path, info.bos_id if bos else None)

    @classmethod
    def bytes(cls) -> "Codec":
        return cls(ByteTokenizer(), None, "bytes")
