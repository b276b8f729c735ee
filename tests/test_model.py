"""InfiniLM invariants: streaming equals one call, causality by gradient, Mixture-of-Depths routing, presets,
configs."""

from __future__ import annotations

import random

import pytest
import torch

from infinitrain.errors import ConfigError
from infinitrain.model import ACTIVATIONS, MLP, PRESETS, InfiniLM, ModelConfig, count_parameters
from infinitrain.model.layers import MoDBlock

BASE = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=80, segment_len=16,
            gate_init=0.5)
CONFIGS = {
    "linear": dict(update="linear"),
    "delta": dict(update="delta"),
    "gqa": dict(update="linear", n_kv_heads=2),
    "gqa-delta-yarn": dict(update="delta", n_kv_heads=1, pos_emb="yarn", yarn_scale=4.0, yarn_original_len=8),
    "mod": dict(update="linear", n_kv_heads=2, mod_every=2, mod_capacity=0.25),
    "mod-delta": dict(update="delta", mod_every=1, mod_capacity=0.5),
    "tau": dict(update="delta", n_kv_heads=2, memory_tau=2.0, mod_every=2, mod_capacity=0.5),  # learned τ, MoD
    "shift": dict(update="delta", n_kv_heads=2, memory_tau=2.0, token_shift=True),  # keys/values see the token before
}


