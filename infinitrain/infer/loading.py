"""Read a run: a path -> export, run or checkpoint; its ``config.yaml``; its manifest; its weights; a model.

The one reader of what ``infinitrain train`` and ``infinitrain export`` write (training writes checkpoints in
``infinitrain.train.checkpoint``; export, ``init_from``, resume and the inference commands read them here):

  * an export directory (``config.json`` + safetensors, ``InfiniLM.save_pretrained``), tokenizer.json beside it;
  * a Hugging Face Llama directory (``config.json`` with ``model_type: llama`` + safetensors, e.g. from
    ``infinitrain convert gguf``; inference only): imported by ``model.llama.load_llama`` at the default gates;
  * a run directory (``config.yaml`` + ``checkpoints/step-N``): its newest committed checkpoint, or step N;
  * one committed checkpoint ``RUN/checkpoints/step-N`` (a ``manifest.json`` listing every file's size and sha256).

A checkpoint's files are checked against its manifest before they are read, every ``torch.load`` is
weights-only (a checkpoint cannot run code), and DeepSpeed's ZeRO partitions are gathered into fp32 weights.
``load_for_inference`` adds the tokenizer: ``--tokenizer`` if given (``bytes``: the byte codec), else a
``tokenizer.json`` in the model or run directory, else the one beside the run's prepared data; a run trained on
raw ``.txt`` (byte-level ids 0..255, ``infinitrain.train.data.text_source``) gets the byte codec.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infinitrain.atomic import hash_files
from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.infer.codec import Codec
from infinitrain.model.config import ModelConfig
from infinitrain.model.lm import InfiniLM, scale_memory_tau

CONFIG_NAME = "config.yaml"  # a run's resolved recipe
MANIFEST = "manifest.json"  # written last: its presence makes a checkpoint committed
TAG = "ds"  # DeepSpeed's tag directory inside a checkpoint
STEP_DIR = re.compile(r"^step-(\d{8})$")
RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_|rank(\d{5})(?!\d)")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def owner(rel: str) -> int:
    """The rank that writes, hashes and verifies ``rel``: the rank in its file name, else rank 0."""
    m = RANK_IN_NAME.search(Path(rel).name)
    return int(m.group(1) or m.group(2)) if m else 0


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (named step-N with a manifest)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


# --- a path -> what it names ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPath:
    """What a path names: an export directory (``checkpoint`` None), or a committed checkpoint of a run, with the
    run's ``config.yaml`` read once."""

    path: Path
    checkpoint: Path | None = None
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config["model"], where=f"{self.run_dir / CONFIG_NAME}: model")


def resolve(path: str | os.PathLike, step: int | None = None, *, exports: bool = True) -> RunPath:
    """An export directory (if ``exports``), a committed checkpoint, or a run directory's newest (or ``step``)
    committed checkpoint; CheckpointError naming the path otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such {'model' if exports else 'run'} directory")
    if exports and (p / "config.json").is_file():
        return RunPath(p)
    if (p / MANIFEST).is_file():
        m = STEP_DIR.match(p.name)
        if step is not None and (m is None or int(m.group(1)) != step):
            raise CheckpointError(f"{p}: is the checkpoint of another step than --step {step}")
        return RunPath(p, p, p.parent.parent, run_config(p.parent.parent))
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(f"{p}: not a {'model directory (no config.json), ' if exports else ''}run directory "
                              f"(no {CONFIG_NAME}) or committed checkpoint (no {MANIFEST})")
    found = committed(p / "checkpoints")
    if not found:
        raise CheckpointError(f"{p / 'checkpoints'}: no committed checkpoint (step-N with a {MANIFEST})")
    ckpt = found[-1] if step is None else p / "checkpoints" / step_dir_name(step)
    if ckpt not in found:
        steps = ", ".join(str(int(STEP_DIR.match(c.name).group(1))) for c in found)
        raise CheckpointError(f"{ckpt}: no committed checkpoint for step {step} (committed steps: {steps})")
    return RunPath(p, ckpt, p, run_config(p))


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved recipe (``config.yaml``), with a ``model`` mapping."""
    import yaml

    path = Path(run_dir) / CONFIG_NAME
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (the run's resolved recipe)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: no resolved 'model' mapping")
    return raw


# --- the manifest ---------------------------------------------------------------------------------------


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {ckpt} is not a committed checkpoint")
    try:
        m = json.loads(path.read_text())
        ok = (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("world_size"), int)
              and isinstance(m.get("step"), int))
        ok = ok and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                        and not Path(k).is_absolute() and ".." not in Path(k).parts for k, v in m["files"].items())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err.__class__.__name__}: {err})") from None
    if not ok:
        raise CheckpointError(f"{path}: not a checkpoint manifest (expected step, world_size and files: "
                              "{relative path: {bytes, sha256}})")
    return m


