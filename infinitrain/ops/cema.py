"""MEGALODON's complex exponential moving average (CEMA, arXiv 2404.08801 §3.1) as pure functions: a chunked-scan
fast path beside a naive twin that runs the recurrence one token at a time.

    h_t = α e^{iθ} ⊙ β x_t + (1 − α⊙δ) e^{iθ} ⊙ h_{t−1},    y_t = Re(ηᵀ h_t),    θ_{j,k} = 2πk/E · ω_j

with α = σ(alpha), δ = σ(delta), ω = σ(omega) (the paper's parameterisation: decay and damping in (0, 1), the
base angle ω_j in (0, 1) per channel, wavelets k = 1..E), β the real expansion, η the complex projection.
The official code (XuezheMax/megalodon) puts no phase on the input term and has no β (β·η fold into one
parameter there); this is the paper's equation, which spans the same family of filters.

Fast path (``cema``): no loop over tokens. Tokens are cut into blocks of C; inside a block the output is a causal
convolution with the real kernel K_j[τ] = Re Σ_k η p q^τ (one C×C Toeplitz matmul per channel); every block's
own end state is one matmul with q^{C−1−s}; the states entering the blocks come from a scan over the T/C blocks
(H_n = q^C H_{n−1} + own_n: powers of q only, never inverse powers, so it is stable); their contribution to the
outputs is Re Σ_k η q^{τ+1} H. Every product is a real batched matmul over the channels. Document starts
(``doc_start``) clear the state for their row exactly as the naive twin.

Shape legend: B batch, T tokens, D channels (model dim), E EMA dims per channel (the paper's h), N blocks,
C block length. The state h is (B, D, E) complex; math runs in complex64 for bf16/fp32 and complex128 for fp64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinitrain.ops.memory import document_masks

DEFAULT_BLOCK = 64


def _real_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _complex_dtype(x: Tensor) -> torch.dtype:
    return torch.complex128 if _real_dtype(x) == torch.float64 else torch.complex64


def cema_coefficients(alpha: Tensor, delta: Tensor, omega: Tensor, beta: Tensor, eta: Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Raw parameters -> (p, log q, η) complex (D, E): p = α e^{iθ} β multiplies x_t, q = (1 − αδ) e^{iθ} the state.

    alpha, delta, beta (D, E) and omega (D,) real; eta (D, E, 2) the real and imaginary parts of η."""
    D, E = alpha.shape
    a, d = torch.sigmoid(alpha.to(dtype)), torch.sigmoid(delta.to(dtype))
    k = torch.arange(1, E + 1, dtype=dtype, device=alpha.device)
    theta = (2 * math.pi / E) * k * torch.sigmoid(omega.to(dtype))[:, None]  # (D, E)
    ab = a * beta.to(dtype)  # may be negative: not torch.polar, whose gradient assumes a modulus >= 0
    p = torch.complex(ab * torch.cos(theta), ab * torch.sin(theta))
    log_q = torch.complex(torch.log1p(-(a * d)), theta)  # |q| = 1 − αδ in (0, 1)
    return p, log_q, torch.view_as_complex(eta.to(dtype).contiguous())


def zero_cema_state(batch: int, channels: int, dims: int, dtype: torch.dtype, device=None) -> Tensor:
    return torch.zeros(batch, channels, dims, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64,
                       device=device)


def _block_scan(h0: Tensor, own: Tensor, a: Tensor, live: Tensor) -> tuple[Tensor, Tensor]:
    """States entering each block and after the last: H_n = a·live_n·H_{n−1} + own_n from H_{−1} = h0.

    h0 (D, B, E), own (D, B, N, E) complex, a = q^C (D, E), live (B, N) real (0 where a document starts inside
    block n). A loop over the N = T/C blocks (not over tokens) of (D, B, E) multiply-adds: cheaper on a CPU than a
    log-depth scan, which rewrites all N states log2(N) times. Returns (before (D, B, N, E), final (D, B, E))."""
    h, before = h0, []
    for own_n, live_n in zip(own.unbind(2), live.unbind(1)):  # unbind: one backward op, not N scatters
        before.append(h)
        h = torch.addcmul(own_n, a[:, None], h * live_n[None, :, None])
    return torch.stack(before, 2), h


