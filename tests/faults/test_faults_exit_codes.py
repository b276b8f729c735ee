"""Every documented exit code is produced by a test and listed in the README (issue 8 item 12); the one-rank
SIGTERM/SIGINT resume and the non-finite skip and abort. Exit 8 (a dead or hung peer) is produced by
test_faults_ranks.py."""

from __future__ import annotations

import json
import math
import re
import signal

import pytest

from infinitrain.errors import EXIT_CODES, ConfigError, DataError, ShardCorruptError, TrainingAborted
from trainkit import REPO, SMALL, TEXT, checkpoint_names, cli, events, one_line, rows, run_cli, same_steps

TRAIN = ["train", "--recipe", "debug", "--data", TEXT, *SMALL]


def test_readme_lists_every_exit_code():
    """README "Exit codes": one row per code, the same set errors.py defines (plus 0, 1 and SIGINT's 130)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| `?(\w+)", section, re.M)}
    assert set(listed) == {0, 1, 130, *EXIT_CODES.values()}
    assert {listed[c] for c in EXIT_CODES.values()} == set(EXIT_CODES) - {"InfinitrainError"} | {"usage"}


@pytest.mark.parametrize("code", [2, ConfigError.code, DataError.code, 5])
def test_user_errors_exit_with_their_code(code, tmp_path, capsys, monkeypatch):
    args = {2: ["train", "--data", TEXT],  # no --recipe: a usage error
            ConfigError.code: ["train", "--recipe", "nope"],
            DataError.code: ["train", "--recipe", "debug", "--data", tmp_path / "missing.txt"],
            5: ["generate", tmp_path / "no-model", "--prompt", "x"]}[code]
    got, _, err = cli(args, capsys, monkeypatch)
    assert got == code, err
    if code == 2:  # Click's own usage message
        assert "Error: Missing option '--recipe'" in err and "Traceback" not in err
    else:
        one_line(err, "")


def test_corrupt_shard_exits_7(tmp_path, capsys, monkeypatch):
    tok, shards = tmp_path / "tok.json", tmp_path / "shards"
    assert cli(["tokenizer", "train", TEXT, "--vocab-size", "300", "--out", tok], capsys, monkeypatch)[0] == 0
    assert cli(["prepare", TEXT, "--tokenizer", tok, "--out", shards, "--segment-len", "32", "--sample-segments", "4",
                "--no-progress", "--workers", "1"], capsys, monkeypatch)[0] == 0
    shard = sorted(shards.rglob("*.shard"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    code, _, err = cli(["data", "verify", shards], capsys, monkeypatch)
    assert code == ShardCorruptError.code
    one_line(err, shard.name)


@pytest.mark.parametrize("sig", ["sigterm", "sigint"])
def test_signal_commits_exits_128_plus_signum_and_resumes_bitwise(sig, reference, tmp_path, capsys, monkeypatch):
    """SIGTERM (SIGINT) after step 3 of one rank: step 3 committed, exit 143 (130), one line; the resumed run's
    per-step losses equal the uninterrupted run's."""
    run = tmp_path / "run"
    monkeypatch.setenv("INFINITRAIN_FAULT", f"{sig}:3:0")
    code, _, err = cli([*TRAIN, "--run-dir", run], capsys, monkeypatch)
    assert code == 128 + getattr(signal, sig.upper()) and EXIT_CODES["Preempted"] == 143
    assert checkpoint_names(run) == ["step-00000003"]
    one_line(err, f"stopped by {sig.upper()} after committing")
    monkeypatch.delenv("INFINITRAIN_FAULT")
    assert cli([*TRAIN, "--run-dir", run], capsys, monkeypatch)[0] == 0
    assert [r["step"] for r in events(run, "resumed_from")] == [3]
    same_steps(rows(run), reference[0])


def test_nonfinite_steps_are_skipped_then_abort_exit_6(tmp_path):
    """One rank: a NaN loss at attempt 2 is skipped (logged, counted) and training goes on; three in a row with
    run.max_nonfinite=3 stop the run with exit 6 and one line."""
    run = tmp_path / "a"
    res = run_cli(run, ["schedule.steps=3"], INFINITRAIN_FAULT="nan:2:0")
    assert res.returncode == 0, res.stderr[-2000:]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_total"]) for r in log if r.get("skipped")] == [(2, 1)]
    assert sorted(rows(run)) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows(run).values())
    res = run_cli(tmp_path / "b", ["run.max_nonfinite=3"], INFINITRAIN_FAULT="nan:2+3+4:0")
    assert res.returncode == TrainingAborted.code
    one_line(res.stderr, "3 steps in a row")
