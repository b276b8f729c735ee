"""Infini-attention ops (arXiv 2404.07143 Eqs. 6-10) as pure functions, each fast path beside a naive twin.

Every equation is its own function; ``infini_attention`` is the segment-parallel fast path (no Python
loop over segments for the linear rule, two-phase for the delta rule), ``infini_attention_naive`` is
the same computation written straight from the paper, one segment and one head at a time, and
``infini_attention_stream`` feeds any number of tokens with the state carried (generation feeds one).

Shape legend: B batch, H query heads, G key/value heads (query head h reads KV head h // (H/G)),
T tokens, N segments, S segment length, P tokens of the unfinished segment, K key dim, V value dim.
Memory math runs in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infinitrain.ops.rope import RotarySpec, apply_rotary, apply_rotary_at, apply_rotary_segments

Update = Literal["linear", "delta"]
UPDATES = ("linear", "delta")
DEFAULT_EPS = 1e-6


class MemoryState(NamedTuple):
    """Compressive memory of one layer: M (B, G, K, V) and normaliser z (B, G, K), both fp32."""

    M: Tensor
    z: Tensor


class SegmentBuffer:
    """Room for a whole segment of keys, values and rotated keys, (B, G, S, ·) each (k_rot may be None), shared by
    the states of one stream: a state holding P tokens holds views of the first P positions.

    ``filled`` counts the positions some state has written. A state appends in place only when filled == P:
    nobody wrote past its prefix, so every state sharing the buffer keeps reading what it read. Otherwise (the
    stream forked, e.g. one prefilled state decoded twice) the append copies into a new buffer. Decoding then
    costs O(1) per token instead of re-concatenating the segment's cache.
    """

    __slots__ = ("tensors", "filled")

    def __init__(self, tensors: tuple[Tensor | None, ...], filled: int):
        self.tensors, self.filled = tensors, filled


class AttnState(NamedTuple):
    """Streaming state of one layer: the memory plus the un-rotated keys/values of the unfinished segment."""

    mem: MemoryState
    k: Tensor  # (B, G, P, K)
    v: Tensor  # (B, G, P, V)
    keep: Tensor | None  # (B, P) bool, for Mixture-of-Depths routing; None when every token is kept
    k_rot: Tensor | None = None  # (B, G, P, K) the same keys rotated (a cache; None: rotate k when needed)
    buffer: SegmentBuffer | None = None  # what k, v, k_rot are views of, when grown in place (no autograd)
    last: Tensor | None = None  # (B, D) the layer's last input token, for ``ModelConfig.token_shift`` (else None)


def zero_memory(batch: int, kv_heads: int, key_dim: int, value_dim: int, device=None,
                dtype: torch.dtype = torch.float32) -> MemoryState:
    M = torch.zeros(batch, kv_heads, key_dim, value_dim, dtype=dtype, device=device)
    z = torch.zeros(batch, kv_heads, key_dim, dtype=dtype, device=device)
    return MemoryState(M, z)


def zero_attn_state(batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype, device=None) -> AttnState:
    return AttnState(
        zero_memory(batch, kv_heads, key_dim, value_dim, device, torch.promote_types(dtype, torch.float32)),
        torch.zeros(batch, kv_heads, 0, key_dim, dtype=dtype, device=device),
        torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device),
        None,
    )


# ---------------------------------------------------------------------------------------------
# The paper's equations, one function each
# ---------------------------------------------------------------------------------------------


def acc(x: Tensor) -> Tensor:
    """Memory math precision: fp32 for bf16/fp16/fp32 inputs, fp64 kept for fp64 (reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sigma(x: Tensor, tau: Tensor | None = None) -> Tensor:
    """σ = ELU + 1 (Katharopoulos et al. 2020), in fp32 or wider; strictly positive.

    tau (heads,) optional: σ(τ_h·x) with one temperature per head of x (dim 1), the memory's learned sharpness
    (``ModelConfig.memory_tau``); None is the paper's σ(x)."""
    x = acc(x)
    if tau is not None:
        x = x * acc(tau).view(1, -1, *([1] * (x.dim() - 2)))
    return F.elu(x).add_(1.0)  # in place on ELU's fresh output (its backward reads the input): one tensor


def query_tau(tau: Tensor | None, heads: int) -> Tensor | None:
    """Per-KV-head temperatures (G,) -> per-query-head (H,): query head h reads KV head h // (H/G)."""
    return None if tau is None else tau.repeat_interleave(heads // tau.shape[0])


def _group(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, ...) -> (B, G, H/G, ...): query head h = g * (H/G) + r reads KV head g."""
    B, H = x.shape[:2]
    if H % kv_heads:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({kv_heads})")
    return x.reshape(B, kv_heads, H // kv_heads, *x.shape[2:])


def retrieve(sq: Tensor, mem: MemoryState, eps: float = DEFAULT_EPS) -> Tensor:
    """Eq. 7: A_mem = σ(Q) M / (σ(Q) z + ε). sq (B, H, T, K) fp32 -> (B, H, T, V); M = 0 reads zeros."""
    M, z = mem
    sqg = _group(sq, M.shape[1])  # (B, G, R, T, K)
    num = sqg @ M[:, :, None]  # (B, G, R, T, V)
    den = sqg @ z[:, :, None, :, None]  # (B, G, R, T, 1)
    return (num / (den + eps)).flatten(1, 2)


def linear_update(sk: Tensor, v: Tensor, mem: MemoryState) -> MemoryState:
    """Eq. 8: M += σ(K)ᵀ V, z += Σ_t σ(K_t). sk (B, G, S, K) fp32, v (B, G, S, V) fp32."""
    M, z = mem
    return MemoryState(M + sk.transpose(-1, -2) @ v, z + sk.sum(-2))


def delta_update(sk: Tensor, v: Tensor, mem: MemoryState, eps: float = DEFAULT_EPS) -> MemoryState:
    """Eq. 9: M += σ(K)ᵀ (V − σ(K) M / (σ(K) z + ε)); z is updated as in the linear rule."""
    M, z = mem
    known = (sk @ M) / (sk @ z[..., None] + eps)  # what the memory already returns for these keys
    return MemoryState(M + sk.transpose(-1, -2) @ (v - known), z + sk.sum(-2))


def memory_update(k: Tensor, v: Tensor, mem: MemoryState, update: Update, keep: Tensor | None = None,
                  eps: float = DEFAULT_EPS, tau: Tensor | None = None) -> MemoryState:
    """Write one finished segment (k (B, G, S, K), v (B, G, S, V), raw) into the memory; keep (B, S) masks tokens;
    tau (G,) the memory temperatures (None: 1)."""
    sk, vf = sigma(k, tau), acc(v)
    if keep is not None:
        sk = sk * keep[:, None, :, None]  # a dropped token writes nothing and adds nothing to z
    if update == "linear":
        return linear_update(sk, vf, mem)
    if update == "delta":
        return delta_update(sk, vf, mem, eps)
    raise ValueError(f"update must be one of {UPDATES}, got {update!r}")


def gate(beta: Tensor, a_mem: Tensor, a_dot: Tensor) -> Tensor:
    """Eq. 10: sigmoid(β)·A_mem + (1 − sigmoid(β))·A_dot, one scalar β per query head. -> a_dot.dtype."""
    g = torch.sigmoid(acc(beta)).view(1, -1, 1, 1)
    return (g * a_mem + (1.0 - g) * acc(a_dot)).to(a_dot.dtype)


def _segment_positions(T: int, segment_len: int, device) -> Tensor:
    return torch.arange(T, device=device) % segment_len  # positions reset at every segment


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    """(B, G, ...) -> (B, H, ...) with KV head g serving query heads g*R .. g*R+R-1 (repeat_interleave). A copy
    R times the size of x: only where no fused SDPA kernel reads grouped heads (see ``grouped_sdpa``)."""
    B, G = x.shape[:2]
    if G == heads:
        return x
    return x[:, :, None].expand(B, G, heads // G, *x.shape[2:]).flatten(1, 2)


def grouped_sdpa(q: Tensor, masked: bool) -> bool:
    """Whether SDPA should read G < H key/value heads itself (``enable_gqa=True``) for queries like q: where a fused
    kernel reads grouped heads natively, which is CUDA's FlashAttention (fp16/bf16, no mask). Elsewhere PyTorch
    either falls back to its math kernel, which keeps S×S probabilities (fp32 or a mask on CUDA), or expands K/V
    per query head itself before its kernel (the CPU, in torch 2.13): there the caller expands (``_expand_kv``),
    which costs the same and keeps the kernel fused. Both paths give the same numbers (tested on the CPU)."""
    return q.device.type == "cuda" and not masked and q.dtype in (torch.float16, torch.bfloat16)


def local_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, *, causal: bool = True,
                    keep: Tensor | None = None, doc: Tensor | None = None) -> Tensor:
    """Eq. 6 inside each segment: softmax(QKᵀ/sqrt(K)) V, block-diagonal over segments, one SDPA call.

    q (B, H, T, K) and k (B, G, T, K) already rotated; v (B, G, T, V); T % S == 0. keep (B, T) hides
    dropped tokens from every other query (a dropped query still sees itself, so no row is empty);
    doc (B, T) document ids restrict attention to the query's own document.
    """
    B, H, T, _ = q.shape
    return _local_attention_blocks(q, k, v, segment_len, causal=causal, keep=keep, doc=doc).reshape(B, H, T, -1)


def _local_attention_blocks(q: Tensor, k: Tensor, v: Tensor, segment_len: int, *, causal: bool = True,
                            keep: Tensor | None = None, doc: Tensor | None = None) -> Tensor:
    """``local_attention`` shaped (B, G, R, N, S, V), R = H/G query heads per KV head. Always one 4-D SDPA call,
    which PyTorch's fused kernels can take instead of the math fallback that keeps fp32 S×S probabilities (on CPU
    the flash kernel takes every layout here, checked for fp32 and bf16; on CUDA the unmasked one is
    FlashAttention's case, not checked here). Without keep/doc: segments as extra heads, (B, H·N, S, ·) with
    ``is_causal``; SDPA's output is then laid out (B, S, H·N, V) on CPU, so no copy is made until the caller
    combines it. With G < H and ``grouped_sdpa``: (B·G·N, R, S, ·) queries against (B·G·N, 1, S, ·) keys and
    values (views), so K/V are never copied per query head; only q is laid out anew. With keep/doc: segments as
    batch rows, (B·N, H, S, ·) against (B·N, G, S, ·) (or H when expanded), so that the boolean mask
    (B·N, 1, S, S) broadcasts over heads."""
    B, H, T, K = q.shape
    G, S, Vd = k.shape[1], segment_len, v.shape[-1]
    N, R = T // S, H // G
    masked = keep is not None or doc is not None
    gqa = G < H and grouped_sdpa(q, masked)
    if not gqa:
        k, v = _expand_kv(k, H), _expand_kv(v, H)
    if not masked and gqa:
        qg = q.reshape(B, G, R, N, S, K).transpose(2, 3).reshape(B * G * N, R, S, K)
        o = F.scaled_dot_product_attention(qg, k.reshape(B * G * N, 1, S, K), v.reshape(B * G * N, 1, S, Vd),
                                           is_causal=causal, enable_gqa=True)
        return o.view(B, G, N, R, S, Vd).transpose(2, 3)
    if not masked:
        o = F.scaled_dot_product_attention(
            q.reshape(B, H * N, S, K), k.reshape(B, H * N, S, K), v.reshape(B, H * N, S, Vd), is_causal=causal)
        return o.view(B, G, R, N, S, Vd)
    eye = torch.eye(S, dtype=torch.bool, device=q.device)
    allowed = torch.ones_like(eye) if keep is None else keep.view(B, N, 1, S) | eye  # kept keys, and self
    if doc is not None:
        d = doc.view(B, N, S)
        allowed = allowed & (d[..., :, None] == d[..., None, :])
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()

    def rows(x: Tensor) -> Tensor:  # (B, heads, T, ·) -> (B·N, heads, S, ·)
        return x.reshape(B, x.shape[1], N, S, -1).transpose(1, 2).reshape(B * N, x.shape[1], S, x.shape[-1])

    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=allowed.view(B * N, 1, S, S),
                                       enable_gqa=gqa)
    return o.view(B, N, G, R, S, Vd).permute(0, 2, 3, 1, 4, 5)


# ---------------------------------------------------------------------------------------------
# Fast path over whole segments
# ---------------------------------------------------------------------------------------------


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """Σ_{j<s} x_j along dim, by shifting the inclusive cumsum (no subtraction, so no cancellation)."""
    c = x.cumsum(dim)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat((zero, c.narrow(dim, 0, x.shape[dim] - 1)), dim)


def _scan_with_resets(x: Tensor, x0: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
    """Running sum over dim 2 (segments) of x (B, G, N, ...) from x0 (B, G, ...), emptied where reset (B, N)
    is set: after[s] = (0 if reset[s] else after[s-1]) + x[s]. Returns (after[s-1] for every s, after[-1])."""
    live = (~reset).to(x.dtype)
    before, cur = [], x0
    for s in range(x.shape[2]):
        before.append(cur)
        cur = cur * live[:, s].view(-1, *([1] * (cur.dim() - 1))) + x[:, :, s]
    return torch.stack(before, 2), cur


def memory_states_linear(sk: Tensor, v: Tensor, mem: MemoryState, reset: Tensor | None = None,
                         ) -> tuple[MemoryState, MemoryState]:
    """Linear rule for all segments at once. sk (B, G, N, S, K), v (B, G, N, S, V).

    Returns the state read by every segment, (B, G, N, K, V) / (B, G, N, K), and the final state.
    reset (B, N): the memory is emptied before segment s writes (a document starts inside it).
    """
    Mz, final = _memory_states_linear_joint(sk, v, mem, reset)
    return MemoryState(Mz[..., :-1], Mz[..., -1]), final


def _memory_states_linear_joint(sk: Tensor, v: Tensor, mem: MemoryState, reset: Tensor | None = None,
                                ) -> tuple[Tensor, MemoryState]:
    """``memory_states_linear`` with each state read as one (B, G, N, K, V+1) tensor [M | z]: z is M's extra
    value column (σ(K)ᵀ1 beside σ(K)ᵀV), so one cumsum builds both and one matmul retrieves both."""
    U = sk.transpose(-1, -2) @ v  # (B, G, N, K, V): σ(K_s)ᵀ V_s
    Uz = torch.cat((U, sk.sum(-2)[..., None]), -1)  # (B, G, N, K, V+1)
    Mz0 = torch.cat((mem.M, mem.z[..., None]), -1)  # (B, G, K, V+1)
    if reset is not None:  # a sum that restarts: N small K×V adds, exact (no cumsum cancellation)
        before, after = _scan_with_resets(Uz, Mz0, reset)
    else:
        before = _exclusive_cumsum(Uz, 2) + Mz0[:, :, None]
        after = before[:, :, -1] + Uz[:, :, -1]
    return before, MemoryState(after[..., :-1], after[..., -1])


def memory_states_delta(sk: Tensor, v: Tensor, mem: MemoryState, eps: float, reset: Tensor | None = None,
                        ) -> tuple[MemoryState, MemoryState]:
    """Delta rule, two-phase: M_s = A_s M_{s-1} + B_s with A_s = I − σ(K_s)ᵀ D_s⁻¹ σ(K_s), B_s = σ(K_s)ᵀ V_s.

    z does not depend on M, so every A_s, B_s is built in one batched matmul; only the K×K recurrence
    runs in order. Same shapes as ``memory_states_linear``; a reset empties M and z before segment s writes.
    """
    kbar = sk.sum(-2)
    if reset is None:
        z_before = _exclusive_cumsum(kbar, 2) + mem.z[:, :, None]  # (B, G, N, K)
        z_final = z_before[:, :, -1] + kbar[:, :, -1]
        z_write = z_before
    else:
        z_before, z_final = _scan_with_resets(kbar, mem.z, reset)
        z_write = z_before * (~reset).to(sk.dtype)[:, None, :, None]  # what segment s writes onto
    d = sk @ z_write[..., None] + eps  # (B, G, N, S, 1): D_s = diag(σ(K_s) z_{s-1} + ε)
    skT = sk.transpose(-1, -2)
    eye = torch.eye(sk.shape[-1], dtype=sk.dtype, device=sk.device)
    A = eye - skT @ (sk / d)  # (B, G, N, K, K)
    Bm = skT @ v  # (B, G, N, K, V)
    M = mem.M
    before = []
    for s in range(sk.shape[2]):  # the only sequential part: K×K by K×V per segment
        before.append(M)
        if reset is not None:
            M = M * (~reset[:, s]).to(M.dtype).view(-1, 1, 1, 1)
        M = torch.baddbmm(Bm[:, :, s].flatten(0, 1), A[:, :, s].flatten(0, 1), M.flatten(0, 1)).view_as(M)
    return MemoryState(torch.stack(before, 2), z_before), MemoryState(M, z_final)


def _memory_before_segments(sk: Tensor, vf: Tensor, mem: MemoryState, update: Update, eps: float,
                            reset: Tensor | None) -> tuple[Tensor, MemoryState]:
    """[M | z] before each segment (B, G, N, K, V + 1) and the final memory, by the linear or the delta rule."""
    if update == "linear":
        return _memory_states_linear_joint(sk, vf, mem, reset)
    before, final = memory_states_delta(sk, vf, mem, eps, reset)
    return torch.cat((before.M, before.z[..., None]), -1), final


def infini_attention(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: MemoryState | None = None, *,
                     segment_len: int, update: Update = "linear", causal: bool = True,
                     rotary: RotarySpec | None = None, pos: Tensor | None = None, keep: Tensor | None = None,
                     doc_start: Tensor | None = None, eps: float = DEFAULT_EPS, tau: Tensor | None = None,
                     doc_inside: bool | None = None) -> tuple[Tensor, MemoryState]:
    """Infini-attention over whole segments: (q, k, v, mem) -> (out, final mem).

    q (B, H, T, K), k (B, G, T, K), v (B, G, T, V) un-rotated, T a multiple of S; beta (H,).
    pos (B, T) overrides the in-segment RoPE positions (Mixture-of-Depths compaction); keep (B, T)
    masks tokens out of attention and memory writes. Retrieval reads the state before each segment.
    doc_start (B, T) marks the first token of each new document: no token sees another document,
    through local attention or through the memory; the carried ``mem`` belongs to the document that
    is current when the call starts (see ``document_masks``). tau (G,): the memory reads σ(τ·q) and writes
    σ(τ·k), one temperature per KV head (None: the paper's σ(q), σ(k)). doc_inside: whether a document may
    start inside a segment (then local attention needs the document mask); None reads it from doc_start, a host
    sync, so a model computes it once per call (``documents_inside``) rather than once per layer.
    """
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    B, H, T, K = q.shape
    G, Vd, S = k.shape[1], v.shape[-1], segment_len
    if T % S:
        raise ValueError(f"infini_attention needs whole segments: T={T} is not a multiple of S={S}")
    N = T // S
    if mem is None:
        mem = zero_memory(B, G, K, Vd, q.device, acc(q).dtype)
    # Memory path: un-rotated q/k (no PE on the memory, §4.1), fp32.
    sq = sigma(q, query_tau(tau, H)).view(B, H, N, S, K)
    sk = sigma(k, tau).view(B, G, N, S, K)
    doc = reads = reset = None
    write = keep
    if doc_start is not None:
        doc, reads, writes, reset = document_masks(doc_start, S)
        write = writes if keep is None else keep & writes
        if not (documents_inside(doc_start, S) if doc_inside is None else doc_inside):
            doc = None  # documents start on segment boundaries only: local attention needs no mask (fused kernel)
    if write is not None:
        sk = sk * write.view(B, 1, N, S, 1)
    Mz, final = _memory_before_segments(sk, acc(v).view(B, G, N, S, Vd), mem, update, eps, reset)
    # Eq. 7 for all segments: numerator and normaliser in one matmul, z being Mz's last value column.
    numz = (_group(sq, G) @ Mz[:, :, None]).view(B, H, N, S, Vd + 1)
    num, den = numz.split((Vd, 1), -1)
    g = torch.sigmoid(acc(beta)).view(1, H, 1, 1, 1)
    w = g / (den + eps)  # (B, H, N, S, 1): gate and normaliser folded into one per-token scale
    if reads is not None:
        w = w * reads.view(B, 1, N, S, 1)  # a document's first (partial) segment reads an empty memory
    # Local path: rotated q/k, causal inside each segment.
    if rotary is not None and pos is None:  # in-segment positions: the per-device cached table, no host work
        q, k = apply_rotary_segments(q, S, rotary), apply_rotary_segments(k, S, rotary)
    elif rotary is not None:  # explicit positions (Mixture-of-Depths): angles from the cached frequencies
        q, k = apply_rotary(q, pos, rotary), apply_rotary(k, pos, rotary)
    a_dot = _local_attention_blocks(q, k, v, S, causal=causal, keep=keep, doc=doc)  # (B, G, R, N, S, V)
    # Eq. 10 as `gate`, in two passes: num·w is contiguous and comes first, so the sum is laid out
    # (B, H, T, V) too and SDPA's output needs no reshape copy.
    R = H // G
    out = torch.addcmul((num * w).view(B, G, R, N, S, Vd), a_dot, (1.0 - g).view(1, G, R, 1, 1, 1))
    return out.to(a_dot.dtype).reshape(B, H, T, Vd), final  # a view: out is contiguous


def documents_inside(doc_start: Tensor, segment_len: int) -> bool:
    """Whether a document starts inside a segment of doc_start (B, T), T = N·S (a host sync on an accelerator)."""
    B, T = doc_start.shape
    return bool(doc_start.view(B, T // segment_len, segment_len)[..., 1:].any())


def document_masks(doc_start: Tensor, segment_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks that keep packed documents apart, from doc_start (B, T) bool, T = N·S.

    Returns doc (B, T) document index (0 = the document current when the call starts), reads (B, T):
    the token's document began before its segment, so it may read the memory; writes (B, T): the
    token belongs to the document still current at its segment's end, the only one later segments
    can read; reset (B, N): a document starts inside segment s, so the memory is emptied before s writes.
    """
    B, T = doc_start.shape
    S = segment_len
    N = T // S
    doc = doc_start.long().cumsum(1)  # (B, T)
    seg = doc.view(B, N, S)
    doc_before = torch.cat((doc.new_zeros(B, 1), seg[:, :-1, -1]), 1)  # (B, N): current before segment s
    reads = (seg == doc_before[..., None]).view(B, T)
    writes = (seg == seg[:, :, -1:]).view(B, T)
    reset = seg[:, :, -1] != doc_before
    return doc, reads, writes, reset


# ---------------------------------------------------------------------------------------------
# Naive twin: straight from the paper, one segment and one head at a time
# ---------------------------------------------------------------------------------------------


def infini_attention_naive(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: MemoryState | None = None, *,
                           segment_len: int, update: Update = "linear", causal: bool = True,
                           rotary: RotarySpec | None = None, pos: Tensor | None = None,
                           keep: Tensor | None = None, doc_start: Tensor | None = None,
                           eps: float = DEFAULT_EPS, tau: Tensor | None = None) -> tuple[Tensor, MemoryState]:
    """Reference for ``infini_attention`` (same signature): loops over segments and heads.

    Documents, from the definition: a token sees only earlier tokens of its own document; it reads the
    memory only if its document began before its segment; a segment writes only the tokens of the
    document still current at its end, onto an emptied memory if that document started inside it.
    """
    B, H, T, K = q.shape
    G, Vd, S = k.shape[1], v.shape[-1], segment_len
    R = H // G
    if mem is None:
        mem = zero_memory(B, G, K, Vd, q.device, acc(q).dtype)
    M = [mem.M[:, g] for g in range(G)]  # per KV head: (B, K, V)
    z = [mem.z[:, g] for g in range(G)]  # (B, K)
    if rotary is not None:
        p = pos if pos is not None else _segment_positions(T, S, q.device)
        qr, kr = apply_rotary(q, p, rotary), apply_rotary(k, p, rotary)
    else:
        qr, kr = q, k
    if keep is None:
        keep = torch.ones(B, T, dtype=torch.bool, device=q.device)
    if doc_start is None:
        doc_start = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    doc = doc_start.long().cumsum(1)
    outs = []
    for s0 in range(0, T, S):
        sl = slice(s0, s0 + S)
        L = min(S, T - s0)
        d = doc[:, sl]  # (B, L)
        current_before = doc[:, s0 - 1] if s0 else torch.zeros(B, dtype=torch.long, device=q.device)
        may_read = (d == current_before[:, None]).to(M[0].dtype)[..., None]  # (B, L, 1)
        same_doc = d[:, :, None] == d[:, None, :]
        new_doc = d[:, -1] != current_before  # (B,): a document starts inside this segment
        writer = keep[:, sl] & (d == d[:, -1:])
        seg_out = []
        for h in range(H):
            g = h // R  # query head h reads KV head h // (H/G)
            t = 1.0 if tau is None else tau[g]  # the memory temperature of KV head g
            sq = F.elu(acc(q[:, h, sl]) * t) + 1  # (B, L, K)
            a_mem = (sq @ M[g]) / ((sq @ z[g][:, :, None]) + eps) * may_read  # Eq. 7
            scores = acc(qr[:, h, sl] @ kr[:, g, sl].transpose(-1, -2)) / K ** 0.5  # Eq. 6
            allowed = (keep[:, None, sl] | torch.eye(L, dtype=torch.bool, device=q.device)) & same_doc
            if causal:
                allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
            a_dot = torch.softmax(scores, -1) @ acc(v[:, g, sl])
            gh = torch.sigmoid(acc(beta[h]))
            seg_out.append(gh * a_mem + (1 - gh) * a_dot)  # Eq. 10
        outs.append(torch.stack(seg_out, 1))
        for g in range(G):  # retrieval above used M_{s-1}; now write segment s
            t = 1.0 if tau is None else tau[g]
            M[g], z[g] = _naive_write(M[g], z[g], k[:, g, sl], v[:, g, sl], writer, new_doc, t, update, eps)
    out = torch.cat(outs, 2).to(v.dtype)
    return out, MemoryState(torch.stack(M, 1), torch.stack(z, 1))


def _naive_write(M: Tensor, z: Tensor, k: Tensor, v: Tensor, writer: Tensor, new_doc: Tensor, t, update: Update,
                 eps: float) -> tuple[Tensor, Tensor]:
    """One segment's write into one KV head's memory M (B, K, V), z (B, K) from its keys k (B, L, K) and values
    v (B, L, V) at the ``writer`` positions (B, L); emptied first where a document started inside the segment."""
    live = (~new_doc).to(M.dtype)
    M, z = M * live[:, None, None], z * live[:, None]
    sk = (F.elu(acc(k) * t) + 1) * writer[:, :, None]
    vs = acc(v)
    if update == "linear":
        M = M + sk.transpose(-1, -2) @ vs  # Eq. 8
    else:
        M = M + sk.transpose(-1, -2) @ (vs - (sk @ M) / (sk @ z[:, :, None] + eps))  # Eq. 9
    return M, z + sk.sum(1)


# ---------------------------------------------------------------------------------------------
# Streaming: any number of tokens per call, state carried
# ---------------------------------------------------------------------------------------------


def infini_attention_partial(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, mem: MemoryState, *,
                             causal: bool = True, rotary: RotarySpec | None = None,
                             keep: Tensor | None = None, eps: float = DEFAULT_EPS, k_rot: Tensor | None = None,
                             table_len: int | None = None, tau: Tensor | None = None) -> Tensor:
    """Outputs for the last t tokens of an unfinished segment, without writing the memory.

    q (B, H, t, K) are those tokens' queries; k (B, G, P+t, K), v (B, G, P+t, V) are every key/value
    of the segment so far (un-rotated), so the queries sit at in-segment positions P .. P+t-1.
    keep (B, P+t) masks dropped tokens. k_rot: the same keys already rotated (the stream's cache), used
    instead of rotating k; table_len (>= P+t, the segment length): rotate q from the cached ``rope_table``.
    tau (G,): the memory temperatures.
    """
    B, H, t, K = q.shape
    L = k.shape[2]
    P = L - t
    a_mem = retrieve(sigma(q, query_tau(tau, H)), mem, eps)
    if rotary is not None:
        if table_len is None:
            q = apply_rotary(q, torch.arange(P, L, device=q.device), rotary)
        else:
            q = apply_rotary_at(q, P, rotary, table_len)
        k = k_rot if k_rot is not None else apply_rotary(k, torch.arange(L, device=q.device), rotary)
    mask = None
    if (causal and t > 1) or keep is not None:  # one causal query at the end sees every key: no mask
        qpos = torch.arange(P, L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = (kpos <= qpos) if causal else torch.ones(t, L, dtype=torch.bool, device=q.device)
        if keep is not None:
            mask = mask & (keep[:, None, None, :] | (kpos == qpos))  # (B, 1, t, L)
    gqa = k.shape[1] < H and grouped_sdpa(q, mask is not None)
    if not gqa:
        k, v = _expand_kv(k, H), _expand_kv(v, H)
    a_dot = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return gate(beta, a_mem, a_dot)


def _extend(held: tuple[Tensor | None, ...], new: tuple[Tensor | None, ...], buffer: SegmentBuffer | None,
            capacity: int) -> tuple[tuple[Tensor | None, ...], SegmentBuffer | None]:
    """held (B, G, P, ·) tensors (None when P = 0) followed by new (B, G, t, ·) ones along the tokens, and the
    buffer they are views of. With autograd on this concatenates (an in-place write would break tensors saved
    for backward); else it writes into ``buffer`` when that is safe (see SegmentBuffer), or into a new one."""
    P, t = (0 if held[0] is None else held[0].shape[2]), new[0].shape[2]
    if torch.is_grad_enabled():
        return tuple(n if h is None or n is None else torch.cat((h, n), 2) for h, n in zip(held, new)), None
    first = None if buffer is None else buffer.tensors[0]
    if (buffer is None or buffer.filled != P or P + t > first.shape[2]
            or (first.is_inference() and not torch.is_inference_mode_enabled())):
        room = [None if n is None else n.new_empty(*n.shape[:2], capacity, n.shape[3]) for n in new]
        buffer = SegmentBuffer(tuple(room), 0)
        for b, h in zip(room, held):
            if b is not None and h is not None:
                b[:, :, :P].copy_(h)
    for b, n in zip(buffer.tensors, new):
        if b is not None:
            b[:, :, P:P + t].copy_(n)
    buffer.filled = P + t
    return tuple(None if b is None else b[:, :, :P + t] for b in buffer.tensors), buffer


def infini_attention_stream(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: AttnState | None = None, *,
                            segment_len: int, update: Update = "linear", causal: bool = True,
                            rotary: RotarySpec | None = None, keep: Tensor | None = None,
                            doc_start: Tensor | None = None, eps: float = DEFAULT_EPS,
                            tau: Tensor | None = None, doc_inside: bool | None = None) -> tuple[Tensor, AttnState]:
    """Feed any number of tokens (q (B, H, T, K), k/v (B, G, T, ·)) with the state carried.

    Segments are counted from the start of the stream: the call first completes the unfinished
    segment held in the state, then runs whole segments on the fast path, then keeps the remainder
    as the new unfinished segment. One call over a stream equals any chunking of it, down to one
    token per call (causal attention only: a bidirectional segment depends on its future tokens).
    doc_start (B, T) document starts are supported on segment-aligned calls (the trainer's windows).
    tau (G,): the memory temperatures, doc_inside: whether a document starts inside a segment (see
    ``infini_attention``).
    """
    B, H, T, K = q.shape
    G, Vd, S = k.shape[1], v.shape[-1], segment_len
    if state is None:
        state = zero_attn_state(B, G, K, Vd, k.dtype, q.device)
    mem, kc, vc, keepc, krc, buffer = state[:6]
    if doc_start is not None and (kc.shape[2] or T % S):
        raise ValueError("doc_start needs a segment-aligned call: whole segments and no unfinished segment "
                         f"in the state (got {T} tokens, {kc.shape[2]} held, segment {S})")
    if keep is not None and keepc is None:
        keepc = torch.ones(B, kc.shape[2], dtype=torch.bool, device=q.device)
    if keep is None and keepc is not None:
        keep = torch.ones(B, T, dtype=torch.bool, device=q.device)
    kw = dict(causal=causal, rotary=rotary, eps=eps, table_len=S, tau=tau)
    outs = []
    i = 0
    P = kc.shape[2]
    if P > 0:  # 1. complete the unfinished segment
        i = min(T, S - P)
        kr_new = None
        if rotary is not None:  # rotate only the new keys: the held ones were rotated when they came
            krc = apply_rotary_at(kc, 0, rotary, S) if krc is None else krc
            kr_new = apply_rotary_at(k[:, :, :i], P, rotary, S)
        (ks, vs, krs), buffer = _extend((kc, vc, krc), (k[:, :, :i], v[:, :, :i], kr_new), buffer, S)
        keeps = None if keep is None else torch.cat((keepc, keep[:, :i]), 1)
        outs.append(infini_attention_partial(q[:, :, :i], ks, vs, beta, mem, keep=keeps, k_rot=krs, **kw))
        if P + i < S:
            return outs[0], AttnState(mem, ks, vs, keeps, krs, buffer)
        mem = memory_update(ks, vs, mem, update, keeps, eps, tau)
    n_full = (T - i) // S * S
    if n_full:  # 2. whole segments, fast path
        j = i + n_full
        o, mem = infini_attention(q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], beta, mem, segment_len=S,
                                  update=update, keep=None if keep is None else keep[:, i:j], doc_start=doc_start,
                                  causal=causal, rotary=rotary, eps=eps, tau=tau, doc_inside=doc_inside)
        outs.append(o)
        i = j
    kt, vt = k[:, :, i:], v[:, :, i:]  # 3. the remainder starts a new unfinished segment
    keept = None if keep is None else keep[:, i:]
    krt = buffer = None
    if i < T:
        krt = None if rotary is None else apply_rotary_at(kt, 0, rotary, S)
        (kt, vt, krt), buffer = _extend((None, None, None), (kt, vt, krt), None, S)
        outs.append(infini_attention_partial(q[:, :, i:], kt, vt, beta, mem, keep=keept, k_rot=krt, **kw))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out, AttnState(mem, kt, vt, keept, krt, buffer)
