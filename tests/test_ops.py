"""Ops against their naive twins (outputs, final states, every gradient), plus the paper's invariants."""

from __future__ import annotations

import math
import random

import pytest
import torch

from infinitrain.ops import (
    MemoryState,
    RotarySpec,
    apply_rotary,
    apply_rotary_at,
    apply_rotary_naive,
    delta_update,
    infini_attention,
    infini_attention_naive,
    infini_attention_stream,
    linear_update,
    retrieve,
    rope_inv_freq,
    sigma,
    zero_memory,
)

F64 = torch.float64


def make_inputs(B=2, H=4, G=2, N=7, S=9, K=15, V=10, dtype=F64, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    T = N * S
    q = torch.randn(B, H, T, K, generator=g, dtype=dtype)
    k = torch.randn(B, G, T, K, generator=g, dtype=dtype)
    v = torch.randn(B, G, T, V, generator=g, dtype=dtype)
    beta = torch.randn(H, generator=g, dtype=dtype)
    mem = None
    if with_state:  # a plausible carried state: M from real writes, z positive
        mem = MemoryState(torch.randn(B, G, K, V, generator=g, dtype=dtype) * 3,
                          torch.rand(B, G, K, generator=g, dtype=dtype) * 20 + 1)
    return q, k, v, beta, mem


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_tau", [False, True])
def test_fast_equals_naive_outputs_states_and_gradients(update, heads, with_state, with_tau):
    H, G = heads
    q, k, v, beta, mem = make_inputs(H=H, G=G, with_state=with_state)
    rot = RotarySpec(head_dim=15, rot_dim=10)
    tau = torch.tensor([0.5, 2.0, 3.0, 1.3], dtype=F64)[:G]  # the memory temperatures, one per KV head
    leaves = [q, k, v, beta] + (list(mem) if mem is not None else []) + ([tau] if with_tau else [])
    names = ["q", "k", "v", "beta"] + (["M0", "z0"] if mem is not None else []) + (["tau"] if with_tau else [])

    def run(fn):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        m = MemoryState(*xs[4:6]) if mem is not None else None
        o, fin = fn(*xs[:4], m, segment_len=9, update=update, rotary=rot, tau=xs[-1] if with_tau else None)
        return xs, o, fin

    xs_f, o_f, fin_f = run(infini_attention)
    xs_n, o_n, fin_n = run(infini_attention_naive)
    torch.testing.assert_close(o_f, o_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin_f.M, fin_n.M, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(fin_f.z, fin_n.z, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)  # random upstream gradients for the output and the final state
    do, dM, dz = (torch.randn(t.shape, generator=g, dtype=F64) for t in (o_f, fin_f.M, fin_f.z))
    for xs, o, fin in ((xs_f, o_f, fin_f), (xs_n, o_n, fin_n)):
        ((o * do).sum() + (fin.M * dM).sum() + (fin.z * dz).sum()).backward()
    for name, a, b in zip(names, xs_f, xs_n):
        assert a.grad is not None and b.grad is not None, name
        assert a.grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rotary_from_the_segment_table_equals_rotary_by_position(dtype):
    """The training path rotates every segment from one cached (S, R) table: the same as rotating by the
    in-segment positions t % S, and as the loop twin."""
    from infinitrain.ops.rope import apply_rotary_segments

    x = torch.randn(2, 3, 4 * 9, 10, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for spec in (RotarySpec(head_dim=10, rot_dim=6, base=300.0), RotarySpec(head_dim=10, rot_dim=10, scale=4.0,
                                                                             original_len=4)):
        pos = torch.arange(36) % 9
        tol = 1e-12 if dtype == F64 else 1e-6
        got = apply_rotary_segments(x, 9, spec)
        torch.testing.assert_close(got, apply_rotary(x, pos, spec), rtol=tol, atol=tol)
        torch.testing.assert_close(got, apply_rotary_naive(x, pos, spec), rtol=tol, atol=tol)


def test_memory_tau_sharpens_the_read_and_one_is_the_paper():
    """τ = 1 is exactly the paper's σ; a larger τ moves the read toward the best-matching stored value."""
    q, k, v, beta, mem = make_inputs(H=2, G=2, N=2, S=8, K=6, V=5, with_state=False)
    base, _ = infini_attention(q, k, v, beta, segment_len=8)
    ones, _ = infini_attention(q, k, v, beta, segment_len=8, tau=torch.ones(2, dtype=F64))
    torch.testing.assert_close(ones, base, rtol=0, atol=0)
    # keys with one positive dim each (k_j = +1 on dim j, -1 elsewhere), the query positive on dim 2 only: as τ
    # grows, σ(τ·x) = e^{τx} → 0 on the negative entries, so the other keys' weight fades and the read → v_2
    sk = (2 * torch.eye(6, dtype=F64) - 1)[None, None]  # (1, 1, 6, 6)
    vs = torch.randn(1, 1, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    qq = sk[:, :, 2:3].clone()
    dist = []
    for t in (1.0, 4.0, 16.0):
        tt = torch.tensor([t], dtype=F64)
        m = linear_update(sigma(sk, tt), vs, zero_memory(1, 1, 6, 5, dtype=F64))
        dist.append(float((retrieve(sigma(qq, tt), m) - vs[:, :, 2:3]).norm()))
    assert dist[0] > dist[1] > dist[2] and dist[2] < 1e-3 * dist[0], dist


def test_first_segment_reads_zeros_never_nan():
    sq = sigma(torch.randn(2, 4, 5, 8))
    out = retrieve(sq, zero_memory(2, 4, 8, 6))
    assert torch.equal(out, torch.zeros(2, 4, 5, 6))


def test_gate_is_one_scalar_per_head_and_mixes_as_the_paper():
    q, k, v, _, _ = make_inputs(N=2, H=2, G=2)
    # β → +∞ reads only the memory: segment 1 (empty memory) outputs exactly zeros
    o_mem, _ = infini_attention(q, k, v, torch.full((2,), 60.0, dtype=F64), segment_len=9)
    assert o_mem[:, :, :9].abs().max() < 1e-20
    # β → -∞ is plain local causal attention
    o_dot, _ = infini_attention(q, k, v, torch.full((2,), -60.0, dtype=F64), segment_len=9)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], is_causal=True)
    torch.testing.assert_close(o_dot[:, :, 9:], ref)


def test_memory_is_fp32_under_bf16_and_output_keeps_dtype():
    q, k, v, beta, _ = make_inputs(dtype=torch.bfloat16, with_state=False)
    o, mem = infini_attention(q, k, v, beta, segment_len=9, update="delta")
    assert o.dtype == torch.bfloat16 and mem.M.dtype == torch.float32 and mem.z.dtype == torch.float32
    assert torch.isfinite(o.float()).all() and torch.isfinite(mem.M).all()
    o32, mem32 = infini_attention(q.float(), k.float(), v.float(), beta.float(), segment_len=9, update="delta")
    torch.testing.assert_close(mem.M, mem32.M)  # same fp32 memory math from the same bf16 values


def test_delta_rule_leaves_an_existing_binding_unchanged():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(1, 2, 6, 5, generator=g, dtype=F64)
    z = torch.rand(1, 2, 6, generator=g, dtype=F64) + 1
    sk = sigma(torch.randn(1, 2, 4, 6, generator=g, dtype=F64))
    known = (sk @ M) / (sk @ z[..., None] + 1e-6)
    new = delta_update(sk, known, MemoryState(M, z))
    torch.testing.assert_close(new.M, M)
    torch.testing.assert_close(new.z, z + sk.sum(-2))
    lin = linear_update(sk, known, MemoryState(M, z))
    assert (lin.M - M).abs().max() > 1e-3  # the linear rule writes it again


def test_retrieval_before_update():
    """Segment s must read M_{s-1}: changing segment s's own keys/values cannot change its memory read."""
    q, k, v, _, _ = make_inputs(N=2, H=2, G=2)
    beta = torch.full((2,), 60.0, dtype=F64)  # memory read only
    o1, _ = infini_attention(q, k, v, beta, segment_len=9)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:] += 1.0
    v2[:, :, 9:] -= 2.0
    o2, _ = infini_attention(q, k2, v2, beta, segment_len=9)
    torch.testing.assert_close(o1, o2)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("tau", [None, (0.7, 2.5)])
def test_stream_in_random_chunks_equals_one_call(update, tau):
    q, k, v, beta, mem = make_inputs(N=5, S=9, H=4, G=2)
    tau = None if tau is None else torch.tensor(tau, dtype=F64)
    T = q.shape[2] - 4  # ends inside a segment
    full, st_full = infini_attention_stream(q[:, :, :T], k[:, :, :T], v[:, :, :T], beta, None, segment_len=9,
                                            update=update, rotary=RotarySpec(head_dim=15, rot_dim=14), tau=tau)
    naive, _ = infini_attention_naive(q[:, :, :T], k[:, :, :T], v[:, :, :T], beta, None, segment_len=9,
                                      update=update, rotary=RotarySpec(head_dim=15, rot_dim=14), tau=tau)
    torch.testing.assert_close(full, naive, rtol=1e-10, atol=1e-10)  # the unfinished segment's partial path too
    rng = random.Random(0)
    for sizes in ([1] * T, None):
        st, outs, i = None, [], 0
        while i < T:
            c = min(T - i, 1 if sizes else rng.randint(1, 20))
            o, st = infini_attention_stream(q[:, :, i:i + c], k[:, :, i:i + c], v[:, :, i:i + c], beta, st,
                                            segment_len=9, update=update,
                                            rotary=RotarySpec(head_dim=15, rot_dim=14), tau=tau)
            outs.append(o)
            i += c
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st.mem.M, st_full.mem.M)
        torch.testing.assert_close(st.k, st_full.k)



