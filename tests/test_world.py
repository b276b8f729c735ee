"""The job's world from each launcher's variables (issue 24 item 2), refusals in one line, and the run
directory's lock: two runs never write into one directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from infinitrain.errors import ConfigError
from infinitrain.train.world import RunLock, World, detect_world, first_host

# (launcher's environment, expected World) for rank 5 of 16, local rank 1, rendezvous at head:29500
OK = [
    ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "29500"},
     World(5, 16, 1, "head", 29500, "torchrun/deepspeed")),
    # deepspeed --launcher openmpi: mpirun -x exports nothing of the rendezvous; MASTER_ADDR set by the user
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "MASTER_ADDR": "head"}, World(5, 16, 1, "head", 29500, "Open MPI")),
    ({"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "16", "MV2_COMM_WORLD_LOCAL_RANK": "1",
      "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, World(5, 16, 1, "head", 1234, "MVAPICH")),
    ({"PMI_RANK": "5", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "head"},
     World(5, 16, 1, "head", 29500, "MPICH/Intel MPI (PMI)")),
    # srun: the step's first node and a port from the job id, with no MASTER_* at all
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
      "SLURM_STEP_NODELIST": "gpu[007-008,010],cpu1", "SLURM_JOB_ID": "123456"},
     World(5, 16, 1, "gpu007", 20000 + 123456 % 20000, "srun")),
    # srun --mpi=pmi2: PMI names the world, SLURM_LOCALID (inside the step) the local rank
    ({"PMI_RANK": "5", "PMI_SIZE": "16", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
      "MASTER_ADDR": "head"}, World(5, 16, 1, "head", 29500, "MPICH/Intel MPI (PMI)")),
    # torchrun inside an srun step (one agent per node): torchrun's variables win over Slurm's
    ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "29500",
      "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"},
     World(5, 16, 1, "head", 29500, "torchrun/deepspeed")),
    # a batch script (sbatch --ntasks=16, no srun): one process, whatever SLURM_NTASKS says
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"},
     World(0, 1, 0, "127.0.0.1", 0, "none")),
    ({}, World(0, 1, 0, "127.0.0.1", 0, "none")),
]


@pytest.mark.parametrize("env,want", OK, ids=[w.launcher + str(i) for i, (_, w) in enumerate(OK)])
def test_world_from_each_launcher(env, want):
    assert detect_world(env) == want


def test_local_rank_comes_from_a_local_variable_never_the_global_rank():
    """RANK=5 with Open MPI's local rank 1 on this node: the device index is 1 (before: LOCAL_RANK = RANK = 5)."""
    env = {"RANK": "5", "WORLD_SIZE": "16", "MASTER_ADDR": "h", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_world(env).local_rank == 1
    assert detect_world({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, local_rank_arg=3).local_rank == 3
    # SLURM_LOCALID of a batch script (no srun step) is not this process's: it is not read
    with pytest.raises(ConfigError, match="no local rank"):
        detect_world({"RANK": "5", "WORLD_SIZE": "16", "MASTER_ADDR": "h", "SLURM_LOCALID": "0"})


def test_mpi_rank0_address_is_discovered_when_not_exported():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert detect_world(env, discover=lambda: "10.0.0.1") == World(2, 4, 0, "10.0.0.1", 29500, "Open MPI")


REFUSED = [  # (environment, words the one-line error must hold)
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE", "Open MPI"]),
    ({"PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-x"}, ["PMIX_RANK=3", "world is unknown"]),
    ({"PMI_SIZE": "8"}, ["PMI_SIZE=8", "world is unknown"]),
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE"]),
    ({"WORLD_SIZE": "8"}, ["WORLD_SIZE=8", "RANK"]),
    ({"LOCAL_RANK": "3"}, ["LOCAL_RANK=3", "world is unknown"]),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ["MASTER_ADDR", "mpi4py"]),
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "MASTER_ADDR": "h"}, ["no local rank", "MPI_LOCALRANKID"]),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ["MASTER_ADDR"]),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, ["outside a world of 4"]),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "4"}, ["OMPI_COMM_WORLD_RANK='x'"]),
]


@pytest.mark.parametrize("env,words", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_incomplete_worlds_are_refused_in_one_line(env, words):
    with pytest.raises(ConfigError) as err:
        detect_world(env)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_deepspeed_local_rank_alone_is_refused():
    with pytest.raises(ConfigError, match="--local_rank=2"):
        detect_world({}, local_rank_arg=2)


def test_first_host_of_slurm_hostlists():
    assert first_host("gpu[003-004,9],cpu1") == "gpu003"
    assert first_host("n[1-2]-ib") == "n1-ib"
    assert first_host("alpha,beta") == "alpha"
    assert first_host("single") == "single"
    assert first_host("rack[2,4]-n[10-12]") == "rack2-n10"


def test_mpirun_without_world_size_exits_3_in_one_line(tmp_path):
    """The CLI under an Open MPI-like environment with no world size: exit 3, one line, nothing written."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="1", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "infinitrain.train", "--recipe", "debug", "--run-dir", str(run),
                        "schedule.steps=1", "schedule.warmup=0"], env=env, capture_output=True, text=True, timeout=300)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == ConfigError.code and len(errors) == 1 and "OMPI_COMM_WORLD_SIZE" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not run.exists()


# --- the run directory's lock ------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    assert a.acquire() is None
    held = json.loads((tmp_path / "train.lock").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}, running"):
        b.acquire()
    a.release()
    assert not (tmp_path / "train.lock").exists() and b.acquire() is None
    b.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (a SIGKILLed run's lock)
    (tmp_path / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    note = a.acquire()
    assert note and f"process {dead.pid}" in note
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    a.release()

    (tmp_path / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="on host elsewhere"):
        a.acquire()
    (tmp_path / "train.lock").write_text("garbage")
    with pytest.raises(ConfigError, match="unreadable lock"):
        a.acquire()


def test_second_run_in_a_locked_run_dir_is_refused_and_nothing_written(tmp_path):
    """Another live process of this host holds the directory: `train` there raises ConfigError (exit 3) before
    writing a file; once that process is gone, the lock is taken over, the run trains and removes its lock."""
    from trainkit import train

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (run / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ConfigError, match=f"pid {other.pid}, running"):
            train(run, ["schedule.steps=2"])
        assert sorted(x.name for x in run.iterdir()) == ["train.lock"]
    finally:
        other.kill()
        other.wait()
    assert train(run, ["schedule.steps=2"])["step"] == 2
    assert not (run / "train.lock").exists() and (run / "checkpoints").is_dir()


def test_mpi_discovery_broadcasts_rank0s_address(monkeypatch):
    """Without MASTER_ADDR under MPI, rank 0's address comes over mpi4py (a fake here: rank 1 of 2, whose bcast
    returns what rank 0 sent), and the world is complete."""
    import types

    from infinitrain.train.world import mpi_rank0_address

    sent = []
    comm = types.SimpleNamespace(Get_rank=lambda: 1, bcast=lambda obj, root: (sent.append(obj), "10.1.2.3")[1])
    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=comm)
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_world(env, discover=mpi_rank0_address) == World(1, 2, 1, "10.1.2.3", 29500, "Open MPI")
    assert sent == [None]  # rank 1 sends nothing of its own
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # no mpi4py: refused in one line
    with pytest.raises(ConfigError, match="without MASTER_ADDR"):
        detect_world(env, discover=lambda: mpi_rank0_address())
