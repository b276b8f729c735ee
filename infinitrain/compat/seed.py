"""Seed-compatible building blocks: the API of dingo-actual/infini-transformer (v0.2.7 README), on our ops.

Kept from the seed: class names, argument names and order, defaults, return values, and the parameter
names of ``CompressiveMemory`` (``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``, ``betas``, ``init_mem``,
``init_z``) so its state dicts load. Not kept (its bugs):
- heads are split with a transpose (the seed's ``view`` mixed time steps into heads and leaked the future);
- ``betas`` is one scalar per head as in the paper (the seed had one per value channel; a seed state dict
  is converted on load, see ``seed_betas_to_scalar``);
- RoPE rotates (the seed's angles were ~0), YaRN's temperature scales q and k (not the angles), and
  positions restart at every segment;
- ``InfiniTransformer`` is a pre-norm block with a residual around attention AND around the MLP (the
  seed computed ``LayerNorm(MLP(Attn(x)) + x)``: one post-norm residual, none around attention);
- Mixture-of-Depths multiplies the block output by the router weight, never writes into its input,
  keeps every skipped token (the seed zeroed most of the residual stream) and routes batches at inference;
- arguments are checked: a misspelt keyword is a ``TypeError`` (no ``**kwargs``), a bad value a ``ValueError``.
The memory can be carried across calls: ``forward(x, state, return_state=True)``; no module holds state.

Shape legend: B batch, T tokens, D dim_input, H heads, K dim_key, V dim_value, S segment_len,
C routed tokens per segment (Mixture-of-Depths), N segments.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinitrain.model.layers import MLP, RMSNorm, route_causal, route_topk, topk_per_segment
from infinitrain.ops.memory import UPDATES, AttnState, MemoryState, infini_attention, infini_attention_stream
from infinitrain.ops.rope import RotarySpec, apply_rotary

Update = Literal["linear", "delta"]

# ---------------------------------------------------------------------------------------------
# Argument checks (the seed checked none)
# ---------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _number(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _update(value: object) -> Update:
    if value not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {value!r}")
    return value  # type: ignore[return-value]


def mod_capacity(segment_len: int, sampling_factor: float) -> int:
    """Tokens routed per segment in training: C = ceil(S / sampling_factor), as the seed (at least 1)."""
    sf = _number("sampling_factor", sampling_factor)
    if not 1.0 < sf < segment_len:
        raise ValueError(f"sampling_factor must be in (1, segment_len={segment_len}), got {sampling_factor}")
    return math.ceil(segment_len / sf)


# ---------------------------------------------------------------------------------------------
# Positional embeddings: modules without state that describe a RotarySpec
# ---------------------------------------------------------------------------------------------


class PositionEmbeddings(nn.Module):
    """Base of ``RoPEEmbeddings`` / ``YaRNEmbeddings``: holds a frozen ``RotarySpec``, nothing mutable.

    ``dim`` is the key dimension (must equal ``dim_key``); ``seq_len`` the segment length (must equal
    ``segment_len``): positions restart at every segment, so they run 0 .. seq_len-1.
    """

    spec: RotarySpec

    def __init__(self, dim: int, seq_len: int, dim_embeddings_pct: float, base: float):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.seq_len = _positive_int("seq_len", seq_len)
        pct = _number("dim_embeddings_pct", dim_embeddings_pct)
        self.rot_dim = int(dim * pct) // 2 * 2  # the seed's effective_dim, rounded down to whole pairs
        if not 0.0 < pct <= 1.0 or self.rot_dim < 2:
            raise ValueError(f"dim_embeddings_pct must be in (0, 1] and rotate at least 2 of dim={dim} dims, "
                             f"got {dim_embeddings_pct}")
        self.base = _number("base", base)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """Rotate x (B, H, T, dim) at positions pos, (T,) or (B, T) ints; default 0 .. T-1."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(x.shape)}")
        if pos is None:
            pos = torch.arange(x.shape[-2], device=x.device)
        return apply_rotary(x, pos, self.spec)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self.spec).items())


