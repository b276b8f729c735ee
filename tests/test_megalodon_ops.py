"""MEGALODON ops against their naive twins (outputs, carried states, every gradient), streaming, causality,
documents."""

from __future__ import annotations

import random

import pytest
import torch

from infinitrain.ops.cema import cema, cema_naive
from infinitrain.ops.chunk_attention import ChunkCache, normalized_attention, normalized_attention_naive
from infinitrain.ops.rope import RotarySpec
from infinitrain.ops.timestep_norm import NormState, timestep_norm, timestep_norm_naive

F64 = torch.float64


def cema_leaves(B=2, T=37, D=5, E=3, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    params = [torch.randn(D, E, generator=g, dtype=F64), torch.randn(D, E, generator=g, dtype=F64),
              torch.randn(D, generator=g, dtype=F64), torch.randn(D, E, generator=g, dtype=F64),
              torch.randn(D, E, 2, generator=g, dtype=F64)]  # alpha, delta, omega, beta, eta
    h0 = torch.randn(B, D, E, generator=g, dtype=torch.complex128) if with_state else None
    return x, params, h0


def doc_starts(B, T, seed=3, p=0.08):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) < p


def assert_grads_match(leaves_f, leaves_n, names, reached=None):
    for name, a, b in zip(names, leaves_f, leaves_n):
        assert a.grad is not None and b.grad is not None, name
        assert a.grad.abs().sum() > 0 or name not in (reached or names), f"no gradient reaches {name}"
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def run_cema(fn, x, params, h0, **kw):
    xs = [t.clone().requires_grad_(True) for t in [x, *params] + ([h0] if h0 is not None else [])]
    y, h = fn(xs[0], *xs[1:6], xs[6] if h0 is not None else None, **kw)
    return xs, y, h


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("block", [1, 8, 64])
def test_cema_fast_equals_naive_outputs_state_and_gradients(with_state, docs, block):
    x, params, h0 = cema_leaves(with_state=with_state)
    ds = doc_starts(2, 37) if docs else None
    if docs:
        ds[0, :9] = False  # row 0 reads the carried state until its start at 9 (inside a block);
        ds[0, 9] = ds[1, 0] = True  # row 1 starts a document at the call's first token
    xs_f, y_f, h_f = run_cema(cema, x, params, h0, doc_start=ds, block=block)
    xs_n, y_n, h_n = run_cema(cema_naive, x, params, h0, doc_start=ds)
    torch.testing.assert_close(y_f, y_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_f, h_n, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y_f.shape, generator=g, dtype=F64)
    dh = torch.randn(h_f.shape, generator=g, dtype=torch.complex128)
    for y, h in ((y_f, h_f), (y_n, h_n)):
        ((y * dy).sum() + (h * dh.conj()).real.sum()).backward()
    assert_grads_match(xs_f, xs_n, ["x", "alpha", "delta", "omega", "beta", "eta", "h0"])


def split_points(T, rng):
    cuts, i = [], 0
    while i < T:
        n = rng.choice([1, 1, 2, 3, 5, 7, 13])
        cuts.append((i, min(T, i + n)))
        i += n
    return cuts


def test_cema_streaming_any_chunking_equals_one_call():
    x, params, h0 = cema_leaves(T=53)
    y, h = cema(x, *params, h0, block=8)
    rng = random.Random(0)
    ys, hc = [], h0
    for a, b in split_points(53, rng):
        o, hc = cema(x[:, a:b], *params, hc, block=8)
        ys.append(o)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hc, h, rtol=1e-10, atol=1e-10)


def test_cema_causal_by_gradient_across_blocks():
    x, params, _ = cema_leaves(B=1, T=40)
    x.requires_grad_(True)
    y, _ = cema(x, *params, block=8)
    t = 21  # inside the third block
    y[0, t].sum().backward()
    assert x.grad[0, t + 1:].abs().max() == 0
    assert x.grad[0, :8].abs().min() > 0  # an earlier block reaches it through the carried state