def verify(ckpt: Path, manifest: dict[str, Any], rank: int | None = None, progress: bool = False) -> None:
    """The manifest's files (those ``rank`` owns; None: all of them, as ``export`` checks a whole checkpoint)
    against their recorded size and sha256, several at once. Raises CheckpointError naming the first bad file
    with the expected and actual hash."""
    files = {rel: meta for rel, meta in manifest["files"].items() if rank is None or owner(rel) == rank}
    for rel, meta in sorted(files.items()):
        if not (ckpt / rel).is_file():
            raise CheckpointError(f"{ckpt / rel}: missing (sha256 expected {meta['sha256']}, listed in "
                                  f"{ckpt / MANIFEST})")
    actual = hash_files(ckpt, files, progress=progress, desc="verifying checkpoint")
    for rel, meta in sorted(files.items()):
        got = actual[rel]
        if got["sha256"] != meta["sha256"] or got["bytes"] != meta["bytes"]:
            raise CheckpointError(f"{ckpt / rel}: corrupt (sha256 expected {meta['sha256']}, got {got['sha256']}; "
                                  f"{got['bytes']} of {meta['bytes']} bytes)")


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Every file of the checkpoint against its manifest (size and sha256), several files at once with a
    progress bar on stderr for big checkpoints; returns the manifest."""
    manifest = read_manifest(ckpt)
    verify(ckpt, manifest, progress=True)
    return manifest


def check_sizes(ckpt: Path) -> None:
    """Every file the manifest lists is present with its recorded size (the cheap check before a load; hashes:
    ``verify``)."""
    for rel, meta in read_manifest(ckpt)["files"].items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {ckpt / MANIFEST})")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest records {meta['bytes']} (truncated?)")


# --- weights --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` runs with ``weights_only=True`` whatever the caller asked (DeepSpeed's
    zero_to_fp32 asks for False). Beyond tensors and containers, only the three DeepSpeed classes its ZeRO
    optimizer files hold (stages 1-3, fp32 and bf16, DeepSpeed 0.19) may be rebuilt: an enum, two records."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            yield
    finally:
        torch.load = real


def gathered_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint: ZeRO 1-3 partitions gathered, or stage 0's whole module (file
    sizes checked against the manifest first)."""
    check_sizes(ckpt)
    ds = ckpt / TAG
    # DeepSpeed prints its progress to stdout and stderr: keep both for our results and bars. Every torch.load
    # inside is weights-only: a checkpoint file that would run code when unpickled is refused.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loads():
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if any(ds.glob("zero_pp_rank_*_optim_states.pt")) or any(ds.glob("bf16_zero_pp_rank_*_optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            try:
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG))
            except Exception as err:  # DeepSpeed raises ValueError/AssertionError/KeyError on bad files
                raise CheckpointError(f"{ds}: DeepSpeed could not gather the weights ({type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''})") from None
        files = sorted(ds.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ds}: no DeepSpeed model states (mp_rank_*_model_states.pt or zero_pp_rank_*)")
        try:
            state = torch.load(files[0], map_location="cpu")
        except pickle.UnpicklingError as err:
            why = str(err).strip().splitlines()[-1][:200]
            raise CheckpointError(f"{files[0]}: refused to unpickle ({why})") from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{files[0]}: no 'module' weights in the model states")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def checkpoint_state_dict(ckpt: Path, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint as a plain model's: LoRA adapters of a ``finetune.lora`` run are
    merged into their weights (W + α/r · B A), so exports, evaluations and ``init_from`` see an ordinary model.
    ``config``: the run's ``config.yaml`` if already read."""
    from infinitrain.model.lora import has_adapters, merge_lora_state

    state = gathered_state_dict(ckpt)
    if not has_adapters(state):
        return state
    config = config if config is not None else run_config(ckpt.parent.parent)
    lora = (config.get("finetune") or {}).get("lora") or {}
    scale = lora["alpha"] / lora["rank"] if "alpha" in lora and "rank" in lora else None
    return merge_lora_state(state, scale, where=str(ckpt))


