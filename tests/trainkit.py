"""Shared rig of the trainer tests (tests/test_train.py, tests/faults/): a tiny run, its metrics, and launchers
for one rank in-process, one rank as a CLI subprocess, and two ranks as two plain processes (no torchrun: its
agent would tear the survivors down at once and hide how a rank reacts to a dead peer)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"
# debug preset, 4 segments of 32 tokens, 4 samples per rank per step, 6 steps, 2 TBPTT windows per sample
SMALL = ["data.segments_per_sample=4", "data.micro_batch_size=4", "data.val_samples=8", "schedule.steps=6",
         "schedule.warmup=2", "log.every=1", "log.eval_every=0", "log.progress=false", "tbptt.window=2",
         "checkpoint.save_every=0", "model.segment_len=32", "run.zero_stage=3"]
TWO_RANKS = ["deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]  # partition every parameter
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "INFINITRAIN_FAULT",
               "INFINITRAIN_TRACE")


def rows(run_dir: Path) -> dict[int, dict]:
    """Per-step training rows of metrics.jsonl (the last row wins for a step logged twice)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r
    return out


def events(run_dir: Path, key: str) -> list[dict]:
    """metrics.jsonl rows that carry ``key`` (e.g. "resumed_from", "skipped"), in order."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def same_steps(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:  # bitwise: JSON floats round-trip exactly
        assert (a[k]["loss"], a[k]["grad_norm"], a[k]["lr"]) == (b[k]["loss"], b[k]["grad_norm"], b[k]["lr"]), k


def trace(trace_dir: Path, rank: int = 0) -> list[dict]:
    """The attempts ``INFINITRAIN_TRACE`` recorded for a rank, in order (all processes of the run)."""
    f = trace_dir / f"rank{rank}.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def applied_ids(trace_dir: Path, rank: int = 0) -> dict[int, list[int]]:
    """Sample ids of each applied step; a step replayed after a kill keeps its last (resumed) record."""
    return {r["step"]: r["ids"] for r in trace(trace_dir, rank) if not r["skipped"]}


def train(run_dir: Path, overrides: list[str] = (), resume: str = "auto", **kwargs):
    """One rank, in this process."""
    from infinitrain.train import train as run
    from infinitrain.train.config import load_recipe

    return run(load_recipe("debug", [*SMALL, *overrides], str(TEXT)), run_dir, resume, **kwargs)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def train_argv(run_dir: Path, overrides: list[str] = (), extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "infinitrain.train", "--recipe", "debug", "--data", str(TEXT), "--run-dir",
            str(run_dir), *extra, *SMALL, *overrides]


class Child:
    """A process started by the zygote, with the subset of Popen's interface the tests use."""

    def __init__(self, pid: int, argv: list[str], out: Path, err: Path):
        self.pid, self.args, self.stdout_path, self.stderr_path = pid, argv, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        code = Path(str(self.stderr_path) + ".code")
        if self.returncode is None and code.is_file():
            self.returncode = int(code.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, 9)


class Zygote:
    """tests/zygote.py: forks pre-imported ``infinitrain train`` processes (about 1 s of CPU each instead of 6)."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py")], env=clean_env(), cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.n = 0

    def spawn(self, argv: list[str], env: dict[str, str], fsize: int | None = None) -> Child:
        self.n += 1
        out, err = self.work / f"{self.n}.out", self.work / f"{self.n}.err"
        req = {"argv": argv[3:], "env": env, "cwd": str(REPO), "stdout": str(out), "stderr": str(err), "fsize": fsize}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return Child(json.loads(self.proc.stdout.readline())["pid"], argv, out, err)

    def run(self, argv: list[str], env: dict[str, str], timeout: float, fsize: int | None = None,
            ) -> subprocess.CompletedProcess:
        child = self.spawn(argv, env, fsize)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:  # a hung run fails the test as killed, not forever
            child.kill()
            child.wait()
        return subprocess.CompletedProcess(argv, child.returncode, child.stdout_path.read_text(),
                                           child.stderr_path.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


ZYGOTE: list[Zygote] = []  # set by a session fixture; empty: plain subprocesses


def run_cli(run_dir: Path, overrides: list[str] = (), *, extra: list[str] = (), timeout: float = 300,
            fsize: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """One rank as a real ``infinitrain train`` process (SIGKILL-able); ``fsize``: RLIMIT_FSIZE in bytes."""
    argv = train_argv(run_dir, overrides, extra)
    if ZYGOTE:
        return ZYGOTE[0].run(argv, clean_env(**env), timeout, fsize)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(argv, env=clean_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          preexec_fn=limit if fsize else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(run_dir: Path | list[Path], overrides: list[str] = (), *, world: int = 2,
                 log_dir: Path | None = None, **env: str) -> list[subprocess.Popen]:
    """``world`` ranks of ``infinitrain train``, each its own process group member; stderr to log_dir. A list of
    run dirs gives each rank its own (node-local disks: no rank sees another's files)."""
    run_dirs = list(run_dir) if isinstance(run_dir, (list, tuple)) else [run_dir] * world
    run_dir = run_dirs[0]
    port, log_dir = free_port(), log_dir or run_dir.parent / f"{run_dir.name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        e = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
        argv = train_argv(run_dirs[rank], [*TWO_RANKS, *overrides])
        if ZYGOTE:
            procs.append(ZYGOTE[0].spawn(argv, e))
            continue
        err = open(log_dir / f"rank{rank}.{time.time_ns()}.err", "w")
        procs.append(subprocess.Popen(argv, env=e, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err))
        procs[-1].stderr_path = Path(err.name)
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    """Exit codes of every rank (a rank still alive at the deadline is killed and fails the test)."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank did not exit within {timeout} s: {stderr_tail(p)}") from None
    return codes


def stderr_tail(p: subprocess.Popen, n: int = 3000) -> str:
    return p.stderr_path.read_text()[-n:]


def run_ranks(run_dir: Path | list[Path], overrides: list[str] = (), *, timeout: float = 300,
              **env: str) -> tuple[list[int], list[str]]:
    """Launch, wait; (exit codes, stderr tails) of every rank."""
    procs = launch_ranks(run_dir, overrides, **env)
    return wait_all(procs, timeout), [stderr_tail(p) for p in procs]


def checkpoint_names(run_dir: Path) -> list[str]:
    ck = run_dir / "checkpoints"
    return sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []


def manifest_holds(ckpt: Path) -> bool:
    """Every file the manifest lists has its recorded size and sha256 (the committed checkpoint is intact)."""
    import hashlib

    m = json.loads((ckpt / "manifest.json").read_text())
    return all((ckpt / rel).is_file() and hashlib.sha256((ckpt / rel).read_bytes()).hexdigest() == meta["sha256"]
               for rel, meta in m["files"].items())


def cli(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    """``infinitrain ARGS`` in this process (pytest's capsys and monkeypatch): (exit code, stdout, stderr)."""
    from infinitrain.cli import main

    monkeypatch.setattr(sys, "argv", ["infinitrain", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str, needle: str | Path) -> None:
    """Exactly one error line (progress lines may precede it), naming ``needle``; no traceback."""
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(needle) in lines[0] and "Traceback" not in err, err[-3000:]
