"""``infinitrain train``: parse, call ``train()``, report (``python -m infinitrain.train``: ``cli.train_main``)."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command("train")
@click.option("--recipe", required=True, help="Shipped recipe name (see `infinitrain recipes list`) or a path to a "
              "recipe .yaml.")
@click.argument("overrides", nargs=-1, metavar="[KEY.SUB=VALUE]...")
@click.option("--stage", default=None, help="Stage of a staged recipe (default: its first stage).")
@click.option("--data", "data", default=None, help="Training data: a text file, a directory of .txt files "
              "(byte-level), or prepared shards. Overrides data.path.")
@click.option("--init-from", "init_from", default=None, help="Start from these weights: a Hugging Face Llama dir, "
              "an exported model dir or a run dir. Overrides run.init_from; ignored when the run resumes.")
@click.option("--run-dir", default=None, help="Run directory (default runs/<recipe name>, or "
              "runs/<recipe name>/<stage> for a staged recipe).")
@click.option("--resume", default="auto", show_default=True,
              help="auto: newest committed checkpoint of the run dir if any; none: start fresh; or a checkpoint dir.")
@click.option("--allow-fallback", is_flag=True, help="If the newest checkpoint is damaged, resume from the previous "
              "one (logged) instead of stopping with an error.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
def train_cmd(recipe: str, overrides: tuple[str, ...], stage: str | None, data: str | None, init_from: str | None,
              run_dir: str | None, resume: str, allow_fallback: bool, local_rank: int | None) -> None:
    """Train an Infini-attention LM with DeepSpeed (single process, torchrun or the deepspeed launcher)."""
    from infinitrain.train.config import load_recipe
    from infinitrain.train.loop import train

    if init_from is not None:
        overrides = (*overrides, f"run.init_from={init_from}")
    cfg, stage = load_recipe(recipe, overrides, data, stage=stage, with_stage=True)
    run_dir = run_dir or str(Path("runs", Path(recipe).stem, *([stage] if stage else [])))
    explicit = {t.split("=", 1)[0][len("model."):] for t in overrides if t.startswith("model.")}
    cfg = prepare_init_from(cfg, run_dir, resume, stage, verbose=os.environ.get("RANK", "0") == "0",
                            explicit=explicit)
    if stage is not None and os.environ.get("RANK", "0") == "0":
        click.echo(f"stage {stage}: run dir {run_dir}", err=True)
    summary = train(cfg, run_dir, resume, local_rank=local_rank, allow_fallback=allow_fallback)
    if os.environ.get("RANK", "0") == "0":
        click.echo(done_line(summary, cfg.schedule.steps))
        import torch

        evaluate = cfg.eval.command(run_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                                    dtype=cfg.run.precision)
        if evaluate:
            click.echo(f"evaluate: {evaluate}")
    _close_process_group()


def done_line(summary: dict, steps: int) -> str:
    """The last line of ``train``: where the run stands (a finished run resumed says so, not ``loss nan``)."""
    if summary.get("finished_before"):
        return (f"done: the run had already reached step {summary['step']} of {steps}; nothing to train (raise "
                f"schedule.steps to go on)  checkpoint {summary['checkpoint']}")
    val = summary["val_loss"]  # None: no validation ran
    val = "none (the data has no validation split: data.val_fraction, or prepare --val-fraction)" \
        if val is None else f"{val:.4f}"
    return (f"done: step {summary['step']}  loss {summary['loss']:.4f}  val_loss {val}  "
            f"skipped {summary['skipped_total']}  checkpoint {summary['checkpoint']}")


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits, every rank together. Left to exit-time
    destructors, a rank of a finished 2-rank gloo run sometimes aborted ("terminate called without an active
    exception", SIGABRT), and the launcher reported a run that had committed its checkpoint as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def prepare_init_from(cfg, run_dir: str, resume: str, stage: str | None, verbose: bool,
                      explicit: set[str] | frozenset[str] = frozenset()):
    """Resolve ``stage:NAME``; take the model's shape and function fields from the source (``derive_model``; the
    ``explicit`` command-line fields excepted), or from the run's config.yaml when it resumes (its checkpoint wins
    and ``init_from`` is dropped); check the source against that model now (before DeepSpeed starts) and write
    the report to the run dir."""
    import dataclasses

    from infinitrain.errors import ConfigError
    from infinitrain.train import init_from as init
    from infinitrain.train.checkpoint import committed
    from infinitrain.train.config import STAGE_REF, resolve_stage_ref

    ref = cfg.run.init_from
    cfg = resolve_stage_ref(cfg, run_dir)
    if cfg.run.init_from is None:
        return cfg
    if resume not in ("auto", "none") or (resume == "auto" and committed(Path(run_dir) / "checkpoints")):
        if verbose:
            click.echo(f"resuming {run_dir}: run.init_from {cfg.run.init_from} is not applied", err=True)
        saved = _saved_model(Path(run_dir)) if (Path(run_dir) / "config.yaml").is_file() else \
            init.open_source(cfg.run.init_from, cfg.model).config
        model, _ = init.derive_model(cfg.model, saved, explicit)
        return cfg.replace(model=model, run=dataclasses.replace(cfg.run, init_from=None))
    if ref != cfg.run.init_from and not committed(Path(cfg.run.init_from) / "checkpoints"):
        raise ConfigError(f"stage {stage} starts from {ref[len(STAGE_REF):]}'s run {cfg.run.init_from}, which has no "
                          f"committed checkpoint: train that stage first (--stage {ref[len(STAGE_REF):]}, run dir "
                          f"{cfg.run.init_from}) or set run.init_from=DIR")
    model, derived = init.derive_model(cfg.model, init.open_source(cfg.run.init_from, cfg.model).config, explicit)
    cfg = cfg.replace(model=model)
    report = dataclasses.replace(init.report_for(cfg.model, cfg.run.init_from), derived=derived)
    if verbose:
        click.echo(report.summary(), err=True)
        init.write_report(report, run_dir)
    return cfg


def _saved_model(run_dir: Path):
    """The model a run was started with (its config.yaml, read by the run reader), which a resumed run keeps."""
    from infinitrain.errors import CheckpointError, ConfigError
    from infinitrain.infer.loading import RunPath, run_config

    try:
        return RunPath(run_dir, run_dir=run_dir, config=run_config(run_dir)).model_config
    except CheckpointError as err:
        raise ConfigError(f"{run_dir / 'config.yaml'}: cannot read the run's model to resume it ({err})") from None
