"""Seed-compatible blocks: the seed README examples run as written (shorter sequences), and its bugs are gone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinitrain.compat import (
    CompressiveMemory,
    InfiniTransformer,
    MoDInfiniTransformer,
    RoPEEmbeddings,
    YaRNEmbeddings,
    seed_betas_to_scalar,
)

SEG = 64  # the README uses 2048; two segments of 64 keep the examples fast
SEQ = 2 * SEG


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# The README examples, as written except for segment_len and sequence length
# ---------------------------------------------------------------------------------------------


def test_readme_compressive_memory():
    cm = CompressiveMemory(
        dim_input=768,
        dim_key=64,
        dim_value=64,
        num_heads=8,
        segment_len=SEG,
        sampling_factor=None,
        update="linear",
        causal=True,
        positional_embedder="rope",
        init_state_learnable=False
    )
    batch = torch.randn(
        2,  # batch size
        SEQ,  # sequence length
        768  # input dimension
    )
    output = cm(batch)
    assert output.shape == (2, SEQ, 768) and torch.isfinite(output).all()


def test_readme_infini_transformer():
    tfm = InfiniTransformer(
        dim_input=768,
        dim_hidden=2048,
        dim_key=64,
        dim_value=64,
        num_heads=8,
        activation="ffngeglu",
        segment_len=SEG,
        update="delta",
        causal=True,
        positional_embedder=None,
        init_state_learnable=False,
        dropout=0.1
    )
    batch = torch.randn(2, SEQ, 768)
    output = tfm(batch)
    assert isinstance(output, torch.Tensor)
    assert output.shape == (2, SEQ, 768) and torch.isfinite(output).all()


@pytest.mark.parametrize("training", [True, False])
def test_readme_mod_infini_transformer(training):
    tfm = MoDInfiniTransformer(
        dim_input=768,
        dim_hidden=2048,
        dim_key=64,
        dim_value=64,
        num_heads=8,
        activation="ffngeglu",
        segment_len=SEG,
        sampling_factor=8,
        update="delta",
        causal=True,
        init_state_learnable=False,
        positional_embedder=None,
        dropout=0.1
    )
    tfm.train(training)
    batch = torch.randn(2, SEQ, 768)
    result = tfm(batch)
    assert isinstance(result, tuple) and len(result) == 3
    output, select_target, select_pred = result
    assert output.shape == (2, SEQ, 768) and torch.isfinite(output).all()
    assert select_target.shape == select_pred.shape == (2 * SEQ, 1)
    assert set(select_target.unique().tolist()) <= {0.0, 1.0}
    loss = F.binary_cross_entropy_with_logits(select_pred, select_target)  # the seed's auxiliary loss
    assert torch.isfinite(loss)


def test_readme_rope_embeddings():
    embedder = RoPEEmbeddings(
        dim=64,  # must match dim_key parameter in InfiniTransformer
        seq_len=SEG,  # must match segment_len parameter in InfiniTransformer
        dim_embeddings_pct=0.5,
        base=10000
    )
    tfm = InfiniTransformer(
        dim_input=768,
        dim_hidden=2048,
        dim_key=64,  # must match dim parameter in RoPEEmbeddings
        dim_value=64,
        num_heads=8,
        activation="ffngeglu",
        segment_len=SEG,  # must match seq_len parameter in RoPEEmbeddings
        update="delta",
        causal=True,
        positional_embedder=embedder,
        init_state_learnable=False,
        dropout=0.1
    )
    output = tfm(torch.randn(2, SEQ, 768))
    assert output.shape == (2, SEQ, 768) and torch.isfinite(output).all()
    assert tfm.attn.rotary == embedder.spec and embedder.spec.rot_dim == 32


def test_readme_yarn_embeddings():
    embedder = YaRNEmbeddings(
        dim=64,  # must match dim_key in InfiniTransformer
        seq_len=SEG,  # must match segment_len parameter in InfiniTransformer
        context_len=32768,
        context_len_ext=65536,
        dim_embeddings_pct=0.5,
        base=10000,
        alpha=1,
        beta=32,
        len_scale=None
    )
    tfm = InfiniTransformer(
        dim_input=768,
        dim_hidden=2048,
        dim_key=64,  # must match dim in YaRNEmbeddings
        dim_value=64,
        num_heads=8,
        activation="ffngeglu",
        segment_len=SEG,  # must match seq_len parameter in YaRNEmbeddings
        update="delta",
        causal=True,
        positional_embedder=embedder,
        init_state_learnable=False,
        dropout=0.1
    )
    output = tfm(torch.randn(2, SEQ, 768))
    assert output.shape == (2, SEQ, 768) and torch.isfinite(output).all()
    assert embedder.spec.scale == 2.0 and embedder.spec.original_len == 32768


@pytest.mark.parametrize("activation", ["relu", "abs", "gelu", "swish", "swiglu", "geglu", "ffnglu", "ffngeglu",
                                        "ffnswiglu"])
def test_every_seed_activation(activation):
    tfm = InfiniTransformer(16, 24, 8, 8, 2, activation, 8)
    assert torch.isfinite(tfm(torch.randn(1, 12, 16))).all()


# ---------------------------------------------------------------------------------------------
# Causality by gradient (the seed's view-without-transpose leaked the future)
# ---------------------------------------------------------------------------------------------


def _grad_norms(module, x: torch.Tensor, t: int) -> torch.Tensor:
    """|∂ out[0, t] / ∂ x[0, s]| summed over features, for every s: (T,)."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(out[0, t].sum(), x)
    return g[0].abs().sum(-1)


