"""Build an ``InfiniLM`` from a Hugging Face Llama checkpoint (config.json + safetensors), gates nearly closed.

API::

    model, report = load_llama("Meta-Llama-3-8B/", segment_len=2048, update="linear")  # None: min(2048, max_pos)
    print(report.summary())  # tensors loaded, created (gates, routers) and left unused

- Reads ``config.json`` and ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``
  with ``safetensors.safe_open`` (no pickle: ``pytorch_model.bin`` is refused, never ``torch.load``-ed).
- Each Llama attention becomes an Infini attention with the same Q/K/V/O weights. GQA needs no permutation:
  Hugging Face's ``repeat_kv`` makes query head h read KV head h // (H/G), exactly our convention, and
  both use the "rotate half" RoPE layout.
- The per-head gates β are new. ``gate_init`` defaults to ``DEFAULT_GATE_INIT`` = -5: sigmoid(-5) = 0.0067.
  The gate scales local attention by 1 - sigmoid(β) (0.9933), so ``fold_gates`` divides each head's columns of
  W_O by it: inside the first segment (empty memory, whose read is exactly 0) the logits equal the source's
  (measured on SmolLM2-135M: max |diff| 5e-5 in fp32, the same as with β = -100), and later segments add
  sigmoid(β) / (1 - sigmoid(β)) = 0.67% of a memory read to the unchanged local attention. It is not -100
  (Beomi's Gemma choice): Adam's step is ~lr whatever the gradient's size, but only while the gradient
  clears its eps (1e-8); sigmoid'(-100) = 4e-44 leaves a dead gate, sigmoid'(-5) = 0.0066 does not.
  With the gate learning rate of 1e-2 (issue 2 item 6) β can reach -2 (gate 0.12) in ~300 steps and 0
  (0.5) in ~500. Pass a very negative value (e.g. -100) to close the gates for a parity check.
- Mixture-of-Depths routers (``mod_every`` > 0) are new too, drawn N(0, init_std) from torch's global RNG
  (seed it for reproducibility). Routing skips most tokens in routed blocks by design, so with
  ``mod_every`` > 0 the pretrained behaviour is not preserved at step 0.
- RoPE positions restart at every segment, so ``segment_len`` (default: 2048, the paper's N, or the
  checkpoint's ``max_position_embeddings`` if smaller) may not exceed ``max_position_embeddings``; inside
  one segment the logits equal the original's (at the default gates too, see fold_gates).
- Refused with one line naming the file and key: ``model_type`` other than llama, ``hidden_act`` other than
  silu, attention or MLP biases, partial rotary, any ``rope_scaling``/``rope_parameters`` type other than
  default or "llama3". Llama 3.1/3.2's "llama3" scaling maps exactly onto YaRN's by-parts ramp without the
  temperature (``pos_emb: yarn``, scale = factor, alpha = low_freq_factor, beta = high_freq_factor,
  ``yarn_mscale: 1``).
- Missing tensors and shape mismatches raise ``CheckpointError`` naming the tensor and the file; tensors
  the model does not use (e.g. ``rotary_emb.inv_freq``, a tied checkpoint's ``lm_head.weight``) are listed
  in the report.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.model.config import ModelConfig
from infinitrain.model.lm import InfiniLM

DEFAULT_GATE_INIT = -5.0
DEFAULT_SEGMENT_LEN = 2048  # the paper's N, capped at the checkpoint's max_position_embeddings
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our parameter name -> the Hugging Face tensor name; None: created here, not read from the checkpoint.
_WEIGHT_MAP: tuple[tuple[str, str | None], ...] = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.(?:block\.)?attn\.([qkvo])_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.(?:block\.)?attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.(?:block\.)?mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.(?:block\.)?mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"layers\.(\d+)\.(?:block\.)?attn\.betas", None),
    (r"layers\.(\d+)\.(?:block\.)?attn\.log_tau", None),
    (r"layers\.(\d+)\.(?:block\.)?attn\.shift_[kv]", None),
    (r"layers\.(\d+)\.router\.weight", None),
)


@dataclass(frozen=True)
class LoadReport:
    """What ``load_llama`` did: ``loaded`` maps our parameter name to the checkpoint tensor it came from."""

    directory: Path
    files: tuple[str, ...]  # safetensors files read, relative to directory
    loaded: dict[str, str]
    created: tuple[str, ...]  # our parameters initialised here: gates β, Mixture-of-Depths routers
    unused: tuple[str, ...]  # checkpoint tensors the model does not use

    def summary(self) -> str:
        return (f"{self.directory}: loaded {len(self.loaded)} tensors from {len(self.files)} file(s), "
                f"created {len(self.created)} ({', '.join(self.created) or 'none'}), "
                f"unused {len(self.unused)} ({', '.join(self.unused) or 'none'})")


# --- config.json -> ModelConfig ------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a Hugging Face Llama directory needs config.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _key(hf: dict[str, Any], key: str, where: Path) -> Any:
    if key not in hf:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return hf[key]


def _llama3_rope(p: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    """Llama 3.1 "llama3" scaling is YaRN's by-parts ramp without the temperature: scale = factor,
    alpha = low_freq_factor, beta = high_freq_factor (in rotations within the original context), mscale 1."""
    try:
        fields = dict(pos_emb="yarn", yarn_scale=float(p["factor"]),
                      yarn_original_len=int(p["original_max_position_embeddings"]),
                      yarn_alpha=float(p.get("low_freq_factor", 1.0)), yarn_beta=float(p.get("high_freq_factor", 4.0)),
                      yarn_mscale=1.0)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {key} of type 'llama3' needs numeric factor and "
                              f"original_max_position_embeddings ({err})") from None
    return fields


def _rope_fields(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """RoPE fields of ModelConfig from either layout: transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling``; default RoPE or Llama 3.1's "llama3" scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    fields: dict[str, Any] = {}
    for key, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(p, dict):
            raise CheckpointError(f"{where}: {key} must be an object or null, got {p!r}")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind == "llama3":
            fields.update(_llama3_rope(p, key, where))
        elif kind != "default":
            raise CheckpointError(f"{where}: {key} type {kind!r} is not supported (only default RoPE)")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{where}: {key}.partial_rotary_factor must be 1 for Llama")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor must be 1 for Llama")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise CheckpointError(f"{where}: rope_theta must be a number, got {theta!r}")
    return {"pos_emb": "rope", **fields, "rope_theta": float(theta)}


