"""`generate --prompt-file`: the file is read, tokenized and prefilled in pieces, and the pieces' tokens equal the
whole file's (awkward cuts: multi-byte UTF-8 across reads, runs without spaces, leading-space rules, odd spacing);
the generated text equals the whole-prompt path's."""

from __future__ import annotations

import io
import random

import pytest
from click.testing import CliRunner
from evalkit import codec_of, corpus, make_model, make_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from infinitrain.cli import cli
from infinitrain.data_tools.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from infinitrain.errors import ConfigError
from infinitrain.infer.loading import Codec
from infinitrain.infer.textgen import clean_cut, read_prompt_pieces

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def awkward_text(seed: int = 0) -> str:
    """Words, multi-byte characters (2, 3 and 4 bytes), runs of spaces, tabs and newlines, a 3000-character run
    without whitespace, digits and punctuation."""
    rng = random.Random(seed)
    parts = []
    for doc in corpus(60, seed=seed):
        parts.append(doc)
        parts.append(rng.choice([" ", "  ", "\n", " \n ", "\t", "   \t\n", " ", " ", "\r\n"]))
        if rng.random() < 0.2:
            parts.append(rng.choice(["naïve café ", "日本語のテキスト ", "emoji 🙂🙃 ", "Ωμέγα ", "12345678 ",
                                     "!!?? "]))
    parts.insert(30, "x" * 1500 + "é" * 700 + "🙂" * 100 + "-" * 600)  # no whitespace for 3000 characters
    return " " + "".join(parts) + "  "  # leading and trailing spaces


def codecs_under_test(tmp_path) -> dict[str, Codec]:
    """Ours (byte-level BPE), one with ByteLevel's add_prefix_space (the leading-space rule), a Llama-3-style
    regex split, split digits, and the byte codec."""
    ours = codec_of(make_tokenizer(tmp_path / "ours.json"))
    texts = corpus(200) + ["naïve café 日本語 🙂 Ωμέγα 12345"]
    prefix = train_bpe(texts, vocab_size=400)
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    save_tokenizer(prefix, tmp_path / "prefix.json")
    llama = Tokenizer(models.BPE.from_file(*_vocab_merges(tmp_path, texts)))
    llama.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    llama.decoder = decoders.ByteLevel()
    llama.add_special_tokens(["<|end_of_text|>"])
    save_tokenizer(llama, tmp_path / "llama.json")
    save_tokenizer(train_bpe(texts, vocab_size=400, split_digits=True), tmp_path / "digits.json")
    out = {"ours": ours, "bytes": Codec.bytes()}
    for name in ("prefix", "llama", "digits"):
        tok, info = load_tokenizer(tmp_path / f"{name}.json")
        out[name] = Codec(tok, info.eos_id, name)
    return out


def _vocab_merges(tmp_path, texts):
    """vocab.json and merges.txt of a byte-level BPE trained on ``texts`` (for a hand-built pre-tokenizer)."""
    trained = train_bpe(texts, vocab_size=400)
    trained.model.save(str(tmp_path), "llama")
    return str(tmp_path / "llama-vocab.json"), str(tmp_path / "llama-merges.txt")


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    return codecs_under_test(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", ["ours", "prefix", "llama", "digits", "bytes"])
@pytest.mark.parametrize("read_bytes", [7, 64, 1000, 1 << 16])
def test_the_pieces_tokens_equal_the_whole_files(codecs, name, read_bytes):
    codec, text = codecs[name], awkward_text()
    pieces = list(read_prompt_pieces(io.BytesIO(text.encode()), codec, "p.txt", read_bytes=read_bytes))
    assert [i for ids, _ in pieces for i in ids] == codec.encode(text)
    assert sum(n for _, n in pieces) == len(text.encode())
    if read_bytes <= 1000:
        assert len(pieces) > 10  # really cut (and so the equality above is about the cuts)


def test_a_cut_is_only_made_where_the_tokenizer_agrees(codecs):
    text = "abc  def\tghi jkl" + " " * 40
    cut = clean_cut(text, codecs["ours"], context=4)
    assert text[cut - 1] != " " and text[cut] == " "  # before a space that follows a non-space
    assert clean_cut("x" * 200, codecs["ours"]) == 0  # no space: no cut (read on)
    assert clean_cut(" " * 200, codecs["ours"]) == 0  # spaces only: no space follows a non-space

    class Stubborn(Codec):  # a tokenizer that would differ at every cut
        def encode(self, text):
            return [len(text)]

    assert clean_cut("word " * 100, Stubborn(None, None, "x")) == 0


def test_bad_utf8_is_one_line_naming_the_file_and_byte(codecs):
    data = ("ok " * 100).encode() + b"\xff" + b" more"
    with pytest.raises(ConfigError, match=r"^p.txt: not UTF-8 text \(near byte 300\)$"):
        list(read_prompt_pieces(io.BytesIO(data), codecs["ours"], "p.txt", read_bytes=64))


def test_generate_from_a_file_equals_generate_from_the_same_text(tmp_path):
    """The streamed path (pieces of 64 KB, a bar on stderr) gives the text of the whole-prompt path, with 1 and 2
    samples; the prompt spans many segments and several reads."""
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    make_model(tmp_path / "model", tok)
    text = awkward_text(1) * 9  # ~72 KB: two reads
    (tmp_path / "p.txt").write_text(text)
    args = ["generate", str(tmp_path / "model"), "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "1",
            "--threads", "1"]
    for rows, extra in ((1, []), (2, ["--num-samples", "2"])):
        streamed = CliRunner().invoke(cli, [*args, "--prompt-file", str(tmp_path / "p.txt"), *extra])
        whole = CliRunner().invoke(cli, [*args, "--prompt", text, *extra])
        assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
        assert streamed.stdout == whole.stdout
        tokens = rows * len(codec_of(tok).encode(text))
        assert f"prefill {tokens:,} tokens" in streamed.stderr and f"prefill {tokens:,} tokens" in whole.stderr
    assert "prefill" in streamed.stderr.split("\n")[1]  # the bar (file of > 64 KB)
