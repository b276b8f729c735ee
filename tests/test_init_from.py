"""--init-from: a tiny Hugging Face Llama, an export and a previous stage's run land in the trained model (ZeRO-3,
partitioned by zero.Init or whole), the report names loaded/created/unused tensors, mismatches are one line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.infer.loading import checkpoint_state_dict
from infinitrain.model.config import ModelConfig
from infinitrain.model.io import save_pretrained
from infinitrain.model.llama import fold_gates
from infinitrain.model.lm import InfiniLM
from infinitrain.train.checkpoint import committed
from infinitrain.train.config import load_recipe
from infinitrain.export import export
from infinitrain.train.init_from import REPORT_NAME, report_for

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"  # bytes: token ids 0..255 only
LR = 1e-3
ONE_STEP = ["model.segment_len=32", "data.segments_per_sample=4", "data.micro_batch_size=4", "data.val_samples=4",
            "schedule.steps=1", "schedule.warmup=0", "log.every=1", "log.progress=false", "log.tensorboard=false",
            "tbptt.window=2", f"optim.lr={LR}", "optim.weight_decay=0.0", "run.zero_stage=3", "run.precision=fp32"]


def tiny_llama(path: Path, **overrides) -> Path:
    """A random debug-shaped Llama (vocab 512, d 64, 4 heads on 2 KV heads, FFN 192) saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=192, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
               rms_norm_eps=1e-5, initializer_range=0.1)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones: a norm left at its init would show
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def train_cli(args: list[str]):
    from infinitrain.cli import cli

    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


def test_report_names_loaded_created_unused_and_differences(llama_dir, tmp_path):
    cfg = load_recipe("debug", ["model.segment_len=32", "model.rope_theta=20000"])
    report = report_for(cfg.model, llama_dir)
    ours = dict(InfiniLM(cfg.model).named_parameters())
    assert set(report.loaded) | set(report.created) == set(ours)
    assert report.created == ("layers.0.attn.betas", "layers.1.attn.betas") and report.unused == ()
    assert report.loaded["layers.1.attn.k_proj.weight"] == "model.layers.1.self_attn.k_proj.weight"
    assert report.differences == {"rope_theta": (20000.0, 10000.0)}
    assert "created 2 (layers.*.attn.betas x2)" in report.summary() and "rope_theta" in report.summary()

    # an exported infinitrain model is read by name (across MoD wrapping); a MoD recipe creates its routers
    torch.manual_seed(0)
    export = save_pretrained(InfiniLM(cfg.model), tmp_path / "export")
    mod = load_recipe("debug", ["model.segment_len=32", "model.mod_every=2"]).model
    r = report_for(mod, export)
    assert r.source.kind == "infinitrain export" and r.created == ("layers.1.router.weight",) and not r.unused
    assert r.loaded["layers.1.block.attn.q_proj.weight"] == "layers.1.attn.q_proj.weight"  # plain -> routed layer
    # a recipe with learned memory temperatures creates them (the source has none)
    tau = load_recipe("debug", ["model.segment_len=32", "model.memory_tau=3.0"]).model
    assert report_for(tau, export).created == ("layers.0.attn.log_tau", "layers.1.attn.log_tau")


@pytest.mark.parametrize("override,needle", [
    ("model.d_ff=128", "tensor model.layers.0.mlp.gate_proj.weight has shape (192, 64) in the source, the recipe's "
                       "model needs (128, 64)"),
    ("model.n_layers=3", "the source has no tensor model.layers.2.input_layernorm.weight"),
    ("model.n_layers=1", "n_layers 1 in the recipe, 2 in the source"),
    ("model.vocab_size=256", "tensor model.embed_tokens.weight has shape (512, 64) in the source"),
])
def test_shape_mismatch_is_one_config_error(llama_dir, override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        report_for(load_recipe("debug", ["model.segment_len=32", override]).model, llama_dir)


def test_bad_sources_are_refused(tmp_path, llama_dir):
    cfg = load_recipe("debug").model
    with pytest.raises(ConfigError, match="no such directory"):
        report_for(cfg, tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="pickle files are never read"):
        report_for(cfg, tmp_path / "pickled")
    hf_bin = tmp_path / "hf_bin"
    hf_bin.mkdir()
    (hf_bin / "config.json").write_text((llama_dir / "config.json").read_text())
    (hf_bin / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle files are not read"):
        report_for(cfg, hf_bin)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="init_from .*no committed checkpoint"):
        report_for(cfg, tmp_path / "run")


def test_cli_bad_init_from_is_one_line(tmp_path, llama_dir, monkeypatch, capsys):
    """Through the console entry (`main`), before DeepSpeed starts: one line on stderr, exit code 3."""
    from infinitrain.cli import main

    for source, needle in [(tmp_path / "nothing", "no such directory"), (llama_dir, "has shape (192, 64)")]:
        monkeypatch.setattr(sys, "argv", ["infinitrain", "train", "--recipe", "debug", "--data", str(TEXT),
                                          "--init-from", str(source), "--run-dir", str(tmp_path / "run"),
                                          "model.d_ff=128"])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == ConfigError.code and err.strip().count("\n") == 0 and needle in err, err


def test_llama_weights_survive_zero3_init_and_one_step(llama_dir, tmp_path):
    """Partitioned at construction (zero.Init), loaded under GatheredParameters, one real step, then the
    checkpoint and its export (the same tensors): embedding rows of ids the byte-level data never holds (256..511) get
    no gradient and no decay,
    so they equal the source exactly; every other loaded tensor moved by at most one Adam step (lr)."""
    run = tmp_path / "run"
    res = train_cli(["--recipe", "debug", "--data", str(TEXT), "--init-from", str(llama_dir), "--run-dir", str(run),
                     "--resume", "none", *ONE_STEP, "run.zero_init=true", "model.gate_init=-3"])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((run / REPORT_NAME).read_text())
    assert report["kind"] == "Hugging Face Llama" and len(report["loaded"]) == 21 and report["unused"] == []
    trained = checkpoint_state_dict(committed(run / "checkpoints")[-1])
    exported = export(run, tmp_path / "model").out  # `infinitrain export`: what a user ships
    assert all(torch.equal(t, trained[k]) for k, t in hf_tensors(exported).items())
    src = hf_tensors(llama_dir)
    emb, src_emb = trained["embed.weight"], src["model.embed_tokens.weight"]
    assert torch.equal(emb[256:], src_emb[256:])
    assert not torch.equal(emb[:256], src_emb[:256])  # the step did happen
    model_cfg = ModelConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())["model"])
    for ours, theirs in report["loaded"].items():  # W_O divided by 1 - sigmoid(-3) at import (fold_gates)
        assert (trained[ours] - fold_gates(ours, src[theirs], model_cfg)).abs().max() <= LR * 1.001, ours
    assert not torch.allclose(trained["layers.0.attn.o_proj.weight"], src["model.layers.0.self_attn.o_proj.weight"],
                              atol=10 * LR)
    assert torch.allclose(trained["layers.0.attn.betas"], torch.full((4,), -3.0), atol=0.011)  # gate_lr 1e-2


