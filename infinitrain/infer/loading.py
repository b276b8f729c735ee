"""``load_for_inference(path)``: an export directory, a run directory (its newest committed checkpoint) or one checkpoint -> (model, codec).

MODEL may be
  * a Hugging Face Llama directory (``config.json`` with ``model_type: llama`` + safetensors, e.g. from
    ``infinitrain convert gguf``): imported by ``model.llama.load_llama`` at the default gates, tokenizer.json beside it;
  * an export directory (``config.json`` + safetensors, ``InfiniLM.save_pretrained``), tokenizer.json beside it;
  * a run directory written by ``infinitrain train`` (``config.yaml`` + ``checkpoints/step-N``): the newest
    committed checkpoint's weights are gathered from DeepSpeed's ZeRO files into fp32;
  * one committed checkpoint directory ``RUN/checkpoints/step-N``.
The tokenizer is ``--tokenizer`` if given (``bytes``: the byte codec), else a ``tokenizer.json`` in the model or
run directory, else the one beside the run's prepared data; a run trained on raw ``.txt`` (byte-level ids 0..255,
see ``infinitrain.train.data.text_source``) gets the matching byte codec.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.model.config import ModelConfig
from infinitrain.model.lm import InfiniLM, scale_memory_tau


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, the ids ``infinitrain train --data file.txt`` trains on; the HF call shapes."""

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return _Encoding(list(text.encode("utf-8")))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return 256


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids for inference. ``tokenizer`` has the Hugging Face ``tokenizers`` call shapes."""

    tokenizer: Any
    eos_id: int | None
    source: str  # the tokenizer.json path, or "bytes"
    bos_id: int | None = None  # put before every document and prompt (the model's training data had it there)

    def encode(self, text: str) -> list[int]:
        """The ids of a piece of text (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_document(self, text: str) -> list[int]:
        """The ids of a whole document or prompt: BOS first when the model was trained with one at document starts."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos: bool | None = None) -> "Codec":
        """bos: whether documents start with the tokenizer's BOS, as recorded where the model was trained (the data's
        index, an export's config.json); None: as the tokenizer's own template says (``doc_start_bos``)."""
        from infinitrain.data_tools.tokenizer import load_tokenizer

        tok, info = load_tokenizer(path)
        bos = info.bos_at_doc_start if bos is None else bos
        return cls(tok, info.eos_id, info.path, info.bos_id if bos else None)

    @classmethod
    def bytes(cls) -> "Codec":
        return cls(ByteTokenizer(), None, "bytes")


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
    """The model (eval mode) and its codec for MODEL = export dir, run dir or checkpoint dir (module docstring).
    With ``need_tokenizer=False`` a missing tokenizer gives ``None`` instead of an error (``eval ppl``).
    ``memory_tau_scale``: every memory temperature multiplied by it (``scale_memory_tau``). ``device``: see
    ``resolve_device``."""
    device = resolve_device(device)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model directory")
    if p.is_file() and p.suffix.lower() == ".gguf":
        raise CheckpointError(f"{p}: a GGUF file is read by `infinitrain convert gguf {p} --out DIR` (then use DIR) "
                              "or by `train --init-from`")
    if _is_hf_llama(p):
        model = _hf_llama(p, device, dtype)
        codec = _codec(tokenizer, [p], data_path=None, required=need_tokenizer)
    elif (p / "config.json").is_file():
        model = InfiniLM.from_pretrained(p, device=device, dtype=dtype)
        from infinitrain.model.io import read_config

        extra = read_config(p)[1]
        if tokenizer is None and extra.get("tokenizer") == "bytes":  # export of a byte-level run
            tokenizer = "bytes"
        # exports record whether documents start with BOS; one from before that record had none
        codec = _codec(tokenizer, [p], data_path=None, required=need_tokenizer,
                       bos=bool(extra.get("bos_at_doc_start", False)))
    else:
        ckpt, run_dir = _checkpoint_and_run(p)
        raw = _run_config(run_dir)
        model = _model_from_checkpoint(ckpt, ModelConfig.from_dict(raw["model"], where=f"{run_dir}/config.yaml: model"))
        if dtype is not None:
            from infinitrain.model.io import DTYPES

            if dtype not in DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            model = model.to(DTYPES[dtype])
        model = model.to(device)
        data_path = (raw.get("data") or {}).get("path")
        codec = _codec(tokenizer, [run_dir, ckpt], data_path=data_path, required=need_tokenizer,
                       bos=data_bos(data_path))
    scale_memory_tau(model, memory_tau_scale, where=str(p))
    if codec is None:
        return model.eval(), None
    vocab = codec.tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise ConfigError(f"{codec.source}: tokenizer has {vocab} tokens, the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model.eval(), codec


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


def _checkpoint_and_run(p: Path) -> tuple[Path, Path]:
    """(committed checkpoint, run directory) for a run directory or one of its checkpoints."""
    from infinitrain.train.checkpoint import MANIFEST, committed

    if (p / MANIFEST).is_file():
        return p, p.parent.parent
    if (p / "config.yaml").is_file():
        found = committed(p / "checkpoints")
        if not found:
            raise CheckpointError(f"{p / 'checkpoints'}: no committed checkpoint (step-N with a manifest.json)")
        return found[-1], p
    raise CheckpointError(f"{p}: not a model directory (no config.json), run directory (no config.yaml) "
                          "or committed checkpoint (no manifest.json)")


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (the run's resolved recipe)") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: no resolved 'model' mapping")
    return raw


def _check_manifest(ckpt: Path) -> None:
    """Every file the manifest lists is present with its recorded size (hashes are checked by ``train``)."""
    from infinitrain.train.checkpoint import MANIFEST, read_manifest

    for rel, meta in read_manifest(ckpt)["files"].items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {ckpt / MANIFEST})")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest records {meta['bytes']} (truncated?)")


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint as a plain model's: LoRA adapters of a ``finetune.lora`` run are
    merged into their weights (W + α/r · B A), so exports, evaluations and ``init_from`` see an ordinary model."""
    from infinitrain.model.lora import has_adapters, merge_lora_state

    state = _gathered_state_dict(ckpt)
    if not has_adapters(state):
        return state
    lora = ((_run_config(ckpt.parent.parent).get("finetune") or {}).get("lora") or {})
    scale = lora["alpha"] / lora["rank"] if "alpha" in lora and "rank" in lora else None
    return merge_lora_state(state, scale, where=str(ckpt))


def _gathered_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint: ZeRO 1-3 partitions gathered, or stage 0's whole module."""
    from infinitrain.train.checkpoint import TAG
    from infinitrain.export import weights_only_loads

    _check_manifest(ckpt)
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
            raise CheckpointError(f"{files[0]}: refused to unpickle ({str(err).strip().splitlines()[-1][:200]})") from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{files[0]}: no 'module' weights in the model states")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _model_from_checkpoint(ckpt: Path, config: ModelConfig) -> InfiniLM:
    state = checkpoint_state_dict(ckpt)
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


def describe(model: InfiniLM, codec: Codec | None, memory_tau_scale: float = 1.0) -> str:
    """One line about what was loaded (for stderr); ``memory_tau_scale`` as given to ``load_for_inference``."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    tau = f", memory τ x{memory_tau_scale:g}" if memory_tau_scale != 1 else ""
    family = f"{c.update} memory{tau}" if c.arch == "infini" else f"MEGALODON (CEMA dims {c.ema_dim})"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # stated: a bf16 run's model is bf16 (--dtype)
    return (f"model: {n / 1e6:.2f} M params, {dtype}, {c.n_layers} layers, d {c.d_model}, segment {c.segment_len}, "
            f"{family}; tokenizer: {codec.source if codec else 'none'}")
