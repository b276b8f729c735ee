"""``run.init_from`` / ``--init-from DIR``: start a run from existing weights, with a report of what was loaded.

DIR may be
  * a Hugging Face Llama directory (``config.json`` with ``model_type: llama`` + ``model.safetensors`` or a
    sharded index): tensors are mapped as in ``infinitrain.model.llama`` (the paper continually pretrains an LLM);
  * an exported infinitrain model (``config.json`` with ``format: infinitrain`` + safetensors);
  * a run directory of ``infinitrain train`` (its newest committed checkpoint) or one committed checkpoint
    ``RUN/checkpoints/step-N`` (the previous stage of a recipe): DeepSpeed's own files, gathered by
    ``infer.loading.checkpoint_state_dict`` with every ``torch.load`` forced to ``weights_only=True``.
Safetensors only for outside weights: a directory holding only ``*.bin``/``*.pt`` files is refused.

or a llama.cpp ``FILE.gguf`` (``infinitrain.model.gguf``: dequantised on rank 0 as each tensor is copied).

The source decides what it defines (``derive_model``, applied by ``infinitrain train``): the shape fields
(``ARCHITECTURE``: layers, widths, heads, GQA, vocabulary, tied embeddings) and the function fields
(``NOTED``: RoPE θ and scaling, norm eps) are taken from its config, replacing the recipe's preset, and each
replaced value is listed in the report; the recipe supplies the rest (segment length, memory update, gates,
temperatures, ...). Only a ``model.FIELD=V`` given on the command line keeps its value: a shape field that then
differs is a one-line ``ConfigError`` naming the tensor and both shapes, a function field is used and reported.
Tensors the source lacks but the model may create (the per-head gates β, Mixture-of-Depths routers) keep the
model's own initialisation (``model.gate_init``, ``model.init_std``). A Llama source (no gates) has W_O divided
by 1 - sigmoid(β) (``fold_gates``), so the first segment's logits equal the source's at step 0.

Under ZeRO-3 with ``zero.Init`` the parameters are partitioned when this runs: each one is gathered with
``GatheredParameters(modifier_rank=0)`` and rank 0 (the only rank that reads the files) writes it.
Without ``zero.Init`` every rank holds the whole model and reads the files itself before ``deepspeed.initialize``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from infinitrain.errors import ConfigError
from infinitrain.model.config import ModelConfig
from infinitrain.model.lm import InfiniLM

REPORT_NAME = "init_from.json"
# Parameters a source may lack: the model initialises them itself (gates β, Mixture-of-Depths routers, a class head).
CREATABLE = re.compile(r"layers\.\d+\.(?:block\.)?attn\.(?:betas|log_tau)|layers\.\d+\.router\.weight|score\.weight")
# Fields that decide how weights are read: must agree between the recipe and the source.
ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "activation",
                "tie_embeddings")
# Fields that change no shape but do change the function: reported, the recipe's value is used.
NOTED = ("pos_emb", "rope_theta", "rope_pct", "yarn_scale", "yarn_original_len", "yarn_alpha", "yarn_beta",
         "yarn_mscale", "norm_eps")
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class Source:
    """Where the weights come from: tensor names and shapes (headers only), and how to read values."""

    kind: str  # "Hugging Face Llama" | "infinitrain export" | "run checkpoint"
    path: Path  # the directory given
    origin: Path  # the file listing the tensors, or the checkpoint directory
    config: ModelConfig  # the source's architecture in our terms
    shapes: dict[str, tuple[int, ...]]  # source tensor name -> shape
    name_for: Callable[[str], str | None]  # our parameter -> source tensor (None: created by the model)
    files: dict[str, Path] | None = None  # safetensors file of each tensor; None for a run checkpoint or a GGUF
    read: Callable[[str], torch.Tensor] | None = None  # tensor by name, for a source that is not safetensors (GGUF)
    fold_gates: bool = False  # a Llama without gates: W_O divided by 1 - sigmoid(β) (model/llama.py fold_gates)


@dataclass(frozen=True)
class InitReport:
    """What ``--init-from`` does: ``loaded`` maps our parameter to its source tensor."""

    source: Source
    loaded: dict[str, str]
    created: tuple[str, ...]
    unused: tuple[str, ...]
    differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (recipe, source)
    # taken from the source: field -> (recipe, source)
    derived: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.source
        lines = [f"init_from {s.path} ({s.kind}, {s.origin.name}): loaded {len(self.loaded)} tensors, "
                 f"created {len(self.created)} ({_grouped(self.created)}), unused {len(self.unused)} "
                 f"({_grouped(self.unused)})"]
        if self.derived:
            lines.append("  model from the source: " + ", ".join(
                f"{k} {b!r} (recipe {a!r})" for k, (a, b) in self.derived.items()))
        if self.differences:
            diffs = ", ".join(f"{k} {a!r} (source {b!r})" for k, (a, b) in self.differences.items())
            lines.append(f"  the recipe differs from the source in {diffs}; the recipe's values are used")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        s = self.source
        return {"source": str(s.path), "kind": s.kind, "origin": str(s.origin), "loaded": self.loaded,
                "created": list(self.created), "unused": list(self.unused),
                "differences": {k: {"recipe": a, "source": b} for k, (a, b) in self.differences.items()},
                "derived": {k: {"recipe": a, "source": b} for k, (a, b) in self.derived.items()}}


def _grouped(names: tuple[str, ...] | list[str]) -> str:
    """``layers.0.attn.betas, layers.1.attn.betas`` -> ``layers.*.attn.betas x2`` (lists stay one line)."""
    if not names:
        return "none"
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=layers\.)\d+(?=\.)", "*", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} x{c}" for k, c in counts.items())


# --- sources -------------------------------------------------------------------------------------------


def _by_name(shapes: dict[str, tuple[int, ...]]) -> Callable[[str], str | None]:
    """Our own formats: the same name, also across Mixture-of-Depths wrapping (``layers.1.block.attn...`` in a
    routed layer is ``layers.1.attn...`` in a plain model, and back)."""

    def name_for(ours: str) -> str | None:
        unwrapped = re.sub(r"^(layers\.\d+\.)block\.", r"\1", ours)
        wrapped = re.sub(r"^(layers\.\d+\.)(?!block\.|router\.)", r"\1block.", ours)
        for name in (ours, unwrapped, wrapped):
            if name in shapes:
                return name
        return None if CREATABLE.fullmatch(ours) else ours

    return name_for


def _llama_source(path: Path, hf: dict[str, Any], model: ModelConfig) -> Source:
    from infinitrain.model.llama import (
        hf_name,
        llama_model_config,
        read_shapes,
        tensor_files,
    )

    where = path / "config.json"
    config = llama_model_config(hf, where=where, segment_len=model.segment_len, update=model.update,
                                gate_init=model.gate_init, mod_every=model.mod_every)
    files, listing = tensor_files(path)
    return Source("Hugging Face Llama", path, listing, config, read_shapes(files), hf_name, files, fold_gates=True)


def _gguf_source(path: Path, model: ModelConfig) -> Source:
    from infinitrain.model.gguf import open_gguf
    from infinitrain.model.llama import hf_name, llama_model_config

    g = open_gguf(path)
    config = llama_model_config(g.hf_config, where=path, segment_len=model.segment_len, update=model.update,
                                gate_init=model.gate_init, mod_every=model.mod_every)
    return Source("GGUF", path, path, config, g.shapes, hf_name, read=g.tensor, fold_gates=True)


def _export_source(path: Path) -> Source:
    from infinitrain.model.io import read_config
    from infinitrain.model.llama import read_shapes, tensor_files

    config, _ = read_config(path)
    files, listing = tensor_files(path)
    shapes = read_shapes(files)
    return Source("infinitrain export", path, listing, config, shapes, _by_name(shapes), files)


def _run_source(path: Path) -> Source:
    from infinitrain.errors import CheckpointError
    from infinitrain.infer.loading import resolve

    try:
        run = resolve(path, exports=False)
    except CheckpointError as err:
        raise ConfigError(f"init_from {path}: {err}") from None
    config = run.model_config
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in InfiniLM(config).named_parameters()}
    return Source("run checkpoint", path, run.checkpoint, config, shapes, _by_name(shapes))


def open_source(directory: str | Path, model: ModelConfig) -> Source:
    """Recognise DIR (module docstring) and read its tensor names and shapes (no tensor data)."""
    path = Path(directory)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path, model)
    if not path.is_dir():
        raise ConfigError(f"init_from {path}: no such directory (nor a .gguf file)")
    if (path / "config.json").is_file():
        try:
            meta = json.loads((path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path / 'config.json'}: unreadable JSON ({err})") from None
        if isinstance(meta, dict) and meta.get("format") == "infinitrain":
            return _export_source(path)
        if isinstance(meta, dict) and "model_type" in meta:
            return _llama_source(path, meta, model)
        raise ConfigError(f"{path / 'config.json'}: neither an infinitrain export (format: infinitrain) nor a "
                          "Hugging Face config (model_type)")
    if (path / "config.yaml").is_file() or (path / "manifest.json").is_file():
        return _run_source(path)
    pickles = sorted(p.name for pattern in PICKLES for p in path.glob(pattern))
    if pickles:
        raise ConfigError(f"init_from {path}: only {', '.join(pickles[:3])}: pickle files are never read; "
                          "convert to safetensors (with a config.json)")
    raise ConfigError(f"init_from {path}: not a model directory (no config.json) nor a run directory "
                      "(no config.yaml) nor a checkpoint (no manifest.json)")


# --- plan and load -------------------------------------------------------------------------------------


def plan(model: ModelConfig, source: Source) -> InitReport:
    """Which tensors load, which the model creates, which the source has in excess; errors on mismatches."""
    with torch.device("meta"):
        params = dict(InfiniLM(model).named_parameters())  # a tied lm_head appears once (as embed.weight)
    arch = {k: (getattr(model, k), getattr(source.config, k)) for k in ARCHITECTURE
            if getattr(model, k) != getattr(source.config, k)}
    hint = "; " + ", ".join(f"{k} {a} in the recipe, {b} in the source" for k, (a, b) in arch.items()) if arch else ""
    loaded, created = {}, []
    for ours, p in params.items():
        src = source.name_for(ours)
        if src is None or (src not in source.shapes and CREATABLE.fullmatch(ours)):
            created.append(ours)
            continue
        if src not in source.shapes:
            raise ConfigError(f"init_from {source.path}: the source has no tensor {src} (the recipe's model needs "
                              f"{ours} of shape {tuple(p.shape)}{hint})")
        if source.shapes[src] != tuple(p.shape):
            raise ConfigError(f"init_from {source.path}: tensor {src} has shape {source.shapes[src]} in the source, "
                              f"the recipe's model needs {tuple(p.shape)} for {ours}{hint}")
        loaded[ours] = src
    if arch:
        raise ConfigError(f"init_from {source.path}: the source's architecture differs from the recipe's model{hint}")
    differences = {k: (getattr(model, k), getattr(source.config, k)) for k in NOTED
                   if getattr(model, k) != getattr(source.config, k)}
    unused = tuple(sorted(set(source.shapes) - set(loaded.values())))
    return InitReport(source, loaded, tuple(created), unused, differences)


def derive_model(model: ModelConfig, source: ModelConfig, explicit: set[str] | frozenset[str] = frozenset()
                 ) -> tuple[ModelConfig, dict[str, tuple[Any, Any]]]:
    """``model`` with every ARCHITECTURE and NOTED field taken from ``source`` except those in ``explicit`` (given
    on the command line); returns it and the replaced fields {field: (recipe's value, source's value)}."""
    taken = {k: (getattr(model, k), getattr(source, k)) for k in (*ARCHITECTURE, *NOTED)
             if k not in explicit and getattr(model, k) != getattr(source, k)}
    try:
        return model.replace(**{k: b for k, (_, b) in taken.items()}), taken
    except ConfigError as err:
        raise ConfigError(f"model derived from the init_from source: {err}") from None


def report_for(model: ModelConfig, directory: str | Path) -> InitReport:
    return plan(model, open_source(directory, model))


@contextlib.contextmanager
def _reader(source: Source, active: bool) -> Iterator[Callable[[str], torch.Tensor]]:
    """``get(name) -> tensor``: safetensors files opened on first use, or the checkpoint's gathered state."""
    if not active:
        yield lambda name: None
        return
    if source.read is not None:
        yield source.read
        return
    if source.files is None:
        from infinitrain.infer.loading import checkpoint_state_dict

        state = checkpoint_state_dict(source.origin)  # weights-only: tensors and three DeepSpeed records
        yield state.__getitem__
        return
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            path = source.files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        yield get


def load_into(model: nn.Module, config: ModelConfig, directory: str | Path) -> InitReport:
    """Copy the source's tensors into ``model`` (whole, or partitioned by ``zero.Init``); returns the report."""
    report = report_for(config, directory)
    params = dict(model.named_parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params.values())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    from infinitrain.model.llama import fold_gates

    def value(ours: str, src: str) -> torch.Tensor:
        t = get(src)
        return fold_gates(ours, t, config) if report.source.fold_gates else t

    with _reader(report.source, active=rank == 0 or not partitioned) as get, torch.no_grad():
        for ours, src in report.loaded.items():
            p = params[ours]
            if not partitioned:
                p.copy_(value(ours, src))
                continue
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(value(ours, src))
    return report


def write_report(report: InitReport, run_dir: str | Path) -> Path:
    out = Path(run_dir) / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return out
