"""Checkpoints without a shared filesystem (issue 24 items 3, 10): two ranks, each with its own run directory (a
node's local disk that the other rank cannot see). Each rank hashes its own files, the digests are gathered, and
each disk holds its ranks' files plus the same manifest; the run resumes from them and equals a run on a shared
directory. Below ZeRO-3 node-local disks are refused at start in one line."""

from __future__ import annotations

import hashlib
import json
import signal

import pytest

from infinitrain.errors import CheckpointError, ConfigError
from trainkit import checkpoint_names, events, one_line, rows, run_ranks, same_steps

ARGS = ["checkpoint.save_every=2"]
STEP2, STEP4, STEP6 = "step-00000002", "step-00000004", "step-00000006"
pytestmark = pytest.mark.slow  # two processes per run


def _files(ckpt) -> set[str]:
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}


def test_node_local_disks_commit_resume_and_equal_a_shared_run(tmp_path):
    shared = tmp_path / "shared"
    codes, errs = run_ranks(shared, ARGS)
    assert codes == [0, 0], errs

    a, b = tmp_path / "node-a" / "run", tmp_path / "node-b" / "run"
    codes, errs = run_ranks([a, b], ARGS, INFINITRAIN_FAULT="sigterm:4:0")  # stopped after step 4, committed
    assert codes == [128 + signal.SIGTERM] * 2, errs
    assert "node-local disks: ranks 0; ranks 1" in errs[0]
    assert checkpoint_names(a) == checkpoint_names(b) == [STEP2, STEP4]
    for step in (STEP2, STEP4):
        ma, mb = (a / "checkpoints" / step / "manifest.json").read_bytes(), (b / "checkpoints" / step /
                                                                             "manifest.json").read_bytes()
        assert ma == mb  # the same manifest on every disk ...
        listed = set(json.loads(ma)["files"])
        on_a, on_b = _files(a / "checkpoints" / step) - {"manifest.json"}, _files(b / "checkpoints" / step) - {
            "manifest.json"}
        assert on_a | on_b == listed and not on_a & on_b  # ... listing each disk's own files, hashed where written
        assert {"done.rank00001", "rng_rank00001.pt", "ds/zero_pp_rank_1_mp_rank_00_model_states.pt"} <= on_b
        assert "trainer_state.json" in on_a and not any("rank00000" in f or "rank_0_" in f for f in on_b)
        for rel in listed:
            disk = a if rel in on_a else b
            data = (disk / "checkpoints" / step / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == json.loads(ma)["files"][rel]["sha256"], rel

    codes, errs = run_ranks([a, b], ARGS)  # resume on the same "nodes": equals the shared run
    assert codes == [0, 0], errs
    assert [r["step"] for r in events(a, "resumed_from")] == [4]
    same_steps(rows(a), rows(shared))
    assert checkpoint_names(a) == checkpoint_names(b) == [STEP4, STEP6]  # keep_last=2 pruned on both disks

    rank1_optim = b / "checkpoints" / STEP6 / "ds" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if not rank1_optim.exists():
        rank1_optim = rank1_optim.with_name(rank1_optim.name.removeprefix("bf16_"))
    data = bytearray(rank1_optim.read_bytes())
    data[len(data) // 2] ^= 0x10
    rank1_optim.write_bytes(bytes(data))
    codes, errs = run_ranks([a, b], [*ARGS, "schedule.steps=8"])  # rank 1 finds its own file corrupt
    assert codes == [CheckpointError.code] * 2, errs
    for err in errs:
        one_line(err, rank1_optim)


def test_node_local_disks_below_zero3_are_refused_at_start(tmp_path):
    a, b = tmp_path / "node-a" / "run", tmp_path / "node-b" / "run"
    codes, errs = run_ranks([a, b], ["run.zero_stage=2"])
    assert codes == [ConfigError.code] * 2, errs
    for err in errs:
        one_line(err, "node-local checkpoint directories need run.zero_stage=3")
    assert not (a / "checkpoints").exists() or not any((a / "checkpoints").iterdir())
