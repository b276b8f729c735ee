"""Tests for tokenizer training and loading (infinitrain/data_tools/tokenizer.py, `infinitrain tokenizer train`)."""

from __future__ import annotations

import json

import pytest
from test_data_helpers import invoke, make_docs, run_cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from infinitrain.data_tools.tokenizer import (BOS, EOS, PAD, byte_tokenizer, encoder, load_tokenizer,
                                              save_tokenizer, token_dtype, train_bpe)
from infinitrain.errors import ConfigError

TEXT = "Ünïcödé 東京 🙂 tabs\tand  double  spaces\n\nnew lines  <|eos|> literal specials\r\n"


def test_trained_bpe_has_specials_first_reaches_vocab_and_round_trips(tmp_path):
    tok = train_bpe(make_docs(200), vocab_size=400)
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    assert tok.get_vocab_size() == 400
    save_tokenizer(tok, tmp_path / "tok.json")
    enc, info = load_tokenizer(tmp_path / "tok.json")
    assert (info.bos_id, info.eos_id, info.pad_id, info.vocab_size) == (0, 1, 2, 400)
    for text in [TEXT, *make_docs(20, seed=5)]:
        ids = enc.encode(text, add_special_tokens=False).ids
        assert enc.decode(ids, skip_special_tokens=False) == text
    assert 1 not in enc.encode(TEXT).ids  # the literal "<|eos|>" in a document is plain text, not the eos id
    assert len(enc.encode(make_docs(1, seed=9)[0]).ids) < len(make_docs(1, seed=9)[0].encode()) / 2  # merges work


def test_training_is_deterministic(tmp_path):
    a = train_bpe(make_docs(100, seed=3), vocab_size=500).to_str()
    b = train_bpe(make_docs(100, seed=3), vocab_size=500).to_str()
    assert a == b


def test_byte_tokenizer_is_one_token_per_byte():
    tok = encoder(byte_tokenizer())
    assert tok.get_vocab_size() == 259
    ids = tok.encode(TEXT).ids
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT


def _gpt2_like(tmp_path, specials):
    tok = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(range(97, 123))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_any_hf_tokenizer_json_is_accepted_and_special_ids_found(tmp_path):
    path = _gpt2_like(tmp_path, ["<|endoftext|>"])
    _, info = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert info.eos_id == 26 and info.bos_id is None and info.pad_id == 26
    assert token_dtype(info.vocab_size).itemsize == 2 and token_dtype(70_000).itemsize == 4
    _gpt2_like(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"])
    _, info = load_tokenizer(path)
    assert (info.bos_id, info.eos_id, info.pad_id) == (26, 27, 28)
    _, info = load_tokenizer(path, eos_token="<|begin_of_text|>")
    assert info.eos_id == 26


def test_bad_tokenizers_give_one_line_errors_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not a valid tokenizer.json \\(invalid JSON: Expecting"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "evil.Tok"}}))
    with pytest.raises(ConfigError, match="wrong.json: valid JSON, but not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "wrong.json")
    (tmp_path / "hello.json").write_text('{"hello": 1}')  # was reported as invalid JSON ("expected `,` or `}`")
    with pytest.raises(ConfigError, match=r"hello.json: valid JSON, but .* \(no 'model' mapping; keys hello\)$"):
        load_tokenizer(tmp_path / "hello.json")
    tok = json.loads(_gpt2_like(tmp_path, ["<|endoftext|>"]).read_text())
    (tmp_path / "broken.json").write_text(json.dumps({**tok, "model": {"type": "BPE", "vocab": 3}}))
    with pytest.raises(ConfigError, match="broken.json: not a valid tokenizer.json \\("):
        load_tokenizer(tmp_path / "broken.json")
    path = _gpt2_like(tmp_path, ["<|unusual|>"])
    with pytest.raises(ConfigError, match="no end-of-document token found.*--eos-token"):
        load_tokenizer(path)
    with pytest.raises(ConfigError, match="'<x>' is not in the vocabulary"):
        load_tokenizer(path, eos_token="<x>")


def test_cli_tokenizer_train_in_process_and_as_subprocess(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_docs(50)):
        (corpus / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    res = invoke("tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "a.json"))
    assert res.exit_code == 0 and "vocab 400 from 50 file(s)" in res.output
    proc = run_cli("tokenizer", "train", str(corpus / "*.txt"), "--vocab-size", "400", "--out",
                   str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    proc = run_cli("tokenizer", "train", str(corpus), "--vocab-size", "10", "--out", str(tmp_path / "c.json"))
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.json").exists()


def test_split_digits_spells_every_number_with_single_digit_tokens(tmp_path):
    docs = [f"{d} order 31415 and 27182 were filed as 1234567890 on page {i}." for i, d in enumerate(make_docs(50))]
    plain, split = encoder(train_bpe(docs, vocab_size=600)), encoder(train_bpe(docs, vocab_size=600, split_digits=True))
    text = TEXT + " keys 31415, 900000001 and 27182."
    assert any(sum(c.isdigit() for c in plain.id_to_token(i)) > 1 for i in plain.encode(text).ids)  # merged numbers
    ids = split.encode(text).ids
    pieces = [split.id_to_token(i) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert sum(p.isdigit() for p in pieces) == sum(c.isdigit() for c in text)
    assert split.decode(ids) == text  # still lossless
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = invoke("tokenizer", "train", str(tmp_path / "d.jsonl"), "--vocab-size", "600", "--split-digits",
               "--out", str(tmp_path / "t.json"))
    assert r.exit_code == 0, r.output
    assert encoder(Tokenizer.from_file(str(tmp_path / "t.json"))).encode(text).ids == ids
