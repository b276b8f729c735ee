"""Model configuration: a frozen, validated ``ModelConfig`` and the named presets (debug, 1b, 1b-mod, 8b, 8b-mod,
megalodon-debug, megalodon-7b)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from infinitrain.errors import ConfigError
from infinitrain.ops.memory import UPDATES
from infinitrain.ops.rope import RotarySpec

ACTIVATIONS = ("relu", "abs", "gelu", "swish", "swiglu", "geglu", "ffnglu", "ffngeglu", "ffnswiglu")
POS_EMBS = ("rope", "yarn", "none")
ARCHS = ("infini", "megalodon")

Activation = Literal["relu", "abs", "gelu", "swish", "swiglu", "geglu", "ffnglu", "ffngeglu", "ffnswiglu"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of an ``InfiniLM``. Every field is validated; unknown keys are refused by ``from_dict``.

    ``arch`` chooses the block family: ``infini`` (Infini-attention, arXiv 2404.07143) or ``megalodon`` (CEMA,
    timestep norm and normalised chunked attention, arXiv 2404.08801; ``segment_len`` is its chunk, ``head_dim``
    its shared Q/K dim per head, so z_dim = n_heads·head_dim). Both share embeddings, head, loss and state API."""

    arch: Literal["infini", "megalodon"] = "infini"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int
    activation: Activation = "ffnswiglu"
    segment_len: int = 2048
    update: Literal["linear", "delta"] = "linear"
    pos_emb: Literal["rope", "yarn", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_pct: float = 1.0  # fraction of each head's dims that rotate
    yarn_scale: float = 1.0
    yarn_original_len: int = 2048
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0
    yarn_mscale: float | None = None  # YaRN sqrt(1/t) on q and k; None = 0.1 ln s + 1 (1.0 = Llama 3.1 scaling)
    norm_eps: float = 1e-5
    memory_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = False
    gate_init: float = 0.0  # β at init: sigmoid(0) = 0.5 mixes memory and local attention equally
    # β at init is gate_init + gate_split on even heads and gate_init - gate_split on odd heads: half the heads of
    # each layer start reading mostly the memory, half mostly local attention (0: every head at gate_init)
    gate_split: float = 0.0
    # the memory reads σ(τ·q) and writes σ(τ·k), τ a learned temperature per KV head (``log_tau``) initialised
    # here: a larger τ makes the ELU+1 kernel pick out matching keys. null: the paper's σ(q), σ(k), no parameter
    memory_tau: float | None = None
    # the keys and values of every attention layer see the previous token too: k, v = W·lerp(x_t, x_{t-1}, μ), μ a
    # learned mix per channel (``shift_k``, ``shift_v``) starting at 0 (= off). x_{t-1} crosses segment boundaries
    # (the state carries it), so a segment's first token knows the token before it: what an induction key needs
    # when a needle straddles a boundary. Not in the paper; false: no parameter, the paper's layer
    token_shift: bool = False
    mod_every: int = 0  # 0: no Mixture-of-Depths; k: every k-th block is routed (k=2: every other block)
    mod_capacity: float = 0.125  # fraction of each segment a routed block processes in training
    init_std: float = 0.02
    # classification: the class names; the model then ends in a head of len(labels) outputs (``score``) in place
    # of the LM head, read at each sample's labelled position (infinitrain/train/tasks.py). None: a language model.
    labels: tuple[str, ...] | None = None
    # MEGALODON only (arch: megalodon): CEMA dims per channel (the paper's h), the value dim over all heads
    # (null: 2·d_model) and the timestep norm's groups
    ema_dim: int = 16
    v_dim: int | None = None
    norm_groups: int = 32
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # free-form notes

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.arch == "megalodon":
            self._megalodon_defaults()
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ConfigError(f"model: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                                  "unless head_dim is given")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "segment_len",
                     "yarn_original_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        if self.update not in UPDATES:
            raise ConfigError(f"model.update must be one of {', '.join(UPDATES)}; got {self.update!r}")
        self._check_positions()
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "memory_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if not isinstance(self.mod_every, int) or self.mod_every < 0:
            raise ConfigError(f"model.mod_every must be an integer >= 0, got {self.mod_every!r}")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ConfigError(f"model.mod_capacity must be in (0, 1], got {self.mod_capacity}")
        for name in ("gate_init", "gate_split"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"model.{name} must be finite, got {getattr(self, name)}")
        if self.memory_tau is not None and not (isinstance(self.memory_tau, (int, float))
                                                and not isinstance(self.memory_tau, bool)
                                                and math.isfinite(self.memory_tau) and self.memory_tau > 0):
            raise ConfigError(f"model.memory_tau must be null or a finite number > 0, got {self.memory_tau!r}")
        if not isinstance(self.token_shift, bool):
            raise ConfigError(f"model.token_shift must be true or false, got {self.token_shift!r}")
        if self.token_shift and self.mod_every:
            raise ConfigError("model.token_shift does not combine with Mixture-of-Depths (mod_every > 0): a routed "
                              "block sees a subset of the tokens, so 'the previous token' is not defined there")
        if self.labels is not None:
            labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else None
            if not labels or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels) \
                    or len(set(labels)) != len(labels):
                raise ConfigError(f"model.labels must be null or a list of at least 2 distinct class names, "
                                  f"got {self.labels!r}")
            object.__setattr__(self, "labels", labels)
        if self.arch == "megalodon":
            self._check_megalodon()

    def _check_positions(self) -> None:
        """RoPE / YaRN fields."""
        if self.pos_emb not in POS_EMBS:
            raise ConfigError(f"model.pos_emb must be one of {', '.join(POS_EMBS)}; got {self.pos_emb!r}")
        if not 0.0 < self.rope_pct <= 1.0 or self.rot_dim == 0 and self.pos_emb != "none":
            raise ConfigError(f"model.rope_pct must be in (0, 1] and rotate at least 2 dims; got {self.rope_pct}")
        if self.rope_theta <= 1.0:
            raise ConfigError(f"model.rope_theta must be > 1, got {self.rope_theta}")
        if self.yarn_scale < 1.0 or (self.pos_emb != "yarn" and self.yarn_scale != 1.0):
            raise ConfigError(f"model.yarn_scale must be >= 1 and only set with pos_emb: yarn; got {self.yarn_scale}")
        if not 0.0 < self.yarn_alpha < self.yarn_beta:
            raise ConfigError(f"model.yarn_alpha/yarn_beta need 0 < alpha < beta; got {self.yarn_alpha}, "
                              f"{self.yarn_beta}")
        if self.yarn_mscale is not None and not self.yarn_mscale > 0:
            raise ConfigError(f"model.yarn_mscale must be > 0 or null, got {self.yarn_mscale}")

    def _megalodon_defaults(self) -> None:
        """head_dim (Z per head) defaults to d_model / (4·n_heads) as the paper's 7B (z_dim 1024 of d 4096)."""
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            object.__setattr__(self, "head_dim", max(1, self.d_model // (4 * self.n_heads)))
        if self.v_dim is None and isinstance(self.d_model, int):
            object.__setattr__(self, "v_dim", 2 * self.d_model)

    def _check_megalodon(self) -> None:
        for name in ("ema_dim", "v_dim", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.v_dim % self.n_heads:
            raise ConfigError(f"model.v_dim ({self.v_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.d_model % self.norm_groups:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by norm_groups ({self.norm_groups})")
        refused = {"mod_every": 0, "token_shift": False, "memory_tau": None, "n_kv_heads": self.n_heads}
        for name, default in refused.items():
            if getattr(self, name) != default:
                raise ConfigError(f"model.{name} is an Infini-attention option; arch megalodon takes the default "
                                  f"({default!r}), got {getattr(self, name)!r}")
        if self.pos_emb == "yarn":
            raise ConfigError("model.pos_emb yarn is not supported with arch megalodon (rope or none)")

    # --- derived -----------------------------------------------------------------------------
    def gate_init_per_head(self) -> list[float]:
        """β at init for each of the n_heads query heads (``gate_init`` ± ``gate_split``, even heads +)."""
        return [self.gate_init + (self.gate_split if h % 2 == 0 else -self.gate_split) for h in range(self.n_heads)]

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.rope_pct) // 2 * 2

    def rotary(self) -> RotarySpec | None:
        if self.pos_emb == "none":
            return None
        return RotarySpec(head_dim=self.head_dim, rot_dim=self.rot_dim, base=self.rope_theta,
                          scale=self.yarn_scale if self.pos_emb == "yarn" else 1.0,
                          original_len=self.yarn_original_len, alpha=self.yarn_alpha, beta=self.yarn_beta,
                          mscale=self.yarn_mscale if self.pos_emb == "yarn" else None)

    @property
    def ties_lm_head(self) -> bool:
        """The LM head shares the embedding matrix (a classifier has no LM head)."""
        return self.tie_embeddings and self.labels is None

    def is_routed(self, layer: int) -> bool:
        """Mixture-of-Depths placement: with mod_every=k, blocks k-1, 2k-1, ... are routed (block 0 never)."""
        return self.mod_every > 0 and layer % self.mod_every == self.mod_every - 1

    def mod_tokens_per_segment(self) -> int:
        return max(1, math.ceil(self.segment_len * self.mod_capacity))

    def memory_bytes_per_sequence(self) -> int:
        """Constant state per sequence: fp32 (M, z) per KV head per layer (paper Table 1: d_k (d_v + 1) H l); for
        MEGALODON the complex64 CEMA state (D·h) and the timestep norm's count, mean and variance per layer."""
        if self.arch == "megalodon":
            return self.n_layers * (8 * self.d_model * self.ema_dim + 8 * self.norm_groups + 8)
        return 4 * self.n_layers * self.n_kv_heads * self.head_dim * (self.head_dim + 1)

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        if d["labels"] is not None:
            d["labels"] = list(d["labels"])  # YAML and JSON lists
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "model") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"{where}: {err}") from None

    def replace(self, **changes: Any) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _llama3_8b(**kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                       rope_theta=500000.0, segment_len=2048, **kw)


def _llama32_1b(**kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                       rope_theta=500000.0, tie_embeddings=True, segment_len=2048, **kw)


PRESETS: dict[str, ModelConfig] = {
    # Trains on a CPU in seconds; byte-sized vocabulary so any small tokenizer fits.
    "debug": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, segment_len=64),
    # Llama-3.2-1B shape (1.24 B): 16 layers, d 2048, 32 heads / 8 KV heads, FFN 8192, tied embeddings.
    "1b": _llama32_1b(),
    "1b-mod": _llama32_1b(mod_every=2, mod_capacity=0.125),
    # Llama-3-8B shape (8.03 B): 32 layers, d 4096, 32 heads / 8 KV heads, FFN 14336, RoPE θ 500000.
    "8b": _llama3_8b(),
    "8b-mod": _llama3_8b(mod_every=2, mod_capacity=0.125),
}


