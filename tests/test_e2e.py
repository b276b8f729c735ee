"""End to end as a user would drive it: the `infinitrain` console script in subprocesses, two ranks under torchrun.

tokenizer train -> prepare -> train (ZeRO-3, 2 ranks) -> SIGTERM from outside -> resume -> export -> generate
-> eval ppl -> eval passkey. Each step checks what the user would look at: exit codes, the files promised,
and that the resumed run went on from the committed step instead of starting over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"
BIN = Path(sys.executable).parent
CLI = [str(BIN / "infinitrain")] if (BIN / "infinitrain").exists() else [sys.executable, "-m", "infinitrain.cli"]
RECIPE = ["model.segment_len=32", "data.segments_per_sample=4", "data.micro_batch_size=2", "schedule.steps=8",
          "schedule.warmup=2", "checkpoint.save_every=2", "log.every=1", "log.eval_every=4", "data.val_samples=4",
          "log.progress=false", "log.tensorboard=false"]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "INFINITRAIN_FAULT"):
        e.pop(k, None)
    return e


def run(*args: str, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd)
    assert res.returncode == 0, f"infinitrain {' '.join(args)} -> {res.returncode}\n{res.stderr[-3000:]}"
    return res


def torchrun(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "infinitrain.train", *args]


def committed(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if (p / "manifest.json").exists()) if root.exists() else []


@pytest.mark.slow
def test_user_journey(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, chapter in enumerate(TEXT.read_text().split("Chapter ")[1:9]):
        (docs / f"ch{i:02d}.txt").write_text("Chapter " + chapter)
    tok, data, run_dir, export = (tmp_path / n for n in ("tokenizer.json", "data", "run", "export"))

    run("tokenizer", "train", str(docs), "--vocab-size", "400", "--out", str(tok))
    run("prepare", str(docs), "--tokenizer", str(tok), "--out", str(data), "--segment-len", "32",
        "--sample-segments", "4", "--val-fraction", "0.25", "--no-progress", "--workers", "1")
    run("data", "verify", str(data))

    # Two ranks under torchrun; SIGTERM to the launcher once a checkpoint is committed, as a user would.
    train_args = ["--recipe", "debug", "--data", str(data), "--run-dir", str(run_dir), *RECIPE]
    proc = subprocess.Popen(torchrun(*train_args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not committed(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed(run_dir), "no checkpoint committed before the deadline"
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]  # stopped, not finished
    first = committed(run_dir)
    stopped_at = int(first[-1].split("-")[1])
    assert stopped_at < 8, first

    res = subprocess.run(torchrun(*train_args), env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and '"step"' in line]
    assert max(steps) == 8 and min(s for s in steps if s > stopped_at) == stopped_at + 1
    assert committed(run_dir)[-1] == "step-00000008"

    run("export", str(run_dir), "--out", str(export))
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()
    assert (export / "tokenizer.json").exists()
    assert not list(export.glob("*.bin")) and not list(export.glob("*.pt"))

    gen = run("generate", str(export), "--prompt", "It is a truth universally acknowledged", "--max-new-tokens",
              "24", "--temperature", "0", "--no-stream")
    assert gen.stdout.strip() and "decode 24 tokens" in gen.stderr  # the continuation; speed on stderr

    ppl = run("eval", "ppl", str(export), "--data", str(data), "--out", str(tmp_path / "ppl"))
    assert "segment" in ppl.stdout.lower()
    pk = run("eval", "passkey", str(export), "--lengths", "256,512", "--depths", "0,100", "--samples", "2",
             "--out", str(tmp_path / "passkey"))
    assert "512" in pk.stdout
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tmp_path):
    """`deepspeed --module infinitrain.train` (the launcher injects --local_rank) trains and commits a 2-rank run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "infinitrain.train",
           "--recipe", "debug", "--data", str(TEXT), "--run-dir", str(tmp_path / "run"), *RECIPE, "schedule.steps=2",
           "schedule.warmup=1", "checkpoint.save_every=2"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
