"""Command-line entry point: a thin Click group; each command parses, calls one library function, reports."""

from __future__ import annotations

import click

from infinitrain import __version__
from infinitrain.cli_help import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="infinitrain")
def cli() -> None:
    """Train and run Infini-attention language models on DeepSpeed."""


@cli.command("presets")
def presets_cmd() -> None:
    """List the model presets with their parameter counts."""
    from infinitrain.model.config import PRESETS, format_count
    from infinitrain.model.lm import count_parameters

    for name, cfg in PRESETS.items():
        family = (f"update={cfg.update}" if cfg.arch == "infini" else
                  f"arch=megalodon z={cfg.n_heads * cfg.head_dim} v={cfg.v_dim} ema={cfg.ema_dim}")
        click.echo(f"{name:15s} {format_count(count_parameters(cfg)):>9s}  layers={cfg.n_layers} d={cfg.d_model} "
                   f"heads={cfg.n_heads}/{cfg.n_kv_heads} ffn={cfg.d_ff} segment={cfg.segment_len} {family}")


# --- command registration (each module owns its commands; keep these lines sorted) ---------------
from infinitrain.convert import convert_group  # noqa: E402
from infinitrain.data_tools.commands import data_group, prepare_cmd, tokenizer_group  # noqa: E402
from infinitrain.evaluate.commands import eval_group  # noqa: E402
from infinitrain.export import export_cmd  # noqa: E402
from infinitrain.infer.commands import generate_cmd  # noqa: E402
from infinitrain.plan import plan_cmd  # noqa: E402
from infinitrain.recipes.commands import recipes_group  # noqa: E402
from infinitrain.train.commands import train_cmd  # noqa: E402

cli.add_command(convert_group)
cli.add_command(data_group)
cli.add_command(eval_group)
cli.add_command(export_cmd)
cli.add_command(generate_cmd)
cli.add_command(plan_cmd)
cli.add_command(prepare_cmd)
cli.add_command(recipes_group)
cli.add_command(tokenizer_group)
cli.add_command(train_cmd)


def main() -> None:
    """Console entry: user errors become one line on stderr and a distinct exit code, never a traceback."""
    import os
    import sys

    from infinitrain.errors import InfinitrainError

    # The `deepspeed` launcher puts --local_rank=N before the command (`deepspeed $(which infinitrain) train ...`).
    args = sys.argv[1:]
    while args and args[0].startswith(("--local_rank=", "--local-rank=")):
        os.environ.setdefault("LOCAL_RANK", args.pop(0).split("=", 1)[1])
    try:
        cli(args=args, standalone_mode=False)
    except InfinitrainError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(err.code) from None
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as err:
        if isinstance(err, click.NoSuchOption) and "." in err.option_name:  # `train --schedule.steps=30`
            typed = next((a for a in args if a.startswith(err.option_name)), err.option_name + "=VALUE")
            err.message = f"{err.message.rstrip('.')}: an override has no dashes, write {typed.lstrip('-')}"
        err.show()
        raise SystemExit(err.exit_code) from None


def train_main(argv: list[str] | None = None) -> None:
    """Entry for ``python -m infinitrain.train`` / ``deepspeed --module infinitrain.train``: ``infinitrain train``
    with the launcher's ``--local_rank=N`` taken wherever it stands (a Click group would refuse it)."""
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    for a in argv:
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        else:
            rest.append(a)
    sys.argv = [sys.argv[0], "train", *rest]
    main()


if __name__ == "__main__":
    main()
