"""`infinitrain eval passkey|ppl|summarize|classify`: parse, call one library function, report."""

from __future__ import annotations

import click

from infinitrain.cli_help import Group
from infinitrain.infer.commands import (_device, _dtype, _load, _model, _model_options, _progress, _tau_scale,
                                        _threads)


def _split_options(outputs: str, batch_size: int):
    """The options of an evaluation over the documents of a prepared split (``eval ppl``, ``eval classify``)."""
    options = [click.option("--split", default="val", show_default=True, help="Split of the prepared data to score."),
               click.option("--no-memory", is_flag=True, help="Switch the memory read off (local attention only)."),
               click.option("--out", "out_dir", default="evals", show_default=True, help=f"Folder for {outputs}."),
               click.option("--batch-size", type=int, default=batch_size, show_default=True,
                            help="Documents streamed side by side."),
               click.option("--max-documents", type=int, default=None, help="Stop after this many documents."),
               _device, _dtype, _tau_scale, _progress, _threads]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def _wrote(json_path, png) -> None:
    """Where the results went (stderr); a one-line note when the PNG could not be drawn."""
    from infinitrain.evaluate.plots import MISSING

    click.echo(f"wrote {json_path}" + (f" and {png}" if png else ""), err=True)
    if png is None:
        click.echo(f"note: {MISSING}", err=True)


@click.group("eval", cls=Group)
def eval_group() -> None:
    """Long-context evaluations: passkey retrieval, perplexity per segment, summarization ROUGE, classification."""


@eval_group.command("classify")
@_model
@click.option("--data", required=True, help="Prepared classification shards (`prepare --format classification`).")
@_split_options("classify.json", batch_size=8)
def classify_cmd(model, data, split, no_memory, out_dir, batch_size, max_documents, device, dtype, memory_tau_scale,
                 progress, threads) -> None:
    """Accuracy, macro-F1 and the confusion matrix of a classifier (task: classification), each document streamed
    through the memory one segment at a time (table on stdout, JSON in --out)."""
    from infinitrain.evaluate import classify as cl

    cfg = cl.ClassifyConfig(data=data, split=split, memory=not no_memory, batch_size=batch_size,
                            max_documents=max_documents)
    m, _ = _load(model, None, device, dtype, threads, need_tokenizer=False, classifier=True,
                 memory_tau_scale=memory_tau_scale)
    report = cl.run_classify(m, cfg, model_name=model, progress=progress)
    click.echo(cl.format_table(report))
    _wrote(*cl.write_outputs(report, out_dir))


@eval_group.command("passkey")
@_model
@click.option("--lengths", default="1k,4k,16k,64k", show_default=True, help="Context lengths in tokens (k = 1024).")
@click.option("--depths", default="0,25,50,75,100", show_default=True,
              help="Needle depths in percent (0 = farthest from the question).")
@click.option("--samples", type=int, default=10, show_default=True, help="Prompts per (length, depth).")
@click.option("--out", "out_dir", default="evals", show_default=True, help="Folder for passkey.json and passkey.png.")
@click.option("--no-memory", is_flag=True, help="Switch the memory read off (local attention only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pass keys.")
@click.option("--max-new-tokens", type=int, default=10, show_default=True, help="Tokens generated per answer.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts generated side by side.")
@_model_options
def passkey_cmd(model, lengths, depths, samples, out_dir, no_memory, seed, max_new_tokens, batch_size, tokenizer,
                device, dtype, memory_tau_scale, progress, threads) -> None:
    """Passkey retrieval accuracy per (length, depth): a table on stdout, JSON and a heatmap PNG in --out."""
    from infinitrain.evaluate import passkey as pk

    cfg = pk.PasskeyConfig(lengths=tuple(pk.parse_lengths(lengths)), depths=tuple(pk.parse_depths(depths)),
                           samples=samples, seed=seed, max_new_tokens=max_new_tokens, memory=not no_memory,
                           batch_size=batch_size)
    m, codec = _load(model, tokenizer, device, dtype, threads, memory_tau_scale=memory_tau_scale)
    report = pk.run_passkey(m, codec, cfg, model_name=model, progress=progress)
    report.memory_tau_scale = memory_tau_scale
    click.echo(pk.format_table(report))
    _wrote(*pk.write_outputs(report, out_dir))


@eval_group.command("ppl")
@_model
@click.option("--data", required=True, help="Prepared shards folder (`infinitrain prepare`).")
@_split_options("ppl.json and ppl.png", batch_size=4)
def ppl_cmd(model, data, split, no_memory, out_dir, batch_size, max_documents, device, dtype, memory_tau_scale,
            progress, threads) -> None:
    """Loss and perplexity per segment index over whole documents, every segment (table, JSON, PNG)."""
    from infinitrain.evaluate import ppl

    cfg = ppl.PplConfig(data=data, split=split, memory=not no_memory, batch_size=batch_size,
                        max_documents=max_documents)
    m, _ = _load(model, None, device, dtype, threads, need_tokenizer=False, memory_tau_scale=memory_tau_scale)
    report = ppl.run_ppl(m, cfg, model_name=model, progress=progress)
    report.dtype = str(next(m.parameters()).dtype).replace("torch.", "")
    click.echo(ppl.format_table(report))
    _wrote(*ppl.write_outputs(report, out_dir))


@eval_group.command("summarize")
@_model
@click.option("--data", required=True, help="JSONL file with a document and a reference summary per line.")
@click.option("--document-field", default="document", show_default=True, help="JSONL field of the document.")
@click.option("--summary-field", default="summary", show_default=True, help="JSONL field of the reference summary.")
@click.option("--separator", default="\n\nSummary:\n", show_default=True,
              help="Text between document and summary (as in `prepare --format summarization`).")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True, help="Longest summary in tokens.")
@click.option("--temperature", type=float, default=0.5, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling probability.")
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Documents summarized side by side.")
@click.option("--max-records", type=int, default=None, help="Score only the first N records.")
@click.option("--out", "out_dir", default="evals", show_default=True, help="Folder for summarize.json.")
@_model_options
def summarize_cmd(model, data, document_field, summary_field, separator, max_new_tokens, temperature, top_p, top_k,
                  seed, batch_size, max_records, out_dir, tokenizer, device, dtype, memory_tau_scale, progress,
                  threads) -> None:
    """ROUGE-1/2/L of generated summaries (the paper's decoding: temperature 0.5, top-p 0.95, 1024 tokens)."""
    from infinitrain.evaluate import summarize as sm

    cfg = sm.SummarizeConfig(data=data, document_field=document_field, summary_field=summary_field,
                             separator=separator, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, batch_size=batch_size, max_records=max_records)
    sm.rouge_scorer()  # fail before loading the model when rouge-score is missing
    m, codec = _load(model, tokenizer, device, dtype, threads, memory_tau_scale=memory_tau_scale)
    report = sm.run_summarize(m, codec, cfg, model_name=model, progress=progress)
    click.echo(sm.format_table(report))
    click.echo(f"wrote {sm.write_outputs(report, out_dir)}", err=True)
