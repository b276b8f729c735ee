"""The model's chunked loss (``InfiniLM.forward(..., targets=)``: the fused head + cross-entropy, or the checkpointed
chunks of a class head) against its naive twin ``token_loss_sum`` on full logits: same value, per-token loss and
gradients, and what autograd keeps no longer grows with T·V."""

from __future__ import annotations

import pytest
import torch
from naive_loss import token_loss_sum
from test_plan import saved_bytes

from infinitrain.model import InfiniLM, ModelConfig

CFG = dict(vocab_size=97, n_layers=2, d_model=24, n_heads=2, n_kv_heads=1, d_ff=40, segment_len=7)


@pytest.mark.parametrize("labels,chunk,T", [(None, None, 19), (None, 5, 19), (None, 100, 19), (None, 5, 21),
                                             (("neg", "pos", "mix"), 3, 21)],
                         ids=["lm-segment", "lm-5", "lm-whole", "lm-docs-5", "classifier-docs-3"])
def test_chunked_loss_and_grads_equal_the_naive_twin(labels, chunk, T):
    """float64, odd sizes (T = 19 is not a multiple of the segment 7 nor of the chunk; T = 21 with packed
    document starts, which need whole segments), masked-out targets, a carried state. Both compute the
    cross-entropy in fp32 (as the trainer), row by row: the per-token loss is identical and the gradient of every
    parameter agrees to 1e-10; the summed loss differs only by fp32 summation order."""
    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(**CFG, labels=labels)).double()
    B = 3
    ids = torch.randint(0, 97, (B, T))
    n_out = 97 if labels is None else len(labels)
    targets = torch.randint(0, n_out, (B, T))
    mask = torch.rand(B, T) < 0.6
    doc = None
    if T % 7 == 0:
        doc = torch.zeros(B, T, dtype=torch.bool)
        doc[0, 10] = doc[2, 7] = True
    with torch.no_grad():
        state = model(torch.randint(0, 97, (B, 7))).state

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    naive = model(ids, state, doc_start=doc)
    want, want_ce = token_loss_sum(naive.logits, targets, mask)
    want_g = grads(want)
    out = model(ids, state, doc_start=doc, targets=targets, loss_mask=mask, loss_chunk=chunk)
    assert out.logits is None and out.token_loss.shape == (B, T) and not out.token_loss.requires_grad
    got_g = grads(out.loss_sum)
    torch.testing.assert_close(out.loss_sum, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.token_loss, want_ce, rtol=0, atol=0)
    assert (out.token_loss[~mask] == 0).all() and len(got_g) == len(want_g)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # evaluation: the same loss without checkpointing
        torch.testing.assert_close(model(ids, state, doc_start=doc, targets=targets, loss_mask=mask).token_loss,
                                   want_ce, rtol=0, atol=0)


def test_saved_bytes_do_not_scale_with_tokens_times_vocab():
    """What a forward leaves for its backward (autograd's saved tensors, parameters excluded) with a large
    vocabulary: the naive loss keeps the fp32 log-softmax (4·T·V) and more; the fused loss keeps what the blocks
    keep plus the final norm's input, scale and output and the hidden states' gradient (3·4·D + 4 bytes per token,
    fp32) and the head's gradient (4·V·D, whatever T). The head runs once, in forward: backward recomputes nothing."""
    torch.manual_seed(0)
    V, S, D = 4096, 16, CFG["d_model"]
    model = InfiniLM(ModelConfig(**{**CFG, "vocab_size": V, "segment_len": S, "n_layers": 1}))
    found = {}
    for T in (2 * S, 8 * S):
        ids = torch.randint(0, V, (1, T))
        doc = torch.zeros(1, T, dtype=torch.bool)
        found["naive", T] = saved_bytes(lambda: token_loss_sum(model(ids, doc_start=doc).logits, ids,
                                                               torch.ones_like(doc)), model.parameters())
        tgt = ids.roll(-1, 1)
        found["fused", T] = saved_bytes(lambda: model(ids, doc_start=doc, targets=tgt), model.parameters())
        assert found["naive", T] >= 4 * T * V

        def body():
            x = model.embed(ids)
            for layer in model.layers:
                x = layer(x, None, doc_start=doc)[0]

        found["body", T] = saved_bytes(body, model.parameters())
        assert found["fused", T] - found["body", T] == (12 * D + 4) * T + 4 * V * D, found
        calls = []
        hook = model.lm_head.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
        try:
            model(ids, doc_start=doc, targets=ids).loss_sum.backward()
        finally:
            hook.remove()
        assert calls == [True]  # one call, in forward
    print({k: v / 1e6 for k, v in found.items()})
    assert found["naive", 8 * S] - found["naive", 2 * S] >= 4 * 6 * S * V


