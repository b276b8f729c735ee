"""Model layers: RMSNorm, the nine FFN activations, Infini attention, the pre-norm block and the Mixture-of-Depths
block.

Modules hold parameters only; the memory state is passed in and returned. No distributed code here.
Shape legend: B batch, T tokens, D model dim, H query heads, G KV heads, K head dim, F FFN dim,
N segments, S segment length, C routed tokens per segment (Mixture-of-Depths capacity).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinitrain.model.config import ACTIVATIONS, ModelConfig
from infinitrain.ops.memory import AttnState, MemoryState, infini_attention, infini_attention_stream
from infinitrain.ops.rope import RotarySpec
from infinitrain.ops.shift import token_shift


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Llama), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for bf16/fp16, fp64 kept for references
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


_PLAIN = {"relu": F.relu, "abs": torch.abs, "gelu": F.gelu, "swish": F.silu}
_GATED = {"swiglu": F.silu, "geglu": F.gelu, "ffnglu": torch.sigmoid, "ffngeglu": F.gelu, "ffnswiglu": F.silu}


class GLU(nn.Module):
    """Shazeer's GLU-variant activation layer (F -> F): act(xW + b) ⊙ (xV + c)."""

    def __init__(self, dim: int, act):
        super().__init__()
        self.act = act
        self.w = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.w(x)) * self.v(x)


