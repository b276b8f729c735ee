"""Files that must not run code or crash (issue 8 items 10, 11): a checkpoint whose unpickling would write a marker
file is refused by generate, eval, export, train --init-from and train --resume, and the marker never appears;
exports are safetensors only; a hostile or broken tokenizer, model config, recipe or safetensors header gives one
line naming the file, a non-zero exit and writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from infinitrain.errors import CheckpointError
from trainkit import TEXT, cli, one_line, train


class Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """A 1-step run on text (byte-level ids) with one committed ZeRO-3 checkpoint."""
    run = tmp_path_factory.mktemp("clean") / "run"
    train(run, ["schedule.steps=1", "schedule.warmup=0"])
    return run


@pytest.fixture()
def poisoned_run(clean_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose DeepSpeed files are payloads, with the manifest re-hashed to match (the integrity
    check passes: refusing is up to the unpickling policy). Returns (run dir, marker path)."""
    import shutil

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(clean_run, run)
    ckpt = next((run / "checkpoints").iterdir())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for f in sorted((ckpt / "ds").glob("*.pt")):
        torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, f)
        rel = str(f.relative_to(ckpt))
        manifest["files"][rel] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return run, marker


def test_payload_really_runs_when_unpickled(tmp_path):
    """The control: unpickled without the policy, the payload does write the marker."""
    marker, f = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, f)
    torch.load(f, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["generate", "eval ppl", "export", "train --init-from", "train --resume"])
def test_pickled_code_in_a_checkpoint_is_refused(poisoned_run, command, tmp_path, capsys, monkeypatch):
    run, marker = poisoned_run
    out = tmp_path / "out"
    args = {"generate": ["generate", run, "--prompt", "Hello", "--tokenizer", "bytes", "--max-new-tokens", "2",
                         "--no-progress"],
            "eval ppl": ["eval", "ppl", run, "--data", TEXT, "--out", out, "--no-progress"],
            "export": ["export", run, "--out", out],
            "train --init-from": ["train", "--recipe", "debug", "--data", TEXT, "--init-from", run, "--run-dir", out,
                                  "schedule.steps=1", "schedule.warmup=0", "log.progress=false",
                                  "model.segment_len=32"],
            "train --resume": ["train", "--recipe", "debug", "--data", TEXT, "--run-dir", run, "schedule.steps=2",
                               "schedule.warmup=0", "log.progress=false", "model.segment_len=32",
                               "data.segments_per_sample=4", "data.micro_batch_size=4", "tbptt.window=2"]}[command]
    code, stdout, err = cli(args, capsys, monkeypatch)
    assert code != 0 and not marker.exists(), (code, err[-3000:])
    one_line(err, "npickl")  # "refused to unpickle" / "UnpicklingError: Weights only load failed"
    assert not (out / "model.safetensors").exists()


