"""The MEGALODON family (model.arch: megalodon): streaming equals one call, causality, documents, --no-memory,
presets."""

from __future__ import annotations

import random

import pytest
import torch

from infinitrain.errors import ConfigError
from infinitrain.evaluate.switches import memory_read_off
from infinitrain.model import PRESETS, InfiniLM, ModelConfig, count_parameters
from infinitrain.model.megalodon import MegalodonBlock, MegalodonState

BASE = dict(arch="megalodon", vocab_size=97, d_model=24, n_layers=2, n_heads=2, head_dim=6, v_dim=20, d_ff=40,
            ema_dim=3, norm_groups=4, segment_len=8, rope_theta=100.0)


def build(seed: int = 0, **kw) -> InfiniLM:
    torch.manual_seed(seed)
    model = InfiniLM(ModelConfig(**{**BASE, **kw})).double()
    with torch.no_grad():  # move the zero-initialised affine maps off their start so every path matters
        for n, p in model.named_parameters():
            if n.endswith(("qk_gamma", "qk_mu", "norm_bias")):
                p.normal_(0.0, 0.3)
    return model.eval()


def ids_for(B=2, T=28, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def stream(model, ids, sizes):
    state, outs, i = None, [], 0
    for c in sizes:
        out = model(ids[:, i:i + c], state)
        outs.append(out.logits)
        state, i = out.state, i + c
    return torch.cat(outs, 1), state


def test_streaming_in_random_chunks_equals_one_call():
    model = build()
    T = 28  # 3.5 chunks of 8
    ids = ids_for(T=T)
    with torch.no_grad():
        full = model(ids)
        rng = random.Random(0)
        chunkings = [[1] * T, [8, 8, 8, 4], [5, 11, 1, 3, 8], []]
        while sum(chunkings[3]) < T:
            chunkings[3].append(min(T - sum(chunkings[3]), rng.randint(1, 13)))
        for sizes in chunkings:
            logits, state = stream(model, ids, sizes)
            torch.testing.assert_close(logits, full.logits, rtol=1e-10, atol=1e-10, msg=lambda m: f"{sizes}: {m}")
            for a, b in zip(state.layers, full.state.layers):
                assert isinstance(a, MegalodonState)
                torch.testing.assert_close(a.ema, b.ema, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(a.norm.var, b.norm.var, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(a.cache.v, b.cache.v, rtol=1e-10, atol=1e-10)
    assert full.state.tokens_in_segment == 4


def test_causality_by_gradient_across_chunks():
    model = build()
    ids = ids_for(B=1, T=24)
    x = model.embed(ids).detach().requires_grad_(True)
    state = None
    h = x
    for layer in model.layers:
        h, state, _ = layer(h, None)
    t = 13  # in the second chunk
    h[0, t].sum().backward()
    assert x.grad[0, t + 1:].abs().max() == 0
    assert x.grad[0, :8].abs().min() > 0  # the first chunk reaches it through CEMA and the norm statistics


def test_loss_path_equals_cross_entropy_of_the_logits():
    model = build()
    ids = ids_for(T=20)
    tgt = ids_for(T=20, seed=5)
    out = model(ids, targets=tgt, loss_chunk=7)
    ref = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), tgt.flatten(), reduction="sum")
    torch.testing.assert_close(out.loss_sum.double(), ref, rtol=1e-6, atol=1e-6)  # the chunked loss is fp32


def test_packed_documents_do_not_see_each_other():
    model = build()
    ids = ids_for(T=32, seed=7)
    ds = torch.zeros(2, 32, dtype=torch.bool)
    ds[0, 11] = ds[1, 20] = ds[0, 27] = True  # starts inside chunks
    other = ids.clone()
    other[0, :11] = (other[0, :11] + 1) % 97
    other[1, :20] = (other[1, :20] + 3) % 97
    with torch.no_grad():
        a = model(ids, doc_start=ds).logits
        b = model(other, doc_start=ds).logits
    torch.testing.assert_close(a[0, 11:], b[0, 11:], rtol=0, atol=1e-10)
    torch.testing.assert_close(a[1, 20:], b[1, 20:], rtol=0, atol=1e-10)
    assert (a[0, :11] - b[0, :11]).abs().max() > 1e-3


def test_document_on_a_chunk_boundary_equals_the_document_alone():
    model = build()
    ids = ids_for(B=1, T=32, seed=8)
    ds = torch.zeros(1, 32, dtype=torch.bool)
    ds[0, 16] = True
    with torch.no_grad():
        first = model(ids[:, :8])  # a carried state that the document must drop
        packed = model(ids[:, 8:], first.state, doc_start=ds[:, 8:]).logits
        alone = model(ids[:, 16:]).logits
    torch.testing.assert_close(packed[:, 8:], alone, rtol=1e-10, atol=1e-10)


def test_no_memory_sees_only_the_chunk():
    """Under memory_read_off every chunk equals that chunk fed alone to a fresh model, in calls of any size
    inside the chunk; without it the later chunks differ."""
    model = build()
    ids = ids_for(T=24)
    with torch.no_grad():
        alone = torch.cat([model(ids[:, a:a + 8]).logits for a in range(0, 24, 8)], 1)
        with memory_read_off(model):
            off, _ = stream(model, ids, [8, 3, 5, 1, 7])
            with pytest.raises(ValueError, match="inside one segment"):
                stream(model, ids, [5, 6, 13])
        on = model(ids).logits
    torch.testing.assert_close(off, alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(on[:, :8], alone[:, :8], rtol=1e-10, atol=1e-10)
    assert (on[:, 8:] - alone[:, 8:]).abs().max() > 1e-3


def test_two_hop_residual():
    """Y = FFN(LayerNorm(Attn(X) + X)) + X: with the FFN's output projection zeroed the block is the identity."""
    model = build()
    block = model.layers[0]
    assert isinstance(block, MegalodonBlock)
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    with torch.no_grad():
        block.mlp.down_proj.weight.zero_()
        y, _, _ = block(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_megalodon_7b_parameter_count_is_the_papers():
    """The official 7B (ModelStore mega7.3B, counted from its layer shapes) plus our CEMA expansion β (D·h per
    layer), with the shared RMSNorm (D) for the official final timestep norm (2D)."""
    cfg = PRESETS["megalodon-7b"]
    D, L, Z, V, F, h, vocab = 4096, 32, 1024, 8192, 8192, 16, 32000
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_heads * cfg.head_dim, cfg.v_dim, cfg.d_ff, cfg.ema_dim,
            cfg.vocab_size, cfg.segment_len, cfg.rope_theta) == (D, L, 4, Z, V, F, h, vocab, 4096, 100000.0)
    mega = (2 * D + (4 * D * h + 2 * D) + D + (D * Z + Z) + 2 * (D * V + V) + (D * D + D) + V * D + 2 * 2 * Z)
    nffn = 2 * D + 3 * D * F  # LayerNorm, SwiGLU fc1 / fc2 / fc3
    official = vocab * D + L * (mega + nffn) + 2 * D + vocab * D  # embedding, blocks, final timestep norm, output
    assert count_parameters(cfg) == official + L * D * h - D
    assert 7.0e9 < count_parameters(cfg) < 7.5e9
    assert count_parameters(PRESETS["megalodon-debug"]) < 1e6


@pytest.mark.parametrize("bad", [dict(mod_every=2), dict(token_shift=True), dict(memory_tau=2.0), dict(n_kv_heads=1),
                                 dict(v_dim=21), dict(norm_groups=5), dict(ema_dim=0), dict(arch="mamba"),
                                 dict(pos_emb="yarn", yarn_scale=2.0)])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**{**BASE, **bad})


def test_config_round_trips_and_infini_is_the_default():
    cfg = ModelConfig(**BASE)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(vocab_size=97, d_model=24, n_layers=1, n_heads=2, d_ff=8).arch == "infini"


def test_debug_preset_trains_a_step_in_fp32():
    torch.manual_seed(0)
    model = InfiniLM(PRESETS["megalodon-debug"])
    ids = torch.randint(0, 512, (2, 96))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        loss = out.loss_sum / ids[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name,infini", [("tiny-books-megalodon", "tiny-books"),
                                         ("tiny-passkey-megalodon", "tiny-passkey")])