def build(name: str, seed: int = 0, **kw) -> InfiniLM:
    torch.manual_seed(seed)
    model = InfiniLM(ModelConfig(**{**BASE, **CONFIGS[name], **kw}))
    with torch.no_grad():  # spread the gates so memory and local attention both matter per head
        for p in model.gate_parameters():
            p.copy_(torch.linspace(-1.5, 1.5, p.numel()))
        for p in model.tau_parameters():  # and the memory temperatures, so each KV head has its own
            p.copy_(torch.linspace(-0.5, 1.5, p.numel()))
        for n, p in model.named_parameters():  # and the token shift's mix (0 at init: no shift at all)
            if n.endswith(("shift_k", "shift_v")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def stream(model: InfiniLM, ids: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, object]:
    state, outs, i = None, [], 0
    for c in sizes:
        out = model(ids[:, i:i + c], state)
        outs.append(out.logits)
        state = out.state
        i += c
    assert i == ids.shape[1]
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_in_random_chunks_equals_one_call(name):
    model = build(name)
    T = 56  # 3.5 segments of 16
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        rng = random.Random(name)
        chunkings = [[1] * T, [], [16, 16, 16, 8], [5, 11, 1, 30, 9]]
        while sum(chunkings[1]) < T:
            chunkings[1].append(min(T - sum(chunkings[1]), rng.randint(1, 23)))
        for sizes in chunkings:
            logits, state = stream(model, ids, sizes)
            torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{sizes}: {m}")
            for a, b in zip(state.layers, full.state.layers):
                torch.testing.assert_close(a.mem.M, b.mem.M, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.k, b.k, atol=1e-6, rtol=1e-6)
                assert (a.last is None) == (b.last is None) == (name != "shift")
                if a.last is not None:
                    torch.testing.assert_close(a.last, b.last, atol=1e-5, rtol=1e-5)
    assert full.state.tokens_in_segment == 8


def run_layers(model: InfiniLM, x: torch.Tensor) -> torch.Tensor:
    for layer in model.layers:
        x, _, _ = layer(x, None)  # every layer starts from an empty memory
    return x


@pytest.mark.parametrize("name", ["linear", "delta", "gqa", "mod", "tau", "shift"])
def test_causality_by_gradient_across_segments(name):
    model = build(name)
    T = 40  # segments of 16: positions 0-15, 16-31, 32-39
    x = torch.randn(1, T, 48, requires_grad=True)
    y = run_layers(model, x)
    for t in (3, 15, 16, 20, 33, 39):
        (gx,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        future = gx[0, t + 1:]
        past = gx[0, : t + 1].abs().sum(-1)
        assert torch.equal(future, torch.zeros_like(future)), f"output {t} depends on later inputs"
        assert (past[t] > 0) and (past[0] > 0), f"output {t} ignores its own or the first input"
        if t >= 16:  # reaches the previous segment (through the memory and lower layers)
            assert past[: (t // 16) * 16].sum() > 0


def test_memory_carries_information_across_segments():
    """With the gate open, changing a token of segment 1 changes every later segment's output."""
    model = build("linear", n_layers=1)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.fill_(3.0)
        ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(2))
        ids2 = ids.clone()
        ids2[0, 5] = (ids[0, 5] + 1) % 97
        a, b = model(ids).logits, model(ids2).logits
    assert torch.equal(a[0, :5], b[0, :5])
    assert (a[0, 32:] - b[0, 32:]).abs().amax(-1).min() > 0  # every token of segment 3 sees it


def test_token_shift_carries_the_previous_token_across_a_segment_boundary_and_nothing_more():
    """With the gates closed (local attention only), a segment's first token still sees the token before it through
    the shift, and only that token; without the shift it sees nothing of the earlier segment. ``--no-memory``
    (memory_read_off) cuts the shift's carried token too: segment 2 is then as if it were the first."""
    from infinitrain.evaluate.switches import memory_read_off

    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(3))
    for shift in (True, False):
        model = build("shift" if shift else "delta", n_layers=1)
        with torch.no_grad():
            for p in model.gate_parameters():
                p.fill_(-1e4)  # sigmoid = 0 exactly: the memory adds nothing
        outs = {}
        for t in (14, 15):  # change the second-to-last, then the last, token of segment 1
            other = ids.clone()
            other[0, t] = (ids[0, t] + 1) % 97
            with torch.no_grad():
                a, b = stream(model, ids, [16, 16])[0], stream(model, other, [16, 16])[0]
                with memory_read_off(model):
                    c, d = stream(model, ids, [16, 16])[0], stream(model, other, [16, 16])[0]
            outs[t] = (a[0, 16:] - b[0, 16:]).abs().amax(-1)  # segment 2's logits
            assert torch.equal(c[0, 16:], d[0, 16:])
        assert torch.equal(outs[14], torch.zeros_like(outs[14]))  # only the previous token crosses
        if shift:
            assert outs[15][0] > 1e-4  # segment 2's first token sees segment 1's last
            assert (outs[15][1:] > 0).all()  # and passes it on through local attention
        else:
            assert torch.equal(outs[15], torch.zeros_like(outs[15]))


def test_token_shift_equals_its_naive_twin():
    from infinitrain.ops.shift import token_shift, token_shift_naive

    g = torch.Generator().manual_seed(4)
    x, last = torch.randn(3, 9, 5, generator=g), torch.randn(3, 5, generator=g)
    ds = torch.rand(3, 9, generator=g) < 0.3
    for args in ((x,), (x, last), (x, last, ds), (x, None, ds)):
        assert torch.equal(token_shift(*args), token_shift_naive(*args))
    assert torch.equal(token_shift(x, last)[:, 0], last) and torch.equal(token_shift(x)[:, 1:], x[:, :-1])


# --- Mixture-of-Depths ----------------------------------------------------------------------------


def test_mod_training_routes_exactly_k_per_segment_and_leaves_others_untouched():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **CONFIGS["mod"]})
    block = MoDBlock(cfg).train()
    x = torch.randn(3, 64, 48)
    x_before = x.clone()
    seen = {}
    orig = block.block.forward_compact

    def spy(xs, state, *, pos, tokens_per_segment, **docs):
        seen["n"], seen["pos"], seen["C"] = xs.shape[1], pos, tokens_per_segment
        return orig(xs, state, pos=pos, tokens_per_segment=tokens_per_segment, **docs)

    block.block.forward_compact = spy
    out, _, aux = block(x)
    C = cfg.mod_tokens_per_segment()
    assert C == 4 and seen["C"] == C and seen["n"] == 4 * C  # 4 segments × 4 routed tokens
    assert torch.equal(x, x_before)  # input never mutated
    changed = (out != x).any(-1)  # (B, T)
    assert torch.equal(changed.view(3, 4, 16).sum(-1), torch.full((3, 4), C))
    logits = block.route(x)
    for b in range(3):  # the changed tokens are the top-C logits of their segment
        for s in range(4):
            top = logits[b, s * 16:(s + 1) * 16].topk(C).indices.sort().values + s * 16
            assert torch.equal(changed[b].nonzero().squeeze(1)[s * C:(s + 1) * C], top)
    assert aux > 0


