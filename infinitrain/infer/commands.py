"""`infinitrain generate`, and the model options and loader every inference command shares."""

from __future__ import annotations

import contextlib
import os
import sys

import click

_model = click.argument("model", metavar="MODEL")
_tokenizer = click.option("--tokenizer", default=None, help="tokenizer.json to use, or 'bytes' for byte-level runs "
                          "[default: the one found with MODEL].")
_device = click.option("--device", default="auto", show_default=True,
                       help="Torch device: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.")
_dtype = click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                      help="Cast the weights [default: as stored].")
_progress = click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bars on stderr.")
_tau_scale = click.option("--memory-tau-scale", type=float, default=1.0, show_default=True,
                          help="Multiply every memory temperature τ by this: a sharper memory read for contexts far "
                          "longer than training (choose it on validation prompts, e.g. `eval passkey --seed 1`). "
                          "Needs a model trained with model.memory_tau.")
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="torch CPU threads [default: torch's]; on a busy machine 1 can be much faster.")


def _model_options(f):
    """The options of every command that loads a model and reads text (generate, eval passkey, eval summarize),
    in this --help order: --tokenizer, --device, --dtype, --memory-tau-scale, --progress, --threads."""
    for option in (_threads, _progress, _tau_scale, _dtype, _device, _tokenizer):  # innermost first
        f = option(f)
    return f


def _load(model: str, tokenizer: str | None, device: str, dtype: str | None, threads: int | None,
          need_tokenizer: bool = True, classifier: bool | None = False, memory_tau_scale: float = 1.0):
    import torch

    from infinitrain.errors import ConfigError
    from infinitrain.infer.loading import describe, load_for_inference

    if threads is not None:
        torch.set_num_threads(threads)

    m, codec = load_for_inference(model, tokenizer=tokenizer, device=device, dtype=dtype,
                                  need_tokenizer=need_tokenizer, memory_tau_scale=memory_tau_scale)
    if classifier is not None and (m.config.labels is not None) != classifier:  # None: either kind
        raise ConfigError(f"{model}: a classifier (labels {', '.join(m.config.labels)}) predicts classes, not tokens: "
                          f"use `infinitrain eval classify`" if m.config.labels else
                          f"{model}: a language model has no class head (train with task: classification)")
    click.echo(describe(m, codec, memory_tau_scale), err=True)
    return m, codec


def _read_prompts(prompts: tuple[str, ...], files: tuple[str, ...], per_line: bool) -> list[str]:
    from pathlib import Path

    from infinitrain.errors import ConfigError

    out = list(prompts)
    for f in files:
        try:
            text = sys.stdin.read() if f == "-" else Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{f}: cannot read prompt file ({type(err).__name__}: {err})") from None
        out.extend([line for line in text.splitlines() if line.strip()] if per_line else [text])
    return out


@contextlib.contextmanager
def _open_prompt_file(name: str):
    """(binary stream, size in bytes or None) of a prompt file, '-' = stdin; unreadable: one-line ConfigError."""
    from infinitrain.errors import ConfigError

    if name == "-":
        yield sys.stdin.buffer, None
        return
    try:
        f = open(name, "rb")
    except OSError as err:
        raise ConfigError(f"{name}: cannot read prompt file ({type(err).__name__}: {err.strerror})") from None
    with f:
        yield f, os.fstat(f.fileno()).st_size


@click.command("generate")
@_model
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable: prompts are batched).")
@click.option("--prompt-file", "prompt_files", multiple=True, help="File holding one prompt ('-' = stdin); repeatable. "
              "A single file is read, tokenized and prefilled in pieces: memory stays flat at any length.")
@click.option("--lines", "per_line", is_flag=True, help="Each non-empty line of a --prompt-file is its own prompt.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens generated per row.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling: the smallest set reaching probability p.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (reproducible output).")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Continuations per prompt.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print text as it is generated (a single prompt and sample).")
@click.option("--no-memory", is_flag=True, help="Switch the memory read off (local attention only): what the "
              "model says without what its memory carried.")
@_model_options
def generate_cmd(model, prompts, prompt_files, per_line, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
                 stream, no_memory, tokenizer, device, dtype, memory_tau_scale, progress, threads) -> None:
    """Continue prompts with MODEL at constant memory (segment-wise prefill with the memory carried).

    MODEL is an export directory, a Hugging Face Llama directory (e.g. from `convert gguf`), a run directory (its
    newest committed checkpoint) or a checkpoint directory.
    Tokens/s go to stderr at the end. A classifier (task: classification) answers each prompt with its class
    (stdout) and the class probabilities (stderr), read at the prompt's last token.
    """
    from contextlib import nullcontext

    from infinitrain.evaluate.switches import memory_read_off
    from infinitrain.infer.generate import Sampling
    from infinitrain.infer.textgen import generate_file, generate_text

    one_file = len(prompt_files) == 1 and not prompts and not per_line  # read, tokenized and prefilled in pieces
    texts = None if one_file else _read_prompts(prompts, prompt_files, per_line)
    with _open_prompt_file(prompt_files[0]) if one_file else nullcontext((None, None)) as (f, size):
        m, codec = _load(model, tokenizer, device, dtype, threads, classifier=None, memory_tau_scale=memory_tau_scale)
        if m.config.labels is not None:
            return _answer_classes(m, codec, texts or _read_prompts((), prompt_files, False), not no_memory)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_id=codec.eos_id)
        options = dict(num_samples=num_samples, seed=seed, stream=sys.stdout if stream else None, progress=progress)
        with memory_read_off(m) if no_memory else nullcontext():  # generate prefills one segment per call
            if one_file:
                result = generate_file(m, codec, f, prompt_files[0], sampling, size=size, **options)
            else:
                result = generate_text(m, codec, texts, sampling, **options)
    if result.streamed:
        click.echo()
    elif len(result.texts) == 1:
        click.echo(result.texts[0])
    else:
        for p, s, text in zip(result.prompt_index, result.sample_index, result.texts):
            click.echo(f"=== prompt {p + 1}" + (f", sample {s + 1}" if num_samples > 1 else "") + " ===")
            click.echo(text)
    click.echo(result.summary(), err=True)


def _answer_classes(m, codec, texts: list[str], memory: bool) -> None:
    """A classifier's answer to each prompt: the most likely class on stdout, every class's probability on stderr."""
    from infinitrain.evaluate.classify import classify_texts

    for i, probs in enumerate(classify_texts(m, codec, texts, memory=memory)):
        if len(texts) > 1:
            click.echo(f"=== prompt {i + 1} ===")
        click.echo(max(probs, key=probs.get))
        click.echo("  ".join(f"{name} {p:.3f}" for name, p in probs.items()), err=True)