def _small(cls=InfiniTransformer, **kw):
    args = dict(dim_input=16, dim_hidden=32, dim_key=8, dim_value=6, num_heads=2, activation="swiglu",
                segment_len=8, causal=True, positional_embedder="rope")
    args.update(kw)
    return cls(**args)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("kind", ["memory", "block"])
def test_causal_true_is_causal_by_gradient_across_segments(update, kind):
    if kind == "memory":
        module = CompressiveMemory(16, 8, 6, 2, 8, update=update, causal=True, positional_embedder="rope")
    else:
        module = _small(update=update)
    x = torch.randn(2, 27, 16, dtype=torch.float64)
    module.double()
    for t in (0, 7, 8, 13, 16, 26):  # first token, segment ends and starts, a part segment
        g = _grad_norms(module, x, t)
        assert (g[t + 1:] == 0).all(), f"out[{t}] depends on a later input"
        assert (g[: t + 1] > 0).all(), f"out[{t}] ignores an earlier input"


def test_causal_false_attends_both_ways_inside_a_segment_only():
    module = CompressiveMemory(16, 8, 6, 2, 8, causal=False).double()
    g = _grad_norms(module, torch.randn(1, 24, 16, dtype=torch.float64), 10)  # segment 1 = tokens 8..15
    assert (g[:16] > 0).all()  # earlier segments via the memory, its own segment both ways
    assert (g[16:] == 0).all()  # never a later segment


def test_mod_inference_routing_is_causal_by_gradient():
    module = _small(MoDInfiniTransformer, sampling_factor=4).double().eval()
    with torch.no_grad():
        module.proj_sampling.bias.fill_(0.5)  # most tokens routed, some not
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    for t in (3, 9, 19):
        g = _grad_norms(module, x, t)
        assert (g[t + 1:] == 0).all() and g[t] > 0


# ---------------------------------------------------------------------------------------------
# Arguments: misspelt keywords raise, bad values raise
# ---------------------------------------------------------------------------------------------

CM = dict(dim_input=16, dim_key=8, dim_value=8, num_heads=2, segment_len=8)


@pytest.mark.parametrize("cls, kwargs, typo", [
    (CompressiveMemory, CM, {"position_embedder": "rope"}),  # the seed's code spelling, swallowed by its tests
    (InfiniTransformer, dict(CM, dim_hidden=32, activation="relu"), {"position_embedder": None}),
    (InfiniTransformer, dict(CM, dim_hidden=32, activation="relu"), {"positional_embeddings": "rope"}),
    (MoDInfiniTransformer, dict(CM, dim_hidden=32, activation="relu", sampling_factor=2), {"drop_out": 0.1}),
    (RoPEEmbeddings, dict(dim=8, seq_len=8), {"dim_embedding_pct": 0.5}),
    (YaRNEmbeddings, dict(dim=8, seq_len=8, context_len=8, context_len_ext=16), {"length_scale": 1.0}),
])
def test_misspelt_keyword_is_a_type_error(cls, kwargs, typo):
    with pytest.raises(TypeError, match=list(typo)[0]):
        cls(**kwargs, **typo)


