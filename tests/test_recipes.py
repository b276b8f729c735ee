"""Shipped recipes: every recipe and stage validates, builds on the meta device, gets a DeepSpeed config and has
the size its name says; stages merge and refer to each other; `recipes list | show | cp` and one-line errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from infinitrain.cli import cli
from infinitrain.errors import ConfigError
from infinitrain.model import count_parameters
from infinitrain.model.lm import InfiniLM
from infinitrain.train.config import (RECIPE_DIR, TrainConfig, load_recipe, load_yaml, recipe_stages,
                                      resolve_stage_ref, shipped_recipes)
from infinitrain.train.engine import deepspeed_config

# name -> (parameters, tolerance, {stage: sample tokens}): the paper's sizes and input lengths (arXiv 2404.07143 §4)
PAPER = {
    "1b-passkey": (1.236e9, 0.01e9, {"pretrain": 4096, "finetune": 6144}),  # 4K; 5K prompts in 3 segments
    "1b-mod-passkey": (1.236e9, 0.01e9, {"pretrain": 4096, "finetune": 6144}),
    "8b-booksum": (8.030e9, 0.01e9, {"pretrain": 8192, "finetune": 32768}),
    "8b-mod-booksum": (8.030e9, 0.01e9, {"pretrain": 8192, "finetune": 32768}),
    "pg19": (0.267e9, 0.01e9, {None: 32768}),
}
CASES = [(p.stem, stage) for p in shipped_recipes()
         for stage in (list(recipe_stages(load_yaml(p), str(p))) or [None])]


def test_the_paper_recipes_are_shipped():
    assert set(PAPER) | {"debug"} <= {p.stem for p in shipped_recipes()}


@pytest.mark.parametrize("name,stage", CASES, ids=[f"{n}:{s}" if s else n for n, s in CASES])
def test_every_recipe_and_stage_builds(name, stage):
    cfg = load_recipe(name, stage=stage)
    with torch.device("meta"):
        model = InfiniLM(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg.model)
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == cfg.data.micro_batch_size * cfg.data.grad_accum * cfg.n_windows * 8
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["zero_optimization"]["stage"] == cfg.run.zero_stage
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # config.yaml round-trips
    assert cfg.log.progress  # a long run shows its progress (the tiny-* recipes printed nothing until done)
    if name in PAPER:
        size, tol, lengths = PAPER[name]
        assert abs(n - size) < tol, f"{name}: {n / 1e9:.3f} B"
        assert cfg.sample_len == lengths[stage] and cfg.model.segment_len == 2048
        assert cfg.data.path and not Path(cfg.data.path).is_absolute()  # a directory `prepare` writes
        assert ("mod" in name) == (cfg.model.mod_every == 2) and cfg.model.mod_capacity == 0.125
    if stage == "finetune":  # starts from the pretrain stage's run dir
        assert cfg.run.init_from == "stage:pretrain"
        assert resolve_stage_ref(cfg, "runs/x/finetune").run.init_from == str(Path("runs/x/pretrain"))


def test_paper_details_are_recorded():
    pg19 = load_recipe("pg19").model
    assert (pg19.n_layers, pg19.n_heads, pg19.head_dim, pg19.d_ff) == (12, 8, 128, 4096)
    ev = load_recipe("8b-booksum", stage="finetune").eval
    assert (ev.task, ev.temperature, ev.top_p, ev.max_new_tokens) == ("summarize", 0.5, 0.95, 1024)
    assert load_recipe("8b-booksum", stage="pretrain").schedule.steps == 30000
    assert load_recipe("1b-passkey", stage="finetune").schedule.steps == 400
    assert max(load_recipe("1b-passkey", stage="finetune").eval.lengths) == 2**20
    assert ev.command("runs/r") == ("infinitrain eval summarize runs/r --data booksum-test.jsonl --temperature 0.5 "
                                    "--top-p 0.95 --max-new-tokens 1024")


def test_fewer_steps_than_the_recipes_warmup_keep_its_warmup_share():
    assert load_recipe("debug").schedule.warmup == 30  # of 300 steps
    assert load_recipe("debug", ["schedule.steps=10"]).schedule.warmup == 1  # was an error: warmup 30 > 10 steps
    assert load_recipe("debug", ["schedule.steps=29"]).schedule.warmup == 2
    assert load_recipe("debug", ["schedule.steps=30"]).schedule.warmup == 30  # fits: unchanged
    assert load_recipe("debug", ["schedule.steps=10", "schedule.warmup=4"]).schedule.warmup == 4


def test_stages_merge_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: debug\noptim: {lr: 1.0e-3, weight_decay: 0.2}\n"
                      "stages:\n  a: {optim: {lr: 2.0e-3}}\n  b: "
                      "{model: {segment_len: 32}, run: {init_from: 'stage:a'}}\n")
    a = load_recipe(str(recipe))  # the first stage by default
    assert (a.optim.lr, a.optim.weight_decay, a.model.segment_len) == (2e-3, 0.2, 64)
    b, stage = load_recipe(str(recipe), ["optim.lr=5e-3"], stage="b", with_stage=True)
    assert stage == "b" and (b.optim.lr, b.model.segment_len, b.run.init_from) == (5e-3, 32, "stage:a")
    assert load_recipe("debug", with_stage=True)[1] is None


@pytest.mark.parametrize("body,stage,needle", [
    ("stages:\n  a: {}\n", "z", "unknown stage 'z' (stages: a)"),
    ("stages:\n  a: {optim: {lrr: 1}}\n", "a", "unknown key optim.lrr"),
    ("stages:\n  a: {bogus: 1}\n", "a", "stages.a: unknown key bogus"),
    ("stages:\n  a: {run: {init_from: 'stage:b'}}\n  b: {}\n", "a", "must name an earlier stage"),
    ("stages:\n  a b: {}\n", "a b", "stage name 'a b'"),
    ("run: {init_from: 'stage:a'}\n", None, "must name an earlier stage"),
    ("", "a", "recipe has no stages"),
])
def test_stage_errors(tmp_path, body, stage, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: debug\n" + body)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_recipe(str(recipe), stage=stage)


def test_recipes_list_show_cp(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["recipes", "list"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line for line in res.output.splitlines()}
    assert set(rows) == {p.stem for p in shipped_recipes()}
    assert re.search(r"8b \(edited\)\s+8\.030 B\s+pretrain,finetune\s+Llama-3-8B", rows["8b-booksum"])
    assert re.search(r"debug\s+0\.16 M\s+-\s+the `debug` preset", rows["debug"])

    res = runner.invoke(cli, ["recipes", "show", "pg19"])
    assert res.exit_code == 0 and res.output == (RECIPE_DIR / "pg19.yaml").read_text()
    res = runner.invoke(cli, ["recipes", "show", "8b-booksum", "--resolved", "--stage", "finetune"])
    assert res.exit_code == 0, res.output
    assert TrainConfig.from_dict(yaml.safe_load(res.output)) == load_recipe("8b-booksum", stage="finetune")

    res = runner.invoke(cli, ["recipes", "cp", "8b-booksum", str(tmp_path)])
    assert res.exit_code == 0, res.output
    copied = tmp_path / "8b-booksum.yaml"
    assert copied.read_text() == (RECIPE_DIR / "8b-booksum.yaml").read_text()
    assert load_recipe(str(copied), stage="finetune") == load_recipe("8b-booksum", stage="finetune")
    copied.write_text("# mine\n")
    res = runner.invoke(cli, ["recipes", "cp", "8b-booksum", str(copied)])
    assert isinstance(res.exception, ConfigError) and "--force" in str(res.exception)
    assert copied.read_text() == "# mine\n"
    res = runner.invoke(cli, ["recipes", "cp", "8b-booksum", str(copied), "--force"])
    assert res.exit_code == 0 and copied.read_text() == (RECIPE_DIR / "8b-booksum.yaml").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["recipes", "show", "nope"], "unknown recipe 'nope' (shipped: 1b-mod-passkey, 1b-passkey,"),
    (["recipes", "cp", "nope", "x.yaml"], "unknown recipe 'nope'"),
    (["train", "--recipe", "8b-booksum", "--stage", "posttrain"],
     "unknown stage 'posttrain' (stages: pretrain, finetune)"),
    (["train", "--recipe", "debug", "--stage", "finetune"], "recipe has no stages"),
    (["train", "--recipe", "tiny-pasky"], "or give a path to a .yaml file); did you mean tiny-passkey?"),
    (["train", "--recipe", "debug", "schedule.step=30"], "(known: min_lr_ratio, steps, warmup); did you mean "
                                                         "schedule.steps?"),
    (["train", "--recipe", "debug", "shedule.steps=30"], "unknown key shedule (known: model, task, deepspeed, data, "
                                                         "optim, schedule, tbptt, checkpoint, log, run, eval, "
                                                         "finetune); "
                                                         "did you mean schedule?"),
    (["train", "--recipe", "debug", "model.n_layer=3"], "did you mean model.n_layers?"),
    (["train", "--recipe", "debug", "log.progres=false"], "did you mean log.progress?"),
    (["train", "--recipe", "debug", "schedule.steps=10", "schedule.warmup=30"],
     "schedule.warmup (30) must be <= schedule.steps (10)"),
    (["train", "--recipe", "8b-booksum", "--stage", "finetune", "--run-dir", "exp/finetune"],
     "stage finetune starts from pretrain's run exp/pretrain, which has no committed checkpoint: train that stage "
     "first (--stage pretrain"),
])
def test_cli_errors_are_one_line(argv, needle, monkeypatch, capsys, tmp_path):
    from infinitrain.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["infinitrain", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == ConfigError.code and err.strip().count("\n") == 0 and needle in err, err


# config.json of the base models the recipes name (meta-llama/Llama-3.2-1B and meta-llama/Meta-Llama-3-8B)
LLAMA_32_1B = dict(model_type="llama", hidden_act="silu", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"})
LLAMA_3_8B = dict(model_type="llama", hidden_act="silu", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("name,hf", [("1b-passkey", LLAMA_32_1B), ("1b-mod-passkey", LLAMA_32_1B),
                                     ("8b-booksum", LLAMA_3_8B), ("8b-mod-booksum", LLAMA_3_8B)])
def test_recipe_model_is_its_base_model(name, hf):
    """Every field --init-from compares (shapes, RoPE and its scaling, norm eps) equals the base model's, so
    the pretrain stage starts from exactly the function Llama computes (gates aside)."""
    from infinitrain.model.llama import llama_model_config
    from infinitrain.train.init_from import ARCHITECTURE, NOTED

    cfg = load_recipe(name, stage="pretrain").model
    base = llama_model_config(hf, where=Path("config.json"), segment_len=cfg.segment_len, update=cfg.update,
                              gate_init=cfg.gate_init, mod_every=cfg.mod_every)
    assert {k: getattr(cfg, k) for k in ARCHITECTURE + NOTED} == {k: getattr(base, k) for k in ARCHITECTURE + NOTED}
    assert cfg.gate_init == -5.0  # nearly closed gates (model/llama.py DEFAULT_GATE_INIT)
