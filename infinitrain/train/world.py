"""Who this process is in the job, and who else writes into its run directory.

``detect_world(env)``: rank, world size, local rank and rendezvous address from whichever launcher started the
process: torchrun and the ``deepspeed`` launcher (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, pdsh included), Open
MPI (``mpirun``, ``deepspeed --launcher openmpi``: ``OMPI_COMM_WORLD_*``), MVAPICH (``MV2_COMM_WORLD_*``), MPICH
and Intel MPI (``PMI_RANK``/``PMI_SIZE``, local rank ``MPI_LOCALRANKID``) and Slurm's ``srun`` (``SLURM_PROCID``/
``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``). The local rank always comes from a local variable, never from the
global rank. A process that sees a multi-process launcher whose world it cannot complete is refused in one line
naming the variables it saw: before, it became a world of one, and ``mpirun -n 8`` started 8 runs in one directory.

``RunLock``: ``run_dir/train.lock`` holds the host and pid of the run writing there; a second run is refused.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from infinitrain.errors import ConfigError

DEFAULT_PORT = 29500  # torchrun's and DeepSpeed's default rendezvous port
# (launcher, rank, world size, local rank): the first whose rank variable is set names the world
MPI_LAUNCHERS = (("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                 ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
                 ("MPICH/Intel MPI (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"))
SLURM = ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
# variables that mean "one of several processes" when no complete world can be read from the ones above
MULTI_PROCESS_HINTS = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMIX_NAMESPACE",
                       "SLURM_STEP_NUM_TASKS")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # who started the process ("none": a world of one)

    def env(self) -> dict[str, str]:
        """The torch.distributed variables (DeepSpeed's MPI discovery is skipped when all five are set)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _seen(env: Mapping[str, str], names) -> str:
    shown = [f"{k}={env[k]}" for k in names if k in env]
    return ", ".join(shown) or "none"


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(f"launched by {launcher}: {name}={env[name]!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"launched by {launcher}: {name}={value} is negative")
    return value


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[003-004,9],cpu1`` -> ``gpu003``, ``n[1-2]-ib`` -> ``n1-ib``."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", nodelist[:end].strip())


def _rendezvous(env: Mapping[str, str], launcher: str, size: int, discover: Callable[[], str] | None
                ) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT): the environment's; under srun the step's first node and a port from the job
    id (every task computes the same); under MPI rank 0's address from ``discover`` (mpi4py), as DeepSpeed does."""
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "MASTER_ADDR" in env or size == 1:
        return env.get("MASTER_ADDR", "127.0.0.1"), port
    if launcher == "srun" and (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        host = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        return host, port
    addr = discover() if discover is not None else None  # None: no mpi4py
    if addr:
        return addr, port
    raise ConfigError(f"launched by {launcher} ({size} processes) without MASTER_ADDR: export MASTER_ADDR=<rank 0's "
                      f"host> and MASTER_PORT (mpirun -x MASTER_ADDR -x MASTER_PORT), or install mpi4py to find it")


def _mpi_world(env: Mapping[str, str]) -> tuple[str, str, str, str] | None:
    """The first MPI launcher (or srun step) whose rank variable is set. Slurm counts only inside an srun step
    (SLURM_STEP_NUM_TASKS): a batch script also has SLURM_PROCID=0 and SLURM_NTASKS, yet it is one process."""
    for spec in (*MPI_LAUNCHERS, SLURM):
        if spec[1] in env and (spec is not SLURM or "SLURM_STEP_NUM_TASKS" in env):
            return spec
    return None


def _local_names(env: Mapping[str, str], own: str) -> tuple[str, ...]:
    """Where this process's local rank may be read, best first: its launcher's own variable, LOCAL_RANK, then
    the other launchers' (SLURM_LOCALID only inside an srun step, where it is this task's)."""
    others = [s[3] for s in MPI_LAUNCHERS] + (["SLURM_LOCALID"] if "SLURM_STEP_NUM_TASKS" in env else [])
    return tuple(dict.fromkeys([own, "LOCAL_RANK", *others]))


def detect_world(env: Mapping[str, str], local_rank_arg: int | None = None,
                 discover: Callable[[], str] | None = None) -> World:
    """The world this process belongs to, from ``env`` (``os.environ``); ``local_rank_arg`` is the deepspeed
    launcher's ``--local_rank``; ``discover()`` returns rank 0's address under MPI (mpi4py), None: unknown.
    Raises ConfigError naming the variables seen when a launcher's world is incomplete."""
    if "RANK" in env or "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher (pdsh, local), or set by hand
        if not ("RANK" in env and "WORLD_SIZE" in env):
            raise ConfigError(f"RANK and WORLD_SIZE must be set together (seen: {_seen(env, ('RANK', 'WORLD_SIZE'))})")
        launcher, rank, size = "torchrun/deepspeed", _int(env, "RANK", "torchrun/deepspeed"), \
            _int(env, "WORLD_SIZE", "torchrun/deepspeed")
        local_names = _local_names(env, "LOCAL_RANK")
    else:
        spec = _mpi_world(env)
        if spec is None:
            hints = [k for k in MULTI_PROCESS_HINTS if k in env]
            hints += [k for k in ("LOCAL_RANK",) if env.get(k, "0") != "0"]
            if hints or local_rank_arg not in (None, 0):
                raise ConfigError(f"started by a multi-process launcher whose world is unknown (seen: "
                                  f"{_seen(env, hints) if hints else f'--local_rank={local_rank_arg}'}); launch with "
                                  "torchrun, the deepspeed launcher, mpirun (Open MPI, MPICH, MVAPICH) or srun")
            return World(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)), "none")
        launcher, rank_name, size_name, local_name = spec
        if size_name not in env:
            raise ConfigError(f"launched by {launcher} but {size_name} is not set, so the world size is unknown "
                              f"(seen: {_seen(env, (rank_name, size_name, local_name))})")
        rank, size = _int(env, rank_name, launcher), _int(env, size_name, launcher)
        local_names = _local_names(env, local_name)
        discover = discover if launcher != "srun" else None
    if not 0 <= rank < max(size, 1):
        raise ConfigError(f"launched by {launcher}: rank {rank} is outside a world of {size}")
    local = next((_int(env, n, launcher) for n in local_names if n in env), local_rank_arg)
    if local is None:
        if size > 1:
            raise ConfigError(f"launched by {launcher} ({size} processes) but no local rank is set (looked for "
                              f"{', '.join(local_names)}): set LOCAL_RANK, this process's index on its node")
        local = 0
    if "RANK" in env and size > 1 and "MASTER_ADDR" not in env:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={size} without MASTER_ADDR: set MASTER_ADDR and MASTER_PORT "
                          "(rank 0's host and port), as torchrun and the deepspeed launcher do")
    addr, port = _rendezvous(env, launcher, size, discover)
    return World(rank, size, local, addr, port, launcher)