def test_stream_without_the_rotated_key_cache_is_the_same():
    """The state's k_rot is only a cache: a state stripped of it (rebuilt by rotating k) continues identically,
    and the cache equals the held keys rotated at positions 0..P-1 by the loop twin."""
    q, k, v, beta, _ = make_inputs(N=3, S=8, H=4, G=2)
    spec = RotarySpec(head_dim=15, rot_dim=12, scale=2.0, original_len=4)
    kw = dict(segment_len=8, rotary=spec)
    st_a = st_b = None
    for i in range(20):
        o_a, st_a = infini_attention_stream(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], beta, st_a, **kw)
        o_b, st_b = infini_attention_stream(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], beta,
                                            None if st_b is None else st_b._replace(k_rot=None), **kw)
        torch.testing.assert_close(o_a, o_b, rtol=1e-12, atol=1e-12)
        P = st_a.k.shape[2]
        if P:  # at a segment boundary nothing is held (k_rot None)
            torch.testing.assert_close(st_a.k_rot, apply_rotary_naive(st_a.k, torch.arange(P), spec))
    assert st_a.k.shape[2] == 4



def test_stream_buffer_grows_in_place_and_a_forked_stream_stays_exact():
    """Without autograd the segment's keys/values grow in place in a SegmentBuffer; two streams continued from one
    state, token by token in turn, each equal the concatenating path (autograd on), its naive twin."""
    q, k, v, beta, _ = make_inputs(N=3, S=8, H=4, G=2)
    streams = {"a": (q, k, v), "b": tuple(x.flip(2) for x in (q, k, v))}
    kw = dict(segment_len=8, rotary=RotarySpec(head_dim=15, rot_dim=14), update="delta")

    def step(st, i, src):
        return infini_attention_stream(*(x[:, :, i:i + 1] for x in src), beta, st, **kw)

    ref, outs, st0 = {}, {}, None
    for i in range(11):  # a shared prefix inside the second segment
        _, st0 = step(st0, i, streams["a"])
    for name, src in streams.items():  # autograd on: every append concatenates
        st, ref[name] = st0, []
        for i in range(11, 22):
            o, st = step(st, i, src)
            ref[name].append(o)
    with torch.no_grad():
        st = None
        for i in range(11):
            _, st = step(st, i, streams["a"])
        assert st.buffer is not None and st.buffer.filled == 3
        states = dict.fromkeys(streams, st)
        outs = {name: [] for name in streams}
        for i in range(11, 22):  # in turn: "b" finds the buffer already extended past its prefix and copies
            for name, src in streams.items():
                o, states[name] = step(states[name], i, src)
                outs[name].append(o)
    for name in streams:
        torch.testing.assert_close(torch.cat(outs[name], 2), torch.cat(ref[name], 2), rtol=1e-12, atol=1e-12)
    assert states["a"].buffer is not states["b"].buffer