def _toeplitz(kern: Tensor) -> Tensor:
    """Causal Toeplitz (D, C, C) [t, s] = kern[t − s] for s <= t, else 0; kern (D, C)."""
    C = kern.shape[-1]
    i = torch.arange(C, device=kern.device)
    lag = i[:, None] - i[None, :]
    return kern[:, lag.clamp(min=0)] * (lag >= 0).to(kern.dtype)


def _reim(z: Tensor, dim: int) -> Tensor:
    """Complex z -> [Re z | Im z] along dim (real), so that a complex product is one real matmul."""
    return torch.cat((z.real, z.imag), dim)


def _cema_blocks(x: Tensor, p: Tensor, log_q: Tensor, eta: Tensor, h0: Tensor, C: int,
                 doc_start: Tensor | None, doc_inside: bool | None = None) -> tuple[Tensor, Tensor]:
    """``cema`` on T = N·C tokens: x (B, T, D) real, p/log_q/eta (D, E) complex, h0 (B, D, E) -> (y (B, T, D), h).

    Every product is one real batched matmul over the channels, on x laid out (D, B·N, C)."""
    B, T, D = x.shape
    N, E = T // C, p.shape[-1]
    xd = x.permute(2, 0, 1).reshape(D, B * N, C).contiguous()  # (D, B·N, C), one copy: bmm wants it dense
    tau = torch.arange(C + 1, dtype=x.dtype, device=x.device)
    qpow = torch.polar(torch.exp(log_q.real[..., None] * tau), log_q.imag[..., None] * tau)  # (D, E, C+1): q^τ
    toe = _toeplitz(((eta * p)[..., None] * qpow[..., :C]).sum(1).real)  # (D, C, C): Re Σ_k η p q^{t−s}
    y = torch.bmm(xd, toe.transpose(1, 2))  # (D, B·N, C) the in-block convolution
    reads = writes = None
    live = torch.ones(B, N, dtype=x.dtype, device=x.device)
    if doc_start is not None:
        doc, reads, writes, reset = document_masks(doc_start, C)
        live = (~reset).to(x.dtype)
        if doc_inside is not False:  # False: every start is on a block boundary, so no block needs its mask
            y = _mask_blocks_with_starts(y, xd, toe, doc.reshape(B * N, C), doc_start.reshape(B * N, C))
        writes = writes.reshape(1, B * N, C).to(x.dtype)
    xw = xd if writes is None else xd * writes  # a block's end state holds only its last document
    wp = p[..., None] * qpow[..., :C].flip(-1)  # (D, E, C): p q^{C−1−s}
    own = torch.bmm(xw, _reim(wp, 1).transpose(1, 2))  # (D, B·N, 2E): each block's own end state, Re | Im
    own = torch.complex(own[..., :E], own[..., E:]).view(D, B, N, E)
    before, final = _block_scan(h0.transpose(0, 1), own, qpow[..., C], live)  # (D, B, N, E), (D, B, E)
    wc = eta[..., None] * qpow[..., 1:]  # (D, E, C): η q^{τ+1}
    carry = torch.bmm(_reim(before, -1).reshape(D, B * N, 2 * E), torch.cat((wc.real, -wc.imag), 1))  # Re(H·wc)
    if reads is not None:
        carry = carry * reads.reshape(1, B * N, C).to(x.dtype)  # a token of a document begun in its block reads none
    return _TokensMajor.apply(y + carry, B), final.transpose(0, 1)


class _TokensMajor(torch.autograd.Function):
    """(D, B·N, C) -> (B, T, D) contiguous, and the gradient back to (D, B·N, C) contiguous: a plain permute would
    hand the bmm backward a strided gradient, which it copies one (channel) matrix at a time."""

    @staticmethod
    def forward(ctx, z: Tensor, batch: int) -> Tensor:
        ctx.shape = z.shape
        return z.reshape(z.shape[0], batch, -1).permute(1, 2, 0).contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        return g.permute(2, 0, 1).contiguous().view(ctx.shape), None