def _megalodon_7b(**kw: Any) -> ModelConfig:
    return ModelConfig(arch="megalodon", vocab_size=32000, d_model=4096, n_layers=32, n_heads=4, head_dim=256,
                       v_dim=8192, d_ff=8192, ema_dim=16, norm_groups=64, segment_len=4096, rope_theta=100000.0,
                       activation="ffnswiglu", **kw)


PRESETS.update({
    # MEGALODON on a CPU in seconds: the same sizes as debug where they mean the same thing.
    "megalodon-debug": ModelConfig(arch="megalodon", vocab_size=512, d_model=64, n_layers=2, n_heads=2, head_dim=16,
                                   v_dim=128, d_ff=192, ema_dim=8, norm_groups=8, segment_len=64),
    # The paper's 7B (official ModelStore "mega7.3B"): 32 blocks, d 4096, 4 heads, Z 1024, values 8192, SwiGLU FFN
    # 8192, CEMA dims 16, 64 norm groups, Llama-2's 32K vocabulary, chunk 4096, RoPE base 100K.
    "megalodon-7b": _megalodon_7b(),
})


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def format_count(n: int) -> str:
    """A parameter count in the unit that shows it: ``8.030 B``, ``164.168 K`` (the debug preset is not ``0.000 B``)."""
    scale, unit = next(((s, u) for s, u in ((1e9, "B"), (1e6, "M")) if n >= s), (1e3, "K"))
    return f"{n / scale:.3f} {unit}"