@pytest.mark.parametrize("need", ["both", "x", "weight"])
def test_fused_linear_cross_entropy_equals_the_naive_twin(need):
    """The op alone, float64 hidden states and head, odd sizes (13 tokens, chunks of 4 rows across the batch), a
    masked-out target and an ignored one (-100): per-token loss bitwise the naive twin's, gradients of x and W to
    1e-10 (upstream gradient 1; 1e-6 of the largest under 0.37: the cross-entropy is fp32 in both, scaled before
    or after); only the tensors that ask for a gradient get one."""
    from infinitrain.ops.loss import linear_cross_entropy

    torch.manual_seed(0)
    B, T, D, V = 2, 13, 6, 11
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=need in ("both", "x"))
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=need in ("both", "weight"))
    targets = torch.randint(0, V, (B, T))
    targets[1, 3] = -100
    mask = torch.rand(B, T) < 0.7
    want, want_ce = token_loss_sum(torch.nn.functional.linear(x, w), targets, mask)
    leaves = [t for t in (x, w) if t.requires_grad]
    got, got_ce = linear_cross_entropy(x, w, targets, mask, chunk=4)
    assert not got_ce.requires_grad and got_ce[1, 3] == 0
    torch.testing.assert_close(got_ce, want_ce, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for scale in (1.0, 0.37):  # the fused op scales its fp32-made gradient afterwards, in x's dtype: fp32 rounding
        want_g = torch.autograd.grad(want * scale, leaves, retain_graph=True)
        for g, wg in zip(torch.autograd.grad(got * scale, leaves, retain_graph=True), want_g):
            if scale == 1.0:
                torch.testing.assert_close(g, wg, rtol=1e-10, atol=1e-14)
            else:
                assert float((g - wg).abs().max()) <= 1e-6 * float(wg.abs().max())
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, targets, mask, chunk=5)[1], want_ce, rtol=0, atol=0)


def test_fused_linear_cross_entropy_in_bf16_is_within_stated_tolerances():
    """bf16 hidden states and head (the matmuls in bf16, log-softmax in fp32, the head's gradient summed over chunks
    in fp32) against the naive twin on the same bf16 tensors: loss within 1e-3 relative, gradients within 2e-2 of
    their largest entry; the gradients come back in bf16."""
    from infinitrain.ops.loss import linear_cross_entropy

    torch.manual_seed(0)
    B, T, D, V = 2, 64, 32, 300
    x = torch.randn(B, T, D).bfloat16().requires_grad_()
    w = (torch.randn(V, D) * 0.2).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.8
    want, _ = token_loss_sum(torch.nn.functional.linear(x, w), targets, mask)
    want_g = torch.autograd.grad(want, (x, w))
    got, _ = linear_cross_entropy(x, w, targets, mask, chunk=48)
    got_g = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    for g, wg in zip(got_g, want_g):
        assert g.dtype == torch.bfloat16
        assert float((g.float() - wg.float()).abs().max()) <= 2e-2 * float(wg.float().abs().max())