def test_cached_rope_table_equals_apply_rotary():
    for spec in (RotarySpec(head_dim=16, rot_dim=16), RotarySpec(head_dim=16, rot_dim=10, scale=4.0, original_len=8)):
        x = torch.randn(2, 3, 5, 16, dtype=F64)
        for start in (0, 3, 11):
            want = apply_rotary_naive(x, torch.arange(start, start + 5), spec)
            torch.testing.assert_close(apply_rotary_at(x, start, spec, 16), want)
            torch.testing.assert_close(apply_rotary(x, torch.arange(start, start + 5), spec), want)
        with torch.inference_mode():  # a table first built in inference mode still serves autograd later
            apply_rotary_at(x.float(), 0, spec, 32)
        xg = x.float().requires_grad_()
        apply_rotary_at(xg, 2, spec, 32).sum().backward()
        assert xg.grad is not None

def test_keep_mask_equals_dropping_the_tokens():
    """A token masked by keep is invisible: same outputs for kept tokens as deleting it from every segment."""
    q, k, v, beta, _ = make_inputs(N=3, S=8, H=2, G=2, with_state=False)
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[:, 2::4] = False  # two tokens of each segment of 8 dropped, same in both rows
    o, mem = infini_attention(q, k, v, beta, segment_len=8, keep=keep, update="delta")
    idx = keep[0].nonzero().squeeze(1)
    pos = (idx % 8).expand(2, -1)
    o2, mem2 = infini_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], beta, segment_len=6, pos=pos,
                                update="delta")
    torch.testing.assert_close(o[:, :, idx], o2)
    torch.testing.assert_close(mem.M, mem2.M)


