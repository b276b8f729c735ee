"""LoRA adapters (Hu et al., arXiv 2106.09685) on chosen ``nn.Linear`` layers, and their merge into plain weights.

    LoRALinear:  y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ       A (R, I) random, B (O, R) zero: unchanged at step 0
    merge:       W' = W + (α/r) · B A                            the naive twin: same outputs without dropout

A ``LoRALinear`` keeps the base layer's own ``weight``/``bias`` Parameters under the same names and adds
``lora_A``/``lora_B`` beside them, so every name the checkpoints, ``init_from`` and the export know stays as it is
and a merged state dict is a plain model's (``merge_lora_state``). No ``peft``: it renames the wrapped weights
(``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``), its merge works through a ``PeftModel`` only
(``inject_adapter_in_model`` on a custom module cannot merge), and it installs transformers and accelerate;
the whole method is the two lines above.
Shape legend: I in features, O out features, R rank; x (..., I).
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinitrain.errors import CheckpointError, ConfigError

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
GROUPS = ("attention", "mlp")  # target shorthands: q/k/v/o of every attention, every Linear of every MLP


class LoRALinear(nn.Module):
    """``base`` plus a rank-R update; the base's Parameters are reused (same objects, same names)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear (and peft) initialise A
        self.lora_A = nn.Parameter(a.to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., O) through rank R
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """W + scale · B A, computed in fp32 (or wider) and returned in W's dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(wide) + scale * (lora_B.to(wide) @ lora_A.to(wide))).to(weight.dtype)


def target_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Qualified name -> ``nn.Linear`` for the targets: ``attention`` (q/k/v/o projections), ``mlp`` (every Linear of
    an MLP), a bare name (``q_proj``: the last name component) or a glob on the qualified name
    (``layers.0.attn.*``). A target that matches no Linear is a ConfigError (a typo trains nothing)."""
    from infinitrain.model.layers import MLP, InfiniAttention

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    owners = {"attention": [n for n, m in model.named_modules() if isinstance(m, InfiniAttention)],
              "mlp": [n for n, m in model.named_modules() if isinstance(m, MLP)]}
    chosen: dict[str, nn.Linear] = {}
    for target in targets:
        if target in GROUPS:
            prefixes = tuple(f"{o}." for o in owners[target])
            hit = [n for n in linears if n.startswith(prefixes)
                   and (target == "mlp" or n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"))]
        elif "." in target or any(c in target for c in "*?["):
            hit = [n for n in linears if fnmatch.fnmatchcase(n, target)]
        else:
            hit = [n for n in linears if n.rsplit(".", 1)[-1] == target]
        if not hit:
            example = next(iter(linears), "none")
            raise ConfigError(f"finetune.lora.targets: {target!r} matches no Linear layer (names look like {example}; "
                              f"shorthands: {', '.join(GROUPS)})")
        chosen.update((n, linears[n]) for n in hit)
    return dict(sorted(chosen.items()))


def add_lora(model: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float = 0.0,
             seed: int = 0) -> list[str]:
    """Swap every targeted Linear of ``model`` for a ``LoRALinear`` (in place); returns their qualified names.
    A is drawn from one generator seeded with ``seed`` in name order: identical on every rank."""
    chosen = target_modules(model, targets)
    g = torch.Generator().manual_seed(seed)
    for name, base in chosen.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout, generator=g))
    return list(chosen)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` of ``model`` by a plain ``nn.Linear`` holding the merged weight (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            with torch.no_grad():
                plain.weight = nn.Parameter(merged_weight(m.weight, m.lora_A, m.lora_B, m.scale),
                                            requires_grad=m.weight.requires_grad)
                if m.bias is not None:
                    plain.bias = m.bias
            setattr(parent, attr, plain)
    return model


def has_adapters(state: dict[str, Tensor]) -> bool:
    return any(k.endswith(ADAPTER_SUFFIXES) for k in state)


def merge_lora_state(state: dict[str, Tensor], scale: float | None, where: str = "checkpoint") -> dict[str, Tensor]:
    """A state dict with adapters -> the plain model's state dict: each ``X.weight`` becomes W + scale · B A and the
    ``X.lora_A``/``X.lora_B`` entries are dropped. ``scale`` (α/r) None: the state must hold no adapters."""
    if not has_adapters(state):
        return state
    if scale is None:
        raise CheckpointError(f"{where}: holds LoRA adapters but its run config has no finetune.lora (alpha/rank)")
    out = {k: v for k, v in state.items() if not k.endswith(ADAPTER_SUFFIXES)}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len("lora_A")]
            missing = [k for k in (f"{prefix}lora_B", f"{prefix}weight") if k not in state]
            if missing:
                raise CheckpointError(f"{where}: adapter {key} without {missing[0]}")
            out[f"{prefix}weight"] = merged_weight(state[f"{prefix}weight"], state[key], state[f"{prefix}lora_B"],
                                                   scale)
    return out
