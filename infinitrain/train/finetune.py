"""The recipe's ``finetune:`` section: LoRA adapters and which parameters train (freezing by name pattern).

    finetune:
      lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [attention, mlp]}   # null (default): no adapters
      gates: true        # with LoRA: the per-head gates β train too
      memory: false      # with LoRA: q/k/v train in full (the memory reads with σ(Q), writes with σ(K), V)
      freeze: []         # patterns of parameters that do not train
      train: []          # patterns of parameters that train whatever the rules above say

Which parameters train: with ``lora`` the adapters, the gates (``gates``), q/k/v (``memory``) and a
classification head (``score.*``, new weights); without it every parameter. Then ``freeze`` removes and ``train``
adds. A pattern is a glob on the full parameter name (``layers.0.*``, ``*.attn.betas``) or ``re:`` + a regular
expression (full match); each must match some parameter. Infini-attention has no projections of its own for the
memory: Eqs. 7-8 reuse the attention's Q, K and V, which is why ``memory: true`` means q/k/v.
On the command line the lora mapping is replaced whole: ``'finetune.lora={rank: 4, alpha: 8}'``.
Frozen parameters get ``requires_grad = False`` before ``deepspeed.initialize`` (the optimizer never sees them;
ZeRO keeps them partitioned and saves them with the checkpoint). The adapters are merged into the weights
whenever a checkpoint is read for inference or export (``infinitrain.model.lora.merge_lora_state``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from infinitrain.errors import ConfigError
from infinitrain.model.lora import GROUPS, add_lora

MEMORY_PARAMS = re.compile(r".*\.attn\.[qkv]_proj\.(weight|bias)")
GATE_PARAMS = re.compile(r".*\.attn\.(betas|log_tau)")
HEAD_PARAMS = re.compile(r"score\..*")
ADAPTER_PARAMS = re.compile(r".*\.lora_[AB]")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _patterns(where: str, value: Any) -> list[str]:
    _check(isinstance(value, list) and all(isinstance(p, str) and p for p in value),
           f"{where} must be a list of name patterns (globs, or re:REGEX), got {value!r}")
    for p in value:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ConfigError(f"{where}: {p!r} is not a regular expression ({err})") from None
    return value


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(GROUPS))  # attention, mlp, bare names or globs

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               f"finetune.lora.rank must be a positive integer, got {self.rank!r}")
        _check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
               f"finetune.lora.alpha must be a positive number, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               f"finetune.lora.dropout must be in [0, 1), got {self.dropout!r}")
        names = isinstance(self.targets, list) and all(isinstance(t, str) and t for t in self.targets)
        _check(names and bool(self.targets),
               f"finetune.lora.targets must be a non-empty list of layer names, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    lora: LoRAConfig | None = None
    gates: bool = True
    memory: bool = False
    freeze: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            known = {f.name for f in dataclasses.fields(LoRAConfig)}
            unknown = sorted(set(self.lora) - known)
            _check(not unknown,
                   f"finetune.lora: unknown key {unknown[0] if unknown else ''} (known: {', '.join(sorted(known))})")
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        _check(self.lora is None or isinstance(self.lora, LoRAConfig),
               f"finetune.lora must be a mapping (rank, alpha, dropout, targets) or null, got {self.lora!r}")
        _check(isinstance(self.gates, bool), f"finetune.gates must be true or false, got {self.gates!r}")
        _check(isinstance(self.memory, bool), f"finetune.memory must be true or false, got {self.memory!r}")
        _patterns("finetune.freeze", self.freeze)
        _patterns("finetune.train", self.train)

    @property
    def active(self) -> bool:
        return self.lora is not None or bool(self.freeze) or bool(self.train)


def matching(names: list[str], patterns: list[str], where: str) -> set[str]:
    """The names matched by any pattern; a pattern that matches nothing is a ConfigError."""
    out: set[str] = set()
    for p in patterns:
        hit = {n for n in names if (re.fullmatch(p[3:], n) if p.startswith("re:") else fnmatch.fnmatchcase(n, p))}
        _check(bool(hit), f"{where}: {p!r} matches no parameter (names look like {names[min(1, len(names) - 1)]})")
        out |= hit
    return out


def trainable_names(names: list[str], ft: FinetuneConfig) -> set[str]:
    """Which of the parameter ``names`` train under ``ft`` (module docstring)."""
    if ft.lora is None:
        chosen = set(names)
    else:
        rules = [ADAPTER_PARAMS, HEAD_PARAMS] + [GATE_PARAMS] * ft.gates + [MEMORY_PARAMS] * ft.memory
        chosen = {n for n in names if any(r.fullmatch(n) for r in rules)}
    chosen -= matching(names, ft.freeze, "finetune.freeze")
    chosen |= matching(names, ft.train, "finetune.train")
    _check(bool(chosen), "finetune: no parameter left to train (check finetune.freeze)")
    return chosen


def apply_finetune(model: nn.Module, ft: FinetuneConfig, seed: int = 0) -> str | None:
    """Add the adapters and set ``requires_grad`` (in place, before ``deepspeed.initialize``); returns a one-line
    summary, or None when the section changes nothing."""
    if not ft.active:
        return None
    adapted = []
    if ft.lora is not None:
        lo = ft.lora
        adapted = add_lora(model, lo.targets, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, seed=seed)
    params = dict(model.named_parameters())
    train = trainable_names(list(params), ft)
    for name, p in params.items():
        p.requires_grad_(name in train)
    size = {n: getattr(p, "ds_numel", p.numel()) for n, p in params.items()}  # whole sizes under zero.Init
    n_train, n_all = sum(size[n] for n in train), sum(size.values())
    lora = f"LoRA r={ft.lora.rank} alpha={ft.lora.alpha:g} on {len(adapted)} layers; " if ft.lora else ""
    return (f"finetune: {lora}training {len(train)} of {len(params)} tensors, {n_train:,} of {n_all:,} parameters "
            f"({100 * n_train / max(1, n_all):.2f}%)")