def mpi_rank0_address() -> str | None:
    """Rank 0's address broadcast over MPI (mpi4py), the way DeepSpeed's own MPI discovery finds it; None
    without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    addr = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        try:
            addr = subprocess.check_output(["hostname", "-I"], text=True).split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            addr = socket.gethostname()
    return MPI.COMM_WORLD.bcast(addr, root=0)


# --- the run directory's lock -------------------------------------------------------------------------------

LOCK = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``run_dir/train.lock``, created exclusively (O_EXCL: atomic on local disks and NFSv3+) with this host and
    pid; removed by ``release``. A lock left by a dead process of this host is taken over (a SIGKILLed run);
    one held by a live process, or by another host (whose processes cannot be checked from here), is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> str | None:
        """None, or a note that a stale lock was taken over; raises ConfigError when another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                note = self._stale_or_raise(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return note
        raise ConfigError(f"{self.path}: could not take the run directory's lock (another run raced for it)")

    def _stale_or_raise(self, host: str) -> str:
        """Remove a lock left by a dead process of this host (and say so); raise for a live or remote holder."""
        try:
            held = json.loads(self.path.read_text())
            other_host, other_pid = str(held["host"]), int(held["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.path}: unreadable lock file; if no run uses {self.path.parent}, delete it") \
                from None
        if other_host == host and not _alive(other_pid):
            self.path.unlink(missing_ok=True)
            return f"{self.path}: took over the lock of process {other_pid} (no longer running)"
        where = "running" if other_host == host else f"on host {other_host}"
        raise ConfigError(f"{self.path}: another run (pid {other_pid}, {where}) is writing into {self.path.parent}; "
                          f"use another --run-dir, or delete the lock if that run is dead")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
