"""``infinitrain export``: a committed training checkpoint -> a model directory (safetensors, config.json,
tokenizer.json).

    RUN_DIR/checkpoints/step-N  --verify manifest sha256-->  gather ZeRO partitions (fp32)  -->  OUT/
        model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json above --max-shard-size)
        config.json       the ModelConfig, the dtype, the tokenizer ("tokenizer.json" or "bytes"), whether
                          documents start with its BOS (bos_at_doc_start, as the training data did), provenance
        tokenizer.json    the run's tokenizer (in the run, or beside its prepared data); none found is an error

Several runs (or checkpoints) of one model are averaged weight by weight into one export (a uniform "model
soup", Wortsman et al. 2022): ``infinitrain export runs/a runs/b runs/c --out soup``. Every checkpoint is verified,
the model configs and tokenizers must agree, and the mean is taken in float64 before the cast to ``--dtype``.

Everything is written under ``.OUT.partial`` beside OUT and renamed into place at the end, so OUT is either
absent or complete. The exported model is loaded by ``InfiniLM.from_pretrained(OUT)`` from JSON and
safetensors only (nothing unpickled). Reading the *training* checkpoint goes through DeepSpeed's
``zero_to_fp32``, which calls ``torch.load``: export forces every such call to ``weights_only=True``
(tensors, containers and three DeepSpeed record classes only), after checking every file's sha256 against
the checkpoint's manifest.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from infinitrain.atomic import fsync_dir, fsync_tree, sha256_file
from infinitrain.errors import ConfigError

if TYPE_CHECKING:
    from infinitrain.infer.loading import RunPath

PRECISIONS = ("bf16", "fp32")  # the training precisions (train.config.PRECISIONS)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, what: str = "--max-shard-size", bare: str = "b") -> int:
    """Bytes from ``5GB`` (10^9, as Hugging Face), ``512MiB`` (2^20), ``40KB``, or a plain number in the unit
    ``bare`` (bytes; ``plan --gpu-memory 80`` means 80 GB)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = (m.group(2).lower() or bare) if m else None
    if unit not in _UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of "
                          f"{'bytes' if bare == 'b' else bare.upper()}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what} {text!r} must be positive")
    return n


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Path
    step: int
    dtype: str
    files: tuple[str, ...]  # weight files written (one, or the shards)
    bytes: int  # weight bytes on disk
    tokenizer: str  # "tokenizer.json" or "bytes"
    seconds: float
    sources: tuple[Path, ...] = ()  # every checkpoint averaged (``checkpoint`` is the first), or just ``checkpoint``


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an existing ``out`` only with ``force``)."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _run_precision(run: RunPath) -> str:
    precision = (run.config.get("run") or {}).get("precision")
    return precision if precision in PRECISIONS else "fp32"