# --- positional embeddings ----------------------------------------------------------------------


def test_rope_rotates_and_matches_its_loop_twin():
    spec = RotarySpec(head_dim=8, rot_dim=8, base=10000.0)
    x = torch.randn(1, 2, 6, 8, dtype=F64)
    pos = torch.arange(6)
    y = apply_rotary(x, pos, spec)
    torch.testing.assert_close(y, apply_rotary_naive(x, pos, spec))
    # norms preserved, position 0 untouched, position 1 rotates the first pair by exactly 1 radian
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    assert rope_inv_freq(spec)[0] == 1.0
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(y[..., 1, 0], x[..., 1, 0] * c - x[..., 1, 4] * s)
    # every pair actually rotates by a non-negligible angle over 2048 positions (the seed's does not)
    assert (rope_inv_freq(spec) * 2048 > 0.1).all()


def test_rope_scores_depend_on_relative_position_only():
    spec = RotarySpec(head_dim=16, rot_dim=16)
    q, k = torch.randn(16, dtype=F64), torch.randn(16, dtype=F64)

    def score(i, j):
        qi = apply_rotary(q.view(1, 1, 1, 16), torch.tensor([i]), spec)
        kj = apply_rotary(k.view(1, 1, 1, 16), torch.tensor([j]), spec)
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert (score(7, 3) - score(7, 6)).abs() > 1e-6


