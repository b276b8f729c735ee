"""A run directory a user can rely on: made with relative paths, used from any directory; a resume with another
model refused before anything is written; a finished run, a resume and a failed start each say what happened."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import TEXT, clean_env

from infinitrain.errors import ConfigError

CLI = [sys.executable, "-c", "from infinitrain.cli import main; main()"]
SMALL = ["data.segments_per_sample=2", "data.micro_batch_size=2", "data.val_samples=2", "log.every=1",
         "log.tensorboard=false", "model.segment_len=32", "run.zero_stage=0", "checkpoint.save_every=0"]


def infinitrain(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def tree_digest(root: Path) -> str:
    """Every path, mode, size and content hash under ``root``: equal digests, nothing changed."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size}\n".encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's folder: a tokenizer, prepared data and a 2-step run, all made with relative paths from inside it."""
    work = tmp_path_factory.mktemp("project")
    shutil.copy(TEXT, work / "book.txt")
    for args in (["tokenizer", "train", "book.txt", "--vocab-size", "300", "--out", "tok.json"],
                 ["prepare", "book.txt", "--tokenizer", "tok.json", "--out", "data", "--segment-len", "32",
                  "--sample-segments", "2", "--val-fraction", "0.1", "--no-progress", "--workers", "1"]):
        res = infinitrain(work, *args)
        assert res.returncode == 0, res.stderr[-2000:]
    res = infinitrain(work, "train", "--recipe", "debug", "--data", "data", "--run-dir", "run", *SMALL,
                      "schedule.steps=2", "log.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    # stdout holds our result only: DeepSpeed's "... built successfully" is not printed
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["done"], res.stdout
    assert "built successfully" not in res.stderr
    assert "note: the data's tokenizer has 300 tokens, model.vocab_size is 512: 212 output rows" in res.stderr
    return work


def test_a_run_made_with_relative_paths_works_from_any_directory(project, tmp_path):
    """The quickstart's "Next:" line: export, generate and eval of the run from another directory, and the export
    ships the tokenizer (it used to be exported with "tokenizer": null)."""
    run = project / "run"
    assert (run / "tokenizer.json").read_bytes() == (project / "tok.json").read_bytes()  # copied in at start
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = infinitrain(elsewhere, "export", str(run), "--out", str(tmp_path / "model"))
    assert res.returncode == 0 and "tokenizer tokenizer.json" in res.stdout, res.stderr[-2000:]
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == (project / "tok.json").read_bytes()
    for model in (run, tmp_path / "model"):
        res = infinitrain(elsewhere, "generate", str(model), "--prompt", "It is a truth", "--max-new-tokens", "4",
                          "--temperature", "0", "--no-stream")
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]
    res = infinitrain(elsewhere, "eval", "ppl", str(run), "--data", str(project / "data"), "--max-documents", "1",
                      "--out", "evals", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    moved = tmp_path / "moved"  # the run alone, its data gone: it still has its tokenizer
    shutil.copytree(run, moved / "run")
    res = infinitrain(moved, "generate", "run", "--prompt", "It is", "--max-new-tokens", "2", "--no-stream")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("change,named", [("model.n_layers=3", "model.n_layers 2 -> 3"),
                                          ("model.update=delta", "model.update 'linear' -> 'delta'")])
def test_a_resume_with_another_model_is_refused_and_changes_nothing(project, change, named):
    before = tree_digest(project / "run")
    res = infinitrain(project, "train", "--recipe", "debug", "--data", "data", "--run-dir", "run", *SMALL,
                      "schedule.steps=2", change)
    assert res.returncode == ConfigError.code and "Traceback" not in res.stderr, res.stderr[-3000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and named in error[0] and "start over in a new --run-dir" in error[0], res.stderr
    assert tree_digest(project / "run") == before  # config.yaml was overwritten before


def test_a_finished_run_says_so_and_a_resume_line_stands_alone(project, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(project / "run", run)
    res = infinitrain(project, "train", "--recipe", "debug", "--data", "data", "--run-dir", str(run), *SMALL,
                      "schedule.steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("done: the run had already reached step 2 of 2; nothing to train") and \
        "nan" not in res.stdout, res.stdout
    res = infinitrain(project, "train", "--recipe", "debug", "--data", "data", "--run-dir", str(run), *SMALL,
                      "schedule.steps=3", "log.progress=true")
    assert res.returncode == 0 and res.stdout.startswith("done: step 3  loss "), res.stderr[-2000:]
    lines = re.split(r"[\r\n]", res.stderr)  # the bar redraws with \r: the resume line must not share its line
    assert any(line.startswith(f"resuming from {run}/checkpoints/step-00000002 (step 2)") for line in lines), \
        res.stderr
    assert any(line.startswith("train:") for line in lines)


def test_a_start_refused_for_its_input_leaves_no_run_directory(tmp_path):
    res = infinitrain(tmp_path, "train", "--recipe", "debug", "schedule.steps=2")  # no --data
    assert res.returncode == ConfigError.code and "no training data" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "tiny.txt").write_text("too short for one sample")
    res = infinitrain(tmp_path, "train", "--recipe", "debug", "--data", "tiny.txt", "schedule.steps=2")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
