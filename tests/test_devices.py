"""Devices (issue 24 item 1): the sampler's generator lives on the model's device, `--device auto` picks CUDA when
present, and the eval command a training run prints carries the run's device and dtype."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from infinitrain.errors import ConfigError
from infinitrain.infer.loading import resolve_device
from infinitrain.infer.textgen import sampling_generator
from infinitrain.model import InfiniLM
from infinitrain.train.config import load_recipe


def test_sampling_generator_is_made_on_the_models_device(monkeypatch):
    made = []

    class Recorder:
        def __init__(self, device=None):
            made.append(torch.device(device) if device is not None else None)

        def manual_seed(self, seed):
            return self

    model = InfiniLM(load_recipe("debug").model).to("meta")  # any device but the CPU
    monkeypatch.setattr(torch, "Generator", Recorder)
    sampling_generator(model, 3)
    assert made == [torch.device("meta")]


def test_seeded_sampling_on_the_cpu_is_reproducible():
    from infinitrain.infer.generate import Sampling, generate

    torch.manual_seed(0)
    model = InfiniLM(load_recipe("debug").model).eval()
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=50)
    a = generate(model, [[1, 2, 3]], s, generator=sampling_generator(model, 7))
    b = generate(model, [[1, 2, 3]], s, generator=sampling_generator(model, 7))
    assert a == b and len(a[0]) == 12


def test_device_auto_and_refusals(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)


def test_generate_and_eval_default_to_auto():
    from infinitrain.cli import cli

    for args in (["generate", "--help"], ["eval", "passkey", "--help"], ["eval", "summarize", "--help"]):
        out = CliRunner().invoke(cli, args).output
        assert "auto (CUDA when present" in out and "[default: auto]" in out, args


def test_trainer_prints_the_eval_command_with_the_runs_device_and_dtype(tmp_path, monkeypatch):
    from infinitrain.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: debug\nrun: {precision: fp32}\neval: {task: passkey, lengths: [1024]}\n")
    monkeypatch.setattr("infinitrain.train.loop.train", lambda *a, **k: {
        "step": 1, "loss": 1.0, "val_loss": 1.0, "skipped_total": 0, "checkpoint": "x"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = tmp_path / "run"
    out = CliRunner().invoke(cli, ["train", "--recipe", str(recipe), "--run-dir", str(run)]).output
    assert f"evaluate: infinitrain eval passkey {run} --device cuda --dtype fp32 --lengths 1024" in out, out


def test_cuda_runs_get_deterministic_cublas_and_a_stated_nccl_watchdog(monkeypatch):
    """setup_environment with CUDA faked present: CUBLAS_WORKSPACE_CONFIG only in deterministic mode, NCCL's
    async error handling stated (a user's own values win); without CUDA, neither, and DS_ACCELERATOR=cpu."""
    from infinitrain.train.engine import setup_environment

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUBLAS_WORKSPACE_CONFIG",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING", "DS_ACCELERATOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    setup_environment(deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    setup_environment(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    setup_environment(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    for k in ("CUBLAS_WORKSPACE_CONFIG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.delenv(k)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup_environment(deterministic=True)
    assert os.environ["DS_ACCELERATOR"] == "cpu" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


def test_deterministic_mode_sets_cudnn_and_restores_it():
    from infinitrain.train.loop import _configure_determinism

    cfg = load_recipe("debug", ["run.deterministic=true"])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    restore = _configure_determinism(cfg, rank=0)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        restore()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark = False
