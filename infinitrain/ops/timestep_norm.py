"""MEGALODON's timestep normalisation (arXiv 2404.08801 §3.2) as pure functions: group norm whose mean and variance
are cumulative over time (causal), with the running count, mean and variance carried across chunks and calls.

At token t, group g normalises with the mean and (population) variance of every element of g seen so far in the
stream, the carried prefix included: y = (x − μ_t) / sqrt(σ²_t + ε) ⊙ w + b. ``timestep_norm`` computes all
positions with cumulative sums (centred on the carried mean, so fp32 sums do not cancel); ``timestep_norm_naive``
is the Welford update of the official kernel, one token at a time. A document start (``doc_start``) empties the
statistics of its row before its token.

Shape legend: B batch, T tokens, D channels, G groups (D/G channels each).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NormState(NamedTuple):
    """Running statistics per row: count of tokens seen (B,) int64, mean (B, G) and variance (B, G) of each group."""

    count: Tensor
    mean: Tensor
    var: Tensor

    def detach(self) -> "NormState":
        return NormState(self.count, self.mean.detach(), self.var.detach())


def zero_norm_state(batch: int, groups: int, dtype: torch.dtype, device=None) -> NormState:
    dtype = torch.promote_types(dtype, torch.float32)
    return NormState(torch.zeros(batch, dtype=torch.long, device=device),
                     torch.zeros(batch, groups, dtype=dtype, device=device),
                     torch.zeros(batch, groups, dtype=dtype, device=device))


def _last_start(doc_start: Tensor) -> Tensor:
    """(B, T) index of the latest document start at or before each token, −1 where none."""
    T = doc_start.shape[1]
    idx = torch.arange(T, device=doc_start.device).expand_as(doc_start)
    return torch.where(doc_start, idx, torch.full_like(idx, -1)).cummax(1).values


def timestep_norm(x: Tensor, weight: Tensor, bias: Tensor, state: NormState | None = None, *, groups: int,
                  eps: float = 1e-5, doc_start: Tensor | None = None) -> tuple[Tensor, NormState]:
    """x (B, T, D), weight/bias (D,) -> (y (B, T, D) in x's dtype, the statistics after the last token)."""
    B, T, D = x.shape
    wide = torch.promote_types(x.dtype, torch.float32)
    if state is None:
        state = zero_norm_state(B, groups, x.dtype, x.device)
    if T == 0:
        return x, state
    n0, m0, v0 = state.count, state.mean.to(wide), state.var.to(wide)
    xg = x.to(wide).view(B, T, groups, D // groups)
    seen = (n0 > 0)[:, None]
    c = torch.where(seen, m0, xg[:, 0].mean(-1)).detach()  # (B, G) centre: any value is exact, a near one is stable
    xs = xg - c[:, None, :, None]
    cs1, cs2 = xs.mean(-1).cumsum(1), xs.pow(2).mean(-1).cumsum(1)  # (B, T, G)
    n0f = n0.to(wide)[:, None]
    prior1 = n0f * (m0 - c)  # the carried statistics, centred on c
    prior2 = n0f * (v0 + (m0 - c) ** 2)
    count = n0[:, None] + torch.arange(1, T + 1, device=x.device)  # (B, T)
    s1, s2 = cs1 + prior1[:, None], cs2 + prior2[:, None]
    if doc_start is not None:  # sums restart at the latest document start
        r = _last_start(doc_start)
        new = (r >= 0)[..., None]
        at = r.clamp(min=0)[..., None].expand(B, T, groups)
        before1 = (cs1 - xs.mean(-1)).gather(1, at)  # Σ_{s<r}, read at r
        before2 = (cs2 - xs.pow(2).mean(-1)).gather(1, at)
        s1, s2 = torch.where(new, cs1 - before1, s1), torch.where(new, cs2 - before2, s2)
        count = torch.where(r >= 0, torch.arange(T, device=x.device) - r + 1, count)
    cnt = count.to(wide)[..., None]
    mean_c = s1 / cnt
    var = (s2 / cnt - mean_c ** 2).clamp(min=0.0)  # (B, T, G)
    xn = (xs - mean_c[..., None]) * torch.rsqrt(var + eps)[..., None]
    y = xn.view(B, T, D) * weight.to(wide) + bias.to(wide)
    return y.to(x.dtype), NormState(count[:, -1], mean_c[:, -1] + c, var[:, -1])


def timestep_norm_naive(x: Tensor, weight: Tensor, bias: Tensor, state: NormState | None = None, *, groups: int,
                        eps: float = 1e-5, doc_start: Tensor | None = None) -> tuple[Tensor, NormState]:
    """Reference for ``timestep_norm``: per token, merge its group mean and variance into the running ones
    (Welford, as the official CUDA kernel), then normalise with the merged statistics."""
    B, T, D = x.shape
    wide = torch.promote_types(x.dtype, torch.float32)
    if state is None:
        state = zero_norm_state(B, groups, x.dtype, x.device)
    n, m, v = state.count.clone(), state.mean.to(wide), state.var.to(wide)
    ys = []
    for t in range(T):
        if doc_start is not None:
            n = torch.where(doc_start[:, t], torch.zeros_like(n), n)
        xt = x[:, t].to(wide).view(B, groups, D // groups)
        gu, gv = xt.mean(-1), xt.var(-1, unbiased=False)  # this token's group statistics (B, G)
        n = n + 1
        c2 = (1.0 / n.to(wide))[:, None]
        c1 = 1.0 - c2
        delta = gu - m
        m = c1 * m + c2 * gu
        v = c1 * v + c2 * gv + (c1 * delta) * (c2 * delta)
        y = (xt - m[..., None]) / torch.sqrt(v[..., None] + eps)
        ys.append(y.reshape(B, D) * weight.to(wide) + bias.to(wide))
    y = torch.stack(ys, 1) if ys else x
    return y.to(x.dtype), NormState(n, m, v)