def test_finetune_stage_starts_from_the_pretrain_run(tmp_path, monkeypatch):
    """A two-stage recipe: `--stage finetune` reads runs/<recipe>/pretrain's newest checkpoint (stage:pretrain),
    not its own fresh init (another seed), and reports every tensor loaded."""
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "model: {preset: debug, segment_len: 32}\n"
        "data: {segments_per_sample: 4, micro_batch_size: 4, val_samples: 4}\n"
        f"optim: {{lr: {LR}, weight_decay: 0.0}}\n"
        "schedule: {steps: 1, warmup: 0}\n"
        "tbptt: {window: 2}\n"
        "log: {every: 1, progress: false, tensorboard: false}\n"
        "run: {zero_stage: 3, precision: fp32}\n"
        "stages:\n"
        "  pretrain: {run: {seed: 1}}\n"
        "  finetune: "
        "{run: {seed: 2, init_from: 'stage:pretrain'}, data: {segments_per_sample: 2}, tbptt: {window: 1}}\n")
    monkeypatch.chdir(tmp_path)
    res = train_cli(["--recipe", str(recipe), "--data", str(TEXT)])  # the first stage by default
    assert res.exit_code == 0, (res.output, res.exception)
    pre = checkpoint_state_dict(committed(Path("runs/two/pretrain/checkpoints"))[-1])
    res = train_cli(["--recipe", str(recipe), "--stage", "finetune", "--data", str(TEXT)])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads(Path("runs/two/finetune", REPORT_NAME).read_text())
    assert report["source"] == "runs/two/pretrain" and report["kind"] == "run checkpoint"
    assert report["created"] == [] and len(report["loaded"]) == len(pre)
    fine = checkpoint_state_dict(committed(Path("runs/two/finetune/checkpoints"))[-1])
    assert torch.equal(fine["embed.weight"][256:], pre["embed.weight"][256:])
    for name in pre:
        assert (fine[name] - pre[name]).abs().max() <= 1.001 * max(LR, 1e-2), name  # gates: gate_lr
    # resuming the finished stage does not load the source again
    res = train_cli(["--recipe", str(recipe), "--stage", "finetune", "--data", str(TEXT)])
    assert res.exit_code == 0 and "is not applied" in res.output, res.output


@pytest.mark.slow  # a 2-rank torchrun run (~30 s)
def test_llama_weights_land_on_two_ranks(llama_dir, tmp_path):
    """Two ranks, every parameter partitioned (persistence threshold 0): rank 0 reads the files, the other rank
    only joins each GatheredParameters; the checkpoint holds the source as in the 1-rank test."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "infinitrain.train", "--recipe", "debug", "--data", str(TEXT), "--init-from", str(llama_dir),
           "--run-dir", str(run), *ONE_STEP, "run.zero_init=true",
           "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    res = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run / REPORT_NAME).read_text())
    trained = checkpoint_state_dict(committed(run / "checkpoints")[-1])
    src = hf_tensors(llama_dir)
    assert torch.equal(trained["embed.weight"][256:], src["model.embed_tokens.weight"][256:])
    model_cfg = ModelConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())["model"])
    for ours, theirs in report["loaded"].items():  # W_O divided by 1 - sigmoid(-3) at import (fold_gates)
        assert (trained[ours] - fold_gates(ours, src[theirs], model_cfg)).abs().max() <= LR * 1.001, ours
    assert not torch.allclose(trained["layers.0.attn.o_proj.weight"], src["model.layers.0.self_attn.o_proj.weight"],
                              atol=10 * LR)
