"""Test helpers for generation and evaluation: a small BPE, tiny saved models, prepared shards, main() in-process."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from infinitrain.data_tools.passkey import FILLER, QUESTION, TASK, needle
from infinitrain.data_tools.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from infinitrain.model import InfiniLM, ModelConfig

WORDS = ("the grass is green the sky is blue the sun is yellow here we go there and back again "
         "a long river runs past the old mill where the miller sleeps").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "." for _ in range(n)]


def make_tokenizer(path: Path) -> Path:
    """A byte-level BPE (vocab 512) trained on passkey text and the word corpus; eos/bos/pad are ids 0-2."""
    texts = [TASK + FILLER * 3 + needle(12345) + QUESTION + " 678 90.", *corpus(200)]
    save_tokenizer(train_bpe(texts, vocab_size=512), path)
    return path


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                 segment_len=16), **kw})


def make_model(directory: Path, tokenizer: Path | None, *, gate: float = 2.0, seed: int = 0, **kw) -> InfiniLM:
    """A random tiny model with open gates (sigmoid(β) ≈ 0.88: the memory matters), saved with its tokenizer."""
    torch.manual_seed(seed)
    model = InfiniLM(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.gate_parameters():
            p.fill_(gate)
    model.save_pretrained(directory)
    if tokenizer is not None:
        (Path(directory) / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return model


def codec_of(tokenizer: Path):
    from infinitrain.infer.codec import Codec

    tok, info = load_tokenizer(tokenizer)
    return Codec(tok, info.eos_id, str(tokenizer))


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``infinitrain ARGV`` through the real console entry (error lines and exit codes), in this process."""
    from infinitrain.cli import main

    old = sys.argv
    sys.argv = ["infinitrain", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
