"""``infinitrain convert gguf FILE.gguf --out DIR``: a llama.cpp GGUF as a Hugging Face Llama directory."""

from __future__ import annotations

import click

from infinitrain.cli_help import Group


@click.group("convert", cls=Group)
def convert_group() -> None:
    """Convert model files from other formats into ones infinitrain and transformers read."""


@convert_group.command("gguf")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New directory for config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json.")
def gguf_cmd(path: str, out: str) -> None:
    """Dequantise a llama GGUF (llama.cpp, Ollama) into a Hugging Face Llama directory, usable by
    `train --init-from DIR`, `generate DIR`, `eval ... DIR` and transformers' LlamaForCausalLM."""
    from infinitrain.model.gguf import convert_gguf

    done = convert_gguf(path, out)
    click.echo(f"wrote {done} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