def test_partial_rotation_leaves_the_rest():
    spec = RotarySpec(head_dim=16, rot_dim=8)
    x = torch.randn(1, 1, 5, 16, dtype=F64)
    y = apply_rotary(x, torch.arange(5), spec)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y, apply_rotary_naive(x, torch.arange(5), spec))


def test_yarn_scale_one_equals_rope():
    x = torch.randn(2, 3, 11, 16, dtype=F64)
    pos = torch.arange(11)
    rope = RotarySpec(head_dim=16, rot_dim=16, base=500000.0)
    yarn = RotarySpec(head_dim=16, rot_dim=16, base=500000.0, scale=1.0, original_len=4096)
    torch.testing.assert_close(apply_rotary(x, pos, yarn), apply_rotary(x, pos, rope))


def test_yarn_by_parts_and_temperature():
    s = 16.0
    rope = RotarySpec(head_dim=64, rot_dim=64)
    yarn = RotarySpec(head_dim=64, rot_dim=64, scale=s, original_len=2048, alpha=1.0, beta=32.0)
    f0, f1 = rope_inv_freq(rope).double(), rope_inv_freq(yarn).double()
    rotations = 2048 * f0 / (2 * math.pi)  # r(d) = L / λ_d
    hi, lo = rotations > 32, rotations < 1
    assert hi.any() and lo.any() and (~hi & ~lo).any()
    torch.testing.assert_close(f1[hi], f0[hi], rtol=1e-6, atol=0)  # high frequencies untouched
    torch.testing.assert_close(f1[lo], f0[lo] / s, rtol=1e-6, atol=0)  # low frequencies interpolated by s
    mid = ~hi & ~lo
    assert ((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / s)).all()
    # temperature: sqrt(1/t) = 0.1 ln s + 1 multiplies q and k, angles unchanged at position 0
    x = torch.randn(1, 1, 1, 64, dtype=F64)
    y = apply_rotary(x, torch.tensor([0]), yarn)
    torch.testing.assert_close(y, x * (0.1 * math.log(s) + 1))


def test_rotary_spec_validation():
    with pytest.raises(ValueError):
        RotarySpec(head_dim=8, rot_dim=7)
    with pytest.raises(ValueError):
        RotarySpec(head_dim=8, rot_dim=8, scale=0.5)


# --- packed documents -----------------------------------------------------------------------------


