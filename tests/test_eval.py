"""Evaluations: passkey table/JSON/PNG and its scoring (oracle 100%, random model low), ppl per segment equals a
manual computation over every segment, --no-memory changes later segments only and leaves the model untouched,
ROUGE summaries, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from evalkit import codec_of, corpus, make_model, make_tokenizer, run_main

from infinitrain.cli import cli
from infinitrain.data_tools.prepare import PrepareConfig, prepare
from infinitrain.evaluate import passkey as pk
from infinitrain.evaluate import plots
from infinitrain.evaluate import ppl
from infinitrain.evaluate.switches import memory_read_off

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer(root / "tokenizer.json")
    model = make_model(root / "model", tok)
    return root, tok, model, codec_of(tok)


@pytest.fixture(scope="module")
def shards(kit):
    """Documents of 3 to ~300 tokens packed into samples of 4 x 16 tokens, so documents cross samples."""
    root, tok, _, codec = kit
    texts = corpus(14, seed=5) + [" ".join(corpus(12, seed=6))]
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(PrepareConfig(inputs=(str(src),), tokenizer=str(tok), out=str(root / "shards"), segment_len=16,
                          sample_segments=4, progress=False))
    return root / "shards", [codec.encode(t) + [codec.eos_id] for t in texts]


def test_passkey_table_json_and_heatmap(kit, tmp_path):
    root, _, _, _ = kit
    r = CliRunner().invoke(cli, ["eval", "passkey", str(root / "model"), "--lengths", "128,256", "--depths", "0,50,100",
                                 "--samples", "2", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["depth", "\\", "length", "128", "256"]
    assert [line.split()[0] for line in lines[1:5]] == ["0%", "50%", "100%", "mean"]
    report = json.loads((tmp_path / "passkey.json").read_text())
    assert report["schema"] == 1 and report["config"]["lengths"] == [128, 256]
    assert report["config"]["depths"] == [0.0, 0.5, 1.0] and report["config"]["memory"] is True
    assert len(report["cells"]) == 6 and len(report["records"]) == 12
    for cell in report["cells"]:
        assert set(cell) == {"length", "depth", "correct", "total", "accuracy", "prompt_tokens_mean"}
        assert cell["total"] == 2 and cell["prompt_tokens_mean"] <= cell["length"]
    for rec in report["records"]:
        assert set(rec) == {"length", "depth", "pass_key", "prompt_tokens", "output", "correct"}
    assert report["accuracy"] <= 0.25  # a random model does not find 1-50000 keys
    assert (tmp_path / "passkey.png").is_file() == HAS_MPL
    if not HAS_MPL:
        assert "matplotlib is not installed" in r.stderr


def test_passkey_scores_a_model_that_always_answers_correctly_100_percent(kit, monkeypatch, tmp_path):
    _, _, model, codec = kit

    def oracle(model, prompts, sampling, **kw):
        keys = [re.search(r"The pass key is (\d+)\.", codec.decode(p)).group(1) for p in prompts]
        return [codec.encode(f" {k}. The") for k in keys]

    monkeypatch.setattr(pk, "generate", oracle)
    cfg = pk.PasskeyConfig(lengths=(128, 200), depths=(0.0, 0.25, 1.0), samples=3)
    report = pk.run_passkey(model, codec, cfg, progress=False)
    assert report.accuracy == 1.0 and all(c["accuracy"] == 1.0 for c in report.cells)
    assert "100.0" in pk.format_table(report)
    monkeypatch.setattr(pk, "generate", lambda model, prompts, sampling, **kw: [codec.encode(" 0.")] * len(prompts))
    wrong = pk.run_passkey(model, codec, pk.PasskeyConfig(lengths=(128,), depths=(0.5,), samples=2, memory=False),
                           progress=False)
    assert wrong.accuracy == 0.0
    assert pk.write_outputs(wrong, tmp_path)[0].name == "passkey-no-memory.json"
    monkeypatch.setattr(plots, "pyplot", lambda: None)  # matplotlib missing: JSON still written, no PNG
    json_path, png = pk.write_outputs(wrong, tmp_path / "noplot")
    assert json_path.is_file() and png is None and not (tmp_path / "noplot" / "passkey-no-memory.png").exists()


def test_passkey_helpers():
    assert pk.parse_lengths("1k,4k,256,1m") == [256, 1024, 4096, 1024**2]
    assert [pk.length_label(n) for n in (1024, 65536, 1024**2, 300)] == ["1K", "64K", "1M", "300"]
    assert pk.first_integer(" 4412. Remember 7") == 4412 and pk.first_integer(" none") is None


def manual_segment_losses(model, docs: list[list[int]], S: int) -> tuple[list[float], list[int]]:
    """Each document in one forward call; position t (target t+1 inside the document) counts in segment t // S."""
    sums, counts = {}, {}
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d])
            nll = F.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:], reduction="none")
            for t, v in enumerate(nll.tolist()):
                sums[t // S] = sums.get(t // S, 0.0) + v
                counts[t // S] = counts.get(t // S, 0) + 1
    n = max(sums) + 1
    return [sums[k] for k in range(n)], [counts[k] for k in range(n)]


def test_ppl_per_segment_equals_a_manual_computation_over_every_segment(kit, shards):
    _, _, model, _ = kit
    folder, docs = shards
    report = ppl.run_ppl(model, ppl.PplConfig(data=str(folder), split="train", batch_size=3), progress=False)
    sums, counts = manual_segment_losses(model, docs, model.config.segment_len)
    assert report.documents == len(docs) and len(report.segments) == len(counts) > 10
    assert [s["tokens"] for s in report.segments] == counts
    for s, total, n in zip(report.segments, sums, counts):
        assert s["loss"] == pytest.approx(total / n, rel=1e-5)
    assert report.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert report.ppl == pytest.approx(math.exp(report.loss))


def test_no_memory_changes_later_segments_only_and_leaves_the_model_unchanged(kit, shards, tmp_path):
    root, _, model, _ = kit
    folder, _ = shards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(data=str(folder), split="train", batch_size=2)
    on = ppl.run_ppl(model, ppl.PplConfig(**cfg), progress=False)
    off = ppl.run_ppl(model, ppl.PplConfig(**cfg, memory=False), progress=False)
    assert off.segments[0]["loss"] == pytest.approx(on.segments[0]["loss"], rel=1e-6)  # empty memory either way
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(on.segments[1:], off.segments[1:]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with memory_read_off(model), pytest.raises(ValueError, match="stay inside one segment"):
            model(ids)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)  # hooks removed after an error too
    r = CliRunner().invoke(cli, ["eval", "ppl", str(root / "model"), "--data", str(folder), "--split", "train",
                                 "--no-memory", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "ppl-no-memory.json").read_text())
    assert saved["config"]["memory"] is False and saved["loss"] == pytest.approx(off.loss, rel=1e-6)
    assert "memory OFF" in r.stdout and r.stdout.splitlines()[0].split()[:2] == ["segment", "tokens"]
    assert (tmp_path / "ppl.png").is_file() == HAS_MPL


def test_summarize_rouge_and_an_oracle(kit, tmp_path, monkeypatch):
    pytest.importorskip("rouge_score")
    from infinitrain.evaluate import summarize as sm

    root, _, model, codec = kit
    data = tmp_path / "s.jsonl"
    refs = ["the sun is yellow.", "the river runs past the mill."]
    data.write_text("".join(json.dumps({"doc": d, "ref": r}) + "\n" for d, r in zip(corpus(2, seed=9), refs)))
    r = CliRunner().invoke(cli, ["eval", "summarize", str(root / "model"), "--data", str(data), "--document-field",
                                 "doc", "--summary-field", "ref", "--max-new-tokens", "12", "--out", str(tmp_path),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "summarize.json").read_text())
    assert report["config"]["temperature"] == 0.5 and report["config"]["top_p"] == 0.95
    assert len(report["records"]) == 2 and all(0 <= report[m] <= 100 for m in ("rouge1", "rouge2", "rougeL"))
    assert sm.SEPARATOR == PrepareConfig.separator
    seen = iter(refs)
    monkeypatch.setattr(sm, "generate", lambda m, prompts, s, **kw: [codec.encode(next(seen)) for _ in prompts])
    cfg = sm.SummarizeConfig(data=str(data), document_field="doc", summary_field="ref", batch_size=1)
    oracle = sm.run_summarize(model, codec, cfg, progress=False)
    assert [oracle.rouge1, oracle.rouge2, oracle.rougeL, oracle.overall] == pytest.approx([100.0] * 4)


def test_eval_errors_are_one_line_with_exit_codes(kit, tmp_path, capsys):
    root, _, _, _ = kit
    model = str(root / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "a", "summary": "b"}\n{not json\n')
    cases = [(["eval", "passkey", model, "--lengths", "4x"], 3, "--lengths"),
             (["eval", "passkey", model, "--lengths", "16"], 3, "shorter than the prompt"),
             (["eval", "passkey", model, "--samples", "0"], 3, "--samples"),
             (["eval", "ppl", model, "--data", str(tmp_path)], 4, "no index.json"),
             (["eval", "summarize", model, "--data", str(bad)], 4, f"{bad}:2: invalid JSON")]
    for argv, code, message in cases:
        got, out, err = run_main(argv, capsys)
        assert got == code, (argv, err)
        assert err.strip().splitlines()[-1].startswith("error:") and message in err and "Traceback" not in err


def test_eval_passkey_as_a_real_subprocess(kit, tmp_path):
    root, _, _, _ = kit
    out = subprocess.run([sys.executable, "-m", "infinitrain.cli", "eval", "passkey", str(root / "model"),
                          "--lengths", "128", "--depths", "50", "--samples", "1", "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "passkey accuracy" in out.stdout and (tmp_path / "passkey.json").is_file()


def test_memory_tau_scale_reads_and_writes_the_memory_at_f_times_tau(kit, tmp_path, capsys):
    """--memory-tau-scale F: every layer equals the naive Infini-attention run with τ·F (the read σ(Fτq) and the
    write σ(Fτk)); `eval passkey` records F and answers like the scaled model; a model without τ refuses F != 1."""
    from infinitrain.infer.loading import load_for_inference
    from infinitrain.ops.memory import infini_attention_naive

    root, tok, _, codec = kit
    make_model(tmp_path / "tau", tok, memory_tau=2.0, update="delta")
    plain, _ = load_for_inference(tmp_path / "tau")
    scaled, _ = load_for_inference(tmp_path / "tau", memory_tau_scale=1.5)
    x = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lp, ls in zip(plain.layers, scaled.layers):
            a = ls.attn
            q, k, v = a.project(x)
            ref, mem = infini_attention_naive(q, k, v, a.betas, segment_len=16, update="delta", rotary=a.rotary,
                                              eps=a.eps, tau=1.5 * lp.attn.tau())
            out, state = a(x)
            torch.testing.assert_close(out, a.merge(ref), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.mem.M, mem.M, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, lp.attn(x)[0], atol=1e-4)

    cfg = pk.PasskeyConfig(lengths=(128,), depths=(0.0, 1.0), samples=2)
    want = pk.run_passkey(scaled, codec, cfg, progress=False)
    code, stdout, err = run_main(["eval", "passkey", str(tmp_path / "tau"), "--lengths", "128", "--depths", "0,100",
                                  "--samples", "2", "--out", str(tmp_path / "ev"), "--memory-tau-scale", "1.5",
                                  "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "passkey.json").read_text())
    assert report["memory_tau_scale"] == 1.5 and "memory τ x1.5" in err and "τ x1.5" in stdout
    assert [r["output"] for r in report["records"]] == [r["output"] for r in want.records]
    for argv, message in ((["--memory-tau-scale", "2"], f"{root / 'model'}: --memory-tau-scale needs memory "
                                                         "temperatures"),  # the kit's model has no τ
                          (["--memory-tau-scale", "-1"], "--memory-tau-scale must be a finite number > 0")):
        code, stdout, err = run_main(["eval", "passkey", str(root / "model"), "--lengths", "128", *argv], capsys)
        assert code == 3 and message in err and stdout == "", err
        assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
