"""The generated DeepSpeed JSON states the accumulation and reduction dtypes and turns ZeRO-3's comm overlap on for
CUDA only; a bf16 run (ZeRO-3, TBPTT windows, segment checkpointing, grad_accum 2) trains, commits, resumes, and
the engine built from its JSON accumulates in fp32 (issue 24 items 4, 9). The 8B recipes' micro-batches are the
ones `infinitrain plan` sizes to fit 8 x 80 GB."""

from __future__ import annotations

import json
import math

import pytest
import torch

from infinitrain.plan import plan
from infinitrain.train.config import load_recipe
from infinitrain.train.engine import deepspeed_config
from trainkit import SMALL, TEXT, checkpoint_names, events, train


@pytest.mark.parametrize("precision,stage,accum", [("bf16", 3, "fp32"), ("bf16", 2, "fp32"), ("bf16", 1, None),
                                                   ("bf16", 0, None), ("fp32", 3, "fp32"), ("fp32", 0, "fp32")])
def test_accumulation_and_reduction_dtypes_are_stated(precision, stage, accum):
    cfg = load_recipe("debug", [f"run.precision={precision}", f"run.zero_stage={stage}"])
    ds = deepspeed_config(cfg, 8, cuda=False)
    assert ds["communication_data_type"] == "fp32"
    assert ds.get("data_types", {}).get("grad_accum_dtype") == accum
    cfg = load_recipe("debug", ["deepspeed.communication_data_type=bf16"])  # a recipe may halve the traffic
    assert deepspeed_config(cfg, 8)["communication_data_type"] == "bf16"


def test_zero3_overlaps_communication_on_cuda_only():
    cfg = load_recipe("debug", ["run.zero_stage=3"])
    assert deepspeed_config(cfg, 8, cuda=True)["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(cfg, 8, cuda=False)["zero_optimization"]["overlap_comm"] is False
    assert deepspeed_config(cfg, 8)["zero_optimization"]["overlap_comm"] is torch.cuda.is_available()


@pytest.mark.parametrize("name", ["8b-booksum", "8b-mod-booksum"])
def test_8b_recipes_micro_batches_fit_per_plan(name):
    """Pretrain 4 x accum 1, finetune 2 x 2 (32 samples a step on 8 GPUs either way): both fit 80 GB per plan,
    and the next bigger micro-batch of the finetune stage does not fit comfortably."""
    want = {"pretrain": (4, 1), "finetune": (2, 2)}
    for stage, (micro, accum) in want.items():
        cfg = load_recipe(name, stage=stage)
        assert (cfg.data.micro_batch_size, cfg.data.grad_accum) == (micro, accum)
        assert plan(cfg, gpus=8).fits, (name, stage)
    assert not plan(load_recipe(name, ["data.micro_batch_size=4", "data.grad_accum=1"], stage="finetune"),
                    gpus=8).fits


def test_bf16_zero3_windows_checkpointing_trains_resumes_and_accumulates_in_fp32(tmp_path):
    run = tmp_path / "run"
    over = ["run.precision=bf16", "run.zero_stage=3", "tbptt.window=2", "tbptt.checkpointing=segment",
            "data.micro_batch_size=2", "data.grad_accum=2", "schedule.steps=3", "checkpoint.save_every=2"]
    out = train(run, over)
    assert out["step"] == 3 and math.isfinite(out["loss"])
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32" and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 2 * 2  # grad_accum x 2 windows of 2 segments
    assert ds["zero_optimization"]["overlap_comm"] is torch.cuda.is_available()
    assert checkpoint_names(run) == ["step-00000002", "step-00000003"]
    out = train(run, [*over, "schedule.steps=5"])
    assert out["step"] == 5 and math.isfinite(out["loss"]) and [e["step"] for e in events(run, "resumed_from")] == [3]

    from infinitrain.train.engine import build_engine  # DeepSpeed honours the JSON: its gradient partitions are fp32

    cfg = load_recipe("debug", [*SMALL, *over], str(TEXT))
    engine, _ = build_engine(cfg, ds)
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert engine.optimizer.grad_partitions_flat_buffer.dtype == torch.float32
    assert next(engine.module.parameters()).dtype == torch.bfloat16