def test_mod_router_is_on_the_lm_gradient_path():
    model = build("mod").train()
    ids = torch.randint(0, 97, (2, 32))
    out = model(ids)
    out.logits.square().mean().backward()  # LM-side loss only, no aux
    routers = [m.router.weight.grad for m in model.layers if isinstance(m, MoDBlock)]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


@pytest.mark.parametrize("with_docs", [False, True])
def test_mod_compact_training_path_equals_masked_path_for_the_same_routing(with_docs):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **CONFIGS["mod"], "update": "delta"})
    block = MoDBlock(cfg).train()
    x = torch.randn(2, 48, 48)
    from infinitrain.model.layers import compact_doc_start, topk_per_segment

    idx = topk_per_segment(block.route(x), 16, cfg.mod_tokens_per_segment())
    keep = torch.zeros(2, 48, dtype=torch.bool).scatter(1, idx, True)
    ds = None
    if with_docs:  # documents starting mid-segment, on a routed and on an unrouted token
        ds = torch.zeros(2, 48, dtype=torch.bool)
        ds[0, idx[0, 5]] = True
        ds[1, int((~keep[1]).nonzero()[7])] = True
    xs = x.gather(1, idx[..., None].expand(-1, -1, 48))
    ys, st_c = block.block.forward_compact(
        xs, None, pos=idx % 16, tokens_per_segment=4,
        doc_start=None if ds is None else compact_doc_start(ds, idx % 16, 16, 4))
    y, st_m, _ = block.block(x, None, keep=keep, doc_start=ds)
    torch.testing.assert_close(ys, y.gather(1, idx[..., None].expand(-1, -1, 48)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_c.mem.M, st_m.mem.M, atol=1e-5, rtol=1e-5)


def test_mod_batched_causal_inference_equals_batch_one():
    model = build("mod", seed=3)
    with torch.no_grad():  # bias routers so rows route clearly different counts
        for m in model.layers:
            if isinstance(m, MoDBlock):
                m.router.weight.mul_(20)
        ids = torch.randint(0, 97, (4, 40), generator=torch.Generator().manual_seed(5))
        batched = model(ids).logits
        counts = []
        for b in range(4):
            one = model(ids[b:b + 1]).logits
            torch.testing.assert_close(batched[b:b + 1], one, atol=1e-5, rtol=1e-5)
        x = model.embed(ids)
        x, _, _ = model.layers[0](x)
        counts = (model.layers[1].route(x) > 0).sum(1)
    assert len(set(counts.tolist())) > 1, f"rows should route different counts, got {counts.tolist()}"


# --- presets, configs, activations ----------------------------------------------------------------


def test_presets_parameter_counts():
    counts = {name: count_parameters(cfg) for name, cfg in PRESETS.items()}
    gates_8b = 32 * 32
    assert abs(counts["8b"] - gates_8b - 8.03e9) / 8.03e9 < 0.01
    assert counts["8b"] == 8_030_261_248 + gates_8b  # Llama-3-8B exactly, plus one β per head
    assert counts["1b"] == 1_235_814_400 + 16 * 32  # Llama-3.2-1B (tied embeddings) plus gates
    assert counts["8b-mod"] == counts["8b"] + 16 * 4096  # one router (d → 1) per routed block
    assert counts["1b-mod"] == counts["1b"] + 8 * 2048
    assert counts["debug"] < 1e6
    assert PRESETS["8b"].n_kv_heads == 8 and PRESETS["8b"].rope_theta == 500000.0


def test_debug_preset_runs_and_learns_a_step():
    torch.manual_seed(0)
    model = InfiniLM(PRESETS["debug"])
    ids = torch.randint(0, 512, (2, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None for p in model.gate_parameters())


@pytest.mark.parametrize("bad", [
    dict(n_heads=5), dict(n_kv_heads=3), dict(activation="swigloo"), dict(update="delta2"), dict(pos_emb="alibi"),
    dict(dropout=1.0), dict(segment_len=0), dict(mod_capacity=0.0), dict(yarn_scale=2.0), dict(rope_pct=0.0),
    dict(memory_tau=0.0), dict(memory_tau=-1.0), dict(memory_tau=float("inf")), dict(memory_tau=True),
    dict(gate_split=float("nan")), dict(token_shift=1), dict(token_shift=True, mod_every=2),
])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**{**BASE, **bad})


def test_gate_split_starts_even_heads_on_the_memory_and_odd_heads_local():
    model = InfiniLM(ModelConfig(**{**BASE, "gate_init": -1.0, "gate_split": 3.0, "mod_every": 2}))
    for p in model.gate_parameters():  # plain and Mixture-of-Depths blocks alike
        assert p.tolist() == [2.0, -4.0, 2.0, -4.0]
    model.reset_parameters()
    assert all(p.tolist() == [2.0, -4.0, 2.0, -4.0] for p in model.gate_parameters())
    assert InfiniLM(ModelConfig(**BASE)).gate_parameters()[0].tolist() == [0.5] * 4  # default: gate_init


def test_config_from_dict_refuses_unknown_keys_and_round_trips():
    cfg = ModelConfig(**BASE)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="segmnt_len"):
        ModelConfig.from_dict({**cfg.to_dict(), "segmnt_len": 3})
    with pytest.raises(AttributeError):
        cfg.d_model = 3  # frozen