def test_recipes_mirror_the_infini_ones(name, infini):
    """Same data, samples, steps, optimiser and TBPTT as the Infini recipe; parameters within 10%."""
    from infinitrain.train.config import load_recipe

    a, b = load_recipe(name), load_recipe(infini)
    assert a.model.arch == "megalodon" and b.model.arch == "infini"
    assert (a.data, a.optim, a.schedule, a.tbptt, a.run) == (b.data, b.optim, b.schedule, b.tbptt, b.run)
    assert a.model.segment_len == b.model.segment_len and a.model.vocab_size == b.model.vocab_size
    na, nb = count_parameters(a.model), count_parameters(b.model)
    assert abs(na - nb) / nb < 0.1, (na, nb)


def test_megalodon_7b_recipe_is_the_papers_run():
    from infinitrain.train.config import load_recipe

    cfg = load_recipe("megalodon-7b")
    assert cfg.model == PRESETS["megalodon-7b"] and cfg.sample_len == 32768 and cfg.model.segment_len == 4096
    o = cfg.optim
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (3.5e-4, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.schedule.warmup == 2500 and cfg.schedule.steps * cfg.sample_len * 128 > 2e12  # 2T tokens on 128 GPUs


def test_batched_generate_equals_each_prompt_alone():
    """Prompts of different lengths in one batch (rows prefilled alone, states stacked by ModelState.cat)."""
    from infinitrain.infer.generate import Sampling, generate

    model = build()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (13, 5, 21)]
    sampling = Sampling(max_new_tokens=6, temperature=0)
    together = generate(model, prompts, sampling)
    assert together == [generate(model, [p], sampling)[0] for p in prompts]


def test_doc_inside_false_on_chunk_boundaries_is_the_same():
    model = build()
    ids = ids_for(T=32)
    ds = torch.zeros(2, 32, dtype=torch.bool)
    ds[0, 8] = ds[1, 24] = True  # on chunk boundaries only
    with torch.no_grad():
        a = model(ids, doc_start=ds).logits
        b = model(ids, doc_start=ds, doc_inside=False).logits
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
