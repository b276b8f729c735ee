"""``infinitrain train``: parse, call ``train()``, report. Also ``python -m infinitrain.train`` for launchers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.command("train")
@click.option("--recipe", required=True, help="Shipped recipe name (debug) or a path to a recipe .yaml.")
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
@click.option("--data", "data", default=None, help="Training data: a text file, a directory of .txt files "
              "(byte-level), or prepared shards. Overrides data.path.")
@click.option("--run-dir", default=None, help="Run directory (default runs/<recipe name>).")
@click.option("--resume", default="auto", show_default=True,
              help="auto: newest committed checkpoint of the run dir if any; none: start fresh; or a checkpoint dir.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
def train_cmd(recipe: str, overrides: tuple[str, ...], data: str | None, run_dir: str | None, resume: str,
              local_rank: int | None) -> None:
    """Train an Infini-attention LM with DeepSpeed (single process, torchrun or the deepspeed launcher)."""
    from infinitrain.train.config import load_recipe
    from infinitrain.train.loop import train

    cfg = load_recipe(recipe, overrides, data)
    run_dir = run_dir or str(Path("runs") / Path(recipe).stem)
    summary = train(cfg, run_dir, resume, local_rank=local_rank)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"done: step {summary['step']}  loss {summary['loss']:.4f}  val_loss {summary['val_loss']:.4f}  "
                   f"skipped {summary['skipped_total']}  checkpoint {summary['checkpoint']}")


def main(argv: list[str] | None = None) -> None:
    """Entry for ``python -m infinitrain.train`` / ``deepspeed --module infinitrain.train``: the launcher puts
    ``--local_rank=N`` first, which a Click group would refuse."""
    from infinitrain.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    for a in argv:
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        else:
            rest.append(a)
    sys.argv = [sys.argv[0], "train", *rest]
    cli_main()
