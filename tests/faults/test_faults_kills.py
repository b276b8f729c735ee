"""kill -9 at every stage of a save and between saves, and seeded random kills: every resume starts from the newest
committed checkpoint, and the finished run equals the uninterrupted one: losses bitwise, sample ids exactly once
(issue 8 items 1, 2, 6)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import traced_train
from trainkit import applied_ids, checkpoint_names, events, rows, run_cli, same_steps, trace

STEP = "step-{:08d}"


def _resumed_from(run_dir: Path) -> list[str | None]:
    return [Path(r["resumed_from"]).name for r in events(run_dir, "resumed_from")]


def test_kill9_at_every_save_stage_and_between_saves(reference, tmp_path):
    """Six processes of one run (save every 2 steps, keep 1): SIGKILL before any file of step 2, after the files
    of step 4, after its manifest but before the commit rename, after the commit but before pruning, then in the
    middle of step 5 (between saves); the sixth finishes. After each kill the newest committed checkpoint is the
    one expected, the next start cleans the partial and resumes from it (at most one interval lost), and the
    whole run reproduces the uninterrupted one: per-step losses bitwise and each step's sample ids exactly once."""
    run, tr = tmp_path / "run", tmp_path / "trace"
    args = ["checkpoint.save_every=2", "checkpoint.keep_last=1"]
    stages = [  # (fault, checkpoints left behind, where the next start resumes from)
        ("kill:before_shards:2:0", [STEP.format(2) + ".tmp"], None),
        ("kill:after_shards:4:0", [STEP.format(2), STEP.format(4) + ".tmp"], 2),
        ("kill:before_commit:4:0", [STEP.format(2), STEP.format(4) + ".tmp"], 2),
        ("kill:after_commit:4:0", [STEP.format(2), STEP.format(4)], 4),  # not pruned yet
        ("kill:mid_step:5:0", [STEP.format(2), STEP.format(4)], 4),  # pruned only after the next commit
    ]
    for fault, left, _ in stages:
        res = run_cli(run, args, INFINITRAIN_FAULT=fault, INFINITRAIN_TRACE=str(tr))
        assert res.returncode == -9, (fault, res.stderr[-2000:])
        assert checkpoint_names(run) == left, fault
    res = run_cli(run, args, INFINITRAIN_TRACE=str(tr))
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint_names(run) == [STEP.format(6)]
    # the first restart had nothing committed; every later one resumed from the newest commit
    assert _resumed_from(run) == [STEP.format(s) for s in (2, 2, 4, 4)]
    same_steps(rows(run), reference[0])
    assert applied_ids(tr) == reference[1]  # each step's samples, in order: no duplicate, no gap
    consumed = [i for ids in applied_ids(tr).values() for i in ids]
    assert len(consumed) == len(set(consumed)) == 6 * 4  # one epoch is far longer than 24 samples


def test_kill9_at_before_commit_keeps_manifest_out_of_reach(tmp_path):
    """A partial directory that already holds its manifest (killed just before the rename) is not a checkpoint:
    the next start removes it rather than loading it."""
    run = tmp_path / "run"
    res = run_cli(run, ["checkpoint.save_every=1", "schedule.steps=2", "schedule.warmup=1"],
                  INFINITRAIN_FAULT="kill:before_commit:2:0")
    assert res.returncode == -9
    partial = run / "checkpoints" / (STEP.format(2) + ".tmp")
    assert (partial / "manifest.json").is_file() and checkpoint_names(run) == [STEP.format(1), partial.name]
    res = run_cli(run, ["checkpoint.save_every=1", "schedule.steps=2", "schedule.warmup=1"])
    assert res.returncode == 0 and "resuming from" in res.stderr and STEP.format(1) in res.stderr
    assert checkpoint_names(run) == [STEP.format(1), STEP.format(2)]