def test_pickle_beside_config_is_never_read(clean_run, tmp_path, capsys, monkeypatch):
    """A model directory holding config.json and only a pickled pytorch_model.bin (no safetensors): generate and
    --init-from refuse it without unpickling."""
    from infinitrain.model.config import get_preset
    from infinitrain.model.io import save_pretrained
    from infinitrain.model.lm import InfiniLM

    model_dir, marker = tmp_path / "model", tmp_path / "PWNED"
    save_pretrained(InfiniLM(get_preset("debug")), model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save({"weights": Payload(marker)}, model_dir / "pytorch_model.bin")
    code, _, err = cli(["generate", model_dir, "--prompt", "Hi", "--tokenizer", "bytes", "--no-progress"], capsys,
                       monkeypatch)
    assert code == CheckpointError.code and not marker.exists()
    one_line(err, "safetensors")
    code, _, err = cli(["train", "--recipe", "debug", "--data", TEXT, "--init-from", model_dir, "--run-dir",
                        tmp_path / "r", "log.progress=false"], capsys, monkeypatch)
    assert code != 0 and not marker.exists() and not (tmp_path / "r" / "checkpoints").exists()
    one_line(err, model_dir)


def test_exports_are_safetensors_only(clean_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    code, _, err = cli(["export", clean_run, "--out", out], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes and suffixes <= {".safetensors", ".json"}, suffixes
    for f in out.glob("*.safetensors"):
        n = struct.unpack("<Q", f.read_bytes()[:8])[0]
        json.loads(f.read_bytes()[8:8 + n])  # a JSON header and raw tensor bytes: nothing to unpickle


# --- item 11: hostile or broken files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from infinitrain.model.config import get_preset
    from infinitrain.model.io import save_pretrained
    from infinitrain.model.lm import InfiniLM

    d = tmp_path_factory.mktemp("model") / "model"
    save_pretrained(InfiniLM(get_preset("debug")), d)
    return d


def _header(n: int, body: bytes) -> bytes:
    return struct.pack("<Q", n) + body


BROKEN = {  # name -> bytes of the file (None: the file is missing)
    "missing": None,
    "empty": b"",
    "invalid JSON": b"{not json",
    "binary": b"\x00\xff\xfe\x80" * 64,
}
SAFETENSORS = {
    "missing": None,
    "empty": b"",
    "invalid JSON header": _header(9, b"{not json"),
    "oversized header": _header(1 << 40, b"{}"),  # claims 1 TB of header: refused before reading it
    "header past the end": _header(4096, b'{"a": 1}'),
}


def _generate(model: Path, tmp_path: Path, capsys, monkeypatch, tokenizer: str | Path = "bytes"):
    return cli(["generate", model, "--prompt", "Hi", "--tokenizer", tokenizer, "--max-new-tokens", "2",
                "--no-progress"], capsys, monkeypatch)


def _write(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(content)


def _damaged_copy(model_dir: Path, tmp_path: Path, name: str, content: bytes | None) -> Path:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    _write(d / name, content)
    return d


@pytest.mark.parametrize("kind", list(SAFETENSORS))
def test_broken_safetensors_header(model_dir, kind, tmp_path, capsys, monkeypatch):
    d = _damaged_copy(model_dir, tmp_path, "model.safetensors", SAFETENSORS[kind])
    code, out, err = _generate(d, tmp_path, capsys, monkeypatch)
    assert code == CheckpointError.code and out == ""
    one_line(err, d / "model.safetensors" if kind != "missing" else d)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_model_config(model_dir, kind, tmp_path, capsys, monkeypatch):
    d = _damaged_copy(model_dir, tmp_path, "config.json", BROKEN[kind])
    code, out, err = _generate(d, tmp_path, capsys, monkeypatch)
    assert code != 0 and out == ""
    one_line(err, d if kind == "missing" else d / "config.json")


@pytest.mark.parametrize("kind", [*BROKEN, "remote code"])
def test_broken_tokenizer_file(model_dir, kind, tmp_path, capsys, monkeypatch):
    """generate --tokenizer and prepare --tokenizer: one line naming the file; prepare writes no output folder."""
    tok = tmp_path / "tokenizer.json"
    _write(tok, BROKEN.get(kind, b'{"auto_map": {"AutoTokenizer": ["evil.Tokenizer", null]}}'))
    code, out, err = _generate(model_dir, tmp_path, capsys, monkeypatch, tokenizer=tok)
    assert code != 0 and out == ""
    one_line(err, tok)
    shards = tmp_path / "shards"
    code, out, err = cli(["prepare", TEXT, "--tokenizer", tok, "--out", shards, "--segment-len", "32",
                          "--sample-segments", "4", "--no-progress", "--workers", "1"], capsys, monkeypatch)
    assert code != 0 and not shards.exists()
    one_line(err, tok)


@pytest.mark.parametrize("kind", [*BROKEN, "not a mapping", "unknown key"])
def test_broken_recipe(kind, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    _write(recipe, {**BROKEN, "not a mapping": b"- 1\n- 2\n", "unknown key": b"model: debug\nbogus: 1\n"}[kind])
    code, out, err = cli(["train", "--recipe", recipe, "--data", TEXT, "--run-dir", tmp_path / "run"], capsys,
                         monkeypatch)
    assert code != 0 and not (tmp_path / "run").exists()
    one_line(err, recipe if kind != "unknown key" else "bogus")
