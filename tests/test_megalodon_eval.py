"""The MEGALODON family through `eval ppl` (with and without --no-memory), `eval passkey` and `generate` from the
CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from evalkit import corpus, make_model, make_tokenizer

from infinitrain.cli import cli
from infinitrain.data_tools.prepare import PrepareConfig, prepare
from infinitrain.evaluate import ppl

MEGA = dict(arch="megalodon", n_kv_heads=4, head_dim=8, v_dim=32, ema_dim=4, norm_groups=8)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("mega-eval")
    tok = make_tokenizer(root / "tokenizer.json")
    model = make_model(root / "model", tok, **MEGA)
    with torch.no_grad():  # a random model whose carried state matters: move the zero-initialised affine maps
        for n, p in model.named_parameters():
            if n.endswith(("qk_gamma", "qk_mu", "norm_bias")):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(root / "model")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(10, seed=5) + [" ".join(corpus(12, seed=6))]))
    prepare(PrepareConfig(inputs=(str(src),), tokenizer=str(tok), out=str(root / "shards"), segment_len=16,
                          sample_segments=4, progress=False))
    return root, model


def test_ppl_with_and_without_the_carried_state(kit, tmp_path):
    root, model = kit
    cfg = dict(data=str(root / "shards"), split="train", batch_size=2)
    on = ppl.run_ppl(model, ppl.PplConfig(**cfg), progress=False)
    off = ppl.run_ppl(model, ppl.PplConfig(**cfg, memory=False), progress=False)
    assert off.segments[0]["loss"] == pytest.approx(on.segments[0]["loss"], rel=1e-6)  # the first chunk: no past
    later = [abs(a["loss"] - b["loss"]) for a, b in zip(on.segments[1:], off.segments[1:])]
    assert max(later) > 1e-4 and sum(x > 1e-6 for x in later) > 0.8 * len(later)  # the past reaches later chunks
    r = CliRunner().invoke(cli, ["eval", "ppl", str(root / "model"), "--data", str(root / "shards"), "--split",
                                 "train", "--no-memory", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ppl-no-memory.json").read_text())["loss"] == pytest.approx(off.loss, rel=1e-6)


def test_passkey_and_generate_from_the_cli(kit, tmp_path):
    root, _ = kit
    r = CliRunner().invoke(cli, ["eval", "passkey", str(root / "model"), "--lengths", "256,512", "--depths", "0,100",
                                 "--samples", "1", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "512" in r.stdout and "MEGALODON" in r.output
    r = CliRunner().invoke(cli, ["generate", str(root / "model"), "--prompt", "the sky is", "--max-new-tokens", "8",
                                 "--temperature", "0", "--no-stream"])
    assert r.exit_code == 0, r.output
