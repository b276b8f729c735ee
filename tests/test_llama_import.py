"""Llama import: logits equal transformers' LlamaForCausalLM inside one segment, gates closed (GQA, tied, sharded)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from infinitrain.errors import CheckpointError, ConfigError  # noqa: E402
from infinitrain.model.llama import DEFAULT_GATE_INIT, llama_model_config, load_llama  # noqa: E402
from infinitrain.ops.rope import RotarySpec, rope_inv_freq  # noqa: E402

VOCAB, T = 101, 24
CLOSED = -100.0  # sigmoid(-100) = 4e-44: 1 - sigmoid is exactly 1 in fp32


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, d 64, 4 heads on 2 KV heads (GQA). Weights larger than HF's init and norms not all ones,
    so a swapped norm, head or projection shows in the logits."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, rope_theta=10000.0, max_position_embeddings=128,
                      tie_word_embeddings=tied, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save(model: LlamaForCausalLM, path: Path, **kw) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[LlamaForCausalLM, Path]]:
    root = tmp_path_factory.mktemp("llama")
    untied, tied = tiny_llama(tied=False), tiny_llama(tied=True, seed=1)
    return {
        "untied": (untied, save(untied, root / "untied")),
        "tied": (tied, save(tied, root / "tied")),
        "sharded": (untied, save(untied, root / "sharded", max_shard_size="30KB")),
    }


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(path: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    model, _ = load_llama(path, segment_len=32, **kw)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["untied", "tied", "sharded"])
def test_closed_gates_match_transformers(checkpoints, ids, kind):
    hf, path = checkpoints[kind]
    if kind == "sharded":
        assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    model, report = load_llama(path, segment_len=32, gate_init=CLOSED)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=1e-4, rtol=0)  # measured max |Δ| 1.7e-6
    assert report.created == ("layers.0.attn.betas", "layers.1.attn.betas")
    assert len(report.loaded) == 2 + 9 * 2 + (0 if kind == "tied" else 1)
    assert report.unused == ()
    assert (len(report.files) > 1) == (kind == "sharded")
    assert (model.lm_head.weight is model.embed.weight) == (kind == "tied")
    assert not model.training


def test_default_gates_preserve_the_first_segment_and_act(checkpoints, ids):
    """β = -5 scales local attention by 1 - sigmoid(-5) = 0.9933; W_O's columns are divided by it at import
    (fold_gates), so the first segment equals the source as with closed gates, while the gate stays live: in
    the second segment the memory read (0.67%) changes the logits, and without the fold the first would differ."""
    hf, path = checkpoints["untied"]
    model, _ = load_llama(path, segment_len=12)
    assert all((p == DEFAULT_GATE_INIT).all() for p in model.gate_parameters())
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf_logits(hf, ids)
        unfolded, _ = load_llama(path, segment_len=12)
        for layer, src in zip(unfolded.layers, hf.model.layers):
            layer.attn.o_proj.weight.copy_(src.self_attn.o_proj.weight)
        plain = unfolded(ids).logits
    assert (ours[:, :12] - theirs[:, :12]).abs().max() < 1e-5  # measured 1e-6
    assert (ours[:, 12:] - theirs[:, 12:]).abs().max() > 1e-3  # the memory read acts from the second segment
    assert (plain[:, :12] - theirs[:, :12]).abs().max() > 1e-3  # negative control: the fold is what preserves


def test_tile_instead_of_interleave_breaks_parity(checkpoints, ids):
    """Negative control for GQA: pair query head h with KV head h % 2 (Beomi's tile) instead of h // 2."""
    hf, path = checkpoints["untied"]
    model, _ = load_llama(path, segment_len=32, gate_init=CLOSED)
    order = torch.tensor([0, 2, 1, 3])  # new head j is old head order[j] and reads KV head j // 2
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.attn
            attn.q_proj.weight.copy_(attn.q_proj.weight.view(4, 16, 64)[order].reshape(64, 64))
            attn.o_proj.weight.copy_(attn.o_proj.weight.view(64, 4, 16)[:, order].reshape(64, 64))
        delta = (model(ids).logits - hf_logits(hf, ids)).abs().max().item()
    assert delta > 1e-2


def test_dtype_and_mod_routers(checkpoints, ids):
    _, path = checkpoints["tied"]
    model, report = load_llama(path, segment_len=8, mod_every=2, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert report.created == ("layers.0.attn.betas", "layers.1.block.attn.betas", "layers.1.router.weight")
    assert report.loaded["layers.1.block.attn.q_proj.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert model.layers[1].router.weight.std() > 0
    assert torch.isfinite(model(ids).logits.float()).all()


def test_never_unpickles(checkpoints, monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    load_llama(checkpoints["untied"][1], segment_len=32)
    (tmp_path / "config.json").write_text((checkpoints["untied"][1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle files are not read"):
        load_llama(tmp_path)


def copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file checkpoint whose tensors dict went through ``edit``."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_names_tensor_and_file(checkpoints, tmp_path):
    path = copy_with(checkpoints["untied"][1], tmp_path / "ckpt", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError,
                       match=r"ckpt/model.safetensors: tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_llama(path, segment_len=32)


def test_sharded_index_pointing_at_wrong_shard(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["sharded"][1], tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = next(s for s in shards if s != index["weight_map"]["lm_head.weight"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"safetensors: tensor lm_head.weight is missing \(the index lists it"):
        load_llama(path, segment_len=32)


def test_shape_mismatch_names_tensor_and_file(checkpoints, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16].contiguous()

    path = copy_with(checkpoints["untied"][1], tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight "
                                              r"has shape \(16, 64\), expected \(32, 64\) for layers.0.attn.k_proj"):
        load_llama(path, segment_len=32)


def test_unused_tensors_are_reported(checkpoints, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    path = copy_with(checkpoints["untied"][1], tmp_path / "ckpt", add)
    _, report = load_llama(path, segment_len=32)
    assert report.unused == ("model.layers.0.self_attn.rotary_emb.inv_freq",)
    assert "unused 1 (model.layers.0.self_attn.rotary_emb.inv_freq)" in report.summary()


BASE = {"model_type": "llama", "vocab_size": 101, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "hidden_act": "silu",
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
WHERE = Path("ckpt/config.json")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias true is not supported"),
    ({"mlp_bias": True}, "mlp_bias true is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling of type 'llama3' needs numeric"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters type 'yarn' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor must be 1"),
    ({"hidden_size": None}, "missing key 'hidden_size'"),
])
def test_unsupported_config_is_refused(change, message):
    hf = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=f"^ckpt/config.json: {message}"):
        llama_model_config(hf, where=WHERE)


def test_config_mapping_and_argument_errors():
    cfg = llama_model_config({**BASE, "head_dim": 32, "tie_word_embeddings": True, "rope_theta": 500000.0},
                             where=WHERE, segment_len=64, update="delta")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (64, 4, 2, 32, 96)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.update) == (500000.0, 1e-6, True, "delta")
    assert llama_model_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},
                              where=WHERE).rope_theta == 7.0  # transformers 5 layout
    with pytest.raises(ConfigError, match="segment_len 256 exceeds max_position_embeddings 128"):
        llama_model_config(BASE, where=WHERE, segment_len=256)
    with pytest.raises(ConfigError, match="^ckpt/config.json: model.update must be one of"):
        llama_model_config(BASE, where=WHERE, segment_len=64, update="lnear")


def test_bad_config_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path}/config.json: model_type 'gemma'")):
        load_llama(tmp_path, segment_len=64)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_llama(tmp_path, segment_len=64)


def test_llama3_rope_is_yarn_ramp_without_temperature():
    """Why 'llama3' rope scaling is refused rather than mapped badly: it is exactly RotarySpec with YaRN's ramp
    and mscale=1, which ModelConfig cannot express yet (its YaRN always applies 0.1 ln s + 1)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=10000.0, rope_scaling=scaling,
                      max_position_embeddings=512)
    hf = LlamaRotaryEmbedding(cfg)
    spec = RotarySpec(head_dim=32, rot_dim=32, base=10000.0, scale=8.0, original_len=64, alpha=1.0, beta=4.0,
                      mscale=1.0)
    torch.testing.assert_close(rope_inv_freq(spec), hf.inv_freq, atol=1e-7, rtol=1e-6)
    assert hf.attention_scaling == 1.0


def test_llama3_rope_scaling_checkpoint_matches_transformers(tmp_path, ids):
    """Llama 3.1/3.2 checkpoints ("llama3" rope scaling) load as YaRN with mscale 1 and match HF to 1e-4."""
    torch.manual_seed(3)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, rope_theta=10000.0, rope_scaling=scaling,
                      max_position_embeddings=128, initializer_range=0.1)
    hf = LlamaForCausalLM(cfg).eval()
    model, _ = load_llama(save(hf, tmp_path / "l3"), segment_len=32, gate_init=CLOSED)
    c = model.config
    assert (c.pos_emb, c.yarn_scale, c.yarn_original_len, c.yarn_alpha, c.yarn_beta, c.yarn_mscale) == \
        ("yarn", 8.0, 8, 1.0, 4.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_logits(hf, ids), atol=1e-4, rtol=0)
    # the scaling matters at these positions: plain RoPE (same weights) would not match
    cfg2 = c.replace(pos_emb="rope", yarn_scale=1.0, yarn_mscale=None)
    from infinitrain.model import InfiniLM

    rope_model = InfiniLM(cfg2).eval()
    rope_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (rope_model(ids).logits - hf_logits(hf, ids)).abs().max() > 1e-3