def test_cema_document_equals_the_document_alone():
    x, params, h0 = cema_leaves(B=1, T=30)
    ds = torch.zeros(1, 30, dtype=torch.bool)
    ds[0, 11] = True
    y, h = cema(x, *params, h0, doc_start=ds, block=8)
    y_alone, h_alone = cema(x[:, 11:], *params, None, block=8)
    torch.testing.assert_close(y[:, 11:], y_alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_alone, rtol=1e-10, atol=1e-10)


def test_cema_fp32_close_to_fp64():
    x, params, h0 = cema_leaves(T=300, D=4, E=16)
    y64, _ = cema(x, *params, h0)
    y32, h32 = cema(x.float(), *(p.float() for p in params), h0.to(torch.complex64))
    assert y32.dtype == torch.float32 and h32.dtype == torch.complex64
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


# --- timestep norm -----------------------------------------------------------------------------


def norm_leaves(B=2, T=29, D=12, G=3, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=F64) * 2 + 1
    w = torch.randn(D, generator=g, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    state = None
    if with_state:
        state = NormState(torch.tensor([5, 0]), torch.randn(B, G, generator=g, dtype=F64),
                          torch.rand(B, G, generator=g, dtype=F64) + 0.5)
    return x, w, b, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_timestep_norm_fast_equals_naive_outputs_state_and_gradients(with_state, docs):
    x, w, b, state = norm_leaves(with_state=with_state)
    ds = doc_starts(2, 29, p=0.15) if docs else None
    names = ["x", "w", "b"] + (["mean0", "var0"] if with_state else [])

    def run(fn):
        xs = [t.clone().requires_grad_(True) for t in [x, w, b] + ([state.mean, state.var] if with_state else [])]
        st = NormState(state.count, xs[3], xs[4]) if with_state else None
        y, fin = fn(xs[0], xs[1], xs[2], st, groups=3, doc_start=ds)
        return xs, y, fin

    xs_f, y_f, s_f = run(timestep_norm)
    xs_n, y_n, s_n = run(timestep_norm_naive)
    torch.testing.assert_close(y_f, y_n, rtol=1e-10, atol=1e-10)
    assert torch.equal(s_f.count, s_n.count)
    torch.testing.assert_close(s_f.mean, s_n.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_f.var, s_n.var, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    dy, dm, dv = (torch.randn(t.shape, generator=g, dtype=F64) for t in (y_f, s_f.mean, s_f.var))
    for y, s in ((y_f, s_f), (y_n, s_n)):
        ((y * dy).sum() + (s.mean * dm).sum() + (s.var * dv).sum()).backward()
    assert_grads_match(xs_f, xs_n, names, reached=names[:3] if docs else names)  # a restart may cut the prior


def test_timestep_norm_statistics_are_the_whole_prefix():
    """At the last token the statistics are the plain mean and variance of every element of the group so far."""
    x, w, b, _ = norm_leaves(B=1, T=17, D=8, G=2, with_state=False)
    _, st = timestep_norm(x, w, b, groups=2)
    grouped = x.view(1, 17, 2, 4).transpose(1, 2).reshape(1, 2, -1)
    torch.testing.assert_close(st.mean, grouped.mean(-1))
    torch.testing.assert_close(st.var, grouped.var(-1, unbiased=False))
    assert int(st.count) == 17


def test_timestep_norm_streaming_and_causality():
    x, w, b, state = norm_leaves(T=41)
    y, fin = timestep_norm(x, w, b, state, groups=3)
    ys, st = [], state
    for a, c in split_points(41, random.Random(1)):
        o, st = timestep_norm(x[:, a:c], w, b, st, groups=3)
        ys.append(o)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.var, fin.var, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    timestep_norm(xg, w, b, state, groups=3)[0][0, 20].sum().backward()
    assert xg.grad[0, 21:].abs().max() == 0 and xg.grad[0, :20].abs().min() > 0


# --- normalised chunked attention ------------------------------------------------------------------


def attn_leaves(B=2, T=31, H=3, Z=6, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H, Z, generator=g, dtype=F64)
    v = torch.randn(B, H, T, V, generator=g, dtype=F64)
    aff = [torch.randn(H, Z, generator=g, dtype=F64) * 0.5 for _ in range(4)]  # kappa_q, mu_q, kappa_k, mu_k
    return z, v, aff


ROT = RotarySpec(head_dim=6, rot_dim=4, base=100.0)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("chunk", [2, 7, 40])
def test_normalized_attention_fast_equals_naive_with_gradients(docs, chunk):
    z, v, aff = attn_leaves()
    ds = doc_starts(2, 31, p=0.15) if docs else None

    def run(fn):
        xs = [t.clone().requires_grad_(True) for t in [z, v, *aff]]
        o, c = fn(*xs, chunk=chunk, rotary=ROT, doc_start=ds)
        return xs, o, c

    xs_f, o_f, c_f = run(normalized_attention)
    xs_n, o_n, c_n = run(normalized_attention_naive)
    torch.testing.assert_close(o_f, o_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c_f.k, c_n.k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c_f.v, c_n.v, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(2)
    do = torch.randn(o_f.shape, generator=g, dtype=F64)
    dk = torch.randn(c_f.k.shape, generator=g, dtype=F64)
    for o, c in ((o_f, c_f), (o_n, c_n)):
        ((o * do).sum() + (c.k * dk).sum()).backward()
    assert_grads_match(xs_f, xs_n, ["z", "v", "kappa_q", "mu_q", "kappa_k", "mu_k"])


def test_normalized_attention_streaming_any_chunking_equals_one_call():
    z, v, aff = attn_leaves(T=47)
    o, c = normalized_attention(z, v, *aff, chunk=8, rotary=ROT)
    outs, cache = [], None
    for a, b in split_points(47, random.Random(2)):
        oi, cache = normalized_attention(z[:, a:b], v[:, :, a:b], *aff, cache, chunk=8, rotary=ROT)
        outs.append(oi)
    torch.testing.assert_close(torch.cat(outs, 2), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache.k, c.k, rtol=1e-10, atol=1e-10)
    assert cache.k.shape[2] == 47 % 8


def test_normalized_attention_is_causal_and_chunk_local():
    z, v, aff = attn_leaves(B=1, T=24)
    z.requires_grad_(True)
    o, _ = normalized_attention(z, v, *aff, chunk=8, rotary=ROT)
    o[0, :, 13].sum().backward()
    assert z.grad[0, 14:].abs().max() == 0  # the future
    assert z.grad[0, :8].abs().max() == 0  # an earlier chunk: attention never crosses a boundary
    assert z.grad[0, 8:14].abs().min() > 0


def test_normalized_attention_has_no_sqrt_scaling():
    z, v, aff = attn_leaves(B=1, T=4, H=1)
    o1, _ = normalized_attention(z, v, *aff, chunk=4)
    k2 = [aff[0] * 2, aff[1] * 2, aff[2], aff[3]]  # doubling q doubles the logits
    o2, _ = normalized_attention(z, v, *k2, chunk=4)
    zn = z / z.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    q, k = (aff[0] * zn + aff[1])[0, :, 0], (aff[2] * zn + aff[3])[0, :, 0]  # (T, Z)
    p = torch.softmax((2 * q @ k.T).masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf")), -1)
    torch.testing.assert_close(o2[0, 0], p @ v[0, 0])
    assert not torch.allclose(o1, o2)


def test_chunk_cache_detach_keeps_values():
    z, v, aff = attn_leaves(T=5)
    _, c = normalized_attention(z.requires_grad_(True), v, *aff, chunk=8)
    d = c.detach()
    assert isinstance(d, ChunkCache) and not d.k.requires_grad and torch.equal(d.k, c.k)
