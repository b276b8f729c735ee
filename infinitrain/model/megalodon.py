"""The MEGALODON block (arXiv 2404.08801): timestep norm -> CEMA -> normalised chunked attention with its gates, and the
SwiGLU FFN behind the two-hop residual. ``model.arch: megalodon`` builds these in place of the Infini blocks.

Modules hold parameters only; the per-layer state (norm statistics, CEMA state, unfinished chunk) is passed in
and returned. Follows the official layer (XuezheMax/megalodon ``MovingAverageGatedAttention``): the CEMA reads the
timestep-normed input X' plus a learned per-channel skip; M = RMSNorm(CEMA(X')); Z = M W_z + b_z; values
silu(X' W_v + b_v); gate r = silu(M W_r + b_r); H = M W_h1 + b_h1 + (r ⊙ Attn) W_h2; then
Ŷ = H + X and Y = FFN(LayerNorm(Ŷ)) + X (the two-hop residual). κ = (γ + 1)/sqrt(Z) with γ learned from 0 (the
paper's κ, no 1/sqrt in the softmax). One difference: the final norm is the shared RMSNorm of the LM head
(the official model ends in a timestep norm), so both families share the head.
Shape legend: B batch, T tokens, D model dim, E CEMA dims, H heads, Z shared dim per head, V value dim per head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinitrain.model.config import ModelConfig
from infinitrain.model.layers import MLP, RMSNorm
from infinitrain.ops.cema import DEFAULT_BLOCK, cema, zero_cema_state
from infinitrain.ops.chunk_attention import ChunkCache, normalized_attention
from infinitrain.ops.timestep_norm import NormState, timestep_norm, zero_norm_state


class MegalodonState(NamedTuple):
    """Streaming state of one MEGALODON layer: timestep-norm statistics, CEMA state (B, D, E) complex, chunk cache."""

    norm: NormState
    ema: Tensor
    cache: ChunkCache

    def detach(self) -> "MegalodonState":
        return MegalodonState(self.norm.detach(), self.ema.detach(), self.cache.detach())

    @property
    def k(self) -> Tensor:
        """The unfinished chunk's keys (B, H, P, Z), as ``AttnState.k``: P tokens are held."""
        return self.cache.k

    def row(self, b: int) -> "MegalodonState":
        """Row b of the batch, (1, ...) in every tensor."""
        n, c = self.norm, self.cache
        return MegalodonState(NormState(*(t[b:b + 1] for t in n)), self.ema[b:b + 1],
                              ChunkCache(c.k[b:b + 1], c.v[b:b + 1]))  # the buffer stays behind: the row copies

    @staticmethod
    def cat(states: "list[MegalodonState | None]") -> "MegalodonState":
        """Rows of several states, one batch (each holding the same number of tokens of its unfinished chunk); None
        is a stream not started (a fresh state shaped like another row: only with no unfinished tokens)."""
        ref = next(s for s in states if s is not None)
        fresh = MegalodonState(NormState(*(torch.zeros_like(t[:1]) for t in ref.norm)), torch.zeros_like(ref.ema[:1]),
                               ChunkCache(*(t[:1].new_zeros(t[:1].shape) for t in ref.cache[:2])))
        rows = [fresh if s is None else s for s in states]
        return MegalodonState(NormState(*(torch.cat(ts) for ts in zip(*(s.norm for s in rows)))),
                              torch.cat([s.ema for s in rows]),
                              ChunkCache(*(torch.cat(ts) for ts in zip(*(s.cache[:2] for s in rows)))))