@pytest.mark.parametrize("change, error, match", [
    ({"update": "dleta"}, ValueError, "update"),
    ({"num_heads": 0}, ValueError, "num_heads"),
    ({"segment_len": 2.5}, TypeError, "segment_len"),
    ({"causal": "yes"}, TypeError, "causal"),
    ({"sampling_factor": 1}, ValueError, "sampling_factor"),
    ({"sampling_factor": 8}, ValueError, "sampling_factor"),
    ({"positional_embedder": "alibi"}, ValueError, "positional_embedder"),
    ({"positional_embedder": RoPEEmbeddings(dim=16, seq_len=8)}, ValueError, "dim_key"),
    ({"positional_embedder": RoPEEmbeddings(dim=8, seq_len=16)}, ValueError, "segment_len"),
    ({"positional_embedder": torch.nn.Identity()}, TypeError, "positional_embedder"),
])
def test_bad_values_raise(change, error, match):
    with pytest.raises(error, match=match):
        CompressiveMemory(**{**CM, **change})


def test_bad_block_and_embedding_values_raise():
    with pytest.raises(ValueError, match="activation"):
        InfiniTransformer(**CM, dim_hidden=32, activation="tanh")
    with pytest.raises(ValueError, match="dropout"):
        InfiniTransformer(**CM, dim_hidden=32, activation="relu", dropout=1.0)
    with pytest.raises(ValueError, match="dim_embeddings_pct"):
        RoPEEmbeddings(dim=8, seq_len=8, dim_embeddings_pct=0.1)
    with pytest.raises(ValueError, match="context_len_ext"):
        YaRNEmbeddings(dim=8, seq_len=8, context_len=16, context_len_ext=8)
    with pytest.raises(ValueError, match="alpha"):
        YaRNEmbeddings(dim=8, seq_len=8, context_len=8, context_len_ext=16, alpha=40)


# ---------------------------------------------------------------------------------------------
# Seed state dicts load
# ---------------------------------------------------------------------------------------------


def _seed_state_dict(H=2, D=16, K=8, V=6, learnable=None) -> dict[str, torch.Tensor]:
    """A state dict with the seed's names and shapes (betas per channel, initial state with a batch dim)."""
    sd = {"proj_k.weight": torch.randn(H * K, D), "proj_v.weight": torch.randn(H * V, D),
          "proj_q.weight": torch.randn(H * K, D), "betas": torch.randn(1, H, 1, V),
          "proj_out.weight": torch.randn(D, H * V)}
    if learnable is not None:
        sd["init_mem"] = torch.randn(1, H, K, V)
        sd["init_z"] = torch.rand(1, H, K, 1) + 0.5 if learnable == "per_key" else torch.rand(1, H, 1, 1) + 0.5
    return sd


def test_seed_state_dict_loads_with_documented_gate_rule():
    sd = _seed_state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    cm = CompressiveMemory(16, 8, 6, 2, 8)
    cm.load_state_dict(sd)  # strict: every seed key maps, nothing missing
    for name in ("proj_q", "proj_k", "proj_v", "proj_out"):
        assert torch.equal(getattr(cm, name).weight, sd[f"{name}.weight"])
    expected = torch.logit(torch.sigmoid(sd["betas"].double()).mean((0, 2, 3))).float()  # (H,)
    torch.testing.assert_close(cm.betas.data, expected)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # the caller's dict is untouched


def test_seed_betas_equal_across_channels_convert_exactly():
    b = torch.tensor([-1.5, 0.25, 3.0]).view(1, 3, 1, 1).expand(1, 3, 1, 5)
    torch.testing.assert_close(torch.sigmoid(seed_betas_to_scalar(b)), torch.sigmoid(b[0, :, 0, 0]))


@pytest.mark.parametrize("z_shape", ["per_key", "scalar"])
def test_seed_state_dict_with_learnable_initial_state(z_shape):
    sd = _seed_state_dict(learnable=z_shape)
    cm = CompressiveMemory(16, 8, 6, 2, 8, init_state_learnable=True)
    cm.load_state_dict(sd)
    assert torch.equal(cm.init_mem.data, sd["init_mem"][0])
    assert torch.equal(cm.init_z.data, sd["init_z"][0, :, :, 0].expand(2, 8))


