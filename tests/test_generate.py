"""Generation: greedy equals the argmax of a full forward pass, batched equals one by one, sampling filters."""

from __future__ import annotations

import pytest
import torch

from infinitrain.errors import ConfigError
from infinitrain.infer.generate import Sampling, filter_logits, generate, sample_next
from infinitrain.model import InfiniLM, ModelConfig

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, segment_len=8)


def build(**kw) -> InfiniLM:
    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.linspace(-2, 2, p.numel()))
    return model


def greedy_by_full_forward(model: InfiniLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kw", [dict(update="linear"), dict(update="delta"), dict(mod_every=2, mod_capacity=0.5),
                                dict(update="delta", mod_every=1, mod_capacity=0.25), dict(memory_tau=3.0)],
                         ids=["linear", "delta", "mod", "mod-delta", "tau"])
def test_greedy_equals_argmax_of_full_forward_across_segments(kw):
    model = build(**kw)
    prompt = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    new = model.generate([prompt], max_new_tokens=30, temperature=0)[0]  # 13 + 30 tokens: 5+ boundaries
    assert new == greedy_by_full_forward(model, prompt, 30)


def test_batched_ragged_prompts_equal_one_by_one():
    model = build(update="delta", mod_every=2, mod_capacity=0.5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 21, 9, 1)]
    batched = model.generate(prompts, max_new_tokens=12, temperature=0)
    for p, out in zip(prompts, batched):
        assert out == model.generate([p], max_new_tokens=12, temperature=0)[0]
        assert len(out) == 12


@pytest.mark.parametrize("kw", [dict(update="delta", mod_every=2, mod_capacity=0.5), dict(token_shift=True)],
                         ids=["mod-delta", "token-shift"])
def test_batched_long_ragged_prompts_prefill_in_chunks_and_equal_one_by_one(kw):
    """Prompts of 5, 203, 97, 1 and 64 tokens (segment 8): each row is prefilled alone in segment chunks and the
    states stacked, so no row feeds its prompt one token per step beyond the few tokens that bring the rows of a
    group to one phase (and a prompt of 5 beside one of 203 is no longer 198 one-token forwards). Every row's
    output equals its own generation, also when continuing from a prefilled state."""
    from infinitrain.infer.generate import prefill

    model = build(**kw)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 203, 97, 1, 64)]
    calls = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    batched = model.generate(prompts, max_new_tokens=6, temperature=0)
    hook.remove()
    singles = [model.generate([p], max_new_tokens=6, temperature=0)[0] for p in prompts]
    assert batched == singles
    assert sum(1 for shape in calls if shape[1] == 1) <= 5 * (6 + 8)  # per row at most new tokens + a segment
    assert max(shape[1] for shape in calls) == 8  # prefill pieces of one segment
    head = [11, 12, 13]  # continuing three streams that share a prefilled head
    state = prefill(model, [torch.tensor([head] * 3)])
    cont = generate(model, prompts[:3], Sampling(max_new_tokens=6, temperature=0), state=state)
    assert cont == [model.generate([head + p], max_new_tokens=6, temperature=0)[0] for p in prompts[:3]]


def test_rows_with_the_same_prompt_share_one_prefill():
    """--num-samples: copies of one prompt are prefilled once and sampled apart."""
    model = build()
    prompt = list(range(1, 30))
    calls = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    outs = model.generate([prompt] * 3, max_new_tokens=5, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert sum(shape[1] for shape in calls if shape[0] == 1) == 28  # one prefill of all but the last token
    assert len({tuple(o) for o in outs}) > 1  # three samples, not one repeated


def test_plan_groups_batches_rows_that_share_a_phase_and_splits_the_rest():
    from infinitrain.infer.generate import plan_groups

    # the example: 5 and 2,000 tokens, segment 2048, 128 new tokens: apart (256 steps), not 1,995 + 128
    assert sorted(plan_groups([5, 2000], 0, 2048, 128)) == [([0], 4), ([1], 1999)]
    # prompts ending at nearby phases share a group: rows 0 and 2 end 3 tokens apart, row 1 elsewhere
    groups = plan_groups([2050, 700, 4099], 0, 2048, 128)
    assert sorted(groups) == [([0, 2], 1), ([1], 699)]
    assert plan_groups([7, 7, 7], 0, 8, 10) == [([0, 1, 2], 6)]
    # a short prompt cannot reach back to a later phase: row 0 (3 tokens) fixes the group's phase at 2
    assert plan_groups([3, 12], 0, 8, 100) == [([0, 1], 2)]


def test_prefill_chunking_does_not_change_the_result():
    model = build()
    prompt = list(range(1, 40))
    a = generate(model, [prompt], Sampling(max_new_tokens=5, temperature=0), prefill_chunk=8)
    b = generate(model, [prompt], Sampling(max_new_tokens=5, temperature=0), prefill_chunk=5)
    c = generate(model, [prompt], Sampling(max_new_tokens=5, temperature=0), prefill_chunk=1000)
    assert a == b == c


def test_sampling_with_a_seed_is_reproducible_and_eos_stops():
    model = build()
    run = lambda seed: model.generate([[1, 2, 3]] * 3, max_new_tokens=20, temperature=1.0, top_p=0.9,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    assert run(5) == run(5)
    assert run(5) != run(6)
    first = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(5))[0]
    eos = first[3]
    stopped = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_p=0.9, eos_id=eos,
                             generator=torch.Generator().manual_seed(5))[0]
    assert stopped == first[: first.index(eos) + 1]


def test_filters_on_known_logits():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.5) == [True, False, False, False, False]  # 0.5 reached by the first token
    assert keep(top_p=0.6) == [True, True, False, False, False]
    assert keep(top_p=0.86) == [True, True, True, True, False]
    assert keep(top_p=1.0) == [True] * 5
    t = filter_logits(logits, temperature=0.5).softmax(-1)
    torch.testing.assert_close(t, (logits * 2).softmax(-1))
    assert sample_next(logits, Sampling(temperature=0)).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, Sampling(top_k=2), g) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean() - 0.5 / 0.7) < 0.04  # renormalised over the top 2


def test_sampling_validation():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)):
        with pytest.raises(ConfigError):
            Sampling(**bad)
    with pytest.raises(ConfigError):
        build().generate([[]], max_new_tokens=1)
