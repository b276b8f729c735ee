"""`infinitrain generate` and model loading: batched and streamed text equal the Python API, run dirs load, errors are
one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from evalkit import codec_of, make_model, make_tokenizer, run_main, tiny_config

from infinitrain.cli import cli
from infinitrain.infer.codec import Codec
from infinitrain.infer.loading import load_for_inference
from infinitrain.infer.generate import Sampling, TextStream, advance, generate, prefill
from infinitrain.model import InfiniLM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(root / "tokenizer.json")
    model = make_model(root / "model", tok)
    return root / "model", model, codec_of(tok)


def greedy_text(model, codec, prompt: str, n: int) -> str:
    out = model.generate([codec.encode(prompt)], max_new_tokens=n, temperature=0, eos_id=codec.eos_id)[0]
    if out and out[-1] == codec.eos_id:
        out = out[:-1]
    return codec.decode(out)


def test_batched_prompts_and_samples_match_the_python_api(saved):
    path, model, codec = saved
    r = CliRunner().invoke(cli, ["generate", str(path), "--prompt", "the grass is", "--prompt", "a long river " * 9,
                                 "--num-samples", "2", "--temperature", "0", "--max-new-tokens", "12",
                                 "--threads", "1"])
    assert r.exit_code == 0, r.output
    blocks = r.stdout.split("=== prompt ")[1:]
    assert [b.split(" ===")[0] for b in blocks] == ["1, sample 1", "1, sample 2", "2, sample 1", "2, sample 2"]
    texts = [b.split(" ===\n", 1)[1][:-1] for b in blocks]  # echo adds a newline
    assert texts[0] == texts[1] == greedy_text(model, codec, "the grass is", 12)
    assert texts[2] == texts[3] == greedy_text(model, codec, "a long river " * 9, 12)
    assert "tok/s" in r.stderr and "prefill" in r.stderr


def test_streamed_output_equals_the_unstreamed_one_and_seeds_reproduce(saved, tmp_path):
    path, model, codec = saved
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("the sun is\n\nthere and back\n")
    args = ["generate", str(path), "--max-new-tokens", "20", "--temperature", "0.9", "--top-k", "50", "--seed", "3"]
    streamed = CliRunner().invoke(cli, args + ["--prompt", "the sun is"])
    plain = CliRunner().invoke(cli, args + ["--prompt", "the sun is", "--no-stream"])
    assert streamed.exit_code == 0 and plain.exit_code == 0, streamed.output + plain.output
    assert streamed.stdout == plain.stdout
    per_line = CliRunner().invoke(cli, args + ["--prompt-file", str(prompt_file), "--lines"])
    assert per_line.stdout.count("=== prompt") == 2  # the blank line is not a prompt
    whole = CliRunner().invoke(cli, args + ["--prompt-file", str(prompt_file), "--no-stream"])
    assert "=== prompt" not in whole.stdout


def test_no_memory_generates_what_the_model_says_with_an_empty_memory_in_every_segment(saved):
    """--no-memory equals generation under memory_read_off; on a prompt of several segments it changes the text."""
    from infinitrain.evaluate.switches import memory_read_off

    path, model, codec = saved
    prompt = "a long river and the sun is there and back " * 6
    assert len(codec.encode(prompt)) > 2 * model.config.segment_len
    args = ["generate", str(path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16", "--no-stream"]
    on, off = (CliRunner().invoke(cli, args + flags) for flags in ([], ["--no-memory"]))
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    with memory_read_off(model):
        expected = greedy_text(model, codec, prompt, 16)
    assert off.stdout == expected + "\n" and on.stdout == greedy_text(model, codec, prompt, 16) + "\n"
    assert off.stdout != on.stdout


def test_text_stream_holds_back_split_utf8_characters():
    codec = Codec.bytes()
    ids = codec.encode("héllo ✓!")
    s = TextStream(codec.decode)
    pieces = [s.push([i]) for i in ids]
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes: nothing until both arrived
    assert "".join(pieces) + s.flush() == "héllo ✓!"


@pytest.mark.parametrize("kw", [{}, dict(mod_every=2, mod_capacity=0.5, update="delta")], ids=["linear", "mod-delta"])
def test_prefill_without_logits_gives_the_state_of_a_full_forward(kw):
    torch.manual_seed(0)
    model = InfiniLM(tiny_config(**kw)).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ref = model(ids[:, :21], model(ids[:, :19]).state).state
        got = advance(model, ids[:, :21], advance(model, ids[:, :19]))
    for a, b in zip(ref.layers, got.layers):  # the buffer is room the views k, v, k_rot are compared through
        for x, y in zip(*(torch.utils._pytree.tree_leaves(s._replace(buffer=None)) for s in (a, b))):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_streamed_prefill_then_generate_from_the_state_equals_one_generate_call():
    torch.manual_seed(0)
    model = InfiniLM(tiny_config(update="delta")).eval()
    prompt = torch.randint(0, 512, (1, 75))
    whole = model.generate([prompt[0].tolist()], max_new_tokens=20, temperature=0)
    state = prefill(model, (prompt[:, i:min(74, i + 16)] for i in range(0, 74, 16)))  # the last chunk is partial
    assert generate(model, [[int(prompt[0, -1])]], Sampling(max_new_tokens=20, temperature=0), state=state) == whole


def fake_run_dir(root, model: InfiniLM, text_file) -> None:
    """A committed checkpoint as the trainer lays it out, with stage-0 DeepSpeed module states."""
    ck = root / "checkpoints" / "step-00000007"
    (ck / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ck / "ds" / "mp_rank_00_model_states.pt")
    f = ck / "ds" / "mp_rank_00_model_states.pt"
    (ck / "manifest.json").write_text(json.dumps({"version": 1, "step": 7, "world_size": 1, "files": {
        "ds/mp_rank_00_model_states.pt": {"bytes": f.stat().st_size, "sha256": "x"}}}))
    (root / "checkpoints" / "step-00000009.tmp").mkdir()  # uncommitted: never loaded
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict(),
                                                      "data": {"path": str(text_file)}}))


def test_run_directory_loads_the_newest_committed_checkpoint_with_a_byte_codec(tmp_path):
    torch.manual_seed(1)
    model = InfiniLM(tiny_config(vocab_size=256)).eval()
    (tmp_path / "train.txt").write_text("hello")
    fake_run_dir(tmp_path / "run", model, tmp_path / "train.txt")
    loaded, codec = load_for_inference(tmp_path / "run")
    assert codec.source == "bytes" and codec.decode(codec.encode("é!")) == "é!"
    ids = torch.tensor([codec.encode("hello world")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000007"
    with open(ckpt / "ds" / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"x")
    code_err = pytest.raises(Exception, load_for_inference, ckpt)
    assert "manifest records" in str(code_err.value)


def test_bad_inputs_are_one_line_errors_with_exit_codes(saved, tmp_path, capsys):
    path, _, _ = saved
    cases = [(["generate", str(tmp_path / "nope"), "--prompt", "x"], 5, "no such model directory"),
             (["generate", str(path), "--prompt", "x", "--top-p", "1.5"], 3, "top_p"),
             (["generate", str(path)], 3, "no prompt given"),
             (["generate", str(path), "--prompt-file", str(tmp_path / "missing.txt")], 3, "cannot read prompt file")]
    bare = tmp_path / "bare"
    make_model(bare, None)
    cases.append((["generate", str(bare), "--prompt", "x"], 3, "pass --tokenizer"))
    for argv, code, message in cases:
        got, out, err = run_main(argv, capsys)
        assert got == code, (argv, err)
        assert err.strip().splitlines()[-1].startswith("error:") and message in err and "Traceback" not in err


def test_generate_as_a_real_subprocess(saved):
    path, model, codec = saved
    out = subprocess.run([sys.executable, "-m", "infinitrain.cli", "generate", str(path), "--prompt", "the sky",
                          "--temperature", "0", "--max-new-tokens", "8", "--no-progress"],
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == greedy_text(model, codec, "the sky", 8) + "\n"  # bytes: a random model writes \r
    assert b"tok/s" in out.stderr


def test_generate_benchmark_pieces_at_tiny_sizes():
    """benchmarks/generate.py in-process: the full-attention baseline is a correct decoder, every cell is timed,
    and the table reports the three targets (no timing assertions)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_generate",
                                                  Path(__file__).parents[1] / "benchmarks" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--quick", "--d-model", "32", "--d-ff", "64"])
    assert bench.check_baseline(args) < 1e-5
    report = {"command": "x", "torch": "t", "machine": "m", "threads": 1, "load_start": "0", "load_end": "0",
              "contexts": args.contexts, "decode_tokens": args.decode_tokens, "full_decode_tokens": 8, "rounds": 1,
              "results": bench.measure_latency(args),
              "memory": [bench.peak_rss(args, a, c) for a in args.archs for c in args.rss_contexts]
              + [bench.peak_rss(args, "full-attn", 256)]}
    assert {(r["impl"], r["context"]) for r in report["results"]} == {
        ("infini", 128), ("infini", 256), ("megalodon", 128), ("megalodon", 256), ("full-attn", 256)}
    assert all(r["decode_ms_median"] > 0 and r["decode_tokens"] == 8 for r in report["results"])
    report["summary"] = bench.summarize(report, args)
    table = bench.format_table(report)
    for needle in ("latency spread", "peak RSS 256 / 64 prompt", "slower per token", "load average",
                   "megalodon: decode latency spread"):
        assert needle in table


