"""``scripts/gpu_check.sh`` (``python -m infinitrain.check``): its CPU half runs here so that it cannot rot, and the
pieces of its GPU half that need no GPU (the training recipe, the plan beside it, the FLOP count) are checked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infinitrain import check

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("INFINITRAIN_TEST_DEVICE", "cpu") != "cpu", reason="the CPU half")
def test_gpu_check_without_cuda_runs_its_cpu_half_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1].startswith("no CUDA device:")
    rows = {line.split("  ")[0]: line for line in lines[:-1]}
    assert set(rows) == {"parity fp32 (TF32 off)", "parity bf16", "generate --seed on cpu"}
    assert all(" ok " in row and "FAIL" not in row for row in rows.values()), res.stdout
    assert "passed" in rows["parity bf16"] and "failed" not in res.stdout


def test_the_gpu_half_recipe_loads_and_plans(tmp_path):
    """The 1b training run's recipe is a valid config of the 1b shape, `plan` prices it, and its FLOPs per token
    are 6 × non-embedding parameters plus the attention and memory terms."""
    from infinitrain.model import count_parameters
    from infinitrain.plan import plan
    from infinitrain.train.config import load_recipe

    (tmp_path / "r.yaml").write_text(check.TRAIN_RECIPE.format(data=tmp_path / "t.txt", micro=2, steps=8))
    cfg = load_recipe(str(tmp_path / "r.yaml"))
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, cfg.sample_len) == (16, 2048, 32, 8, 8192)
    p = plan(cfg, gpus=1, gpu_memory=80e9)
    assert 10e9 < p.peak < 80e9  # ZeRO-3 on one GPU keeps 16 bytes per parameter: about 20 GB plus activations
    dense = 6 * (count_parameters(m) - m.vocab_size * m.d_model)
    flops = check.model_flops_per_token(m, m.segment_len)
    assert dense < flops < 1.2 * dense
    check.write_text(tmp_path / "t.txt", 10_000)
    assert len((tmp_path / "t.txt").read_bytes()) >= 10_000