def export(path: str | os.PathLike | list | tuple, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None, max_shard_size: str | int = "5GB", tokenizer: str | None = None,
           force: bool = False, memory_tau_scale: float = 1.0,
           log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Export the newest (or step ``step``) committed checkpoint of a run directory, or the checkpoint
    directory ``path``, to the model directory ``out``. ``dtype`` None: the run's training precision.
    ``path`` a list of several: their weights averaged (the configs and tokenizers must agree; ``step`` applies
    to each run directory; ``dtype`` None: the first run's precision). ``memory_tau_scale``: every memory
    temperature of the export multiplied by it (``scale_memory_tau``; recorded in ``exported_from``)."""
    from infinitrain.model.lm import scale_memory_tau

    t0 = time.time()
    out = Path(out)
    runs, shard_bytes = _checked_sources(path, out, step=step, dtype=dtype, max_shard_size=max_shard_size,
                                         force=force, memory_tau_scale=memory_tau_scale)
    ckpt = runs[0].checkpoint
    dtype = dtype or _run_precision(runs[0])
    model, codec, manifest, provenance = _load_verified(runs[0], tokenizer, log)
    if len(runs) > 1:
        sources = [provenance, *_add_weights(model, codec, ckpt, runs[1:], tokenizer, log)]
        provenance = {"average_of": sources, "step": manifest["step"], "world_size": manifest["world_size"]}
    if memory_tau_scale != 1:
        scale_memory_tau(model, memory_tau_scale, where=str(ckpt))
        provenance = {**provenance, "memory_tau_scale": memory_tau_scale}
    tok = "bytes" if codec.source == "bytes" else "tokenizer.json"
    tokenizer_file = codec.source if tok == "tokenizer.json" else None
    bos = {"bos_at_doc_start": codec.bos_id is not None} if tok == "tokenizer.json" else {}
    files, size = _write_model(model, out, dtype=dtype, shard_bytes=shard_bytes, tokenizer_file=tokenizer_file,
                               extra={"tokenizer": tok, **bos, "exported_from": provenance}, force=force, log=log)
    return ExportResult(out, ckpt, int(manifest["step"]), dtype, files, size, tok, time.time() - t0,
                        tuple(r.checkpoint for r in runs))


def _checked_sources(path: str | os.PathLike | list | tuple, out: Path, *, step: int | None, dtype: str | None,
                     max_shard_size: str | int, force: bool, memory_tau_scale: float) -> tuple[list[RunPath], int]:
    """The checkpoints to export, resolved and checked against the arguments before any weights are read; and
    the shard size in bytes."""
    import torch

    from infinitrain.infer.loading import resolve
    from infinitrain.model.lm import check_memory_tau_scale

    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if not paths:
        raise ConfigError("export: no run directory or checkpoint given")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # as the trainer does: spares DeepSpeed's "Setting accelerator" warning
    if dtype is not None and dtype not in PRECISIONS:
        raise ConfigError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    check_memory_tau_scale(memory_tau_scale)  # before any checkpoint is read
    shard_bytes = parse_size(max_shard_size)
    runs = [resolve(p, step, exports=False) for p in paths]
    ckpts = [r.checkpoint for r in runs]
    if len({c.resolve() for c in ckpts}) != len(ckpts):
        raise ConfigError(f"{ckpts[0]}: the same checkpoint given twice to average")
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists; choose another --out or pass --force to replace it")
    for ckpt in ckpts:
        if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
            raise ConfigError(f"{out}: must not be inside the checkpoint {ckpt}")
    if len(runs) > 1:
        _check_same_model(runs)
    return runs, shard_bytes


def _write_model(model, out: Path, *, dtype: str, shard_bytes: int, extra: dict[str, Any],
                 tokenizer_file: str | None, force: bool, log: Callable[[str], None]) -> tuple[tuple[str, ...], int]:
    """Write the model directory under ``.OUT.partial``, fsync it and rename it to ``out``; returns the weight files
    and their bytes."""
    from infinitrain.model.io import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, save_pretrained

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    try:
        save_pretrained(model, tmp, dtype=dtype, max_shard_bytes=shard_bytes, extra=extra)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        fsync_tree(tmp)
        files = tuple(sorted(p.name for p in tmp.glob("*.safetensors")))
        size = sum((tmp / f).stat().st_size for f in files)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = [*files, INDEX_NAME] if len(files) > 1 else [WEIGHTS_NAME]
    log(f"wrote {out}: {', '.join(written[:3])}{' ...' if len(written) > 3 else ''}, {CONFIG_NAME}"
        f"{', tokenizer.json' if tokenizer_file is not None else ''}")
    return files, size


def _load_verified(run: RunPath, tokenizer: str | None, log: Callable[[str], None]):
    """(fp32 model, codec or None, manifest, provenance) of one committed checkpoint, its files verified first."""
    from infinitrain.infer.loading import MANIFEST, load_run, verify_checkpoint

    ckpt = run.checkpoint
    manifest = verify_checkpoint(ckpt)
    log(f"verified {len(manifest['files'])} files of {ckpt} against {MANIFEST} (sha256)")
    model, codec = load_run(run, tokenizer=tokenizer)  # no tokenizer: ConfigError, nothing written
    n_params = sum(p.numel() for p in model.parameters())
    log(f"gathered {n_params / 1e6:.2f} M parameters (fp32) from step {manifest['step']} "
        f"({manifest['world_size']} rank{'s' if manifest['world_size'] != 1 else ''})")
    provenance = {"run_dir": str(ckpt.parent.parent.resolve()), "checkpoint": ckpt.name, "step": manifest["step"],
                  "world_size": manifest["world_size"],
                  "manifest_sha256": sha256_file(ckpt / MANIFEST)}
    return model, codec, manifest, provenance


def _check_same_model(runs: list[RunPath]) -> None:
    """ConfigError unless every checkpoint's run trained the same ModelConfig (read from its config.yaml)."""
    first = runs[0].model_config
    for run in runs[1:]:
        other = run.model_config
        if other != first:
            diff = [f.name for f in dataclasses.fields(first) if getattr(first, f.name) != getattr(other, f.name)]
            raise ConfigError(f"{run.checkpoint}: its model differs from {runs[0].checkpoint}'s ({', '.join(diff)}); "
                              f"only checkpoints of one model can be averaged")


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None or a.source == "bytes" or b.source == "bytes":
        return (a is None) == (b is None) and (a is None or a.source == b.source)
    return Path(a.source).read_bytes() == Path(b.source).read_bytes()


def _add_weights(model, codec, first: Path, others: list[RunPath], tokenizer: str | None,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Replace every tensor of ``model`` (loaded from ``first``) by its mean with the ``others``' (float64, one
    extra model in memory at a time); returns the others' provenance."""
    import torch

    own = model.state_dict()
    sums = {k: v.detach().to(torch.float64) for k, v in own.items()}
    sources = []
    for run in others:
        ckpt = run.checkpoint
        other, other_codec, _, prov = _load_verified(run, tokenizer, log)  # configs: _check_same_model
        if not _same_tokenizer(codec, other_codec):
            raise ConfigError(f"{ckpt}: its tokenizer differs from {first}'s; pass --tokenizer to ship one")
        state = other.state_dict()
        if state.keys() != sums.keys() or any(state[k].shape != sums[k].shape for k in sums):
            raise ConfigError(f"{ckpt}: its parameters differ from {first}'s")
        for k, v in state.items():
            sums[k] += v.detach().to(torch.float64)
        sources.append(prov)
        del other, state
    n = len(others) + 1
    with torch.no_grad():
        model.load_state_dict({k: (v / n).to(own[k].dtype) for k, v in sums.items()})
    log(f"averaged the weights of {n} checkpoints (float64 mean)")
    return sources


@click.command("export")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option("--out", required=True, help="Model directory to write (must not exist, unless --force).")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Export this step's committed checkpoint [default: the newest].")
@click.option("--dtype", type=click.Choice(PRECISIONS), default=None,
              help="Weight dtype in the export [default: the run's training precision].")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Shard model.safetensors above this size (5GB = 5e9 bytes, 5GiB = 5*2^30).")
@click.option("--tokenizer", default=None,
              help="tokenizer.json to ship, or 'bytes' [default: the run's, or the one beside its data].")
@click.option("--force", is_flag=True, help="Replace an existing --out (atomically).")
@click.option("--memory-tau-scale", type=float, default=1.0, show_default=True,
              help="Multiply every memory temperature τ of the export by this (as `eval --memory-tau-scale`).")
def export_cmd(run_dirs: tuple[str, ...], out: str, step: int | None, dtype: str | None, max_shard_size: str,
               tokenizer: str | None, force: bool, memory_tau_scale: float) -> None:
    """Export a run's committed checkpoint (RUN_DIR, or RUN_DIR/checkpoints/step-N) as safetensors +
    config.json + tokenizer.json, loadable with InfiniLM.from_pretrained and `infinitrain generate`.
    Several RUN_DIRs (runs or checkpoints of one model): their weights averaged into one model."""
    res = export(list(run_dirs), out, step=step, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tokenizer,
                 force=force, memory_tau_scale=memory_tau_scale, log=lambda s: click.echo(s, err=True))
    what = (f"step {res.step} of {res.checkpoint.parent.parent}" if len(res.sources) == 1 else
            f"the average of {len(res.sources)} checkpoints (" +
            ", ".join(f"{c.parent.parent.name}/{c.name}" for c in res.sources) + ")")
    click.echo(f"exported {what} to {res.out}: {len(res.files)} weight "
               f"file{'s' if len(res.files) != 1 else ''}, {res.bytes / 1e6:.1f} MB {res.dtype}, tokenizer "
               f"{res.tokenizer or 'none'} ({res.seconds:.1f} s)")
