"""LoRA and freezing: the adapter equals its merged weight (naive twin), merging keeps the logits, targets and
freeze/train patterns pick the right names; with the real trainer under ZeRO-3 (1 rank) a LoRA run learns while
every frozen tensor stays bitwise unchanged, and its export is a plain InfiniLM with the unmerged model's logits."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.model import InfiniLM, get_preset
from infinitrain.model.lora import LoRALinear, add_lora, merge_lora, merge_lora_state, merged_weight, target_modules
from infinitrain.train.finetune import FinetuneConfig, apply_finetune, trainable_names

TEXT = Path(__file__).resolve().parent / "fixtures" / "pride_and_prejudice_ch1-12.txt"


def _model(**kw) -> InfiniLM:
    torch.manual_seed(0)
    return InfiniLM(get_preset("debug").replace(segment_len=16, **kw)).double()


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * 0.1)


def test_lora_linear_equals_its_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True).double()
    lora = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    assert torch.equal(lora(x), base(x))  # B = 0: unchanged at step 0
    _randomise_adapters(lora)
    naive = F.linear(x, merged_weight(lora.weight, lora.lora_A, lora.lora_B, 2.0), lora.bias)
    torch.testing.assert_close(lora(x), naive, rtol=1e-12, atol=1e-12)
    assert lora.weight is base.weight and lora.bias is base.bias  # the base's Parameters, same names


def test_add_lora_then_merge_keeps_the_logits():
    model = _model()
    ids = torch.randint(0, 512, (2, 40))
    before = model(ids).logits
    names = add_lora(model, ["attention", "mlp"], rank=4, alpha=8.0)
    assert len(names) == 2 * (4 + 3)  # q, k, v, o and gate, up, down in each of 2 layers
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    _randomise_adapters(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, before)
    state = merge_lora_state({k: v.clone() for k, v in model.state_dict().items()}, 2.0)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(state) == set(merged.state_dict()) == set(_model().state_dict())  # a plain model's names
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-10, atol=1e-10)
    plain = _model()
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-10, atol=1e-10)
    with pytest.raises(CheckpointError, match="finetune.lora"):
        merge_lora_state(model.state_dict(), None)


def test_targets_and_patterns():
    model = _model()
    assert list(target_modules(model, ["q_proj"])) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    mlp = [f"layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    assert list(target_modules(model, ["layers.1.mlp.*"])) == mlp
    with pytest.raises(ConfigError, match="'q_prj' matches no Linear"):
        target_modules(model, ["q_prj"])
    names = [n for n, _ in model.named_parameters()]
    lora = FinetuneConfig(lora={"rank": 2, "targets": ["attention"]})
    add_lora(model, ["attention"], rank=2, alpha=4.0)
    names = [n for n, _ in model.named_parameters()]
    chosen = trainable_names(names, lora)
    assert chosen == {n for n in names if n.endswith((".lora_A", ".lora_B", ".betas"))}
    chosen = trainable_names(names, FinetuneConfig(lora={"rank": 2}, gates=False, memory=True,
                                                   train=["re:layers\\.1\\.mlp\\..*"]))
    assert {n for n in chosen if "lora" not in n} == {
        *(f"layers.{i}.attn.{p}_proj.weight" for i in (0, 1) for p in "qkv"),
        *(f"layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    frozen = trainable_names(names, FinetuneConfig(freeze=["embed.*", "layers.0.*"]))
    assert frozen == {n for n in names if not re.match(r"embed\.|layers\.0\.", n)}
    with pytest.raises(ConfigError, match="finetune.freeze: 'layers.9.\\*' matches no parameter"):
        trainable_names(names, FinetuneConfig(freeze=["layers.9.*"]))
    with pytest.raises(ConfigError, match="no parameter left"):
        trainable_names(names, FinetuneConfig(freeze=["*"]))
    with pytest.raises(ConfigError, match="unknown key rnk"):
        FinetuneConfig(lora={"rnk": 2})


def _params(model_or_state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model_or_state.items()}


def test_lora_under_zero3_trains_only_adapters_and_gates_and_exports_merged(tmp_path):
    """The real trainer (ZeRO-3, 1 rank): the loss falls, the base weights stay bitwise equal to a plain run's
    initialisation, and the export (merged) gives the unmerged model's logits."""
    from infinitrain.infer.loading import gathered_state_dict
    from infinitrain.train import train
    from infinitrain.train.checkpoint import committed
    from infinitrain.train.config import load_recipe
    from infinitrain.train.engine import build_model
    from infinitrain.export import export

    small = ["data.segments_per_sample=4", "data.micro_batch_size=4", "data.val_samples=4", "log.every=1",
             "log.progress=false", "tbptt.window=2", "model.segment_len=32", "run.zero_stage=3", "optim.lr=1e-2",
             "schedule.steps=8", "schedule.warmup=0", "finetune.lora={rank: 4, alpha: 8, targets: [attention, mlp]}"]
    cfg = load_recipe("debug", small, str(TEXT))
    init = _params(dict(build_model(cfg.replace(finetune=FinetuneConfig()), {}).named_parameters()))
    summary = train(cfg, tmp_path / "run", "none")
    losses = [r["loss"] for r in _rows(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.2, losses
    ckpt = committed(tmp_path / "run" / "checkpoints")[-1]
    raw = gathered_state_dict(ckpt)
    adapters = {k for k in raw if ".lora_" in k}
    assert len(adapters) == 2 * 2 * 7
    changed = {k for k in init if not torch.equal(raw[k], init[k])}
    assert changed == {k for k in init if k.endswith(".betas")}  # only the gates move among the base tensors
    assert all(raw[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # B left zero: adapters trained
    # the unmerged model: a fresh LoRA model holding the checkpoint's tensors
    unmerged = InfiniLM(cfg.model)
    apply_finetune(unmerged, cfg.finetune, seed=cfg.run.seed)
    unmerged.load_state_dict(raw)
    export(tmp_path / "run", tmp_path / "model", dtype="fp32")
    plain = InfiniLM.from_pretrained(tmp_path / "model")
    assert not any(".lora_" in k for k in plain.state_dict())
    ids = torch.randint(0, 256, (2, 96))
    torch.testing.assert_close(plain(ids).logits, unmerged.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert summary["step"] == 8


def _rows(run_dir: Path) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_frozen_parameters_stay_bitwise_unchanged_zero3(tmp_path):
    from infinitrain.infer.loading import checkpoint_state_dict
    from infinitrain.train import train
    from infinitrain.train.checkpoint import committed
    from infinitrain.train.config import load_recipe
    from infinitrain.train.engine import build_model

    small = ["data.segments_per_sample=2", "data.micro_batch_size=4", "data.val_samples=4", "log.every=1",
             "log.progress=false", "model.segment_len=32", "run.zero_stage=3", "schedule.steps=3",
             "schedule.warmup=0", "finetune.freeze=[embed.*, 'layers.0.*', '*.betas']"]
    cfg = load_recipe("debug", small, str(TEXT))
    init = _params(dict(build_model(cfg.replace(finetune=FinetuneConfig()), {}).named_parameters()))
    train(cfg, tmp_path / "run", "none")
    state = checkpoint_state_dict(committed(tmp_path / "run" / "checkpoints")[-1])
    frozen = {k for k in init if re.match(r"embed\.|layers\.0\.|.*\.betas$", k)}
    assert frozen and all(torch.equal(state[k], init[k]) for k in frozen)
    assert all(not torch.equal(state[k], init[k]) for k in set(init) - frozen if k.endswith("weight"))


def test_lora_run_resumes_bitwise(tmp_path):
    """Adapters are rebuilt (same seed, same names) before DeepSpeed loads the checkpoint: steps 3-4 resumed from
    the step-2 checkpoint equal the uninterrupted run's bitwise."""
    from infinitrain.train import train
    from infinitrain.train.checkpoint import committed
    from infinitrain.train.config import load_recipe

    cfg = load_recipe("debug", ["data.segments_per_sample=2", "data.micro_batch_size=4", "data.val_samples=4",
                                "log.every=1", "log.progress=false", "model.segment_len=32", "run.zero_stage=3",
                                "schedule.warmup=0", "schedule.steps=4", "checkpoint.save_every=2",
                                "checkpoint.keep_last=0", "finetune.memory=true",
                                "finetune.lora={rank: 2, alpha: 4, targets: [q_proj, v_proj]}"], str(TEXT))
    train(cfg, tmp_path / "a", "none")
    step2 = committed(tmp_path / "a" / "checkpoints")[0]
    train(cfg, tmp_path / "b", str(step2))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in b] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in a[2:]] == [(r["loss"], r["grad_norm"]) for r in b]