def _refuse_unsupported(hf: dict[str, Any], where: Path) -> None:
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise CheckpointError(f"{where}: {key} true is not supported (Infini attention and FFN have no biases)")


def llama_model_config(hf: dict[str, Any], *, where: Path, segment_len: int | None = None,
                       update: Literal["linear", "delta"] = "linear", gate_init: float = DEFAULT_GATE_INIT,
                       mod_every: int = 0) -> ModelConfig:
    """Translate a parsed Llama ``config.json`` (read from ``where``) into our ``ModelConfig``.

    ``segment_len`` None: 2048 (the paper's N), or ``max_position_embeddings`` if that is smaller.
    """
    _refuse_unsupported(hf, where)
    rope = _rope_fields(hf, where)
    max_pos = hf.get("max_position_embeddings")
    if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos <= 0:
        max_pos = None
    if segment_len is None:
        segment_len = min(DEFAULT_SEGMENT_LEN, max_pos or DEFAULT_SEGMENT_LEN)
    if max_pos is not None and isinstance(segment_len, int) and segment_len > max_pos:
        raise ConfigError(f"{where}: segment_len {segment_len} exceeds max_position_embeddings {max_pos}; "
                          "RoPE positions restart each segment, so keep segments within the trained context")
    heads = _key(hf, "num_attention_heads", where)
    fields = dict(
        vocab_size=_key(hf, "vocab_size", where), d_model=_key(hf, "hidden_size", where),
        n_layers=_key(hf, "num_hidden_layers", where), n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        d_ff=_key(hf, "intermediate_size", where), activation="ffnswiglu", **rope,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        segment_len=segment_len, update=update, gate_init=gate_init, mod_every=mod_every,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    try:
        return ModelConfig.from_dict(fields, where=str(where))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


# --- safetensors files ---------------------------------------------------------------------------
def tensor_files(directory: Path) -> tuple[dict[str, Path], Path]:
    """Checkpoint tensor name -> the safetensors file holding it, and the file listing them (file or index)."""
    from safetensors import safe_open

    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if index.is_file() and not single.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        return {name: directory / file for name, file in weight_map.items()}, index
    if not single.is_file():
        found = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
        hint = f" (found {', '.join(found)}: pickle files are not read, convert to safetensors)" if found else ""
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}, single
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"{single}: unreadable safetensors ({err})") from None