@pytest.mark.slow
def test_ten_random_kills_then_resume_equal_uninterrupted(tmp_path):
    """Ten SIGKILLs at seeded random points of a 12-step run (save every step): each process dies at the n-th
    instrumented point it reaches (start of a step, after each backward, after the optimizer, four save sites),
    n drawn from random.Random(SEED) within the next two steps' points. After the last resume the per-step
    losses and the sample ids equal the uninterrupted run's. Rerunning with the same seed replays the kills."""
    seed, steps = 20261201, ["schedule.steps=12", "checkpoint.save_every=1"]
    ref, ref_tr = tmp_path / "ref", tmp_path / "ref-trace"
    traced_train(ref, ref_tr, steps)
    ref_trace = trace(ref_tr)
    per_step = ref_trace[2]["points"] - ref_trace[1]["points"]  # points of one step and its save
    assert per_step >= 7  # step start, 2 backwards, after step, 4 save sites (the kill sites are all reached)
    rng = random.Random(seed)
    run, tr = tmp_path / "run", tmp_path / "trace"
    kills = []
    while len(kills) < 10:
        n = rng.randint(1, 2 * per_step)
        res = run_cli(run, steps, INFINITRAIN_FAULT=f"chaos:{n}:0", INFINITRAIN_TRACE=str(tr))
        assert res.returncode == -9, (seed, kills, n, res.stderr[-2000:])
        kills.append(n)
    res = run_cli(run, steps, INFINITRAIN_TRACE=str(tr))
    assert res.returncode == 0, res.stderr[-2000:]
    print(f"seed {seed}: kills at points {kills} (of {per_step} per step); resumed from "
          f"{_resumed_from(run)}")
    same_steps(rows(run), rows(ref))
    assert applied_ids(tr) == {r["step"]: r["ids"] for r in ref_trace}


# --- a build of DeepSpeed's op killed mid-way ---------------------------------------------------------------


def _lock(root: Path, age_s: float) -> Path:
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_a_lock_left_by_a_killed_build_is_removed_by_age_or_when_no_build_runs(tmp_path, monkeypatch, capsys):
    from infinitrain.train.engine import wait_for_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, 20.0)  # past the start grace, and no process works in the build directory
    assert wait_for_op_build("deepspeed_shm_comm", poll_s=0.05) == lock and not lock.exists()
    assert f"warning: {lock}: removed a build lock 20 s old (no build is running" in capsys.readouterr().err
    lock = _lock(tmp_path, 1000.0)
    monkeypatch.setattr("infinitrain.train.engine._building_in", lambda d: None)  # /proc cannot tell: age decides
    assert wait_for_op_build("deepspeed_shm_comm", poll_s=0.05) == lock and not lock.exists()
    assert "1000 s old (older than 300 s" in capsys.readouterr().err
    assert wait_for_op_build("deepspeed_shm_comm") is None  # no lock: no wait


def test_a_running_build_is_waited_for_not_broken(tmp_path, monkeypatch, capsys):
    from infinitrain.train.engine import wait_for_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, 20.0)
    ninja = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # a build at work in its directory, as ninja is
    try:
        done: list = []
        waiter = threading.Thread(target=lambda: done.append(wait_for_op_build("deepspeed_shm_comm", poll_s=0.05)))
        waiter.start()
        time.sleep(1.0)
        assert lock.exists() and not done  # still waiting, the lock untouched
        lock.unlink()  # the build finishes and releases it
        waiter.join(5)
        assert done == [None]
        assert "waiting for another process's build of deepspeed_shm_comm" in capsys.readouterr().err
        lock = _lock(tmp_path, 20.0)
        assert wait_for_op_build("deepspeed_shm_comm", stale_s=1.0, poll_s=0.05) == lock  # a build hung past stale_s
    finally:
        ninja.kill()
        ninja.wait()


def test_train_after_a_build_killed_mid_way_does_not_hang(tmp_path):
    """The real path: ``infinitrain train`` with the lock a SIGKILLed build left a moment ago (it hung CI for 90
    minutes in deepspeed.init_distributed). The built op is copied so the run does not rebuild it."""
    from infinitrain.train.engine import build_directory

    built = build_directory("deepspeed_shm_comm")
    root = tmp_path / "ext"
    if built.is_dir():
        shutil.copytree(built, root / built.name, ignore=shutil.ignore_patterns("lock"))  # keeps mtimes: no rebuild
    lock = _lock(root, 0.0)
    res = run_cli(tmp_path / "run", ["schedule.steps=1", "schedule.warmup=0"], timeout=240,
                  TORCH_EXTENSIONS_DIR=str(root))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"warning: {lock}: removed a build lock" in res.stderr and not lock.exists()
