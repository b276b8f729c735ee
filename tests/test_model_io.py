"""save_pretrained / from_pretrained: exact round trip, sharding, tied weights, dtype, no pickle, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from infinitrain.errors import CheckpointError
from infinitrain.model import InfiniLM, ModelConfig

CFG = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, segment_len=8, gate_init=0.3)


@pytest.mark.parametrize("tied, mod, tau", [(False, 0, None), (True, 2, 2.5)])
def test_round_trip_is_exact(tmp_path, tied, mod, tau):
    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(**CFG, tie_embeddings=tied, mod_every=mod, memory_tau=tau)).eval()
    with torch.no_grad():
        for p in model.tau_parameters():  # trained temperatures, not the init value
            p.uniform_(-1, 1)
    assert len(model.tau_parameters()) == (0 if tau is None else CFG["n_layers"])
    model.save_pretrained(tmp_path / "m")
    loaded = InfiniLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    if tied:
        assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 50, (2, 20))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_bf16_and_no_unpickling(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(**CFG))
    model.save_pretrained(tmp_path / "m", dtype="bf16", max_shard_bytes=4000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bf16"
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    loaded = InfiniLM.from_pretrained(tmp_path / "m")
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed.weight, model.embed.weight.to(torch.bfloat16))
    assert InfiniLM.from_pretrained(tmp_path / "m", dtype="fp32").embed.weight.dtype == torch.float32


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        InfiniLM.from_pretrained(tmp_path)
    InfiniLM(ModelConfig(**CFG)).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "model": {**data["model"], "d_model": 64}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '[a-z_.0-9]+' has shape"):
        InfiniLM.from_pretrained(tmp_path / "m")
    cfg.write_text(json.dumps({**data, "model": {**data["model"], "n_layers": 3}}))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2"):
        InfiniLM.from_pretrained(tmp_path / "m")
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON at line 1"):
        InfiniLM.from_pretrained(tmp_path / "m")
