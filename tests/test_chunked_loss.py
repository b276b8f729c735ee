"""The model's chunked loss (``InfiniLM.forward(..., targets=)``) against its naive twin ``token_loss_sum`` on full
logits: same value, per-token loss and gradients, and what autograd keeps no longer grows with T·V."""

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
    vocabulary: the naive loss keeps the fp32 log-softmax (4·T·V) and more; the chunked loss keeps what the
    blocks keep plus the final hidden states, targets and mask (4·D + 9 bytes per token, fp32), and in backward
    the head runs on one segment at a time, whatever T."""
    torch.manual_seed(0)
    V, S = 4096, 16
    model = InfiniLM(ModelConfig(**{**CFG, "vocab_size": V, "segment_len": S, "n_layers": 1}))
    found = {}
    for T in (2 * S, 8 * S):
        ids = torch.randint(0, V, (1, T))
        doc = torch.zeros(1, T, dtype=torch.bool)
        found["naive", T] = saved_bytes(lambda: token_loss_sum(model(ids, doc_start=doc).logits, ids,
                                                               torch.ones_like(doc)), model.parameters())
        tgt = ids.roll(-1, 1)
        found["chunked", T] = saved_bytes(lambda: model(ids, doc_start=doc, targets=tgt), model.parameters())
        assert found["naive", T] >= 4 * T * V
        def body():
            x = model.embed(ids)
            for layer in model.layers:
                x = layer(x, None, doc_start=doc)[0]

        found["body", T] = saved_bytes(body, model.parameters())
        assert found["chunked", T] - found["body", T] == (4 * CFG["d_model"] + 9) * T, found
        sizes = []  # logits the head produces, in forward and in the checkpoint's recompute during backward
        hook = model.lm_head.register_forward_hook(lambda m, i, o: sizes.append((torch.is_grad_enabled(), o.numel())))
        try:
            model(ids, doc_start=doc, targets=ids).loss_sum.backward()
        finally:
            hook.remove()
        assert len(sizes) == 2 * T // S and {n for _, n in sizes} == {S * V}  # one segment's logits at a time
    print({k: v / 1e6 for k, v in found.items()})
    assert found["naive", 8 * S] - found["naive", 2 * S] >= 4 * 6 * S * V
