"""What the model asks of the host inside its layer loop (nothing), and GQA with K/V handed to SDPA grouped.

Host syncs and host-to-device copies are counted on the meta device for the 8b shapes, where every tensor op
runs and none has data: a sync (``.item()``, ``bool()``, ``float()``) shows as ``aten._local_scalar_dense`` and
a copy from the host as an op reading a CPU tensor to make a meta one.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infinitrain.model.config import get_preset
from infinitrain.model.lm import InfiniLM
from infinitrain.ops import RotarySpec, infini_attention, infini_attention_stream
from infinitrain.ops import memory as memory_ops


class HostTraffic(TorchDispatchMode):
    """Records every host sync and every op that reads a CPU tensor into a device (non-CPU) tensor."""

    def __init__(self):
        super().__init__()
        self.syncs, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(str(func))
            return 0  # what a real device would have answered does not matter here: only that it was asked
        out = func(*args, **kwargs)
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        outs = torch.utils._pytree.tree_leaves(out)
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 for a in flat) and any(
                isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs):
            self.copies.append(str(func))
        return out


def _meta_model(name: str) -> InfiniLM:
    with torch.device("meta"):
        return InfiniLM(get_preset(name))


@pytest.mark.parametrize("name", ["8b", "8b-mod"])
@pytest.mark.parametrize("doc_inside", [False, True])
def test_a_training_window_of_the_8b_shape_never_waits_for_the_host(name, doc_inside):
    """One window (two 2K segments, packed documents, targets: the trainer's call) forward and backward: no sync
    and no host-to-device copy anywhere, with doc_inside given as the trainer gives it (from its host copy). The
    first window builds the per-device RoPE tables; the second must find them cached."""
    model = _meta_model(name)
    S = model.config.segment_len
    ids = torch.zeros(1, 2 * S, dtype=torch.long, device="meta")
    doc_start = torch.zeros(1, 2 * S, dtype=torch.bool, device="meta")
    kw = dict(doc_start=doc_start, targets=ids, loss_mask=doc_start, doc_inside=doc_inside)
    out = model(ids, **kw)  # warm-up: tables made once per device
    traffic = HostTraffic()
    with traffic:
        out = model(ids, out.state.detach(), **kw)
        (out.loss_sum + out.aux_loss).backward()
    assert traffic.syncs == [] and traffic.copies == []


def test_without_doc_inside_the_model_reads_it_once_per_call_not_per_layer():
    model = _meta_model("8b")
    S = model.config.segment_len
    ids = torch.zeros(1, S, dtype=torch.long, device="meta")
    traffic = HostTraffic()
    with traffic, torch.no_grad():
        model(ids, doc_start=torch.zeros(1, S, dtype=torch.bool, device="meta"))
    assert len(traffic.syncs) == 1  # 32 layers, one question


def test_decoding_a_token_of_the_8b_mod_shape_never_waits_for_the_host():
    """A decoded token through every layer (routed ones included) of the 8b-mod shape: no sync (the CPU-only
    shortcut for a token no row routes is not taken off the CPU) and no host-to-device copy."""
    model = _meta_model("8b-mod").eval()
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with torch.no_grad():
        state = model(ids).state
        model(ids[:, :1], state)  # warm-up at the next position
        traffic = HostTraffic()
        with traffic:
            model(ids[:, :1], model(ids[:, :1], state).state)
    assert traffic.syncs == [] and traffic.copies == []


def _gqa_inputs(dtype=torch.float32, T=32, G=2, H=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, H, T, 16, generator=g, dtype=dtype)
    k = torch.randn(2, G, T, 16, generator=g, dtype=dtype)
    v = torch.randn(2, G, T, 12, generator=g, dtype=dtype)
    return q, k, v, torch.randn(H, generator=g, dtype=dtype)


def _sdpa_kv_heads(monkeypatch) -> list[int]:
    """Spy on SDPA: query heads per key head of every call (the grouped path hands it R = H/G and ``enable_gqa``)."""
    heads, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        assert kw.get("enable_gqa", False) == (k.shape[1] < q.shape[1])
        heads.append(q.shape[1] // k.shape[1])
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(memory_ops.F, "scaled_dot_product_attention", spy)
    return heads


@pytest.mark.parametrize("docs", [None, "inside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kv_path_equals_the_expanding_path_in_training(docs, dtype, monkeypatch):
    """The two local-attention paths with 8 query heads on 2 KV heads, forward and backward, with and without the
    document mask: K/V handed to SDPA grouped (what CUDA's FlashAttention reads without copies; its unmasked
    layout (B·G·N, R, S, ·) is its own code) and expanded per query head (every other case) give the same outputs,
    states and gradients, bit for bit (dk, dv in bf16: within one rounding, the R heads' sum taken in another
    order)."""
    B, H, G, T, K, V = 2, 8, 2, 32, 16, 12
    q, k, v, beta = _gqa_inputs(dtype)
    doc_start = None
    if docs:
        doc_start = torch.zeros(B, T, dtype=torch.bool)
        doc_start[0, 5] = doc_start[1, 19] = True
    rot = RotarySpec(head_dim=K, rot_dim=8)
    grad = torch.randn(B, H, T, V, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run(grouped):
        monkeypatch.setattr(memory_ops, "grouped_sdpa", lambda q, masked: grouped)
        xs = [t.clone().requires_grad_(True) for t in (q, k, v, beta)]
        o, mem = infini_attention(*xs, segment_len=8, rotary=rot, doc_start=doc_start)
        o.backward(grad)
        return [o, *mem, *(x.grad for x in xs)]

    heads = _sdpa_kv_heads(monkeypatch)
    grouped = run(True)
    assert heads == [H // G]
    expanded = run(False)
    assert heads == [H // G, 1]
    for a, b in zip(grouped[:4], expanded[:4]):  # outputs, states, dq
        assert torch.equal(a, b)
    for a, b in zip(grouped[4:], expanded[4:]):  # dk, dv sum R heads' gradients: in bf16 the order shows
        ulp = 0 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(a, b, rtol=ulp, atol=ulp * float(b.abs().max()))


def test_grouped_kv_path_equals_the_expanding_path_in_decoding(monkeypatch):
    """Decoding one token at a time against the unfinished segment's cache (and a 3-token chunk, which takes a
    causal mask): the cache handed to SDPA grouped gives the same outputs as expanded per query head."""
    q, k, v, beta = _gqa_inputs(T=12)
    rot = RotarySpec(head_dim=16, rot_dim=16)

    def run(grouped):
        monkeypatch.setattr(memory_ops, "grouped_sdpa", lambda q, masked: grouped)
        state, outs = None, []
        for a, b in [(t, t + 1) for t in range(9)] + [(9, 12)]:
            o, state = infini_attention_stream(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], beta, state,
                                               segment_len=8, rotary=rot)
            outs.append(o)
        return torch.cat(outs, 2)

    heads = _sdpa_kv_heads(monkeypatch)
    with torch.no_grad():
        grouped = run(True)
        assert set(heads) == {4}
        assert torch.equal(grouped, run(False))
    assert set(heads) == {4, 1}


def test_sdpa_reads_grouped_heads_only_where_its_kernel_does():
    cpu = torch.zeros(1, 4, 8, 16)
    assert not memory_ops.grouped_sdpa(cpu, masked=False)  # torch's CPU kernel would expand K/V itself
    meta = torch.zeros(1, 4, 8, 16, device="meta")
    assert not memory_ops.grouped_sdpa(meta, masked=False)