def test_seed_attention_keys_load_into_a_block():
    tfm = InfiniTransformer(16, 32, 8, 6, 2, "relu", 8)
    missing, unexpected = tfm.load_state_dict({f"attn.{k}": v for k, v in _seed_state_dict().items()}, strict=False)
    assert not unexpected and all(not k.startswith("attn.") for k in missing)
    assert tfm.attn.betas.shape == (2,)


# ---------------------------------------------------------------------------------------------
# State carried across calls; learnable initial state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("learnable", [False, True])
def test_two_calls_with_state_equal_one_call(update, learnable):
    cm = CompressiveMemory(16, 8, 6, 2, 8, update=update, causal=True, positional_embedder="rope",
                           init_state_learnable=learnable).double()
    if learnable:
        with torch.no_grad():
            cm.init_mem.normal_()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    whole = cm(x)
    first, state = cm(x[:, :13], return_state=True)  # ends inside segment 1
    second, state = cm(x[:, 13:], state, return_state=True)
    torch.testing.assert_close(torch.cat((first, second), 1), whole, rtol=0, atol=1e-10)
    assert state.k.shape[2] == 37 % 8


def test_block_state_on_segment_boundaries_equals_one_call_even_bidirectional():
    tfm = _small(causal=False).double()
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    first, state = tfm(x[:, :16], return_state=True)
    second = tfm(x[:, 16:], state)
    torch.testing.assert_close(torch.cat((first, second), 1), tfm(x), rtol=0, atol=1e-10)


def test_learnable_initial_state_is_used_and_trained():
    cm = CompressiveMemory(16, 8, 6, 2, 8, init_state_learnable=True)
    assert {n for n, _ in cm.named_parameters()} >= {"init_mem", "init_z"}
    x = torch.randn(1, 8, 16)
    plain = cm(x)
    zero = CompressiveMemory(16, 8, 6, 2, 8)
    zero.load_state_dict({k: v for k, v in cm.state_dict().items() if not k.startswith("init_")})
    torch.testing.assert_close(plain, zero(x))  # at init M0 = 0: the first segment reads zeros as without
    plain.sum().backward()
    assert cm.init_mem.grad.abs().sum() > 0
    with torch.no_grad():
        cm.init_mem.normal_()
    assert not torch.allclose(cm(x), plain)


# ---------------------------------------------------------------------------------------------
# Positional embeddings
# ---------------------------------------------------------------------------------------------


def test_rope_changes_outputs():
    with_pe = CompressiveMemory(16, 8, 8, 2, 8, causal=True, positional_embedder="rope")
    without = CompressiveMemory(16, 8, 8, 2, 8, causal=True)
    without.load_state_dict(with_pe.state_dict())
    x = torch.randn(2, 16, 16)
    assert (with_pe(x) - without(x)).abs().max() > 1e-3


