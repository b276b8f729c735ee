"""Read a llama.cpp GGUF file as a Hugging Face Llama checkpoint: config.json, dequantised tensors, tokenizer.json.

API::

    g = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # header checked and parsed; no tensor data read yet
    g.hf_config                   # the config.json a Hugging Face Llama of this file has
    g.shapes                      # {hf tensor name: shape}, e.g. model.layers.0.self_attn.q_proj.weight: (576, 576)
    w = g.tensor("model.layers.0.self_attn.q_proj.weight")  # fp32 [out, in], dequantised, rows in HF order
    tok = g.tokenizer()           # tokenizers.Tokenizer built from the vocabulary, merges and token types
    convert_gguf("x.gguf", "out/")  # config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json

- The file is read with the ``gguf`` package (ggml's own reader, extra ``infinitrain[gguf]``) and dequantised
  with its ``gguf.quants.dequantize`` (every ggml type it knows: F32/F16/BF16, Q4_0..Q8_0, K- and I-quants).
- Before ``GGUFReader`` sees the file, ``check_layout`` walks the header with every count bounded by the bytes
  left: the reader loops once per array element even past the end of the file (a count of 2^60 would never
  finish), so a truncated file, a huge metadata count or a tensor reaching past the end is a one-line
  ``CheckpointError`` (exit 5) naming the file and offset, never a hang or a large allocation.
- llama.cpp's converter permutes the rows of Q and K (``permute`` in convert_hf_to_gguf.py: each head's rows
  are interleaved pairs for its own RoPE kernel); ``unpermute`` puts them back into Hugging Face's
  "rotate half" order: row (h, 2i + j) of the file is row (h, j * d/2 + i) of the Hugging Face matrix.
- The tokenizer: ``tokenizer.ggml.model`` "gpt2" (byte-level BPE) only, with the pre-tokenizer named by
  ``tokenizer.ggml.pre`` from ``PRE_TOKENIZERS`` (llama.cpp's regexes); any other name is refused in one line
  rather than guessed, since a wrong split changes every id. Control tokens (type 3) become special added
  tokens, user-defined ones (type 4) plain added tokens.
- Refused in one line: an architecture other than "llama", a mixture of experts, RoPE scaling, partial
  rotary, and any tensor the Llama layout does not have.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infinitrain.errors import CheckpointError, ConfigError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9

# llama.cpp's GGUF tensor names -> Hugging Face Llama names.
_TENSORS = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
)

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp), as ``tokenizers`` pre-tokenizers.
# ByteLevel(use_regex=True): 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_GPT2_REGEX = "byte-level"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "smollm": ("digits", _GPT2_REGEX),  # "\p{N}" then the GPT-2 regex (starcoder, refact: the same case)
    "starcoder": ("digits", _GPT2_REGEX),
    "refact": ("digits", _GPT2_REGEX),
    "gpt-2": (_GPT2_REGEX,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
}


class _Cursor:
    """Bounded little-endian reads from the mapped file; reading past the end is a one-line CheckpointError."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.path, self.off, self.size = buf, path, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.off + n > self.size:
            raise CheckpointError(f"{self.path}: truncated GGUF: {what} at offset {self.off} needs {n} bytes, "
                                  f"{self.size - self.off} left")
        start, self.off = self.off, self.off + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def count(self, what: str, min_bytes: int) -> int:
        """A count of items each at least ``min_bytes`` long: more than the bytes left can hold is refused."""
        at, n = self.off, self.u64(what)
        if n * min_bytes > self.size - self.off:
            raise CheckpointError(f"{self.path}: GGUF {what} {n} at offset {at} cannot fit in the "
                                  f"{self.size - self.off} bytes left (corrupt or hostile file)")
        return n

    def string(self, what: str) -> bytes:
        n = self.count(f"{what} length", 1)
        return bytes(self.buf[self.take(n, what):self.off])


def _skip_value(c: _Cursor, vtype: int, key: str) -> Any:
    """Walk one metadata value; returns it for a u32 (general.alignment), else None."""
    if vtype in SCALAR_SIZES:
        start = c.take(SCALAR_SIZES[vtype], f"value of {key}")
        return struct.unpack_from("<I", c.buf, start)[0] if vtype == 4 else None
    if vtype == STRING:
        c.string(f"value of {key}")
        return None
    if vtype != ARRAY:
        raise CheckpointError(f"{c.path}: GGUF key {key} has unknown value type {vtype} at offset {c.off - 4}")
    itype = c.u32(f"array type of {key}")
    if itype in SCALAR_SIZES:
        c.take(c.count(f"array length of {key}", SCALAR_SIZES[itype]) * SCALAR_SIZES[itype], f"array {key}")
        return None
    n = c.count(f"array length of {key}", 8 if itype == STRING else 12)
    for _ in range(n):
        _skip_value(c, itype, key)
    return None


