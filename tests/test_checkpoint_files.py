"""Checkpoint pieces without a training run: file ownership by rank, parallel hashing with its progress bar, the
disks probe on a world of one, and the RNG state of this process's CUDA device only (issue 24 items 3, 6, 10)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from infinitrain import atomic
from infinitrain.errors import CheckpointError
from infinitrain.train import checkpoint as ckpt


def test_each_file_belongs_to_the_rank_its_name_carries():
    assert ckpt.owner("ds/zero_pp_rank_12_mp_rank_00_model_states.pt") == 12
    assert ckpt.owner("ds/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert ckpt.owner("rng_rank00007.pt") == 7 and ckpt.owner("done.rank00010") == 10
    for rank0 in ("trainer_state.json", "zero_to_fp32.py", "ds/mp_rank_00_model_states.pt", "manifest.json"):
        assert ckpt.owner(rank0) == 0, rank0


def test_hash_files_equals_hashlib_and_shows_a_bar_for_big_checkpoints(tmp_path, capsys, monkeypatch):
    blobs = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(11)} | {"sub/x.pt": b"", "y": b"abc"}
    for rel, data in blobs.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    want = {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in blobs.items()}
    assert ckpt.hash_files(tmp_path, blobs, progress=True) == want
    assert "hashing" not in capsys.readouterr().err  # small: no bar
    monkeypatch.setattr(atomic, "PROGRESS_BYTES", 0)
    assert ckpt.hash_files(tmp_path, blobs, progress=True, desc="hashing test") == want
    assert "hashing test" in capsys.readouterr().err


def test_verify_names_the_corrupt_and_the_missing_file(tmp_path):
    for i in range(3):
        (tmp_path / f"rng_rank{i:05d}.pt").write_bytes(bytes([i]) * 1000)
    manifest = {"files": ckpt.hash_files(tmp_path, [f"rng_rank{i:05d}.pt" for i in range(3)])}
    ckpt.verify(tmp_path, manifest)
    (tmp_path / "rng_rank00002.pt").write_bytes(b"\2" * 999 + b"\3")
    ckpt.verify(tmp_path, manifest, rank=1)  # rank 1 checks its own file only
    with pytest.raises(CheckpointError, match=r"rng_rank00002.pt: corrupt \(sha256 expected"):
        ckpt.verify(tmp_path, manifest, rank=2)
    (tmp_path / "rng_rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match="rng_rank00000.pt: missing"):
        ckpt.verify(tmp_path, manifest)


def test_disks_of_a_world_of_one(tmp_path):
    import torch.distributed as dist

    mine = not dist.is_initialized()  # an in-process training test may have left its world of one
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        disks = ckpt.probe_disks(tmp_path / "checkpoints", zero_stage=2)
    finally:
        if mine:
            dist.destroy_process_group()
    assert disks.groups == ((0,),) and disks.leader and disks.shared
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the probe leaves nothing
    assert ckpt.Disks(((0, 1, 2, 5), (3, 4)), 3).describe() == "ranks 0-2,5; ranks 3-4"
    assert ckpt.Disks(((0, 1), (2, 3)), 2).leader and not ckpt.Disks(((0, 1), (2, 3)), 3).leader


class FakeCuda:
    """torch.cuda as a process with ``visible`` GPUs, on device ``current``, sees it (CPU tensors as states)."""

    def __init__(self, visible: int, current: int):
        self.visible, self.current, self.states = visible, current, {}

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(d) for d in range(self.visible)])

        def set_all(states):
            for d, s in enumerate(states):
                self.set(s, d)

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)

    def _device(self, device) -> int:
        d = self.current if device in (None, "cuda") else int(getattr(device, "index", device))
        if not 0 <= d < self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {d}")
        return d

    def get(self, device="cuda"):
        d = self._device(device)
        return self.states.get(d, torch.tensor([100 + d], dtype=torch.uint8))

    def set(self, state, device="cuda"):
        self.states[self._device(device)] = state.clone()


def test_resume_with_fewer_visible_gpus_restores_this_device_only(monkeypatch):
    """Saved by local rank 5 of 8 visible GPUs; resumed as a process that sees one GPU (CUDA_VISIBLE_DEVICES):
    its own state lands on its device, and nothing else is touched (before: set_rng_state_all of 8 states)."""
    saver = FakeCuda(visible=8, current=5)
    saver.install(monkeypatch)
    state = ckpt.rng_state()
    assert torch.equal(state["cuda_device"], torch.tensor([105], dtype=torch.uint8)) and "cuda" not in state
    resumer = FakeCuda(visible=1, current=0)
    resumer.install(monkeypatch)
    ckpt.set_rng_state(state)
    assert list(resumer.states) == [0] and torch.equal(resumer.states[0], torch.tensor([105], dtype=torch.uint8))

    old = {**state, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in range(8)]}  # an older checkpoint
    del old["cuda_device"]
    resumer.states.clear()
    ckpt.set_rng_state(old)  # no crash; its own device's entry
    assert list(resumer.states) == [0]
