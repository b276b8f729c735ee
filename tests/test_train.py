"""Trainer: recipes and CLI errors, exact resume (SIGTERM and kill -9 mid-save), non-finite skips, corrupt
checkpoints, and the debug model learning real text. One rank in-process; the 2-rank resume runs torchrun."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infinitrain.errors import CheckpointError, ConfigError, TrainingAborted
from infinitrain.train.config import RECIPE_DIR, TrainConfig, load_recipe
from infinitrain.train.engine import deepspeed_config, lr_lambda

from trainkit import REPO, SMALL, TEXT, rows, same_steps, train

# --- recipes, config, CLI -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_build(path):
    cfg = load_recipe(str(path))
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["zero_optimization"]["stage"] == cfg.run.zero_stage
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # config.yaml round-trips


def test_overrides_and_deepspeed_passthrough():
    cfg = load_recipe("debug", ["optim.lr=1e-3", "model.segment_len=32", "tbptt.window=0",
                                "deepspeed.zero_optimization.stage3_prefetch_bucket_size=123"])
    assert cfg.optim.lr == 1e-3 and cfg.model.segment_len == 32 and cfg.window == cfg.data.segments_per_sample
    ds = deepspeed_config(cfg, 1)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 3, "stage3_prefetch_bucket_size": 123}
    assert ds["gradient_accumulation_steps"] == cfg.data.grad_accum * cfg.n_windows


@pytest.mark.parametrize("token,needle", [("optim.lrr=1", "optim.lrr"), ("model.d_modell=8", "d_modell"),
                                          ("bogus.x=1", "bogus"), ("tbptt.checkpointing=full", "checkpointing"),
                                          ("tbptt.window=9", "tbptt.window")])
def test_bad_overrides_are_config_errors(token, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_recipe("debug", [token])


def test_schedule_warmup_then_cosine():
    f = [lr_lambda(s, warmup=4, total=12, min_ratio=0.1) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and abs(f[12] - 0.1) < 1e-12 and f[13] == f[12]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


@pytest.mark.parametrize("args,needle", [(["optim.lrr=1"], "optim.lrr"), (["--recipe", "nope"], "unknown recipe")])
def test_cli_errors_are_one_line(args, needle, tmp_path):
    argv = ["--recipe", "debug", *args] if args[0] != "--recipe" else args
    res = subprocess.run([sys.executable, "-m", "infinitrain.cli", "train", *argv, "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == ConfigError.code
    assert res.stderr.strip().count("\n") == 0 and needle in res.stderr and "Traceback" not in res.stderr


# --- exact resume, faults, checkpoints (1 rank in-process) --------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted 6-step run that the interrupted ones must reproduce bit for bit."""
    d = tmp_path_factory.mktemp("ref")
    train(d)
    return rows(d)


def test_sigterm_saves_and_resumes_bitwise(reference_run, tmp_path, monkeypatch):
    from infinitrain.train.loop import Preempted

    monkeypatch.setenv("INFINITRAIN_FAULT", "sigterm:3:0")
    with pytest.raises(Preempted) as err:
        train(tmp_path)
    assert err.value.code == 128 + 15 and (tmp_path / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    monkeypatch.delenv("INFINITRAIN_FAULT")
    out = train(tmp_path)
    assert out["step"] == 6
    same_steps(rows(tmp_path), reference_run)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITRAIN_FAULT", "nan:2:0")
    out = train(tmp_path / "a", ["schedule.steps=3"])
    assert out["step"] == 3 and out["skipped_total"] == 1
    log = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("skipped")] == [2] and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    monkeypatch.setenv("INFINITRAIN_FAULT", "nan:2+3+4:0")
    with pytest.raises(TrainingAborted, match="3 steps in a row"):
        train(tmp_path / "b", ["run.max_nonfinite=3"])


def test_corrupt_checkpoint_is_named(tmp_path):
    train(tmp_path, ["schedule.steps=2", "schedule.warmup=1"])
    shard = tmp_path / "checkpoints" / "step-00000002" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    shard.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=re.escape(str(shard)) + ".*sha256 expected"):
        train(tmp_path, ["schedule.steps=3", "schedule.warmup=1"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tmp_path, ["schedule.steps=3", "schedule.warmup=1"], resume="none")


# --- the debug model learns real text ---------------------------------------------------------------------


def test_debug_model_learns_real_text(tmp_path):
    """120 steps of the debug preset on Pride and Prejudice ch. 1-12 (bytes): validation cross-entropy falls
    well below the unigram entropy of the text."""
    data = TEXT.read_bytes()
    counts, n = collections.Counter(data), len(data)
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())  # nats per byte, about 3.1
    from infinitrain.train import train as run

    cfg = load_recipe("debug", ["schedule.steps=120", "schedule.warmup=12", "log.eval_every=0", "log.progress=false",
                                "checkpoint.save_every=0", "log.every=50"], str(TEXT))
    out = run(cfg, tmp_path, "none")
    print(f"val loss {out['val_loss']:.3f} nats/byte vs unigram entropy {unigram:.3f}")
    assert out["val_loss"] < 0.8 * unigram