def _mask_blocks_with_starts(y: Tensor, xd: Tensor, toe: Tensor, doc: Tensor, starts: Tensor) -> Tensor:
    """Recompute the in-block convolution of the few blocks where a document starts after their first token, with
    the Toeplitz masked to same-document pairs. y, xd (D, B·N, C); doc, starts (B·N, C)."""
    (j,) = starts[:, 1:].any(-1).nonzero(as_tuple=True)
    if not len(j):
        return y
    d = doc[j]  # (R, C)
    same = (d[:, :, None] == d[:, None, :]).to(toe.dtype)  # (R, C, C)
    ys = ((toe[:, None] * same[None]) @ xd[:, j, :, None]).squeeze(-1)  # (D, R, C)
    return y.transpose(0, 1).index_put((j,), ys.transpose(0, 1)).transpose(0, 1)


def cema(x: Tensor, alpha: Tensor, delta: Tensor, omega: Tensor, beta: Tensor, eta: Tensor, h0: Tensor | None = None,
         *, doc_start: Tensor | None = None, block: int = DEFAULT_BLOCK,
         doc_inside: bool | None = None) -> tuple[Tensor, Tensor]:
    """CEMA over x (B, T, D) from the carried state h0 (B, D, E) complex (None: zeros) -> (y (B, T, D), h_T).

    doc_start (B, T) bool: a document starts at that token, so the state is cleared for its row just before it.
    y has x's dtype; h is complex (see the module docstring). Any split of the tokens over calls, carrying h,
    gives the same outputs: the blocks are an implementation detail. doc_inside False promises that no document
    starts after the first token of a block (it spares a host sync); None looks."""
    B, T, D = x.shape
    E = alpha.shape[-1]
    rdt = _real_dtype(x)
    if h0 is None:
        h0 = zero_cema_state(B, D, E, rdt, x.device)
    if T == 0:
        return x, h0
    p, log_q, eta_c = cema_coefficients(alpha, delta, omega, beta, eta, rdt)
    xf, h, outs, i = x.to(rdt), h0.to(p.dtype), [], 0
    if T == 1:  # decoding: the recurrence itself, h = p x + q h (no blocks, a handful of ops)
        if doc_start is not None:
            h = h * (~doc_start[:, 0]).to(rdt)[:, None, None]
        h = p * xf[:, 0, :, None] + torch.polar(torch.exp(log_q.real), log_q.imag) * h
        return (eta_c * h).sum(-1).real[:, None].to(x.dtype), h
    for C in (min(block, T), T % min(block, T)):  # whole blocks, then the remainder as one shorter block
        n = (T - i) // C * C if C else 0
        if n:
            ds = None if doc_start is None else doc_start[:, i:i + n]
            o, h = _cema_blocks(xf[:, i:i + n], p, log_q, eta_c, h, C, ds, doc_inside)
            outs.append(o)
            i += n
    return torch.cat(outs, 1).to(x.dtype), h


def cema_naive(x: Tensor, alpha: Tensor, delta: Tensor, omega: Tensor, beta: Tensor, eta: Tensor,
               h0: Tensor | None = None, *, doc_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference for ``cema`` (same signature, no block size): the paper's recurrence, one token at a time."""
    B, T, D = x.shape
    E = alpha.shape[-1]
    rdt = _real_dtype(x)
    a, d = torch.sigmoid(alpha.to(rdt)), torch.sigmoid(delta.to(rdt))
    theta = 2 * math.pi * torch.arange(1, E + 1, dtype=rdt) / E * torch.sigmoid(omega.to(rdt))[:, None]
    rot = torch.complex(torch.cos(theta), torch.sin(theta))  # cos θ + i sin θ
    eta_c = torch.complex(eta[..., 0].to(rdt), eta[..., 1].to(rdt))
    h = zero_cema_state(B, D, E, rdt, x.device) if h0 is None else h0
    ys = []
    for t in range(T):
        if doc_start is not None:
            h = h * (~doc_start[:, t]).to(rdt)[:, None, None]  # a new document forgets the old one
        u = beta.to(rdt) * x[:, t, :, None].to(rdt)  # (B, D, E): u_t = β x_t
        h = a * rot * u + (1 - a * d) * rot * h
        ys.append((eta_c * h).sum(-1).real)  # y_t = Re(ηᵀ h_t)
    y = torch.stack(ys, 1) if ys else x.new_zeros(B, 0, D)
    return y.to(x.dtype), h
