"""Rotary position embeddings (RoPE, arXiv 2104.09864) and YaRN (arXiv 2309.00071) as pure functions.

Applied to the local-attention queries and keys only; the compressive-memory path has no positions
(arXiv 2404.07143 §4.1). Convention: Hugging Face Llama's "rotate half" (dim i pairs with i + R/2),
so Llama weights load without a permutation.

Shape legend: B batch, H heads, T tokens, K head dim, R rotated dims (even, R <= K).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class RotarySpec:
    """What to rotate and how. ``scale`` > 1 turns RoPE into YaRN ("NTK-by-parts" + temperature)."""

    head_dim: int
    rot_dim: int
    base: float = 10000.0
    scale: float = 1.0  # YaRN s = L' / L
    original_len: int = 2048  # YaRN L: the context the frequencies were trained for
    alpha: float = 1.0  # YaRN ramp start, in rotations within L
    beta: float = 32.0  # YaRN ramp end
    mscale: float | None = None  # YaRN sqrt(1/t); None = 0.1 ln s + 1

    def __post_init__(self) -> None:
        if self.rot_dim <= 0 or self.rot_dim % 2 or self.rot_dim > self.head_dim:
            raise ValueError(f"rot_dim must be even and in (0, head_dim={self.head_dim}], got {self.rot_dim}")
        if self.base <= 1.0:
            raise ValueError(f"rope base must be > 1, got {self.base}")
        if self.scale < 1.0:
            raise ValueError(f"YaRN scale must be >= 1, got {self.scale}")
        if not 0 < self.alpha < self.beta:
            raise ValueError(f"YaRN needs 0 < alpha < beta, got alpha={self.alpha} beta={self.beta}")
        if self.original_len <= 0:
            raise ValueError(f"original_len must be positive, got {self.original_len}")


def rope_inv_freq(spec: RotarySpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """Angular frequency per rotated pair, (R/2,); YaRN-interpolated when scale > 1."""
    d = torch.arange(0, spec.rot_dim, 2, dtype=torch.float64)
    theta = spec.base ** (-d / spec.rot_dim)  # θ_d = b^{-2d/|D|}
    if spec.scale == 1.0:
        return theta.to(dtype)
    wavelength = 2 * math.pi / theta
    r = spec.original_len / wavelength  # rotations within the original context
    gamma = ((r - spec.alpha) / (spec.beta - spec.alpha)).clamp(0.0, 1.0)
    return ((1 - gamma) * theta / spec.scale + gamma * theta).to(dtype)  # h(θ_d) of the YaRN paper


def rope_mscale(spec: RotarySpec) -> float:
    """YaRN's sqrt(1/t): multiplies q and k (logits by its square), never the angles."""
    if spec.mscale is not None:
        return spec.mscale
    return 1.0 if spec.scale == 1.0 else 0.1 * math.log(spec.scale) + 1.0


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@functools.lru_cache(maxsize=64)
def _inv_freq_on(spec: RotarySpec, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``rope_inv_freq`` on device, made once: a layer call then copies nothing from the host."""
    with torch.inference_mode(False), torch.no_grad():
        return rope_inv_freq(spec, dtype).to(device)


def rope_angles(pos: Tensor, spec: RotarySpec, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (..., R) of positions pos (T,) or (B, T): each frequency twice, in rotate-half order."""
    angles = pos.to(dtype)[..., None] * _inv_freq_on(spec, dtype, pos.device)  # (..., R/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


@functools.lru_cache(maxsize=64)
def rope_table(spec: RotarySpec, length: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (length, R) of positions 0..length-1, computed once per (spec, length, dtype, device).

    In-segment positions never exceed the segment, so decoding slices rows of this table instead of
    recomputing frequencies and angles for every token. Built outside inference mode, so a table first
    made under ``torch.inference_mode()`` still serves training later. Read-only: never write into it.
    """
    with torch.inference_mode(False), torch.no_grad():
        return rope_angles(torch.arange(length, device=device), spec, dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, spec: RotarySpec) -> Tensor:
    """Rotate the first R dims of x (B, H, T, K) by precomputed cos, sin (T, R) or (B, 1, T, R)."""
    wide = cos.dtype
    xr = x[..., : spec.rot_dim].to(wide)
    rotated = (xr * cos + rotate_half(xr) * sin).to(x.dtype)
    out = torch.cat((rotated, x[..., spec.rot_dim :]), dim=-1) if spec.rot_dim < spec.head_dim else rotated
    m = rope_mscale(spec)
    return out if m == 1.0 else out * m


def apply_rotary(x: Tensor, pos: Tensor, spec: RotarySpec) -> Tensor:
    """Rotate the first R dims of x (B, H, T, K) by positions pos, (T,) or (B, T) integers."""
    wide = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16 inputs, fp64 kept for tests
    cos, sin = rope_angles(pos, spec, wide)  # (T, R) or (B, T, R)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R): broadcast over heads
    return rotate(x, cos, sin, spec)


def apply_rotary_at(x: Tensor, start: int, spec: RotarySpec, table_len: int) -> Tensor:
    """``apply_rotary(x, arange(start, start + T), spec)`` from the cached ``rope_table`` rows (start + T <=
    table_len)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope_table(spec, table_len, wide, x.device)
    T = x.shape[-2]
    return rotate(x, cos[start:start + T], sin[start:start + T], spec)


def apply_rotary_segments(x: Tensor, segment_len: int, spec: RotarySpec) -> Tensor:
    """``apply_rotary(x, arange(T) % S, spec)`` for x (B, H, T, K), T = N·S, from the per-device cached
    ``rope_table``: every segment's positions restart at 0, so one (S, R) table serves all N segments and every
    layer (no angles computed, and none kept for backward, per call)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope_table(spec, segment_len, wide, x.device)
    B, H, T, K = x.shape
    return rotate(x.view(B, H, T // segment_len, segment_len, K), cos, sin, spec).reshape(B, H, T, K)


def apply_rotary_naive(x: Tensor, pos: Tensor, spec: RotarySpec) -> Tensor:
    """Loop twin of ``apply_rotary``: one explicit 2x2 rotation per (position, pair)."""
    inv_freq = rope_inv_freq(spec, torch.float64)
    half = spec.rot_dim // 2
    out = x.double().clone()
    T = x.shape[-2]
    for t in range(T):
        p = pos[..., t].double()
        for i in range(half):
            a = p * inv_freq[i]
            if a.dim() == 1:  # per-batch positions
                a = a[:, None]
            x1, x2 = x[..., t, i].double(), x[..., t, i + half].double()
            out[..., t, i] = x1 * torch.cos(a) - x2 * torch.sin(a)
            out[..., t, i + half] = x1 * torch.sin(a) + x2 * torch.cos(a)
    return (out * rope_mscale(spec)).to(x.dtype)
