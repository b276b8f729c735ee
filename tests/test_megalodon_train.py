"""The MEGALODON family through the same trainer and tools: TBPTT windows, exact resume, export/from_pretrained,
constant-memory generation and eval ppl with and without --no-memory."""

from __future__ import annotations

import pytest
import torch

from infinitrain.errors import Preempted
from trainkit import checkpoint_names, rows, same_steps, train

MEGA = ["model.preset=megalodon-debug", "model.segment_len=32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("mega-ref") / "run"
    train(run, MEGA)
    return run


def test_megalodon_learns_and_resumes_bitwise(reference, tmp_path):
    ref = rows(reference)
    assert ref[6]["loss"] < ref[1]["loss"]
    run = tmp_path / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("INFINITRAIN_FAULT", "sigterm:3:0")  # stopped after step 3, as a preempted job
    with pytest.raises(Preempted):
        train(run, [*MEGA, "checkpoint.save_every=1"])
    mp.undo()
    assert checkpoint_names(run)[-1] == "step-00000003"
    train(run, [*MEGA, "checkpoint.save_every=1"])
    same_steps(rows(run), ref)


def test_megalodon_export_generate_and_eval(reference, tmp_path):
    from infinitrain.export import export
    from infinitrain.infer.generate import Sampling, generate, prefill
    from infinitrain.model.lm import InfiniLM

    out = tmp_path / "export"
    export(reference, out)
    model = InfiniLM.from_pretrained(out).double().eval()
    assert model.config.arch == "megalodon"
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state = prefill(model, [ids[:, :33], ids[:, 33:69]])  # chunks across the 32-token chunk boundaries
        last = model(ids[:, 69:], state).logits
    torch.testing.assert_close(last[:, -1], full.logits[:, -1], rtol=1e-9, atol=1e-9)
    prompts = [ids[0, :40].tolist(), ids[1, :23].tolist()]
    got = generate(model, prompts, Sampling(max_new_tokens=12, temperature=0))
    for p, g in zip(prompts, got):  # greedy decoding equals argmax of full forwards, token by token
        seq = list(p)
        for tok in g:
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert seq[-1] == tok
