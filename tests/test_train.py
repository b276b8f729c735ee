"""Trainer: recipes and CLI errors, the debug model learning real text, prepared shards, zero.Init, MoD logging.
Resume, kills, signals, non-finite steps and damaged checkpoints are the fault suite's (tests/faults/)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from infinitrain.errors import ConfigError
from infinitrain.train.config import RECIPE_DIR, TrainConfig, load_recipe
from infinitrain.train.engine import deepspeed_config, lr_lambda

from trainkit import REPO, SMALL, TEXT, rows, train

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
    cfg = load_recipe("debug", ["run.zero_init=true", "model.gate_init=0.25", "run.precision=fp32",
                                "model.memory_tau=3.0", "model.gate_split=2.0"])
    model = build_model(cfg, deepspeed_config(cfg, 1))
    w, beta, tau = (model.layers[0].attn.q_proj.weight, model.layers[0].attn.betas, model.layers[0].attn.log_tau)
    assert hasattr(w, "ds_id") and w.numel() == 0  # partitioned (the local data lives in w.ds_tensor)
    with deepspeed.zero.GatheredParameters([w, beta, tau]):
        assert abs(float(w.detach().std()) - cfg.model.init_std) < 0.003
        assert beta.tolist() == [2.25, -1.75, 2.25, -1.75]  # gate_init ± gate_split, even heads +
        torch.testing.assert_close(tau.detach().exp(), torch.full((cfg.model.n_kv_heads,), 3.0))
    # the temperatures train in their own group without weight decay, at optim.tau_lr (null: the main lr); the
    # gates keep their own group, last (the metrics' gate_lr reads the last group)
    from infinitrain.train.engine import param_groups
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert list(groups)[-1] == "gates"
    assert {id(p) for p in groups["gates"]["params"]} == {id(p) for p in model.gate_parameters()}
    assert {id(p) for p in groups["memory_tau"]["params"]} == {id(p) for p in model.tau_parameters()}
    assert groups["memory_tau"]["lr"] == cfg.optim.lr and groups["memory_tau"]["weight_decay"] == 0.0
    assert len(model.tau_parameters()) == 2
    tau_cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, tau_lr=0.05))
    assert {g["name"]: g["lr"] for g in param_groups(model, tau_cfg)}["memory_tau"] == 0.05


def test_train_benchmark_smoke(tmp_path):
    """benchmarks/train.py runs end to end at tiny lengths and reports finite numbers (no timing assertions)."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--lengths", "128,256", "--window",
                          "1", "--steps", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows_ = json.loads(out.read_text())
    assert [r["length"] for r in rows_] == [128, 256] and "peak RSS" in res.stdout
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and 0 < r["mfu"] < 1 for r in rows_)


def test_mod_aux_loss_router_accuracy_and_memory_tau_logged(tmp_path):
    train(tmp_path, ["schedule.steps=2", "schedule.warmup=1", "model.mod_every=2", "model.mod_capacity=0.25",
                     "tbptt.checkpointing=segment", "model.memory_tau=2.0"])
    r = rows(tmp_path)
    assert all(r[k]["mod_aux_loss"] > 0 and 0 < r[k]["mod_router_acc"] <= 1 for k in (1, 2))
    assert len(r[1]["gates"]) == 2 and len(r[1]["gates"][0]) == 4 and len(r[1]["loss_per_segment"]) == 4
    taus = [t for layer in r[2]["memory_tau"] for t in layer]  # learned through checkpointed, routed segments
    assert len(r[2]["memory_tau"]) == 2 and all(t != 2.0 and abs(t - 2.0) < 0.1 for t in taus), taus


def test_second_step_does_not_rescan_the_zero3_trace():
    """ZeRO-3's first step with a complete trace once decided, for every module call, which parameters to release by
    scanning the rest of the trace (stage3_max_reuse_distance 1e9 > the model): quadratic in segments x layers,
    step 2 cost 30x a step. With the generated stage3_max_reuse_distance 0 step 2 walks the parameters about as
    often as step 3 (counted calls of DeepSpeed's iter_params, not time)."""
    import torch
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    from infinitrain.train.data import Batch
    from infinitrain.train.engine import build_engine, deepspeed_config, init_distributed, setup_environment
    from infinitrain.train.step import backward_windows

    setup_environment()
    init_distributed()
    cfg = load_recipe("debug", ["model.segment_len=16", "data.segments_per_sample=16", "data.micro_batch_size=1",
                                "tbptt.window=0", "tbptt.checkpointing=segment", "run.precision=fp32"])
    engine, _ = build_engine(cfg, deepspeed_config(cfg, 1))
    calls, inner = [0], ppc.iter_params

    def counted(*a, **k):
        calls[0] += 1
        return inner(*a, **k)

    g, per_step = torch.Generator().manual_seed(0), []
    T = cfg.sample_len
    try:
        ppc.iter_params = counted
        for _ in range(3):
            ids = torch.randint(0, 512, (1, T + 1), generator=g)
            doc = torch.zeros(1, T, dtype=torch.bool)
            doc[:, 0] = True
            calls[0] = 0
            backward_windows(engine, [Batch(ids[:, :-1], ids[:, 1:], torch.ones(1, T, dtype=torch.bool), doc,
                                            torch.arange(1))], segment_len=16, window=cfg.window, aux_weight=0.0)
            engine.step()
            per_step.append(calls[0])
    finally:
        ppc.iter_params = inner
    assert per_step[1] < 5 * per_step[2], per_step  # measured 5886 vs 2394; with 1e9: 100x more


def test_grad_norm_is_logged_at_zero_stage_0_and_equals_deepspeeds_at_stage_1(tmp_path):
    """ZeRO stage 0 in fp32 keeps no gradient norm in DeepSpeed (the tiny-* recipes logged grad_norm null in every
    row): the trainer computes it, before clipping, and it equals what DeepSpeed reports at stage 1 on the same
    gradients (rows 1 and 2: the same weights, so the same gradients, at both stages)."""
    common = ["schedule.steps=2", "schedule.warmup=1", "run.precision=fp32", "optim.grad_clip=0.01"]
    train(tmp_path / "s0", [*common, "run.zero_stage=0"])
    train(tmp_path / "s1", [*common, "run.zero_stage=1"])
    s0, s1 = rows(tmp_path / "s0"), rows(tmp_path / "s1")
    assert all(isinstance(s0[k]["grad_norm"], float) and s0[k]["grad_norm"] > 0.01 for k in (1, 2))  # before clipping
    for k in (1, 2):
        assert s0[k]["loss"] == pytest.approx(s1[k]["loss"], rel=1e-5)
        assert s0[k]["grad_norm"] == pytest.approx(s1[k]["grad_norm"], rel=1e-4)