class MLP(nn.Module):
    """Feed-forward network for each seed activation.

    relu/abs/gelu/swish: down(act(up(x))). swiglu/geglu: down(GLU(up(x))), the GLU layer with its own
    weights. ffnglu/ffngeglu/ffnswiglu: bias-free gated FFN down(act(gate(x)) ⊙ up(x)), as in Llama.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        if activation.startswith("ffn"):
            self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
            self.up_proj = nn.Linear(d_model, d_ff, bias=False)
            self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        else:
            self.up_proj = nn.Linear(d_model, d_ff)
            self.down_proj = nn.Linear(d_ff, d_model)
            if activation in _GATED:
                self.glu = GLU(d_ff, _GATED[activation])

    def forward(self, x: Tensor) -> Tensor:
        a = self.activation
        if a.startswith("ffn"):
            return self.down_proj(_GATED[a](self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(self.glu(h) if a in _GATED else _PLAIN[a](h))


class InfiniAttention(nn.Module):
    """Multi-head Infini attention (Eqs. 5-11): shared Q/K/V projections, one memory per KV head, per-head gate β."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, segment_len: int,
                 update: str = "linear", rotary: RotarySpec | None = None, causal: bool = True,
                 gate_init: float | list[float] = 0.0, eps: float = 1e-6, bias: bool = False,
                 value_dim: int | None = None, memory_tau: float | None = None, shift: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.value_dim = value_dim or head_dim
        self.segment_len, self.update, self.rotary, self.causal, self.eps = segment_len, update, rotary, causal, eps
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.value_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.value_dim, d_model, bias=bias)
        # Eq. 10, one scalar per head; gate_init is one value for all heads or a list of n_heads
        self.betas = nn.Parameter(torch.tensor(gate_init, dtype=torch.float32).expand(n_heads).clone())
        # the memory's temperature τ = exp(log_tau), one per KV head (ModelConfig.memory_tau); None: τ = 1, the paper
        self.log_tau = None if memory_tau is None else nn.Parameter(torch.full((n_kv_heads,), math.log(memory_tau)))
        # token shift (ModelConfig.token_shift): keys and values read lerp(x_t, x_{t-1}, μ), μ per channel from 0
        self.shift_k = nn.Parameter(torch.zeros(d_model)) if shift else None
        self.shift_v = nn.Parameter(torch.zeros(d_model)) if shift else None

    def tau(self) -> Tensor | None:
        return None if self.log_tau is None else self.log_tau.exp()

    def project(self, x: Tensor, prev: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q, k, v; prev (B, T, D) the previous tokens (``token_shift``) when the layer shifts."""
        B, T, _ = x.shape
        xk = xv = x
        if self.shift_k is not None:
            xk, xv = torch.lerp(x, prev, self.shift_k.to(x.dtype)), torch.lerp(x, prev, self.shift_v.to(x.dtype))
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, K)
        k = self.k_proj(xk).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, K)
        v = self.v_proj(xv).view(B, T, self.n_kv_heads, self.value_dim).transpose(1, 2)  # (B, G, T, V)
        return q, k, v

    def merge(self, o: Tensor) -> Tensor:
        B, H, T, V = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * V))  # heads back next to each other, then W_O

    def forward(self, x: Tensor, state: AttnState | None = None, *, keep: Tensor | None = None,
                doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
        """Stream x (B, T, D) through the layer; segments count from the start of the stream. doc_inside: whether
        a document of doc_start starts inside a segment (None: read from doc_start, a host sync)."""
        prev = None
        if self.shift_k is not None:
            prev = token_shift(x, None if state is None else state.last, doc_start)
        q, k, v = self.project(x, prev)
        o, state = infini_attention_stream(q, k, v, self.betas, state, segment_len=self.segment_len,
                                           update=self.update, causal=self.causal, rotary=self.rotary,
                                           keep=keep, doc_start=doc_start, eps=self.eps, tau=self.tau(),
                                           doc_inside=doc_inside)
        if self.shift_k is not None:
            state = state._replace(last=x[:, -1])
        return self.merge(o), state

    def without_memory(self, state: AttnState) -> AttnState:
        """The state under ``--no-memory``: an empty memory (M, z); the current segment's keys/values are kept, the
        token shift's carried token only inside a segment (nothing from an earlier segment)."""
        empty = MemoryState(torch.zeros_like(state.mem.M), torch.zeros_like(state.mem.z))
        return AttnState(empty, state.k, state.v, state.keep, last=state.last if state.k.shape[2] else None)

    def skip(self, x: Tensor, state: AttnState | None) -> AttnState:
        """The state after normed tokens x (B, T, D) that no row routes through this layer (Mixture-of-Depths
        decoding): their keys and values take their places in the segment, masked out (keep False), exactly as
        the routed path stores them; no query, output projection or attention result is needed."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, K)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.value_dim).transpose(1, 2)  # (B, G, T, V)
        q = x.new_zeros(B, self.n_heads, T, self.head_dim)
        keep = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        return infini_attention_stream(q, k, v, self.betas, state, segment_len=self.segment_len, update=self.update,
                                       causal=self.causal, rotary=self.rotary, keep=keep, eps=self.eps,
                                       tau=self.tau())[1]

    def forward_compact(self, x: Tensor, state: AttnState | None, *, pos: Tensor, tokens_per_segment: int,
                        doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
        """Mixture-of-Depths training path: x (B, N*C, D) holds the C routed tokens of each of N whole
        segments in order, pos (B, N*C) their in-segment positions. The memory sees only these tokens."""
        if state is not None and state.k.shape[2]:
            raise ValueError("Mixture-of-Depths training needs segment-aligned input: the state holds "
                             f"{state.k.shape[2]} tokens of an unfinished segment")
        q, k, v = self.project(x)
        o, mem = infini_attention(q, k, v, self.betas, None if state is None else state.mem,
                                  segment_len=tokens_per_segment, update=self.update, causal=self.causal,
                                  rotary=self.rotary, pos=pos, doc_start=doc_start, eps=self.eps, tau=self.tau(),
                                  doc_inside=doc_inside)
        B = x.shape[0]
        empty_k = k.new_zeros(B, self.n_kv_heads, 0, self.head_dim)
        empty_v = v.new_zeros(B, self.n_kv_heads, 0, self.value_dim)
        return self.merge(o), AttnState(mem, empty_k, empty_v, None)


def attention_from_config(cfg: ModelConfig) -> InfiniAttention:
    return InfiniAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, segment_len=cfg.segment_len,
                           update=cfg.update, rotary=cfg.rotary(), gate_init=cfg.gate_init_per_head(),
                           eps=cfg.memory_eps, memory_tau=cfg.memory_tau, shift=cfg.token_shift)


class Block(nn.Module):
    """Pre-norm (RMSNorm) Llama-style block: x + Attn(norm(x)), then + MLP(norm(·)), with residual dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = attention_from_config(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def _mlp(self, h: Tensor) -> Tensor:
        return h + self.drop(self.mlp(self.mlp_norm(h)))

    def forward(self, x: Tensor, state: AttnState | None = None, *, keep: Tensor | None = None,
                doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState, Tensor]:
        a, state = self.attn(self.attn_norm(x), state, keep=keep, doc_start=doc_start, doc_inside=doc_inside)
        return self._mlp(x + self.drop(a)), state, x.new_zeros((), dtype=torch.float32)

    def forward_compact(self, x: Tensor, state: AttnState | None, *, pos: Tensor, tokens_per_segment: int,
                        doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
        a, state = self.attn.forward_compact(self.attn_norm(x), state, pos=pos, tokens_per_segment=tokens_per_segment,
                                             doc_start=doc_start, doc_inside=doc_inside)
        return self._mlp(x + self.drop(a)), state


class Routing(NamedTuple):
    """What a Mixture-of-Depths block decided: router logits (B, T) and the chosen tokens (B, T) bool."""

    logits: Tensor
    chosen: Tensor


def topk_per_segment(logits: Tensor, segment_len: int, k: int) -> Tensor:
    """Indices (B, N*k) of the k highest logits inside each segment, in position order. T % S == 0."""
    B, T = logits.shape
    N = T // segment_len
    top = logits.view(B, N, segment_len).topk(k, dim=-1).indices.sort(dim=-1).values  # (B, N, k)
    return (top + torch.arange(N, device=logits.device)[:, None] * segment_len).view(B, N * k)


# A routed block seen by the routing functions: the full path (x (B, T, D), state, keep (B, T)) -> (y, state)
# and the compact path (x̃ (B, N*C, D), state, pos (B, N*C), C) -> (ỹ, state).
FullPath = Callable[[Tensor, AttnState | None, Tensor], tuple[Tensor, AttnState]]
CompactPath = Callable[[Tensor, AttnState | None, Tensor, int], tuple[Tensor, AttnState]]


def route_topk(x: Tensor, logits: Tensor, state: AttnState | None, compact: CompactPath, *, segment_len: int,
               tokens_per_segment: int) -> tuple[Tensor, AttnState, Tensor]:
    """Mixture-of-Depths training: the top C tokens of each segment go through ``compact``.

    Returns out = x + sigmoid(r)·(ỹ − x̃) on the chosen tokens (x elsewhere, x never written), the new
    state and the chosen mask (B, T) bool, the BCE target. T must be a multiple of S.
    """
    B, T, D = x.shape
    S, C = segment_len, tokens_per_segment
    if T % S:
        raise ValueError(f"Mixture-of-Depths training routes whole segments: got {T} tokens, segment {S}")
    idx = topk_per_segment(logits.detach(), S, C)  # (B, N*C)
    xs = x.gather(1, idx[..., None].expand(B, idx.shape[1], D))  # (B, N*C, D)
    ys, state = compact(xs, state, idx % S, C)
    w = torch.sigmoid(logits.gather(1, idx)).to(x.dtype)[..., None]  # router weight on the gradient path
    out = x.scatter_add(1, idx[..., None].expand_as(xs), w * (ys - xs))  # out-of-place: x untouched
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    return out, state, chosen


def route_causal(x: Tensor, logits: Tensor, state: AttnState | None, full: FullPath,
                 ) -> tuple[Tensor, AttnState, Tensor]:
    """Mixture-of-Depths inference: tokens with sigmoid(r) > 0.5 go through ``full``, batched (rows may
    route different counts; dropped tokens are masked out). Returns (out, state, chosen (B, T) bool)."""
    chosen = logits > 0  # sigmoid(r) > 0.5: decided from this token and the past only
    y, state = full(x, state, chosen)
    w = torch.sigmoid(logits).to(x.dtype)[..., None]
    out = torch.where(chosen[..., None], x + w * (y - x), x)
    return out, state, chosen


class MoDBlock(nn.Module):
    """Mixture-of-Depths block (arXiv 2404.02258) around a ``Block``.

    Training: the top C tokens of every segment (C = ceil(S · capacity)) go through the block, the rest
    ride the residual untouched; the output is x + sigmoid(r)·(block(x̃) − x̃), so the router is on the
    gradient path; an auxiliary BCE loss teaches sigmoid(r) to predict membership of the top-C.
    Inference: causal routing by sigmoid(r) > 0.5, batched (rows route different counts; dropped tokens
    are masked out of attention and out of the memory).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block = Block(cfg)
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        self.segment_len = cfg.segment_len
        self.tokens_per_segment = cfg.mod_tokens_per_segment()

    def route(self, x: Tensor) -> Tensor:
        r = self.router(x).squeeze(-1)
        return r.to(torch.promote_types(r.dtype, torch.float32))  # (B, T) logits r

    def forward(self, x: Tensor, state: AttnState | None = None, *, keep: Tensor | None = None,
                doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState, Tensor]:
        if keep is not None:
            raise ValueError("a Mixture-of-Depths block routes by itself; nested routing is not supported")
        logits = self.route(x)
        docs = {} if doc_start is None else dict(doc_start=doc_start, doc_inside=doc_inside)
        if self.training:
            compact = partial(self._compact, **docs)
            out, state, chosen = route_topk(x, logits, state, compact, segment_len=self.segment_len,
                                            tokens_per_segment=self.tokens_per_segment)
            return out, state, F.binary_cross_entropy_with_logits(logits, chosen.float())
        # Decoding a token no row routes skips the block's attention. Knowing that takes a host sync, free on the
        # CPU only: elsewhere the routed path runs with every token masked out, which stores the same state.
        if (x.device.type == "cpu" and x.shape[1] == 1 and doc_start is None and not torch.is_grad_enabled()
                and not bool((logits > 0).any())):
            state = self.block.attn.skip(self.block.attn_norm(x), state)
            return x, state, x.new_zeros((), dtype=torch.float32)
        full = partial(self._full, **docs)
        out, state, _ = route_causal(x, logits, state, full)
        return out, state, x.new_zeros((), dtype=torch.float32)  # the BCE target is top-k, defined in training only

    def _full(self, x: Tensor, state: AttnState | None, keep: Tensor, doc_start: Tensor | None = None,
              doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
        y, state, _ = self.block(x, state, keep=keep, doc_start=doc_start, doc_inside=doc_inside)
        return y, state

    def _compact(self, xs: Tensor, state: AttnState | None, pos: Tensor, tokens_per_segment: int,
                 doc_start: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
        """doc_inside is the full window's: no start inside a segment there means none among the routed tokens;
        a start inside may leave none among them, and the document mask is then merely unneeded (same result)."""
        if doc_start is not None:
            doc_start = compact_doc_start(doc_start, pos, self.segment_len, tokens_per_segment)
        return self.block.forward_compact(xs, state, pos=pos, tokens_per_segment=tokens_per_segment,
                                          doc_start=doc_start, doc_inside=doc_inside)


def compact_doc_start(doc_start: Tensor, pos: Tensor, segment_len: int, tokens_per_segment: int) -> Tensor:
    """Document starts (B, T) seen from the routed tokens (B, N*C) at in-segment positions pos: a routed
    token starts a document when its document differs from the previous routed token's (or from 0)."""
    B, NC = pos.shape
    seg = torch.arange(NC, device=pos.device) // tokens_per_segment
    idx = pos + seg * segment_len  # back to stream positions
    doc = doc_start.long().cumsum(1).gather(1, idx)  # (B, N*C)
    return doc != torch.cat((doc.new_zeros(B, 1), doc[:, :-1]), 1)
