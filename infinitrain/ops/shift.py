"""Token shift: every position's previous token, across segment and call boundaries, with a naive twin."""

from __future__ import annotations

import torch
from torch import Tensor


def token_shift(x: Tensor, last: Tensor | None = None, doc_start: Tensor | None = None) -> Tensor:
    """x (B, T, D) -> prev (B, T, D), prev[:, t] = x[:, t-1]; prev[:, 0] = last (B, D), the previous call's final
    token (None: the stream starts here, zeros). A document's first token (doc_start (B, T) True) gets zeros: nothing
    crosses into a new document."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    prev = torch.cat((first, x[:, :-1]), 1)
    if doc_start is not None:
        prev = prev.masked_fill(doc_start[..., None], 0.0)
    return prev


def token_shift_naive(x: Tensor, last: Tensor | None = None, doc_start: Tensor | None = None) -> Tensor:
    """Reference for ``token_shift``: one token at a time."""
    B, T, D = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        before = torch.zeros(D, dtype=x.dtype) if last is None else last[b].to(x.dtype)
        for t in range(T):
            if doc_start is None or not bool(doc_start[b, t]):
                out[b, t] = before
            before = x[b, t]
    return out
