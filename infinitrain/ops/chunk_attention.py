"""MEGALODON's normalised attention (arXiv 2404.08801 §3.3) inside chunks, as pure functions beside a naive twin.

The queries and keys come from one shared representation Z, normalised per head (RMS, no affine):
Z' = Z / rms(Z), Q = κ_q ⊙ Z' + μ_q, K = κ_k ⊙ Z' + μ_k; softmax(QKᵀ) V without the 1/sqrt(d) scaling (κ is
learned; the model starts it at 1/sqrt(d)), causal and only inside each chunk of C tokens counted from the start
of the stream, RoPE at in-chunk positions. Nothing crosses a chunk boundary here: the CEMA state and the
timestep-norm statistics carry the past. The stream state holds the rotated keys and the values of the
unfinished chunk, so a call may feed any number of tokens (generation feeds one).

Shape legend: B batch, H heads, T tokens, Z shared dim per head, V value dim per head, C chunk length,
P tokens of the unfinished chunk held in the state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infinitrain.ops.memory import SegmentBuffer, _extend
from infinitrain.ops.rope import RotarySpec, apply_rotary, apply_rotary_at


class ChunkCache(NamedTuple):
    """The unfinished chunk: rotated keys (B, H, P, Z) and values (B, H, P, V); without autograd they are views of a
    chunk-sized ``SegmentBuffer`` that decoding appends to in place (as the Infini segment cache)."""

    k: Tensor
    v: Tensor
    buffer: SegmentBuffer | None = None

    def detach(self) -> "ChunkCache":
        return ChunkCache(self.k.detach(), self.v.detach())


def normalized_qk(z: Tensor, kappa_q: Tensor, mu_q: Tensor, kappa_k: Tensor, mu_k: Tensor,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """z (B, T, H, Z) -> q, k (B, H, T, Z): per-head RMS normalisation, then the affine maps (H, Z) of each."""
    wide = torch.promote_types(z.dtype, torch.float32)
    zf = z.to(wide)
    zn = (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps)).transpose(1, 2)  # (B, H, T, Z)
    q = kappa_q[:, None] * zn + mu_q[:, None]
    k = kappa_k[:, None] * zn + mu_k[:, None]
    return q.to(z.dtype), k.to(z.dtype)


def _blocks(q: Tensor, k: Tensor, v: Tensor, C: int, doc: Tensor | None) -> Tensor:
    """Causal softmax(QKᵀ)V inside each chunk; q, k (B, H, N·C, Z) rotated, v (B, H, N·C, V), doc (B, N·C) or None."""
    B, H, T, Z = q.shape
    N = T // C
    if doc is None:
        o = F.scaled_dot_product_attention(q.reshape(B, H * N, C, Z), k.reshape(B, H * N, C, Z),
                                           v.reshape(B, H * N, C, -1), is_causal=True, scale=1.0)
        return o.reshape(B, H, T, -1)
    d = doc.view(B, N, C)
    mask = (d[..., :, None] == d[..., None, :]) & torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    def rows(x: Tensor) -> Tensor:  # (B, H, T, ·) -> (B·N, H, C, ·)
        return x.reshape(B, H, N, C, -1).transpose(1, 2).reshape(B * N, H, C, x.shape[-1])

    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=mask.view(B * N, 1, C, C), scale=1.0)
    return o.view(B, N, H, C, -1).transpose(1, 2).reshape(B, H, T, -1)


def _rotate(x: Tensor, start: int, rotary: RotarySpec | None, C: int) -> Tensor:
    return x if rotary is None else apply_rotary_at(x, start, rotary, C)


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, cache: ChunkCache | None = None, *, chunk: int,
                    rotary: RotarySpec | None = None, doc_start: Tensor | None = None,
                    doc_inside: bool | None = None) -> tuple[Tensor, ChunkCache]:
    """Feed T tokens (q, k (B, H, T, Z) un-rotated, v (B, H, T, V)) after the cached unfinished chunk.

    First the tokens that complete the cached chunk (their queries against its keys), then whole chunks and the
    remainder, padded at the end (causal: padding is seen by nobody). doc_start (B, T) needs an empty cache;
    doc_inside False promises no document starts inside a chunk (no mask, no host sync), None looks."""
    B, H, T, Z = q.shape
    C = chunk
    if cache is None:
        cache = ChunkCache(k.new_zeros(B, H, 0, Z), v.new_zeros(B, H, 0, v.shape[-1]))
    P = cache.k.shape[2]
    if doc_start is not None and P:
        raise ValueError(f"doc_start needs a chunk-aligned call: the cache holds {P} tokens of chunk {C}")
    outs, i = [], 0
    if P:
        i = min(T, C - P)
        (kk, vv), buffer = _extend((cache.k, cache.v), (_rotate(k[:, :, :i], P, rotary, C), v[:, :, :i]),
                                   cache.buffer, C)
        mask = None  # one query at the chunk's end sees every key
        if i > 1:
            mask = torch.arange(P + i, device=q.device)[None, :] <= torch.arange(P, P + i, device=q.device)[:, None]
        outs.append(F.scaled_dot_product_attention(_rotate(q[:, :, :i], P, rotary, C), kk, vv, attn_mask=mask,
                                                   scale=1.0))
        if P + i < C:
            return outs[0], ChunkCache(kk, vv, buffer)
    rest = T - i
    cache = ChunkCache(k.new_zeros(B, H, 0, Z), v.new_zeros(B, H, 0, v.shape[-1]))
    if rest:
        pad = -rest % C
        qr, kr, vr = (F.pad(t[:, :, i:], (0, 0, 0, pad)) for t in (q, k, v))
        pos = torch.arange(rest + pad, device=q.device) % C
        if rotary is not None:
            qr, kr = apply_rotary(qr, pos, rotary), apply_rotary(kr, pos, rotary)
        doc = None
        inside = doc_inside if doc_inside is not None else doc_start is not None and bool(doc_start[:, 1:].any())
        if doc_start is not None and inside:
            doc = F.pad(doc_start.long().cumsum(1), (0, pad), value=-1)
        outs.append(_blocks(qr, kr, vr, C, doc)[:, :, :rest])
        held = rest % C
        if held:
            (kc, vc), buffer = _extend((None, None), (kr[:, :, rest - held:rest], vr[:, :, rest - held:rest]), None, C)
            cache = ChunkCache(kc, vc, buffer)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)), cache


def normalized_attention(z: Tensor, v: Tensor, kappa_q: Tensor, mu_q: Tensor, kappa_k: Tensor, mu_k: Tensor,
                         cache: ChunkCache | None = None, *, chunk: int, rotary: RotarySpec | None = None,
                         eps: float = 1e-5, doc_start: Tensor | None = None,
                         doc_inside: bool | None = None) -> tuple[Tensor, ChunkCache]:
    """z (B, T, H, Z) the shared representation, v (B, H, T, V) -> (out (B, H, T, V), the new chunk cache)."""
    q, k = normalized_qk(z, kappa_q, mu_q, kappa_k, mu_k, eps)
    return chunk_attention(q, k, v, cache, chunk=chunk, rotary=rotary, doc_start=doc_start, doc_inside=doc_inside)


def normalized_attention_naive(z: Tensor, v: Tensor, kappa_q: Tensor, mu_q: Tensor, kappa_k: Tensor, mu_k: Tensor,
                               cache: ChunkCache | None = None, *, chunk: int, rotary: RotarySpec | None = None,
                               eps: float = 1e-5, doc_start: Tensor | None = None) -> tuple[Tensor, ChunkCache]:
    """Reference for ``normalized_attention``: one token at a time, each query against the keys of its chunk so far
    (and of its document), an explicit softmax with no scaling."""
    B, T, H, Zd = z.shape
    keys = [] if cache is None else list(cache.k.unbind(2))
    vals = [] if cache is None else list(cache.v.unbind(2))
    docs = [torch.zeros(B, dtype=torch.long, device=z.device)] * len(keys)
    doc = torch.zeros(B, dtype=torch.long, device=z.device)
    P0, outs = len(keys), []
    for t in range(T):
        pos = (P0 + t) % chunk
        if pos == 0:
            keys, vals, docs = [], [], []  # a new chunk sees nothing before it
        if doc_start is not None:
            doc = doc + doc_start[:, t].long()
        zt = z[:, t].double() if z.dtype == torch.float64 else z[:, t].float()  # (B, H, Z)
        zn = zt / torch.sqrt(zt.pow(2).mean(-1, keepdim=True) + eps)
        qt, kt = (kappa_q * zn + mu_q).to(z.dtype), (kappa_k * zn + mu_k).to(z.dtype)
        if rotary is not None:
            p = torch.tensor([pos], device=z.device)
            qt, kt = apply_rotary(qt[:, :, None], p, rotary)[:, :, 0], apply_rotary(kt[:, :, None], p, rotary)[:, :, 0]
        keys.append(kt)
        vals.append(v[:, :, t])
        docs.append(doc)
        K, Vv, Dc = torch.stack(keys, 2), torch.stack(vals, 2), torch.stack(docs, 1)  # (B, H, L, ·), (B, L)
        scores = (qt[:, :, None] @ K.transpose(-1, -2))[:, :, 0]  # (B, H, L): no 1/sqrt(Z)
        scores = scores.masked_fill((Dc != doc[:, None])[:, None], float("-inf"))
        outs.append((torch.softmax(scores, -1)[:, :, None] @ Vv)[:, :, 0])
    out = torch.stack(outs, 2)
    held = (P0 + T) % chunk
    k_c = torch.stack(keys, 2)[:, :, len(keys) - held:] if held else z.new_zeros(B, H, 0, Zd)
    v_c = torch.stack(vals, 2)[:, :, len(vals) - held:] if held else v.new_zeros(B, H, 0, v.shape[-1])
    return out, ChunkCache(k_c, v_c)