def doc_starts(B, T, positions):
    ds = torch.zeros(B, T, dtype=torch.bool)
    for b, ps in enumerate(positions):
        ds[b, ps] = True
    return ds


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_documents_fast_equals_naive_with_gradients(update):
    q, k, v, beta, mem = make_inputs(H=4, G=2, N=7, S=9)
    # row 0: starts mid-segment, two in one segment, one exactly on a boundary; row 1: one at t=0
    ds = doc_starts(2, 63, [[5, 13, 16, 27, 50], [0, 40]])
    keep = torch.rand(2, 63, generator=torch.Generator().manual_seed(4)) > 0.2
    rot = RotarySpec(head_dim=15, rot_dim=8)
    for kp in (None, keep):
        leaves = [q, k, v, beta, *mem]
        res = []
        for fn in (infini_attention, infini_attention_naive):
            xs = [t.clone().requires_grad_(True) for t in leaves]
            o, fin = fn(*xs[:4], MemoryState(*xs[4:]), segment_len=9, update=update, rotary=rot, keep=kp,
                        doc_start=ds)
            g = torch.Generator().manual_seed(1)
            loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in (o, fin.M, fin.z))
            loss.backward()
            res.append((o, fin, [x.grad for x in xs]))
        (o1, f1, g1), (o2, f2, g2) = res
        torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f1.M, f2.M, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(f1.z, f2.z, rtol=1e-10, atol=1e-9)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_packed_document_equals_the_document_alone(update):
    """A document packed after another (starting mid-segment) gets exactly the outputs and final memory
    it gets alone from an empty state, with the same segment grid (its first segment shortened)."""
    q, k, v, beta, mem = make_inputs(H=2, G=2, N=6, S=8, with_state=True)
    p = 21  # docB starts at offset 5 of segment 2
    ds = doc_starts(2, 48, [[p], [p]])
    o, fin = infini_attention(q, k, v, beta, mem, segment_len=8, update=update, doc_start=ds,
                              rotary=RotarySpec(head_dim=15, rot_dim=10))
    start = p // 8 * 8
    keep = torch.ones(2, 48 - start, dtype=torch.bool)
    keep[:, : p - start] = False  # the other document's tokens of that segment, invisible
    sl = slice(start, None)
    o_alone, fin_alone = infini_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta, None, segment_len=8,
                                          update=update, keep=keep, rotary=RotarySpec(head_dim=15, rot_dim=10))
    torch.testing.assert_close(o[:, :, p:], o_alone[:, :, p - start:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin.M, fin_alone.M)
    # and the first document is unaffected by the second (causality), equal to a call that stops early
    o_first, _ = infini_attention(q[:, :, :24], k[:, :, :24], v[:, :, :24], beta, mem, segment_len=8,
                                  update=update, rotary=RotarySpec(head_dim=15, rot_dim=10))
    torch.testing.assert_close(o[:, :, :p], o_first[:, :, :p])


def test_doc_start_needs_segment_aligned_stream_calls():
    q, k, v, beta, _ = make_inputs(N=2, S=8, H=2, G=2, with_state=False)
    with pytest.raises(ValueError, match="segment-aligned"):
        infini_attention_stream(q[:, :, :10], k[:, :, :10], v[:, :, :10], beta, segment_len=8,
                                doc_start=torch.zeros(2, 10, dtype=torch.bool))


def test_local_attention_fused_path_equals_the_masked_path():
    """Local attention's two SDPA layouts agree (outputs and gradients): segments as heads with is_causal (no
    mask) and segments as batch rows with a boolean mask that allows the same keys, in float64 (math kernel) and
    fp32 (fused kernels). A window whose documents start on segment boundaries only takes the first and keeps no
    S×S tensor for backward (the fused kernel's log-sum-exp, not the math kernel's probabilities); a start
    inside a segment takes the second, which keeps only the (B·N, 1, S, S) mask. Both equal the naive twin."""
    from infinitrain.ops.memory import _local_attention_blocks

    same_doc = torch.zeros(2, 24, dtype=torch.long)  # one document: the mask allows exactly the causal keys
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        q, k, v, beta, mem = make_inputs(H=4, G=2, N=3, S=8, K=16, V=16, dtype=dtype)
        res = []
        for doc in (None, same_doc):
            xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            o = _local_attention_blocks(*xs, 8, doc=doc)
            o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=dtype))
            res.append((o, [x.grad for x in xs]))
        torch.testing.assert_close(res[0][0], res[1][0], rtol=tol, atol=tol)
        for a, b in zip(res[0][1], res[1][1]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    def saved_shapes(ds):
        shapes = []
        x = q.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            infini_attention(x, k, v, beta, mem, segment_len=8, doc_start=ds)
        return shapes

    on_boundaries = doc_starts(2, 24, [[0, 8], [16]])
    inside = doc_starts(2, 24, [[0, 8], [19]])
    assert not any(s[-2:] == (8, 8) for s in saved_shapes(on_boundaries))  # fp32 here: fused kernel
    assert [s for s in saved_shapes(inside) if s[-2:] == (8, 8)] == [(6, 1, 8, 8)]
    q, k, v, beta, mem = make_inputs(H=4, G=2, N=3, S=8, K=16, V=16)
    for ds in (on_boundaries, inside):
        o1, f1 = infini_attention(q, k, v, beta, mem, segment_len=8, doc_start=ds)
        o2, f2 = infini_attention_naive(q, k, v, beta, mem, segment_len=8, doc_start=ds)
        torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f1.M, f2.M, rtol=1e-10, atol=1e-9)