def check_layout(path: Path, buf: Any) -> int:
    """Walk the header bounded by the file size (module docstring); returns the number of tensors."""
    import gguf

    c = _Cursor(buf, path)
    if bytes(buf[c.take(4, "magic"):4]) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
    version = c.u32("version")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.u64("tensor count"), c.count("metadata count", 13)
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = c.string("metadata key").decode("utf-8", errors="replace")
        value = _skip_value(c, c.u32(f"type of {key}"), key)
        if key == "general.alignment" and value is not None:
            alignment = value
    if n_tensors * 24 > c.size - c.off:
        raise CheckpointError(f"{path}: GGUF tensor count {n_tensors} cannot fit in the file (corrupt or hostile)")
    if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: GGUF general.alignment {alignment} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name").decode("utf-8", errors="replace")
        n_dims = c.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: GGUF tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [c.u64(f"dimensions of {name}") for _ in range(n_dims)]
        qtype, offset = c.u32(f"type of {name}"), c.u64(f"data offset of {name}")
        infos.append((name, dims, qtype, offset))
    data_start = -(-c.off // alignment) * alignment
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: GGUF tensor {name} has unknown ggml type {qtype}") from None
        n = math.prod(dims)
        if dims[0] % block:
            raise CheckpointError(f"{path}: GGUF tensor {name}: row length {dims[0]} is not a multiple of its "
                                  f"type's block of {block}")
        end = data_start + offset + n // block * type_size
        if end > c.size:
            raise CheckpointError(f"{path}: GGUF tensor {name} declares {n // block * type_size} bytes at offset "
                                  f"{data_start + offset}, past the end of the file ({c.size} bytes): truncated or "
                                  "corrupt")
    return n_tensors


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation (module docstring): [n_heads * d, in] rows (h, 2i+j) -> (h, j*d/2+i)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's own permutation (convert_hf_to_gguf.py ``permute``), the inverse of ``unpermute``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    for pattern, template in _TENSORS:
        m = re.fullmatch(pattern, gguf_name)
        if m:
            return m.expand(template)
    raise CheckpointError(f"{path}: GGUF tensor {gguf_name} has no place in a Llama model (only llama's "
                          "token_embd, blk.N.attn_*/ffn_*, output_norm, output; rope_freqs means RoPE scaling)")


@dataclass(frozen=True)
class GGUFModel:
    """An opened GGUF: its metadata, its Hugging Face config and where each tensor is (module docstring)."""

    path: Path
    fields: dict[str, Any]  # metadata key -> value (strings decoded, arrays as lists)
    hf_config: dict[str, Any]
    tensors: dict[str, Any]  # hf name -> gguf.ReaderTensor
    reader: Any

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in self.tensors.items()}

    def tensor(self, name: str) -> Tensor:
        """One tensor in fp32, dequantised, in Hugging Face's layout ([out, in] for a linear weight)."""
        import numpy as np
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            value = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy
        except (NotImplementedError, ValueError) as err:
            raise CheckpointError(f"{self.path}: GGUF tensor {t.name} ({t.tensor_type.name}): {err}") from None
        value = value.reshape(self.shapes[name])
        cfg = self.hf_config
        if name.endswith("self_attn.q_proj.weight"):
            value = unpermute(value, cfg["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            value = unpermute(value, cfg["num_key_value_heads"])
        return value

    def tokenizer(self):
        return build_tokenizer(self.fields, self.path)


def _field_value(field: Any) -> Any:
    import gguf

    value = field.contents()
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and not isinstance(value, list):
        value = list(value)
    return value


def open_gguf(path: str | Path) -> GGUFModel:
    """Check and parse ``path`` (metadata and tensor directory; tensor data stays mapped, unread)."""
    path = Path(path)
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{path}: reading GGUF needs the gguf package: pip install 'infinitrain[gguf]'") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            check_layout(path, buf)
    except ValueError as err:  # mmap of an empty file
        raise CheckpointError(f"{path}: not a GGUF file ({err})") from None
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable GGUF ({err})") from None
    hf = gguf_hf_config(fields, path)
    tensors = {hf_tensor_name(t.name, path): t for t in reader.tensors}
    hf["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return GGUFModel(path, fields, hf, tensors, reader)


def _meta(fields: dict[str, Any], key: str, path: Path, default: Any = None, kind: type = int) -> Any:
    if key not in fields:
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata {key} is missing")
        return default
    value = fields[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise CheckpointError(f"{path}: GGUF metadata {key} must be a positive integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise CheckpointError(f"{path}: GGUF metadata {key} must be a positive number, got {value!r}")
    return value


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05, as the source config said)."""
    import numpy as np

    return float(str(np.float32(x)))


def gguf_hf_config(fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a llama GGUF; anything else is refused in one line."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if fields.get("llama.expert_count", 0):
        raise CheckpointError(f"{path}: a mixture of experts (llama.expert_count) is not supported")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (llama.rope.scaling.type)")
    d, heads = _meta(fields, "llama.embedding_length", path), _meta(fields, "llama.attention.head_count", path)
    kv = _meta(fields, "llama.attention.head_count_kv", path, default=heads)
    head_dim = _meta(fields, "llama.attention.key_length", path, default=d // heads)
    if _meta(fields, "llama.rope.dimension_count", path, default=head_dim) != head_dim or heads % kv:
        raise CheckpointError(f"{path}: partial rotary or {heads} query heads over {kv} KV heads are not supported")
    tokens = fields.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": d, "intermediate_size": _meta(fields, "llama.feed_forward_length", path),
        "num_hidden_layers": _meta(fields, "llama.block_count", path), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim,
        "max_position_embeddings": _meta(fields, "llama.context_length", path),
        "rms_norm_eps": _f32(_meta(fields, "llama.attention.layer_norm_rms_epsilon", path, kind=float)),
        "rope_theta": _f32(_meta(fields, "llama.rope.freq_base", path, default=10000.0, kind=float)),
        "vocab_size": _meta(fields, "llama.vocab_size", path, default=len(tokens) or None),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if isinstance(fields.get(key), int):
            cfg[ours] = fields[key]
    return cfg


# --- tokenizer -----------------------------------------------------------------------------------------
def _pre_tokenizer(name: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    if name not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported "
                              f"(known: {', '.join(sorted(PRE_TOKENIZERS))}); a guessed split would change every id")
    steps = []
    for step in PRE_TOKENIZERS[name]:
        if step == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif step == _GPT2_REGEX:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps += [pre_tokenizers.Split(Regex(step), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def build_tokenizer(fields: dict[str, Any], path: Path):
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's for this file: byte-level BPE over the file's vocabulary
    and merges, the named pre-tokenizer, control tokens special (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported "
                              "(only 'gpt2', byte-level BPE)")
    pre = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), path)
    tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens or ())
    if not tokens or not merges or len(types) != len(tokens):
        raise CheckpointError(f"{path}: GGUF tokenizer needs tokenizer.ggml.tokens, merges and token_type of the "
                              "same length")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path}: GGUF merge {bad!r} is not two tokens separated by one space")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])
    return tok


# --- convert -------------------------------------------------------------------------------------------
def _tokenizer_config(fields: dict[str, Any]) -> dict[str, Any]:
    tokens = fields.get("tokenizer.ggml.tokens") or []
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False))}
    for name in ("bos", "eos", "unk", "pad"):
        key = "padding" if name == "pad" else "unknown" if name == "unk" else name
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            out[f"{name}_token"] = tokens[i]
    if isinstance(fields.get("tokenizer.chat_template"), str):
        out["chat_template"] = fields["tokenizer.chat_template"]
    return out


def convert_gguf(path: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face Llama directory of a GGUF: config.json, model.safetensors (fp32, the dequantised
    values exactly), tokenizer.json and tokenizer_config.json. Returns ``out``."""
    from safetensors.torch import save_file

    g = open_gguf(path)
    tok = g.tokenizer()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty (convert writes a new directory)")
    out.mkdir(parents=True, exist_ok=True)
    state = {name: g.tensor(name).contiguous() for name in g.tensors}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "converted_from": g.path.name})
    (out / "config.json").write_text(json.dumps(g.hf_config, indent=1) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(g.fields), indent=1) + "\n")
    return out
