"""The op, model and generation parity tests on the device named by INFINITRAIN_TEST_DEVICE (default cpu), in fp32
and bf16 against float64 references computed on the CPU. ``python -m infinitrain.check`` runs them on CUDA.

Tolerances (stated here once, printed by the check): fp32 with TF32 off, 1e-4 relative and absolute on outputs,
states and gradients (fp32 rounding through a few dozen chained ops; the CPU meets 1e-6); bf16, 4e-2 relative to
each tensor's largest value (bf16 keeps 8 bits, the memory itself runs in fp32); model logits 1e-4 (fp32) and
5e-2 (bf16) of their largest value; generation: exact token equality (fp32, greedy).
"""

from __future__ import annotations

import os

import pytest
import torch

from infinitrain.model import InfiniLM, ModelConfig
from infinitrain.ops import MemoryState, RotarySpec, infini_attention, infini_attention_naive, infini_attention_stream

DEVICE = torch.device(os.environ.get("INFINITRAIN_TEST_DEVICE", "cpu"))
F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "bf16": 4e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: TF32 matmuls (10-bit mantissa) would need bf16-like tolerances."""
    if DEVICE.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, what: str) -> None:
    """actual (device, dtype) against expected (CPU float64), within the dtype's stated tolerance."""
    a, e = actual.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    tol = TOL[dtype]
    scale = 1.0 if dtype == "fp32" else float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what} ({dtype} on {DEVICE}): {m}")


def inputs(H=4, G=2, N=4, S=16, K=16, V=12, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = N * S
    xs = [torch.randn(B, H, T, K, generator=g), torch.randn(B, G, T, K, generator=g),
          torch.randn(B, G, T, V, generator=g), torch.randn(H, generator=g)]
    mem = MemoryState(torch.randn(B, G, K, V, generator=g) * 3, torch.rand(B, G, K, generator=g) * 20 + 1)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, S + 5] = doc_start[1, 2 * S] = True  # one start inside a segment, one on a boundary
    return xs, mem, doc_start


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_infini_attention_on_device_equals_the_float64_naive_twin(dtype, update, docs):
    """Outputs, final states and the gradients of q, k, v, β, M0, z0 and τ under random upstream gradients."""
    xs, mem, doc_start = inputs()
    tau = torch.tensor([0.7, 1.6])
    rot = RotarySpec(head_dim=16, rot_dim=8, base=500.0)
    leaves = xs + list(mem) + [tau]
    # the naive reference reads the same values the device reads: the inputs rounded to dtype, then widened
    rounded = [t.to(DTYPES[dtype]) for t in leaves[:4]] + leaves[4:]
    kw = dict(segment_len=16, update=update, rotary=rot, doc_start=doc_start if docs else None)

    def run(fn, tensors, device):
        ts = [t.to(device).detach().requires_grad_(True) for t in tensors]
        o, fin = fn(*ts[:4], MemoryState(ts[4], ts[5]), tau=ts[6],
                    **{**kw, "doc_start": None if kw["doc_start"] is None else kw["doc_start"].to(device)})
        return ts, o, fin

    ts_d, o_d, fin_d = run(infini_attention, rounded, DEVICE)
    ts_n, o_n, fin_n = run(infini_attention_naive, [t.to(F64) for t in rounded], "cpu")
    close(o_d, o_n, dtype, "output")
    close(fin_d.M, fin_n.M, dtype, "M")
    close(fin_d.z, fin_n.z, dtype, "z")
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=g, dtype=F64) for t in (o_n, fin_n.M, fin_n.z)]
    for o, fin in ((o_d, fin_d), (o_n, fin_n)):
        sum((x.double() * u.to(x.device)).sum() for x, u in zip((o, fin.M, fin.z), ups)).backward()
    for name, a, b in zip(["q", "k", "v", "beta", "M0", "z0", "tau"], ts_d, ts_n):
        close(a.grad, b.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_streaming_on_device_in_chunks_equals_one_call(dtype):
    """Chunks of 1, 7, 16 and 23 tokens with the state carried equal one call over the stream (GQA, RoPE)."""
    xs, _, _ = inputs(N=3)
    q, k, v, beta = (t.to(DEVICE, DTYPES[dtype]) for t in xs)
    rot = RotarySpec(head_dim=16, rot_dim=16)
    with torch.no_grad():
        whole, _ = infini_attention_stream(q, k, v, beta, segment_len=16, rotary=rot, update="delta")
        state, outs, a = None, [], 0
        for n in (1, 7, 16, 23, 1):
            o, state = infini_attention_stream(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], beta, state,
                                               segment_len=16, rotary=rot, update="delta")
            outs.append(o)
            a += n
    close(torch.cat(outs, 2), whole.double(), dtype, "chunked stream")


def tiny_model(**kw) -> InfiniLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, segment_len=16,
                      **kw)
    model = InfiniLM(cfg).eval()
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.linspace(-2, 2, p.numel()))
    return model


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kw", [dict(update="delta"), dict(mod_every=2, mod_capacity=0.5)], ids=["delta", "mod"])
def test_model_on_device_streams_token_by_token_as_the_cpu_float64_model(dtype, kw):
    """Logits of a 53-token stream fed one token at a time on the device equal the float64 CPU model's one call."""
    model = tiny_model(**kw)
    ids = torch.randint(0, 97, (2, 53), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.to(F64)(ids).logits
        dev = model.to(DEVICE, DTYPES[dtype])
        state, outs = None, []
        for t in range(ids.shape[1]):
            out = dev(ids[:, t:t + 1].to(DEVICE), state)
            outs.append(out.logits)
            state = out.state
    got = torch.cat(outs, 1)
    tol = 1e-4 if dtype == "fp32" else 5e-2
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.to("cpu", F64), ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["fp32"])
def test_generation_on_device_greedy_batched_and_seeded(dtype):
    """Greedy generation on the device equals the CPU's; ragged prompts batched equal one by one; sampling with a
    seeded generator on the device repeats itself."""
    model = tiny_model(update="delta")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 40, 17)]
    cpu = model.generate(prompts, max_new_tokens=10, temperature=0)
    dev = model.to(DEVICE)
    assert dev.generate(prompts, max_new_tokens=10, temperature=0) == cpu
    assert [dev.generate([p], max_new_tokens=10, temperature=0)[0] for p in prompts] == cpu

    def sample(seed):
        return dev.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                            generator=torch.Generator(device=DEVICE).manual_seed(seed))

    assert sample(5) == sample(5) and sample(5) != sample(6)