# --- two ranks ----------------------------------------------------------------------------------------------


def _torchrun(run_dir: Path, extra: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "INFINITRAIN_FAULT"):
        env.pop(k, None)
    if fault:
        env["INFINITRAIN_FAULT"] = fault
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "infinitrain.train", "--recipe", "debug", "--data", str(TEXT), "--run-dir", str(run_dir), *SMALL,
           "deepspeed.zero_optimization.stage3_param_persistence_threshold=0", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_two_ranks_resume_bitwise(tmp_path):
    """SIGTERM to rank 0 only at step 3: both ranks agree, commit step 3 and exit 143; the resumed run's
    per-step losses equal the uninterrupted 2-rank run's."""
    ref = _torchrun(tmp_path / "ref", [])
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = _torchrun(tmp_path / "cut", [], fault="sigterm:3:0")
    assert cut.returncode != 0 and "SIGTERM" in cut.stderr, cut.stderr[-3000:]
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000003"]
    done = _torchrun(tmp_path / "cut", [])
    assert done.returncode == 0, done.stderr[-3000:]
    same_steps(rows(tmp_path / "cut"), rows(tmp_path / "ref"))
    assert json.loads((tmp_path / "cut" / "checkpoints" / "step-00000006" / "manifest.json").read_text())[
        "world_size"] == 2
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):  # in-process world of one
        train(tmp_path / "cut", ["deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])


def test_trains_on_prepared_shards(tmp_path):
    """`infinitrain prepare` output (BPE, documents packed with their starts, a val split) trains directly."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, chapter in enumerate(TEXT.read_text().split("Chapter ")[1:6]):
        (docs / f"ch{i}.txt").write_text("Chapter " + chapter)
    cli = [sys.executable, "-m", "infinitrain.cli"]
    tok, shards = tmp_path / "tokenizer.json", tmp_path / "shards"
    for args in (["tokenizer", "train", str(docs), "--vocab-size", "300", "--out", str(tok)],
                 ["prepare", str(docs), "--tokenizer", str(tok), "--out", str(shards), "--segment-len", "32",
                  "--sample-segments", "4", "--val-fraction", "0.3", "--no-progress", "--workers", "1"]):
        res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
    from infinitrain.train import train as run
    from infinitrain.train.data import open_source

    src, val = open_source(str(shards), 128, 512, 0.05)
    assert src.sample_len == 128 and val is not None and src[0].doc_start[0]
    cfg = load_recipe("debug", [*SMALL, "schedule.steps=3"], str(shards))
    out = run(cfg, tmp_path / "run", "none")
    assert out["step"] == 3 and math.isfinite(out["loss"]) and math.isfinite(out["val_loss"])


def test_zero_init_builds_partitioned_and_initialised():
    """run.zero_init=true: parameters are partitioned at construction and still get the model's init."""
    import deepspeed
    import torch

    from infinitrain.train.engine import build_model, init_distributed, setup_environment

    setup_environment()
    init_distributed()
    cfg = load_recipe("debug", ["run.zero_init=true", "model.gate_init=0.25", "run.precision=fp32"])
    model = build_model(cfg, deepspeed_config(cfg, 1))
    w, beta = model.layers[0].attn.q_proj.weight, model.layers[0].attn.betas
    assert hasattr(w, "ds_id") and w.numel() == 0  # partitioned (the local data lives in w.ds_tensor)
    with deepspeed.zero.GatheredParameters([w, beta]):
        assert abs(float(w.detach().std()) - cfg.model.init_std) < 0.003 and torch.all(beta == 0.25)


def test_train_benchmark_smoke(tmp_path):
    """benchmarks/train.py runs end to end at tiny lengths and reports finite numbers (no timing assertions)."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--lengths", "128,256", "--window",
                          "1", "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows_ = json.loads(out.read_text())
    assert [r["length"] for r in rows_] == [128, 256] and "peak RSS" in res.stdout
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and 0 < r["mfu"] < 1 for r in rows_)


def test_mod_aux_loss_and_router_accuracy_logged(tmp_path):
    train(tmp_path, ["schedule.steps=2", "schedule.warmup=1", "model.mod_every=2", "model.mod_capacity=0.25",
                     "tbptt.checkpointing=segment"])
    r = rows(tmp_path)
    assert all(r[k]["mod_aux_loss"] > 0 and 0 < r[k]["mod_router_acc"] <= 1 for k in (1, 2))
    assert len(r[1]["gates"]) == 2 and len(r[1]["gates"][0]) == 4 and len(r[1]["loss_per_segment"]) == 4