def test_all_nine_activations_differ():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    outs = {}
    for a in ACTIVATIONS:
        torch.manual_seed(1)
        outs[a] = MLP(16, 32, a)(x)
        assert outs[a].shape == x.shape and torch.isfinite(outs[a]).all()
    flat = [o.flatten() for o in outs.values()]
    assert len({tuple(f[:4].tolist()) for f in flat}) == len(ACTIVATIONS)


# --- packed documents -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "delta", "gqa", "mod", "shift"])
def test_packed_documents_do_not_see_each_other(name):
    model = build(name)
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(7))
    ds = torch.zeros(2, 64, dtype=torch.bool)
    ds[0, 21] = ds[1, 40] = True  # mid-segment starts
    ds[0, 50] = True  # and a third document
    other = ids.clone()
    other[0, :21] = (other[0, :21] + 1) % 97  # change every token of row 0's first document
    other[1, :40] = (other[1, :40] + 3) % 97
    with torch.no_grad():
        a = model(ids, doc_start=ds).logits
        b = model(other, doc_start=ds).logits
    torch.testing.assert_close(a[0, 21:], b[0, 21:], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1, 40:], b[1, 40:], rtol=0, atol=1e-6)
    assert (a[0, :21] - b[0, :21]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear", "delta", "mod", "shift"])
def test_document_on_a_segment_boundary_equals_the_document_alone(name):
    model = build(name)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(8))
    ds = torch.zeros(1, 64, dtype=torch.bool)
    ds[0, 32] = True
    with torch.no_grad():
        packed = model(ids, doc_start=ds).logits
        alone = model(ids[:, 32:]).logits
    torch.testing.assert_close(packed[:, 32:], alone, rtol=1e-5, atol=1e-5)
