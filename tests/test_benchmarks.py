"""Smoke tests of the benchmark scripts at tiny sizes: every cell reported with finite numbers (no timing
assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("level", ["op", "layer"])
def test_attention_benchmark_reports_every_impl(level, tmp_path, capsys):
    bench = _load("attention")
    out = tmp_path / "out.json"
    argv = ["--level", level, "--T", "64,128", "--segment", "32", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "8", "--rounds", "2", "--min-time", "0", "--naive-max-t", "64", "--full-max-t", "128",
            "--ratio-local-t", "128", "--ratio-full-t", "128", "--threads", "1", "--json", str(out)]
    report = bench.main(argv)
    table = capsys.readouterr().out
    for impl in bench.IMPLS:
        assert impl in table
    rows = {(r["impl"], r["T"]): r for r in report["results"]}
    for impl in bench.IMPLS:
        for T in (64, 128):
            r = rows[impl, T]
            if (impl == "naive-linear" and T > 64) or (impl == "megalodon" and level == "op"):
                assert r["note"].startswith("skipped") and "best_tok_s" not in r
                continue
            assert r["runs"] >= 1 and r["level"] == level
            assert math.isfinite(r["best_tok_s"]) and r["best_tok_s"] > 0
            assert math.isfinite(r["median_tok_s"]) and r["median_tok_s"] > 0
            assert r["saved_bytes"] > 0
    assert "skipped" in table
    for ratio in report["ratios"]:
        assert ratio["best"] is not None and math.isfinite(ratio["best"]) and ratio["best"] > 0
        assert math.isfinite(ratio["median"])
    assert "infini-linear / local-only" in table and "infini-linear / full-causal" in table
    assert "seed-linear / local-only" in table and "infini-linear / seed-linear" in table
    assert json.loads(out.read_text())["config"]["levels"] == [level]


def test_saved_bytes_are_deterministic_and_linear_in_length_for_local_only():
    """The saved-for-backward counter gives the same bytes on every run; local-only saves exactly O(T)."""
    bench = _load("attention")
    argv = ["--level", "op", "--T", "64,128", "--segment", "32", "--heads", "2", "--head-dim", "8",
            "--rounds", "1", "--min-time", "0", "--impls", "local-only,infini-linear", "--threads", "1"]
    a = {(r["impl"], r["T"]): r["saved_bytes"] for r in bench.run(bench.parse_args(argv))["results"]}
    b = {(r["impl"], r["T"]): r["saved_bytes"] for r in bench.run(bench.parse_args(argv))["results"]}
    assert a == b
    assert a["local-only", 128] == 2 * a["local-only", 64]
    assert a["infini-linear", 128] > a["local-only", 128]


def test_rss_is_measured_in_a_fresh_process():
    bench = _load("attention")
    argv = ["--level", "op", "--T", "64", "--segment", "32", "--heads", "2", "--head-dim", "8", "--rounds", "1",
            "--min-time", "0", "--impls", "local-only", "--threads", "1", "--rss"]
    (r,) = bench.run(bench.parse_args(argv), argv)["results"]
    assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0


def test_prepare_benchmark_times_every_cell_and_workers_agree(tmp_path, capsys):
    """benchmarks/prepare.py at a tiny size: bare tokenizer and prepare at 1 and 2 workers, the same token count
    for whole documents and pieces, byte-identical outputs (no timing assertions)."""
    bench = _load("prepare")
    report = bench.main(["--mb", "0.05", "--rounds", "1", "--json", str(tmp_path / "p.json")])
    cells = {(r["impl"], r["workers"]): r for r in report["results"]}
    assert {(i, w) for i in ("bare-docs", "bare-pieces", "prepare") for w in (1, 2)} <= set(cells)
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in cells.values())
    assert cells["prepare", 2]["stage1"] > 0 and cells["prepare", 2]["stage2"] > 0
    assert report["outputs_identical"] and report["tokens"] > 1000
    assert "prepare 2 workers / 1 worker" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["summary"] == report["summary"]


TINY_MODEL = ["--layers", "2", "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--ffn", "48", "--vocab", "97",
              "--segment", "32", "--window", "1", "--threads", "1", "--peak-n", "256"]


def test_model_benchmark_times_every_contender_and_precision(tmp_path, capsys):
    """benchmarks/model.py at a tiny shape: every (contender, precision, length) cell timed with finite tok/s, MFU and
    kernel share, the side-by-side ratios printed, the load and CPU flags reported (no timing assertions)."""
    bench = _load("model")
    out = tmp_path / "m.json"
    rep = bench.main(["--lengths", "64,128", "--rounds", "1", "--profile", "3", "--json", str(out), *TINY_MODEL])
    table = capsys.readouterr().out
    cells = {(r["contender"], r["precision"], r["T"]): r for r in rep["results"]}
    assert set(cells) == {(c, p, T) for c in bench.CONTENDERS for p in bench.PRECISIONS for T in (64, 128)}
    for r in cells.values():
        assert r["steps"] == 1 and math.isfinite(r["best_tok_s"]) and r["best_tok_s"] > 0, r
        assert 0 < r["mfu"] < 10 and 0 <= r["sys_share"] <= 1 and len(r["profile"]["top"]) == 3
    names = {x["ratio"] for x in rep["ratios"]}
    assert {"infini / hf fp32 T=128", "trainer / infini bf16 T=64", "trainer bf16 / fp32 T=128",
            "trainer fp32 T=128 / T=64"} <= names
    assert "load before:" in table and "load average" in table and "bf16 unit:" in table
    assert rep["peaks"]["fp32"] > 0 and rep["peaks"]["bf16"] > 0
    assert json.loads(out.read_text())["ratios"] == rep["ratios"]


def test_model_benchmark_caps_full_attention_by_predicted_time():
    """The full-attention contender is skipped where a step is predicted to exceed --max-step-s: quadratic from
    one known length, a + bT² through the two longest known."""
    bench = _load("model")
    shape = bench.Shape(vocab=97, d_model=32, layers=2)
    assert bench.hf_skip(shape, "fp32", 4096, {}, 10.0) == ""
    assert bench.hf_skip(shape, "fp32", 4096, {1024: 1.0}, 10.0).startswith("skipped: predicted 16 s")
    assert bench.hf_skip(shape, "fp32", 4096, {1024: 1.0}, 20.0) == ""
    assert "predicted 10 s" in bench.hf_skip(shape, "fp32", 8192, {2048: 1.0, 4096: 3.0}, 9.0)  # 0.25 T + 0.125 T²
    assert "GiB available" in bench.hf_skip(bench.Shape(vocab=10**9), "fp32", 1 << 20, {}, 1e9)

