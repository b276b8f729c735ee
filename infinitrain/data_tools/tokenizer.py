"""Tokenizers: train a byte-level BPE with bos/eos/pad, load any Hugging Face tokenizer.json and find its special ids.

Only ``tokenizer.json`` files are read (never ``tokenizer_config.json`` ``auto_map`` code), so loading a
tokenizer cannot run anything. Special-token text inside documents (a literal ``<|endoftext|>``) is encoded
as plain text by :func:`encoder`, so a document can never inject a control token into the training stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from infinitrain.atomic import write_atomic
from infinitrain.errors import ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the 256 byte symbols plus the specials: a pure byte-level tokenizer

# Names used by common tokenizer.json files (ours, GPT-2/SmolLM, Llama 3, Llama 2/Mistral, Gemma), in order.
EOS_NAMES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>")
PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>")


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """What the shards record about the tokenizer that made them."""

    path: str
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int  # the eos id when the tokenizer has no pad token (padding is always loss-masked)
    # the tokenizer's own template puts bos_id before a text (Llama 3's <|begin_of_text|>): every document then
    # starts with it, in prepare, generation and every eval (``doc_start_bos``)
    bos_at_doc_start: bool = False

    def __post_init__(self) -> None:
        for name in ("eos_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{self.path}: {name}={getattr(self, name)} outside vocab of {self.vocab_size}")

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def to_dict(self) -> dict:
        """The index's ``tokenizer`` entry. ``bos_at_doc_start`` only when set: folders of tokenizers without a
        BOS template stay byte-identical (and keep their prepare fingerprint); a missing key reads as false."""
        d = {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
             "bos_id": self.bos_id, "pad_id": self.pad_id}
        return {**d, "bos_at_doc_start": True} if self.bos_at_doc_start else d


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
              split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, lossless decode) with bos/eos/pad as ids 0, 1, 2.

    ``split_digits`` makes every digit its own token (as Llama 2 and Mistral do): a number is never merged, so
    every number of any length is spelled by the same ten tokens (passkeys, arithmetic, copying ids).
    """
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size {vocab_size} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                          "specials)")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def byte_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte (no merges) plus bos/eos/pad: lossless and corpus-independent."""
    return train_bpe([], vocab_size=MIN_VOCAB)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` atomically (temp file in the same folder, then rename)."""
    write_atomic(Path(path), tok.to_str().encode())


def resolve_tokenizer_path(path: str | os.PathLike) -> Path:
    """A ``tokenizer.json`` file, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"{p}: tokenizer file not found")
    return p


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None) -> tuple[Tokenizer, TokenizerInfo]:
    """Load any Hugging Face ``tokenizer.json`` and find eos (required), bos and pad."""
    p = resolve_tokenizer_path(path)
    raw = p.read_bytes()
    try:
        parsed = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{p}: not a valid tokenizer.json (invalid JSON: {err})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        found = f"keys {', '.join(sorted(parsed)[:5]) or 'none'}" if isinstance(parsed, dict) else type(parsed).__name__
        raise ConfigError(f"{p}: valid JSON, but not a Hugging Face tokenizer.json (no 'model' mapping; {found})")
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{p}: not a valid tokenizer.json ({first})") from None
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ConfigError(f"{p}: --eos-token {eos_token!r} is not in the vocabulary")
    else:
        eos_id = _first_id(tok, EOS_NAMES)
        if eos_id is None:
            raise ConfigError(f"{p}: no end-of-document token found (tried {', '.join(EOS_NAMES)}); pass --eos-token")
    template_bos = doc_start_bos(tok)
    bos_id = _first_id(tok, BOS_NAMES) if template_bos is None else template_bos
    pad_id = _first_id(tok, PAD_NAMES)
    info = TokenizerInfo(path=str(p), sha256=hashlib.sha256(raw).hexdigest(), vocab_size=vocab_size,
                         eos_id=eos_id, bos_id=bos_id, pad_id=eos_id if pad_id is None else pad_id,
                         bos_at_doc_start=template_bos is not None)
    return encoder(tok), info


def doc_start_bos(tok: Tokenizer) -> int | None:
    """The one special token the tokenizer's own post-processor puts before a single text (Llama 3 puts
    <|begin_of_text|>, Llama 2 and Mistral <s>, Gemma <bos>), else None (GPT-2, SmolLM, ours: no template).
    A model trained from such a tokenizer's weights saw it at every document start, so we insert it there too."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[0] if k == 1 else None
    return None


def encoder(tok: Tokenizer) -> Tokenizer:
    """The tokenizer set up for data: special-token text in documents is encoded as ordinary text."""
    tok.encode_special_tokens = True
    tok.no_truncation()
    tok.no_padding()
    return tok


def _first_id(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None
