"""Save and load an ``InfiniLM`` as a directory: config.json + model.safetensors (sharded above a size, with an index).

Loading never unpickles: config.json is JSON, weights are safetensors. Layout (Hugging Face style):
  config.json                          {"format": "infinitrain", "format_version": 1, "model": ..., "dtype": ...}
  model.safetensors                    or model-00001-of-0000N.safetensors + model.safetensors.index.json
Tied embeddings are stored once (``embed.weight``) and re-tied on load.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infinitrain.errors import CheckpointError
from infinitrain.model.config import ModelConfig

if TYPE_CHECKING:
    from infinitrain.model.lm import InfiniLM

FORMAT = "infinitrain"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _state_for_saving(model: InfiniLM, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, t in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue  # the same storage as embed.weight
        t = t.detach()
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().cpu()
    return state


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_pretrained(model: InfiniLM, directory: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created); dtype "fp32"/"bf16"/"fp16" converts floating tensors."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = _state_for_saving(model, DTYPES[dtype] if dtype else None)
    shards = _shards(state, max_shard_bytes)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    if len(shards) == 1:
        save_file(shards[0], out / WEIGHTS_NAME, metadata=meta)
        _usual_mode(out / WEIGHTS_NAME)
    else:
        weight_map = {}
        total = sum(t.numel() * t.element_size() for t in state.values())
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata=meta)
            _usual_mode(out / name)
            weight_map.update({k: name for k in shard})
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1))
    saved_dtype = dtype or str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
              "dtype": saved_dtype, **(extra or {})}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return out


def _usual_mode(path: Path) -> None:
    """safetensors writes 0600; a model to share gets what any new file gets (0644 under the usual umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of a saved model directory and the rest of its config.json."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not an infinitrain model directory)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 JSON (byte {err.start})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an infinitrain config (format "
                              f"{data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                              f"(this infinitrain reads {FORMAT_VERSION})")
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: missing the 'model' object")
    return ModelConfig.from_dict(data["model"], where=f"{path}: model"), data


@contextlib.contextmanager
def open_safetensors(path: Path, device: str = "cpu"):
    """``safe_open`` with a damaged or hostile file (empty, truncated, invalid JSON or oversized header: the
    library caps headers at 100 MB) reported as one CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt", device=device) as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors or the sharded index."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        return {k: directory / v for k, v in weight_map.items()}
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (weights are read from safetensors only)")


def load_weights(model: InfiniLM, directory: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> InfiniLM:
    """Fill ``model`` (built on the meta device from ``read_config(directory)``) with the directory's safetensors
    weights, checked name by name and shape by shape; returned in eval mode (``InfiniLM.from_pretrained``)."""
    directory, config = Path(directory), model.config
    files = _weight_files(directory)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(set(files) - expected)
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} (not in this config)")
    want = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    params = dict(model.named_parameters())
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
        with open_safetensors(path, device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the config needs "
                                          f"{tuple(params[name].shape)}")
                state[name] = t.to(want) if want is not None and t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    if config.ties_lm_head:
        model.lm_head.weight = model.embed.weight
    return model.eval()