@pytest.mark.skipif(os.environ.get("INFINITRAIN_SLOW") != "1", reason="trains a debug run (~1 min): INFINITRAIN_SLOW=1")
def test_a_real_zero3_run_directory_loads_and_generates(tmp_path):
    """The trainer's own ZeRO-3 checkpoint (gathered by DeepSpeed's zero_to_fp32), byte codec from its .txt data."""
    from evalkit import corpus

    text = tmp_path / "train.txt"
    text.write_text(" ".join(corpus(300)))
    subprocess.run([sys.executable, "-m", "infinitrain.cli", "train", "--recipe", "debug", "--data", str(text),
                    "--run-dir", str(tmp_path / "run"), "schedule.steps=2", "schedule.warmup=1",
                    "checkpoint.save_every=2", "log.eval_every=0", "log.progress=false", "log.tensorboard=false"],
                   check=True, capture_output=True, timeout=900)
    model, codec = load_for_inference(tmp_path / "run")
    assert codec.source == "bytes" and model.config.segment_len == 64
    r = CliRunner().invoke(cli, ["generate", str(tmp_path / "run"), "--prompt", "the grass", "--max-new-tokens", "5",
                                 "--temperature", "0", "--no-stream"])
    assert r.exit_code == 0, r.output
    assert r.stdout == greedy_text(model, codec, "the grass", 5) + "\n"