class RoPEEmbeddings(PositionEmbeddings):
    """RoPE (arXiv 2104.09864) on the first ``dim_embeddings_pct`` of each head's dims (rotate-half pairs)."""

    def __init__(self, dim: int, seq_len: int, dim_embeddings_pct: float = 0.5, base: float = 10000):
        super().__init__(dim, seq_len, dim_embeddings_pct, base)
        self.spec = RotarySpec(head_dim=self.dim, rot_dim=self.rot_dim, base=self.base)


class YaRNEmbeddings(PositionEmbeddings):
    """YaRN (arXiv 2309.00071): scale s = context_len_ext / context_len, NTK-by-parts ramp (alpha, beta)
    over the rotations within context_len, and q, k multiplied by 0.1 ln s + 1 (``len_scale`` replaces
    that factor). With context_len_ext == context_len it is exactly ``RoPEEmbeddings``."""

    def __init__(self, dim: int, seq_len: int, context_len: int, context_len_ext: int,
                 dim_embeddings_pct: float = 0.5, base: float = 10000, alpha: float = 1, beta: float = 32,
                 len_scale: float | None = None):
        super().__init__(dim, seq_len, dim_embeddings_pct, base)
        self.context_len = _positive_int("context_len", context_len)
        self.context_len_ext = _positive_int("context_len_ext", context_len_ext)
        if context_len_ext < context_len:
            raise ValueError(f"context_len_ext ({context_len_ext}) must be >= context_len ({context_len})")
        alpha, beta = _number("alpha", alpha), _number("beta", beta)
        if not 0.0 < alpha < beta:
            raise ValueError(f"YaRN needs 0 < alpha < beta, got alpha={alpha}, beta={beta}")
        if len_scale is not None and not _number("len_scale", len_scale) > 0:
            raise ValueError(f"len_scale must be > 0 or None, got {len_scale}")
        self.spec = RotarySpec(head_dim=self.dim, rot_dim=self.rot_dim, base=self.base,
                               scale=context_len_ext / context_len, original_len=context_len, alpha=alpha,
                               beta=beta, mscale=None if len_scale is None else float(len_scale))


PositionalEmbedder = PositionEmbeddings | Literal["rope", "yarn"] | None


def resolve_embedder(embedder: PositionalEmbedder, dim_key: int, segment_len: int) -> PositionEmbeddings | None:
    """None, an embeddings object (checked against dim_key / segment_len), or "rope" / "yarn" with seed
    defaults. "yarn" alone has no context lengths to extend, so it is YaRN at scale 1 (equal to RoPE);
    pass a ``YaRNEmbeddings`` to extend."""
    if embedder is None:
        return None
    if embedder == "rope":
        return RoPEEmbeddings(dim=dim_key, seq_len=segment_len)
    if embedder == "yarn":
        return YaRNEmbeddings(dim=dim_key, seq_len=segment_len, context_len=segment_len, context_len_ext=segment_len)
    if isinstance(embedder, str):
        raise ValueError(f"positional_embedder must be None, 'rope', 'yarn' or an embeddings object, got {embedder!r}")
    if not isinstance(embedder, PositionEmbeddings):
        raise TypeError(f"positional_embedder must be a RoPEEmbeddings/YaRNEmbeddings, got {type(embedder).__name__}")
    if embedder.dim != dim_key:
        raise ValueError(f"positional_embedder dim ({embedder.dim}) must match dim_key ({dim_key})")
    if embedder.seq_len != segment_len:
        raise ValueError(f"positional_embedder seq_len ({embedder.seq_len}) must match segment_len ({segment_len})")
    return embedder


# ---------------------------------------------------------------------------------------------
# Compressive memory (one Infini-attention layer)
# ---------------------------------------------------------------------------------------------


def seed_betas_to_scalar(betas: Tensor) -> Tensor:
    """Seed gate (1, H, 1, V), one logit per value channel, -> ours (H,), one per head (paper Eq. 10).

    Rule: β_h = logit(mean_c sigmoid(β_{h,c})), the per-head gate that mixes memory and local attention
    in the same average proportion. Exact when a head's channels share one value.
    """
    p = torch.sigmoid(betas.double()).mean(dim=(0, 2, 3))  # (H,)
    return torch.logit(p, eps=1e-12).to(betas.dtype)