def test_rope_rotates_and_keeps_the_unrotated_half():
    rope = RoPEEmbeddings(dim=8, seq_len=16)
    x = torch.randn(1, 2, 16, 8)
    y = rope(x, torch.arange(16))
    assert (y[..., 1:, :4] - x[..., 1:, :4]).abs().min(-1).values.max() > 0  # every position > 0 moved
    assert torch.equal(y[..., 4:], x[..., 4:]) and torch.equal(y[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_yarn_at_scale_one_equals_rope():
    x = torch.randn(2, 3, 16, 8)
    pos = torch.arange(16)
    rope = RoPEEmbeddings(dim=8, seq_len=16, dim_embeddings_pct=1.0, base=500)
    yarn = YaRNEmbeddings(dim=8, seq_len=16, context_len=4096, context_len_ext=4096, dim_embeddings_pct=1.0, base=500)
    assert torch.equal(yarn(x, pos), rope(x, pos))
    a = CompressiveMemory(16, 8, 8, 2, 16, causal=True, positional_embedder=rope)
    b = CompressiveMemory(16, 8, 8, 2, 16, causal=True, positional_embedder=yarn)
    b.load_state_dict(a.state_dict())
    h = torch.randn(1, 32, 16)
    assert torch.equal(a(h), b(h))
    assert CompressiveMemory(16, 8, 8, 2, 16, positional_embedder="yarn").rotary.scale == 1.0  # "yarn": scale 1


def test_yarn_extension_and_len_scale():
    x = torch.randn(1, 1, 16, 8)
    pos = torch.arange(16)
    rope = RoPEEmbeddings(dim=8, seq_len=16)
    yarn = YaRNEmbeddings(dim=8, seq_len=16, context_len=16, context_len_ext=64)
    assert yarn.spec.scale == 4.0 and not torch.allclose(yarn(x, pos), rope(x, pos))
    fixed = YaRNEmbeddings(dim=8, seq_len=16, context_len=16, context_len_ext=64, len_scale=1.0)
    torch.testing.assert_close(yarn(x, pos), fixed(x, pos) * (0.1 * torch.log(torch.tensor(4.0)) + 1))


# ---------------------------------------------------------------------------------------------
# Mixture-of-Depths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_factor, k", [(8, 8), (6, 11), (2.5, 26)])  # k = ceil(64 / sampling_factor)
def test_mod_training_target_has_exactly_k_per_segment(sampling_factor, k):
    mod = MoDInfiniTransformer(16, 32, 8, 8, 2, "relu", SEG, sampling_factor, causal=True)
    x = torch.randn(3, SEQ, 16)
    x0 = x.clone()
    out, target, pred = mod(x)
    assert torch.equal(x, x0)  # the input is never written
    assert torch.equal(target.view(3, 2, SEG).sum(-1), torch.full((3, 2), float(k)))
    torch.testing.assert_close(pred, mod.proj_sampling(x).view(-1, 1))
    skipped = target.view(3, SEQ) == 0
    assert torch.equal(out[skipped], x[skipped])  # skipped tokens ride the residual untouched
    top = pred.view(3, 2, SEG).topk(k, -1).values[..., -1:]  # the k-th largest logit per segment
    assert ((pred.view(3, 2, SEG) >= top) == target.view(3, 2, SEG).bool()).all()


def test_mod_router_is_on_the_gradient_path():
    mod = MoDInfiniTransformer(16, 32, 8, 8, 2, "relu", 16, 4)
    out, _, _ = mod(torch.randn(2, 32, 16))
    out.pow(2).sum().backward()  # no auxiliary loss: the router learns from the output alone
    assert mod.proj_sampling.weight.grad.abs().sum() > 0


def test_mod_eval_batch_equals_rows_one_at_a_time():
    mod = _small(MoDInfiniTransformer, sampling_factor=4, update="delta").double().eval()
    with torch.no_grad():
        mod.proj_sampling.bias.fill_(0.3)
    x = torch.randn(4, 29, 16, dtype=torch.float64)
    out, target, pred = mod(x)
    routed = (pred.view(4, 29) > 0).sum(1)
    assert len(set(routed.tolist())) > 1, "rows should route different counts"
    assert 0 < routed.min() and routed.max() < 29
    rows = [mod(x[i:i + 1]) for i in range(4)]
    # RMSNorm computes in fp32 even for fp64 input, so batch-vs-row matmul blocking shows at ~1e-8
    torch.testing.assert_close(out, torch.cat([r[0] for r in rows]), rtol=0, atol=1e-6)
    torch.testing.assert_close(target, torch.cat([r[1] for r in rows]))
    skipped = pred.view(4, 29) <= 0
    assert torch.equal(out[skipped], x[skipped])


def test_mod_eval_state_carries_across_calls():
    mod = _small(MoDInfiniTransformer, sampling_factor=4).double().eval()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    whole = mod(x, return_state=True)
    first = mod(x[:, :11], return_state=True)
    second = mod(x[:, 11:], first[3], return_state=True)
    torch.testing.assert_close(torch.cat((first[0], second[0]), 1), whole[0], rtol=0, atol=1e-6)
    # (select_target is top-C of the tokens each call sees: not streamable, and routing never reads it)


def test_seed_blocks_live_in_compat_only():
    import infinitrain.model

    for name in ("CompressiveMemory", "InfiniTransformer", "MoDInfiniTransformer", "RoPEEmbeddings", "YaRNEmbeddings"):
        assert not hasattr(infinitrain.model, name), name