def model_from_checkpoint(run: RunPath) -> InfiniLM:
    """The run's model (fp32, CPU) with the checkpoint's weights; CheckpointError if they do not fit its config."""
    ckpt, config = run.checkpoint, run.model_config
    state = checkpoint_state_dict(ckpt, run.config)
    with torch.device("meta"):
        model = InfiniLM(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{ckpt}: weights do not match the run's model config ({what}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected)")
    params = model.state_dict()
    for name, t in state.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{ckpt}: tensor {name!r} has shape {tuple(t.shape)}, the config needs "
                                  f"{tuple(params[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.ties_lm_head:
        model.lm_head.weight = model.embed.weight
    return model


# --- a model for inference ------------------------------------------------------------------------------


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else the CPU; any other name is checked (a CUDA device without CUDA, or a
    name torch does not know, is a one-line ConfigError)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {name!r}: not a torch device ({str(err).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (use --device cpu, or auto)")
    return device


def load_for_inference(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                       device: str | torch.device = "auto", dtype: str | None = None, need_tokenizer: bool = True,
                       memory_tau_scale: float = 1.0) -> tuple[InfiniLM, Codec | None]:
    """The model (eval mode) and its codec for MODEL = export dir, Llama dir, run dir or checkpoint dir (module
    docstring). With ``need_tokenizer=False`` a missing tokenizer gives ``None`` instead of an error (``eval ppl``).
    ``memory_tau_scale``: every memory temperature multiplied by it (``scale_memory_tau``). ``device``: see
    ``resolve_device``."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        raise CheckpointError(f"{p}: a GGUF file is read by `infinitrain convert gguf {p} --out DIR` (then use DIR) "
                              "or by `train --init-from`")
    return load_run(resolve(p), tokenizer=tokenizer, device=device, dtype=dtype, need_tokenizer=need_tokenizer,
                    memory_tau_scale=memory_tau_scale)


def load_run(run: RunPath, *, tokenizer: str | os.PathLike | None = None, device: str | torch.device = "auto",
             dtype: str | None = None, need_tokenizer: bool = True,
             memory_tau_scale: float = 1.0) -> tuple[InfiniLM, Codec | None]:
    """``load_for_inference`` of a path already resolved."""
    device = resolve_device(device)
    if run.checkpoint is None:
        model, codec = _load_directory(run.path, tokenizer, device, dtype, need_tokenizer)
    else:
        model = model_from_checkpoint(run)
        if dtype is not None:
            from infinitrain.model.io import DTYPES

            if dtype not in DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            model = model.to(DTYPES[dtype])
        model = model.to(device)
        data_path = (run.config.get("data") or {}).get("path")
        codec = _codec(tokenizer, [run.run_dir, run.checkpoint], data_path=data_path, required=need_tokenizer,
                       bos=data_bos(data_path))
    scale_memory_tau(model, memory_tau_scale, where=str(run.path))
    if codec is None:
        return model.eval(), None
    vocab = codec.tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise ConfigError(f"{codec.source}: tokenizer has {vocab} tokens, the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model.eval(), codec


def _load_directory(p: Path, tokenizer, device, dtype: str | None, need_tokenizer: bool
                    ) -> tuple[InfiniLM, Codec | None]:
    """An export (config.json of infinitrain) or a Hugging Face Llama directory, with its codec."""
    if _is_hf_llama(p):
        return _hf_llama(p, device, dtype), _codec(tokenizer, [p], data_path=None, required=need_tokenizer)
    from infinitrain.model.io import read_config

    model = InfiniLM.from_pretrained(p, device=device, dtype=dtype)
    extra = read_config(p)[1]
    if tokenizer is None and extra.get("tokenizer") == "bytes":  # export of a byte-level run
        tokenizer = "bytes"
    # exports record whether documents start with BOS; one from before that record had none
    return model, _codec(tokenizer, [p], data_path=None, required=need_tokenizer,
                         bos=bool(extra.get("bos_at_doc_start", False)))


def _is_hf_llama(p: Path) -> bool:
    """A Hugging Face model directory (config.json with ``model_type``, not an infinitrain export)."""
    import json

    try:
        meta = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # InfiniLM.from_pretrained names the problem
    return isinstance(meta, dict) and "model_type" in meta and meta.get("format") != "infinitrain"


def _hf_llama(p: Path, device, dtype: str | None) -> InfiniLM:
    """A Hugging Face Llama directory as an Infini model (``load_llama``: the default gates folded into W_O, so
    one segment computes the source model; later segments add the memory read at 0.67%)."""
    from infinitrain.model.io import DTYPES
    from infinitrain.model.llama import load_llama

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, _ = load_llama(p, dtype=DTYPES[dtype] if dtype else None, device=device)
    return model


def data_bos(data_path) -> bool | None:
    """Whether the prepared data at ``data_path`` starts documents with BOS (its index records it; an index from
    before that record: no); None when there is no index to read (raw text, a mixture, data moved away)."""
    if not isinstance(data_path, str) or not (Path(data_path) / "index.json").is_file():
        return None
    try:
        index = json.loads((Path(data_path) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return bool((index.get("tokenizer") or {}).get("bos_at_doc_start", False))


def _codec(explicit, folders: list[Path], data_path: str | None, required: bool, bos: bool | None = None,
           ) -> Codec | None:
    """The codec of a model: an explicit --tokenizer, else a tokenizer.json in ``folders`` or beside the data. bos:
    what the model's data recorded about BOS at document starts (None: the tokenizer's template decides)."""
    if explicit is not None:
        return Codec.bytes() if str(explicit) == "bytes" else Codec.from_file(explicit, bos)
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            return Codec.from_file(folder / "tokenizer.json", bos)
    if data_path is not None:
        d = Path(data_path)
        if (d / "tokenizer.json").is_file():
            return Codec.from_file(d / "tokenizer.json", bos)
        if d.exists() and not (d / "index.json").is_file():
            return Codec.bytes()  # raw .txt training data: byte-level ids
    if not required:
        return None
    raise ConfigError(f"{folders[0]}: no tokenizer.json found (looked in {', '.join(map(str, folders))}"
                      f"{' and ' + data_path if data_path else ''}); pass --tokenizer FILE (or --tokenizer bytes "
                      "for a run trained on raw .txt)")


def describe(model: InfiniLM, codec: Codec | None, memory_tau_scale: float = 1.0) -> str:
    """One line about what was loaded (for stderr); ``memory_tau_scale`` as given to ``load_for_inference``."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    tau = f", memory τ x{memory_tau_scale:g}" if memory_tau_scale != 1 else ""
    family = f"{c.update} memory{tau}" if c.arch == "infini" else f"MEGALODON (CEMA dims {c.ema_dim})"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # stated: a bf16 run's model is bf16 (--dtype)
    return (f"model: {n / 1e6:.2f} M params, {dtype}, {c.n_layers} layers, d {c.d_model}, segment {c.segment_len}, "
            f"{family}; tokenizer: {codec.source if codec else 'none'}")