class CompressiveMemory(nn.Module):
    """Multi-head Infini attention (arXiv 2404.07143 Eqs. 5-11) with the seed's API.

    forward(x (B, T, D)) -> (B, T, D); any T (a trailing part segment attends within itself). With
    ``state`` / ``return_state=True`` the memory and the unfinished segment are carried across calls.
    ``causal=False`` (the seed default) attends in both directions inside each segment, so chunked calls
    only equal one call when chunks end on segment boundaries; ``causal=True`` streams exactly.
    ``sampling_factor`` only records the Mixture-of-Depths capacity (``tokens_per_segment``).
    ``init_state_learnable``: learnable initial M (H, K, V), zeros, and z (H, K), 1/K (so the first segment
    still reads zeros and M's gradient is not divided by ε alone); keep z positive.
    """

    def __init__(self, dim_input: int, dim_key: int, dim_value: int, num_heads: int, segment_len: int,
                 sampling_factor: float | None = None, update: Update = "linear", causal: bool = False,
                 positional_embedder: PositionalEmbedder = None, init_state_learnable: bool = False):
        super().__init__()
        D, K, V, H = (_positive_int(n, v) for n, v in (("dim_input", dim_input), ("dim_key", dim_key),
                                                        ("dim_value", dim_value), ("num_heads", num_heads)))
        self.dim_input, self.dim_key, self.dim_value, self.num_heads = D, K, V, H
        self.segment_len = _positive_int("segment_len", segment_len)
        self.sampling_factor = sampling_factor
        self.tokens_per_segment = None if sampling_factor is None else mod_capacity(segment_len, sampling_factor)
        self.update = _update(update)
        self.causal = _flag("causal", causal)
        self.positional_embedder = resolve_embedder(positional_embedder, K, segment_len)
        self.proj_q = nn.Linear(D, H * K, bias=False)
        self.proj_k = nn.Linear(D, H * K, bias=False)
        self.proj_v = nn.Linear(D, H * V, bias=False)
        self.proj_out = nn.Linear(H * V, D, bias=False)
        self.betas = nn.Parameter(torch.zeros(H))  # one scalar per head; sigmoid(0) = 0.5 mixes equally
        if _flag("init_state_learnable", init_state_learnable):
            self.init_mem = nn.Parameter(torch.zeros(H, K, V))
            self.init_z = nn.Parameter(torch.full((H, K), 1.0 / K))
        else:
            self.register_parameter("init_mem", None)
            self.register_parameter("init_z", None)

    @property
    def rotary(self) -> RotarySpec | None:
        return None if self.positional_embedder is None else self.positional_embedder.spec

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.dim_key, self.dim_value
        q = self.proj_q(x).view(B, T, H, K).transpose(1, 2)  # (B, H, T, K): heads split, then transposed
        k = self.proj_k(x).view(B, T, H, K).transpose(1, 2)  # (B, H, T, K)
        v = self.proj_v(x).view(B, T, H, V).transpose(1, 2)  # (B, H, T, V)
        return q, k, v

    def merge(self, o: Tensor) -> Tensor:
        B, H, T, V = o.shape
        return self.proj_out(o.transpose(1, 2).reshape(B, T, H * V))  # (B, T, D)

    def initial_state(self, x: Tensor) -> AttnState:
        """State before the first token of x (B, T, D): zeros, or the learnable M, z; no pending tokens."""
        B, H, K, V = x.shape[0], self.num_heads, self.dim_key, self.dim_value
        wide = torch.promote_types(x.dtype, torch.float32)
        if self.init_mem is None:
            mem = MemoryState(x.new_zeros(B, H, K, V, dtype=wide), x.new_zeros(B, H, K, dtype=wide))
        else:
            mem = MemoryState(self.init_mem.to(wide).expand(B, H, K, V), self.init_z.to(wide).expand(B, H, K))
        return AttnState(mem, x.new_zeros(B, H, 0, K), x.new_zeros(B, H, 0, V), None)

    def attend(self, x: Tensor, state: AttnState | None = None, keep: Tensor | None = None,
               ) -> tuple[Tensor, AttnState]:
        """x (B, T, D) -> (out (B, T, D), state); keep (B, T) masks tokens out (Mixture-of-Depths inference)."""
        q, k, v = self.project(x)
        o, state = infini_attention_stream(q, k, v, self.betas, self.initial_state(x) if state is None else state,
                                           segment_len=self.segment_len, update=self.update, causal=self.causal,
                                           rotary=self.rotary, keep=keep)
        return self.merge(o), state

    def attend_compact(self, xs: Tensor, state: AttnState | None, pos: Tensor, tokens_per_segment: int,
                       ) -> tuple[Tensor, AttnState]:
        """Mixture-of-Depths training: xs (B, N*C, D) are the C routed tokens of N whole segments, pos
        (B, N*C) their in-segment positions. Needs a state on a segment boundary."""
        state = self.initial_state(xs) if state is None else state
        if state.k.shape[2]:
            raise ValueError(f"Mixture-of-Depths training needs segment-aligned input: the state holds "
                             f"{state.k.shape[2]} tokens of an unfinished segment")
        q, k, v = self.project(xs)
        o, mem = infini_attention(q, k, v, self.betas, state.mem, segment_len=tokens_per_segment,
                                  update=self.update, causal=self.causal, rotary=self.rotary, pos=pos)
        return self.merge(o), AttnState(mem, state.k, state.v, None)

    def forward(self, x: Tensor, state: AttnState | None = None, return_state: bool = False,
                ) -> Tensor | tuple[Tensor, AttnState]:
        out, state = self.attend(x, state)
        return (out, state) if return_state else out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Accept the seed's shapes: betas (1, H, 1, V) -> (H,) by ``seed_betas_to_scalar``; init_mem
        (1, H, K, V) -> (H, K, V); init_z (1, H, K, 1) or (1, H, 1, 1) -> (H, K). (torch hands this hook
        a copy of the caller's dict, so the caller's tensors are untouched.)"""
        H, K = self.num_heads, self.dim_key
        b = state_dict.get(prefix + "betas")
        if b is not None and b.dim() == 4:
            state_dict[prefix + "betas"] = seed_betas_to_scalar(b)
        m = state_dict.get(prefix + "init_mem")
        if m is not None and m.dim() == 4:
            state_dict[prefix + "init_mem"] = m[0]
        z = state_dict.get(prefix + "init_z")
        if z is not None and z.dim() == 4:
            state_dict[prefix + "init_z"] = z[0, :, :, 0].expand(H, K).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, dim_key={self.dim_key}, dim_value={self.dim_value}, "
                f"segment_len={self.segment_len}, update={self.update!r}, causal={self.causal}")


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class InfiniTransformer(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + Dropout(MLP(norm(h))). -> (B, T, D).

    Deliberately not the seed's ``LayerNorm(MLP(Attn(x)) + x)``: that has no residual around attention
    and normalises the residual stream after every layer. Norms are RMSNorm as in the rest of the
    project; ``dropout`` applies to the MLP branch, as the seed documents. ``attn`` is a
    ``CompressiveMemory``, so the seed's ``attn.*`` keys load.
    """

    def __init__(self, dim_input: int, dim_hidden: int, dim_key: int, dim_value: int, num_heads: int,
                 activation: str, segment_len: int, update: Update = "linear", causal: bool = False,
                 positional_embedder: PositionalEmbedder = None, init_state_learnable: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        p = _number("dropout", dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.attn_norm = RMSNorm(dim_input)
        self.attn = CompressiveMemory(dim_input, dim_key, dim_value, num_heads, segment_len, update=update,
                                      causal=causal, positional_embedder=positional_embedder,
                                      init_state_learnable=init_state_learnable)
        self.mlp_norm = RMSNorm(dim_input)
        self.mlp = MLP(dim_input, _positive_int("dim_hidden", dim_hidden), activation)
        self.drop = nn.Dropout(p)

    def _mlp(self, h: Tensor) -> Tensor:
        return h + self.drop(self.mlp(self.mlp_norm(h)))

    def block(self, x: Tensor, state: AttnState | None, keep: Tensor | None = None) -> tuple[Tensor, AttnState]:
        a, state = self.attn.attend(self.attn_norm(x), state, keep)
        return self._mlp(x + a), state

    def block_compact(self, xs: Tensor, state: AttnState | None, pos: Tensor, tokens_per_segment: int,
                      ) -> tuple[Tensor, AttnState]:
        a, state = self.attn.attend_compact(self.attn_norm(xs), state, pos, tokens_per_segment)
        return self._mlp(xs + a), state

    def forward(self, x: Tensor, state: AttnState | None = None, return_state: bool = False,
                ) -> Tensor | tuple[Tensor, AttnState]:
        out, state = self.block(x, state)
        return (out, state) if return_state else out


def topk_target(logits: Tensor, segment_len: int, tokens_per_segment: int, offset: int = 0) -> Tensor:
    """Top-C membership (B, T) bool inside each segment; segments start ``offset`` tokens before logits
    (B, T) (an unfinished segment carried in the state); a part segment keeps min(C, its length)."""
    B, T = logits.shape
    right = -(offset + T) % segment_len
    padded = F.pad(logits.detach(), (offset, right), value=float("-inf"))  # whole segments
    idx = topk_per_segment(padded, segment_len, tokens_per_segment)
    return torch.zeros_like(padded, dtype=torch.bool).scatter(1, idx, True)[:, offset:offset + T]


class MoDInfiniTransformer(InfiniTransformer):
    """Mixture-of-Depths (arXiv 2404.02258) ``InfiniTransformer``: returns (out, select_target, select_pred).

    A router ``proj_sampling`` scores every token. Training: the top C = ceil(segment_len / sampling_factor)
    tokens of each segment go through the block (their memory holds only routed tokens, RoPE at their
    original in-segment positions); out = x + sigmoid(r)·(block(x̃) − x̃) there and x elsewhere, so the
    router is on the gradient path; T must be a multiple of segment_len. Inference: causal routing by
    sigmoid(r) > 0.5, batched (rows route different counts; dropped tokens are masked out).
    select_target (B*T, 1) is top-C membership (float 0/1; in eval too, for a validation BCE, though eval
    routing never reads it; a segment split across calls gets top-C of each call's part), select_pred
    (B*T, 1) the router logits: add
    ``binary_cross_entropy_with_logits(select_pred, select_target)`` to the loss.
    """

    def __init__(self, dim_input: int, dim_hidden: int, dim_key: int, dim_value: int, num_heads: int,
                 activation: str, segment_len: int, sampling_factor: float, update: Update = "linear",
                 causal: bool = False, positional_embedder: PositionalEmbedder = None,
                 init_state_learnable: bool = False, dropout: float = 0.0):
        super().__init__(dim_input, dim_hidden, dim_key, dim_value, num_heads, activation, segment_len,
                         update=update, causal=causal, positional_embedder=positional_embedder,
                         init_state_learnable=init_state_learnable, dropout=dropout)
        self.segment_len = segment_len
        self.sampling_factor = sampling_factor
        self.tokens_per_segment = mod_capacity(segment_len, sampling_factor)
        self.proj_sampling = nn.Linear(dim_input, 1)  # the seed's router, with its bias

    def forward(self, x: Tensor, state: AttnState | None = None, return_state: bool = False,
                ) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, AttnState]:
        r = self.proj_sampling(x).squeeze(-1)
        logits = r.to(torch.promote_types(r.dtype, torch.float32))  # (B, T) router logits, fp32 or wider
        S, C = self.segment_len, self.tokens_per_segment
        if self.training:
            out, state, chosen = route_topk(x, logits, state, self.block_compact, segment_len=S,
                                            tokens_per_segment=C)
        else:
            offset = 0 if state is None else state.k.shape[2]
            out, state, _ = route_causal(x, logits, state, self.block)
            chosen = topk_target(logits, S, C, offset)
        target, pred = chosen.to(logits.dtype).view(-1, 1), logits.view(-1, 1)  # (B*T, 1) each
        return (out, target, pred, state) if return_state else (out, target, pred)
