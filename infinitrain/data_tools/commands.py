"""Click commands for the data tools (`tokenizer train`, `prepare`, `data verify|inspect|passkey`): parse, call, report."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("tokenizer")
def tokenizer_group() -> None:
    """Train tokenizers."""


@tokenizer_group.command("train")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--vocab-size", type=int, required=True, help="Vocabulary size, specials included (>= 259).")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Where to write tokenizer.json.")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "jsonl"]), default="auto", show_default=True,
              help="auto: .jsonl files are JSONL, others one document a file.")
@click.option("--text-field", default=None, help="JSONL field holding the text [default: text].")
@click.option("--min-frequency", type=int, default=2, show_default=True, help="Drop merges seen fewer times.")
def tokenizer_train_cmd(inputs, vocab_size, out, fmt, text_field, min_frequency) -> None:
    """Train a byte-level BPE with <|bos|>, <|eos|>, <|pad|> (ids 0, 1, 2) on INPUT files, folders or globs."""
    from infinitrain.data_tools.inputs import Document, ReadOptions, expand_inputs, read_documents
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe

    paths = expand_inputs(inputs)
    opts = ReadOptions(format=fmt, text_field=text_field)
    texts = (d.text for d in read_documents(paths, opts) if isinstance(d, Document))
    tok = train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    save_tokenizer(tok, out)
    click.echo(f"wrote {out}: vocab {tok.get_vocab_size()} from {len(paths)} file(s)")
