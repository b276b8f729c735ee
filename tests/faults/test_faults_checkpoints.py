"""Damaged checkpoints and a full disk (issue 8 items 3, 5): a corrupt newest checkpoint stops the resume with one
line naming the file and the expected and actual hash, or with --allow-fallback resumes from the previous one;
never a silent start from scratch. A save that hits the file-size limit leaves the previous checkpoint valid."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from infinitrain.errors import CheckpointError, Preempted
from trainkit import checkpoint_names, events, manifest_holds, rows, run_cli, same_steps, train

STEP1, STEP2 = "step-00000001", "step-00000002"
OPTIM = "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    """A 6-step run stopped by SIGTERM after step 2, saving every step: step-1 and step-2 committed."""
    run = tmp_path_factory.mktemp("two-commits") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("INFINITRAIN_FAULT", "sigterm:2:0")
    with pytest.raises(Preempted):
        train(run, ["checkpoint.save_every=1"])
    mp.undo()
    assert checkpoint_names(run) == [STEP1, STEP2]
    return run


def _flip(f: Path) -> None:
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    f.write_bytes(bytes(blob))


def _damage(ckpt: Path, kind: str) -> str:
    """Damage ``ckpt``; returns a regex the error must match (the file, and the hashes where there are some)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    optim = ckpt / OPTIM
    sha = manifest["files"][OPTIM]["sha256"]
    if kind == "flipped byte":
        _flip(optim)
        return re.escape(f"{optim}: corrupt (sha256 expected {sha}, got ") + "[0-9a-f]{64}"
    if kind == "truncated file":
        optim.write_bytes(optim.read_bytes()[:1000])
        return re.escape(f"{optim}: corrupt (sha256 expected {sha}, got ") + "[0-9a-f]{64}.*1000 of"
    if kind == "missing rank file":
        (ckpt / "rng_rank00000.pt").unlink()
        sha = manifest["files"]["rng_rank00000.pt"]["sha256"]
        return re.escape(f"{ckpt / 'rng_rank00000.pt'}: missing (sha256 expected {sha}")
    if kind == "garbage manifest":
        (ckpt / "manifest.json").write_bytes(b"\x00\xff garbage {")
        return re.escape(f"{ckpt / 'manifest.json'}: unreadable manifest")
    if kind == "manifest of another shape":
        (ckpt / "manifest.json").write_text('{"files": ["a"], "step": 2, "world_size": 1}')
        return re.escape(f"{ckpt / 'manifest.json'}: not a checkpoint manifest")
    if kind == "no manifest":
        (ckpt / "manifest.json").unlink()
        return re.escape(f"{ckpt / 'manifest.json'}: missing")
    raise ValueError(kind)


KINDS = ["flipped byte", "truncated file", "missing rank file", "garbage manifest", "manifest of another shape",
         "no manifest"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_is_named_never_skipped(two_commits, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(two_commits, run)
    needle = _damage(run / "checkpoints" / STEP2, kind)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=needle) as err:
        train(run)
    assert "\n" not in str(err.value)
    assert (run / "metrics.jsonl").read_text() == before and checkpoint_names(run) == [STEP1, STEP2]  # nothing ran


def test_fallback_flag_resumes_from_the_previous_checkpoint(two_commits, reference, tmp_path):
    """--allow-fallback: the flipped step-2 is skipped (logged, named), the run resumes from step 1 and
    reproduces the uninterrupted run bitwise."""
    run = tmp_path / "run"
    shutil.copytree(two_commits, run)
    _damage(run / "checkpoints" / STEP2, "flipped byte")
    res = run_cli(run, extra=["--allow-fallback"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped a damaged checkpoint" in res.stderr and OPTIM.split("/")[1] in res.stderr
    resumed = events(run, "resumed_from")
    assert [Path(r["resumed_from"]).name for r in resumed] == [STEP1]
    assert "sha256 expected" in resumed[0]["fallbacks"][0]
    same_steps(rows(run), reference[0])


def test_all_checkpoints_damaged_is_an_error_even_with_fallback(two_commits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_commits, run)
    _damage(run / "checkpoints" / STEP2, "flipped byte")
    _damage(run / "checkpoints" / STEP1, "garbage manifest")
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*newest: .*" + STEP2):
        train(run, allow_fallback=True)


def test_corrupt_checkpoint_cli_is_one_line_exit_5(two_commits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_commits, run)
    _damage(run / "checkpoints" / STEP2, "truncated file")
    res = run_cli(run)
    assert res.returncode == CheckpointError.code
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert str(run / "checkpoints" / STEP2 / OPTIM) in res.stderr and "sha256 expected" in res.stderr


def test_disk_full_during_save_keeps_the_previous_checkpoint(two_commits, reference, tmp_path):
    """RLIMIT_FSIZE of 1 MB (`ulimit -f`; SIGXFSZ ignored, so writes fail with EFBIG): the save of step 4 fails
    on the 2 MB optimizer file. One line naming the file, exit 5, the partial step-4 removed, step-2 intact;
    the next start without the limit resumes from step 2 and equals the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(two_commits, run)
    res = run_cli(run, ["checkpoint.save_every=2"], fsize=1 << 20)
    assert res.returncode == CheckpointError.code, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert re.search(r"step-00000004\.tmp/ds/\S+optim_states.pt: write failed .*file-size limit \(ulimit -f\) 1.0 MB",
                     err)
    assert "previous one is intact" in err
    assert sum("error:" in line for line in res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert checkpoint_names(run) == [STEP1, STEP2] and manifest_holds(run / "checkpoints" / STEP2)
    res = run_cli(run, ["checkpoint.save_every=2"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert [Path(r["resumed_from"]).name for r in events(run, "resumed_from")] == [STEP2, STEP2]
    same_steps(rows(run), reference[0])


def test_write_error_names_the_unfinished_torch_file_not_just_the_newest(tmp_path):
    """torch.save's zip writer raises without a file name. The file named is the .pt that is not a complete zip,
    even when a finished file has the same or a newer mtime (two saves within one mtime tick: the CI flake where
    the error named the model-states file instead of the optimizer file that hit the limit)."""
    from infinitrain.train.checkpoint import _write_error

    ds = tmp_path / "step-00000004.tmp" / "ds"
    ds.mkdir(parents=True)
    partial, done = ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", ds / "zero_pp_rank_0_model_states.pt"
    torch.save({"w": list(range(1000))}, partial)
    partial.write_bytes(partial.read_bytes()[:700])  # cut short, as a failed write leaves it
    torch.save({"w": [1, 2]}, done)
    t = partial.stat().st_mtime_ns
    os.utime(done, ns=(t + 1, t + 1))  # the finished file is the newest
    line = _write_error(RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file"),
                        tmp_path / "step-00000004.tmp")
    assert line.startswith(f"{partial}: write failed (")