class MegalodonAttention(nn.Module):
    """The moving-average equipped gated attention layer: (x, state) -> (H, state); the residual is the block's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, E, H = cfg.d_model, cfg.ema_dim, cfg.n_heads
        self.n_heads, self.z_head, self.v_head = H, cfg.head_dim, cfg.v_dim // H
        self.segment_len, self.groups, self.eps = cfg.segment_len, cfg.norm_groups, cfg.norm_eps
        self.rotary = cfg.rotary()
        # CEMA blocks divide the chunk, so a document starting on a chunk boundary starts on a block boundary
        self.block = max(c for c in range(1, min(DEFAULT_BLOCK, cfg.segment_len) + 1) if cfg.segment_len % c == 0)
        self.norm_weight = nn.Parameter(torch.ones(D))  # timestep norm affine
        self.norm_bias = nn.Parameter(torch.zeros(D))
        self.alpha = nn.Parameter(torch.zeros(D, E))  # CEMA, raw (see infinitrain/ops/cema.py)
        self.delta = nn.Parameter(torch.zeros(D, E))
        self.omega = nn.Parameter(torch.zeros(D))
        self.beta = nn.Parameter(torch.ones(D, E))
        self.eta = nn.Parameter(torch.zeros(D, E, 2))
        self.skip = nn.Parameter(torch.zeros(D))  # the official code's ω: CEMA output + skip ⊙ X'
        self.ema_norm = RMSNorm(D, cfg.norm_eps)
        self.wz = nn.Linear(D, H * cfg.head_dim)
        self.wv = nn.Linear(D, cfg.v_dim)
        self.wr = nn.Linear(D, cfg.v_dim)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(cfg.v_dim, D, bias=False)
        self.qk_gamma = nn.Parameter(torch.zeros(2, H, cfg.head_dim))  # κ = (γ + 1) / sqrt(Z) for Q and K
        self.qk_mu = nn.Parameter(torch.zeros(2, H, cfg.head_dim))
        self.reset_own_parameters()

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """The official initialisation of everything that is not a Linear (those are the model's)."""
        D, E = self.alpha.shape
        if not self.alpha.numel():  # partitioned by zero.Init: the engine calls this again module by module
            return
        nn.init.normal_(self.alpha, 0.0, 0.2)
        nn.init.normal_(self.delta, 0.0, 0.2)
        freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D)[torch.randperm(D)]
        self.omega.copy_(torch.log(freqs / (1 - freqs)))  # base angles ω = σ(omega) spread over (0, 1)
        self.beta.fill_(1.0)
        nn.init.normal_(self.eta[..., 0], 0.0, E ** -0.5)
        self.eta[..., 1].zero_()
        nn.init.trunc_normal_(self.skip, 0.0, 0.25, -1.0, 1.0)
        self.norm_weight.fill_(1.0)
        self.norm_bias.zero_()
        self.qk_gamma.zero_()
        self.qk_mu.zero_()

    def cema_parameters(self) -> tuple[Tensor, ...]:
        return self.alpha, self.delta, self.omega, self.beta, self.eta

    def forward(self, x: Tensor, state: MegalodonState | None = None, *, doc_start: Tensor | None = None,
                doc_inside: bool | None = None) -> tuple[Tensor, MegalodonState]:
        """doc_inside: whether a document starts inside a chunk (None: read from doc_start, a host sync)."""
        B, T, _ = x.shape
        norm, ema, cache = (None, None, None) if state is None else state
        xn, norm = timestep_norm(x, self.norm_weight, self.norm_bias, norm, groups=self.groups, eps=self.eps,
                                 doc_start=doc_start)  # (B, T, D)
        y, ema = cema(xn, *self.cema_parameters(), ema, doc_start=doc_start, block=self.block,
                      doc_inside=doc_inside)
        m = self.ema_norm(y + self.skip.to(xn.dtype) * xn)  # (B, T, D)
        z = self.wz(m).view(B, T, self.n_heads, self.z_head)
        v = F.silu(self.wv(xn)).view(B, T, self.n_heads, self.v_head).transpose(1, 2)  # (B, H, T, V)
        kappa = (self.qk_gamma + 1.0) / math.sqrt(self.z_head)
        o, cache = normalized_attention(z, v, kappa[0], self.qk_mu[0], kappa[1], self.qk_mu[1], cache,
                                        chunk=self.segment_len, rotary=self.rotary, eps=self.eps, doc_start=doc_start,
                                        doc_inside=doc_inside)
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·V)
        h = self.wh1(m) + self.wh2(o * F.silu(self.wr(m)))
        return h, MegalodonState(norm, ema, cache)

    def without_memory(self, state: MegalodonState) -> MegalodonState:
        """The state under ``--no-memory``: a call that opens a chunk starts from a fresh CEMA state and fresh norm
        statistics; inside a chunk (tokens held) the state is this chunk's own and is kept."""
        if state.cache.k.shape[2]:
            return state
        B, D, E = state.ema.shape
        fresh = zero_norm_state(B, self.groups, state.norm.mean.dtype, state.ema.device)
        return MegalodonState(fresh, zero_cema_state(B, D, E, state.norm.mean.dtype, state.ema.device), state.cache)


class MegalodonBlock(nn.Module):
    """MEGA layer then the normalised FFN with the two-hop residual: Ŷ = Attn(X) + X; Y = FFN(LayerNorm(Ŷ)) + X."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = MegalodonAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, state: MegalodonState | None = None, *, doc_start: Tensor | None = None,
                doc_inside: bool | None = None) -> tuple[Tensor, MegalodonState, Tensor]:
        a, state = self.attn(x, state, doc_start=doc_start, doc_inside=doc_inside)
        y_hat = x + self.drop(a)
        out = x + self.drop(self.mlp(self.mlp_norm(y_hat)))  # two hops: the FFN's residual is the block input
        return out, state, x.new_zeros((), dtype=torch.float32)
