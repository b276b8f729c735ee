"""Two ranks (two plain processes, gloo, ZeRO-3 with every parameter partitioned): SIGTERM to rank 0 only, a rank
killed mid-save and mid-step, NaN on one rank, and a checkpoint of 2 ranks offered to 1 (issue 8 items 1, 4, 7,
8, 9). Each rank's exit code is checked directly: under torchrun the agent would kill the survivor at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from infinitrain.errors import CheckpointError, CollectiveError, TrainingAborted
from trainkit import (TWO_RANKS, applied_ids, checkpoint_names, events, launch_ranks, manifest_holds, one_line, rows,
                      run_ranks, same_steps, stderr_tail, trace, train, wait_all)

ARGS = ["checkpoint.save_every=2"]
pytestmark = pytest.mark.slow  # two processes per run (CI runs them; `-m "not slow"` skips them locally)


@pytest.fixture(scope="module")
def reference2(tmp_path_factory):
    """The uninterrupted 2-rank 6-step run: (rows per step, per rank sample ids per step)."""
    d = tmp_path_factory.mktemp("reference2")
    codes, errs = run_ranks(d / "run", ARGS, INFINITRAIN_TRACE=str(d / "trace"))
    assert codes == [0, 0], errs
    return rows(d / "run"), [applied_ids(d / "trace", r) for r in (0, 1)]


def test_sigterm_to_rank0_only_commits_within_25s_and_resumes(reference2, tmp_path):
    """SIGTERM to rank 0 alone once it finished step 2: the ranks agree at the end of the step, commit one
    checkpoint of the last applied step and both exit 143 within 25 s; the 2-rank resume loses no step and
    reproduces the uninterrupted run (losses and every rank's sample ids). The same checkpoint offered to one
    rank is refused, naming both world sizes (item 4: no universal-checkpoint conversion)."""
    run, tr = tmp_path / "run", tmp_path / "trace"
    procs = launch_ranks(run, ["checkpoint.save_every=0"], INFINITRAIN_TRACE=str(tr))  # only the signal saves
    deadline = time.time() + 300
    while not any(r["step"] >= 2 for r in trace(tr, 0)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [stderr_tail(p) for p in procs]
        time.sleep(0.05)
    os.kill(procs[0].pid, signal.SIGTERM)
    sent = time.time()
    codes = wait_all(procs, timeout=60)
    took = time.time() - sent
    assert codes == [128 + signal.SIGTERM] * 2 and took <= 25, (codes, took, [stderr_tail(p) for p in procs])
    last = [max(r["step"] for r in trace(tr, rank)) for rank in (0, 1)]
    assert last[0] == last[1] and checkpoint_names(run)[-1] == f"step-{last[0]:08d}"  # no applied step lost
    one_line(stderr_tail(procs[0]), "stopped by SIGTERM after committing")
    print(f"SIGTERM at step {last[0]}: both ranks exited 143 in {took:.1f} s")

    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):  # a world of one, in-process
        train(run, [*TWO_RANKS, *ARGS])

    codes, errs = run_ranks(run, ARGS, INFINITRAIN_TRACE=str(tr))
    assert codes == [0, 0], errs
    assert [r["step"] for r in events(run, "resumed_from")] == [last[0]]
    same_steps(rows(run), reference2[0])
    assert [applied_ids(tr, r) for r in (0, 1)] == reference2[1]


def test_rank_killed_during_save_resumes_from_previous_commit(reference2, tmp_path):
    """Rank 1 SIGKILLed after writing its shards of step 4 but before its done marker; rank 0 finished its own
    files and marker and finds its peer gone (DeepSpeed's save all-reduces the tag first, so no rank writes
    before every rank has entered the save): rank 0 exits with the collective-failure code naming the last
    commit, step-4 is never committed, and the 2-rank restart cleans it, resumes from step 2 and equals the
    uninterrupted run."""
    run = tmp_path / "run"
    codes, errs = run_ranks(run, ARGS, INFINITRAIN_FAULT="kill:after_shards:4:1")
    assert codes == [CollectiveError.code, -9], errs
    one_line(errs[0], "step-00000002")
    partial = run / "checkpoints" / "step-00000004.tmp"
    assert checkpoint_names(run) == ["step-00000002", partial.name] and not (partial / "manifest.json").exists()
    assert (partial / "done.rank00000").is_file() and not (partial / "done.rank00001").exists()  # one rank's files
    codes, errs = run_ranks(run, ARGS)
    assert codes == [0, 0], errs
    assert [r["step"] for r in events(run, "resumed_from")] == [2]
    same_steps(rows(run), reference2[0])


def test_dead_peer_mid_step_stops_rank0_within_timeout(tmp_path):
    """Rank 1 SIGKILLed in the middle of step 3 (after its first backward): rank 0 leaves within run.timeout_s
    (20 s here) with exit 8 and one line, and the last checkpoint (step 2) stays valid."""
    run = tmp_path / "run"
    procs = launch_ranks(run, [*ARGS, "run.timeout_s=20"], INFINITRAIN_FAULT="kill:mid_step:3:1")
    assert procs[1].wait(timeout=300) == -9
    died = time.time()
    code = procs[0].wait(timeout=60)
    took = time.time() - died
    assert code == CollectiveError.code and took <= 20, (code, took, stderr_tail(procs[0]))
    one_line(stderr_tail(procs[0]), "peer")
    assert checkpoint_names(run) == ["step-00000002"] and manifest_holds(run / "checkpoints" / "step-00000002")
    print(f"rank 0 exited {took:.1f} s after rank 1 died")


def test_hung_peer_stops_rank0_after_the_configured_timeout(tmp_path):
    """Rank 1 frozen (SIGSTOP) in the middle of step 3: rank 0's collective gives up after run.timeout_s (4 s) and
    it exits 8 with one line; step 2 stays valid."""
    run = tmp_path / "run"
    procs = launch_ranks(run, [*ARGS, "run.timeout_s=4"], INFINITRAIN_FAULT="stop:mid_step:3:1")
    try:
        deadline = time.time() + 300
        while _state(procs[1].pid) != "T":
            assert time.time() < deadline and procs[0].poll() is None, stderr_tail(procs[0])
            time.sleep(0.05)
        stopped = time.time()
        code = procs[0].wait(timeout=120)
        took = time.time() - stopped
    finally:
        procs[1].kill()
    assert code == CollectiveError.code and 3 <= took <= 30, (code, took, stderr_tail(procs[0]))
    one_line(stderr_tail(procs[0]), "peer")
    assert checkpoint_names(run) == ["step-00000002"] and manifest_holds(run / "checkpoints" / "step-00000002")
    print(f"rank 0 exited {took:.1f} s after rank 1 froze (run.timeout_s=4)")


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_nan_on_one_rank_every_rank_skips_then_aborts(tmp_path):
    """Rank 1's loss is NaN at attempts 3, 4, 5 (rank 0's is finite): both ranks skip each of them (the flag is
    all-reduced), their parameter partitions stay bitwise what step 2 left, each skip is logged and counted, and
    the third in a row (run.max_nonfinite=3) stops both ranks with exit 6."""
    run, tr = tmp_path / "run", tmp_path / "trace"
    codes, errs = run_ranks(run, ["checkpoint.save_every=1", "run.max_nonfinite=3"], INFINITRAIN_FAULT="nan:3+4+5:1",
                            INFINITRAIN_TRACE=str(tr))
    assert codes == [TrainingAborted.code] * 2, errs
    one_line(errs[0], "3 steps in a row")
    for rank in (0, 1):
        t = {r["attempt"]: r for r in trace(tr, rank)}
        assert [t[a]["skipped"] for a in (1, 2, 3, 4, 5)] == [False, False, True, True, True]
        digests = [t[a]["params_sha256"] for a in (1, 2, 3, 4, 5)]
        assert len(set(digests[1:])) == 1 and digests[0] != digests[1]
    skips = events(run, "skipped")
    assert [(r["step"], r["skipped_total"], r["skipped_in_row"], r["reason"]) for r in skips] == [
        (3, 1, 1, "non-finite loss"), (3, 2, 2, "non-finite loss"), (3, 3, 3, "non-finite loss")]
    assert checkpoint_names(run) == ["step-00000001", "step-00000002"]