def read_each(names: dict[str, Path], fetch: Callable[[Any, str], Any]) -> dict[str, Any]:
    """``fetch(open_file, name)`` for every named tensor, opening each safetensors file once; a listed tensor that
    is missing or an unreadable file is a one-line CheckpointError naming the file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in names.items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, Any] = {}
    for path, wanted in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in wanted:
                    if name not in present:
                        raise CheckpointError(f"{path}: tensor {name} is missing (the index lists it here)")
                    out[name] = fetch(f, name)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors' own SafetensorError, OSError
            raise CheckpointError(f"{path}: unreadable safetensors ({err})") from None
    return out


def read_tensors(names: dict[str, Path]) -> dict[str, Tensor]:
    """Read the named tensors, opening each file once."""
    return read_each(names, lambda f, name: f.get_tensor(name))


def read_shapes(names: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """The named tensors' shapes from the safetensors headers, without reading any data."""
    return read_each(names, lambda f, name: tuple(f.get_slice(name).get_shape()))


# --- weights -------------------------------------------------------------------------------------
def hf_name(ours: str) -> str | None:
    """The checkpoint tensor for one of our parameters; None if it is created fresh (gates, routers)."""
    for pattern, template in _WEIGHT_MAP:
        m = re.fullmatch(pattern, ours)
        if m:
            return None if template is None else m.expand(template)
    raise CheckpointError(f"no Llama tensor maps to InfiniLM parameter {ours} (update infinitrain/model/llama.py)")


def _fresh(ours: str, shape: torch.Size, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Tensor:
    if ours.endswith("betas"):
        return torch.tensor(cfg.gate_init_per_head(), dtype=dtype, device=device).expand(shape).clone()
    if ours.endswith("log_tau"):
        return torch.full(shape, math.log(cfg.memory_tau), dtype=dtype, device=device)
    if ours.endswith(("shift_k", "shift_v")):
        return torch.zeros(shape, dtype=dtype, device=device)  # token shift off at the start: Llama's own layer
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, cfg.init_std)  # router


def fold_gates(name: str, value: Tensor, cfg: ModelConfig) -> Tensor:
    """A source tensor as our parameter ``name`` holds it: W_O's columns of head h divided by 1 - sigmoid(β_h)
    at the gates' init, so a first segment's logits equal the source's (module docstring); others unchanged."""
    if not re.fullmatch(r"layers\.\d+\.(?:block\.)?attn\.o_proj\.weight", name):
        return value
    local = 1.0 - torch.sigmoid(torch.tensor(cfg.gate_init_per_head(), dtype=torch.float64))  # (H,)
    cols = local.repeat_interleave(value.shape[1] // cfg.n_heads)  # head h owns columns h*V .. (h+1)*V - 1
    return (value.double() / cols).to(value.dtype)


def _set_parameter(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value))


def load_llama(directory: str | Path, *, segment_len: int | None = None, update: Literal["linear", "delta"] = "linear",
               gate_init: float = DEFAULT_GATE_INIT, mod_every: int = 0, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> tuple[InfiniLM, LoadReport]:
    """Build an ``InfiniLM`` (in eval mode) holding a Llama checkpoint's weights.

    ``dtype`` None keeps the stored dtype of the embedding; every tensor, new ones included, gets one dtype.
    """
    directory = Path(directory)
    cfg_path = directory / "config.json"
    cfg = llama_model_config(read_json(cfg_path), where=cfg_path, segment_len=segment_len, update=update,
                             gate_init=gate_init, mod_every=mod_every)
    files, listing = tensor_files(directory)
    with torch.device("meta"):
        model = InfiniLM(cfg)  # no memory and no random init for weights about to be replaced
    wanted = {ours: hf_name(ours) for ours, _ in model.named_parameters()}  # a tied lm_head appears once
    missing = [hf for hf in wanted.values() if hf is not None and hf not in files]
    if missing:
        raise CheckpointError(f"{listing}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    tensors = read_tensors({hf: files[hf] for hf in wanted.values() if hf is not None})
    dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    device = torch.device(device)
    params = dict(model.named_parameters())
    for ours, hf in wanted.items():
        shape = params[ours].shape
        if hf is None:
            value = _fresh(ours, shape, cfg, dtype, device)
        else:
            value = tensors.pop(hf)
            if value.shape != shape:
                raise CheckpointError(f"{files[hf]}: tensor {hf} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(shape)} for {ours}")
            value = fold_gates(ours, value, cfg).to(device=device, dtype=dtype)
        _set_parameter(model, ours, value)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: InfiniLM tensor {left[0]} was not filled (see model/llama.py)")
    model.eval()  # as from_pretrained; call .train() to train
    used = {hf for hf in wanted.values() if hf is not None}
    report = LoadReport(
        directory=directory,
        files=tuple(sorted({str(p.relative_to(directory)) for hf, p in files.items() if hf in used})),
        loaded={ours: hf for ours, hf in wanted.items() if hf is not None},
        created=tuple(ours for ours, hf in wanted.items() if hf is None),
        unused=tuple(sorted(set(files) - used)),
    )
    return model, report
