"""``infinitrain export`` from a real 1-rank ZeRO-3 run: from_pretrained gives the checkpoint's logits (fp32, bf16,
sharded), nothing is unpickled without weights_only, and a corrupt checkpoint leaves no output at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evalkit import run_main
from safetensors import safe_open
from trainkit import REPO, SMALL, TEXT

from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.infer.loading import load_for_inference
from infinitrain.model import InfiniLM
from infinitrain.export import export, parse_size

IDS = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two optimizer steps of the debug recipe (segment 32, memory temperatures), ZeRO-3, fp32, committed at steps
    1 and 2."""
    from infinitrain.train import load_recipe, train

    d = tmp_path_factory.mktemp("run")
    cfg = load_recipe("debug", [*SMALL, "schedule.steps=2", "schedule.warmup=1", "checkpoint.save_every=1",
                                "checkpoint.keep_last=0", "log.tensorboard=false", "model.memory_tau=2.0"],
                      str(TEXT))
    assert cfg.run.zero_stage == 3 and cfg.run.precision == "fp32"
    train(cfg, d, "none")
    return d


def logits(model: InfiniLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_export_gives_the_checkpoint_logits(run, tmp_path, monkeypatch):
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    res = export(run, tmp_path / "m")
    assert loads and all(w is True for w in loads)  # DeepSpeed's zero_to_fp32 asks for weights_only=False
    assert res.step == 2 and res.dtype == "fp32" and res.files == ("model.safetensors",) and res.tokenizer == "bytes"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors made 0600
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["exported_from"]["step"] == 2 and meta["exported_from"]["world_size"] == 1
    monkeypatch.setattr(torch, "load", None)  # loading an export never unpickles
    exported = InfiniLM.from_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch, "load", real_load)
    reference, _ = load_for_inference(run)
    torch.testing.assert_close(logits(exported), logits(reference), rtol=0, atol=0)
    _, codec = load_for_inference(tmp_path / "m")  # what `infinitrain generate` reads: the byte codec
    assert codec.source == "bytes" and codec.decode(codec.encode("Mr. Darcy")) == "Mr. Darcy"

    first = export(run, tmp_path / "m1", step=1)  # an older committed step
    step1, _ = load_for_inference(run / "checkpoints" / "step-00000001")
    assert first.step == 1
    torch.testing.assert_close(logits(InfiniLM.from_pretrained(tmp_path / "m1")), logits(step1), rtol=0, atol=0)
    assert not torch.equal(logits(step1), logits(reference))


def test_sharded_bf16_export_round_trips(run, tmp_path):
    res = export(run, tmp_path / "m", dtype="bf16", max_shard_size="40KB")
    out = tmp_path / "m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(res.files) > 2 and set(index["weight_map"].values()) == set(res.files)
    reference, _ = load_for_inference(run)
    fp32 = reference.state_dict()
    for f in res.files:
        with safe_open(out / f, "pt") as sf:
            tensors = {name: sf.get_tensor(name) for name in sf.keys()}  # noqa: SIM118 (not a dict)
        assert len(tensors) == 1 or sum(t.numel() * 2 for t in tensors.values()) <= 40_000, f  # 40KB = 40,000 B
        for name, t in tensors.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, fp32[name].to(torch.bfloat16)), name
    exported = InfiniLM.from_pretrained(out)
    assert exported.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(exported), logits(reference.to(torch.bfloat16)), rtol=0, atol=0)


def test_parse_size():
    assert [parse_size(s) for s in ("5GB", "2GiB", "40KB", "1.5MB", "123", 7)] == [
        5 * 10**9, 2 * 2**30, 40_000, 1_500_000, 123, 7]
    for bad in ("5 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(ConfigError, match="max-shard-size"):
            parse_size(bad)


def test_cli_refuses_a_corrupt_checkpoint_and_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = tmp_path / "models" / "m"
    code, stdout, err = run_main(["export", str(copy), "--out", str(out), "--step", "2"], capsys)
    assert code == 0 and "exported step 2" in stdout and "tokenizer bytes" in stdout, err
    code, _, err = run_main(["export", str(copy), "--out", str(out)], capsys)
    assert code == ConfigError.code and "already exists" in err
    code, _, err = run_main(["export", str(copy), "--out", str(tmp_path / "x"), "--step", "7"], capsys)
    assert code == CheckpointError.code and "committed steps: 1, 2" in err

    shard = copy / "checkpoints" / "step-00000002" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    shard.write_bytes(bytes(blob))
    for target, extra in ((tmp_path / "models" / "fresh", []), (out, ["--force"])):
        code, stdout, err = run_main(["export", str(copy), "--out", str(target), *extra], capsys)
        assert code == CheckpointError.code and stdout == "", err
        assert err.strip().count("\n") == 0 and str(shard) in err and "sha256 expected" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]  # nothing new, nothing partial
    assert (out / "model.safetensors").is_file()  # --force did not touch the good export

    import infinitrain.model.io as model_io

    def dies_half_way(model, directory, **kw):  # a crash after some files were written
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "save_pretrained", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        export(copy, tmp_path / "models" / "crash", step=1)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]


@pytest.mark.skipif(os.environ.get("INFINITRAIN_SLOW") != "1",
                    reason="a 2-rank torchrun run (~30 s): INFINITRAIN_SLOW=1")
def test_export_of_a_two_rank_run(tmp_path):
    """Both ranks' ZeRO-3 partitions are gathered: the export equals what load_for_inference reads."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "infinitrain.train", "--recipe", "debug", "--data", str(TEXT), "--run-dir",
                          str(tmp_path / "run"), *SMALL, "schedule.steps=2", "schedule.warmup=1",
                          "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"],
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, cwd=REPO,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = export(tmp_path / "run", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["exported_from"]["world_size"] == 2
    reference, _ = load_for_inference(tmp_path / "run")
    torch.testing.assert_close(logits(InfiniLM.from_pretrained(out.out)), logits(reference), rtol=0, atol=0)
    assert re.fullmatch(r"[0-9a-f]{64}",
                        json.loads((out.out / "config.json").read_text())["exported_from"]["manifest_sha256"])


def test_tokenizer_comes_from_the_prepared_data_or_the_flag(run, tmp_path, capsys):
    """A run on prepared shards ships the tokenizer.json found beside its data; --tokenizer overrides."""
    import yaml
    from evalkit import make_tokenizer

    copy, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(run, copy)
    data.mkdir()
    (data / "index.json").write_text("{}")
    make_tokenizer(data / "tokenizer.json")
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["path"] = str(data)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = export(copy, tmp_path / "m")
    assert res.tokenizer == "tokenizer.json"
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    _, codec = load_for_inference(tmp_path / "m")
    assert codec.source == str(tmp_path / "m" / "tokenizer.json")
    assert export(copy, tmp_path / "b", tokenizer="bytes").tokenizer == "bytes"
    assert not (tmp_path / "b" / "tokenizer.json").exists()

    shutil.rmtree(data)  # no tokenizer anywhere: an error (exit 3, one line), not an export without one
    code, stdout, err = run_main(["export", str(copy), "--out", str(tmp_path / "none")], capsys)
    assert code == ConfigError.code and stdout == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after "verified ... files"
    assert len(errors) == 1 and "no tokenizer.json found" in errors[0] and "--tokenizer FILE" in errors[0], err
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))


def test_export_averages_checkpoints_weight_by_weight(run, tmp_path, capsys):
    """Several checkpoints of one model -> their mean, tensor by tensor (a model soup); other models refused."""
    import yaml

    one, two = run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000002"
    res = export([one, two], tmp_path / "soup")
    assert res.sources == (one, two) and res.step == 1
    a, _ = load_for_inference(one)
    b, _ = load_for_inference(two)
    soup = InfiniLM.from_pretrained(tmp_path / "soup").state_dict()
    naive = {k: (a.state_dict()[k].double() + b.state_dict()[k].double()) / 2 for k in soup}
    for k in soup:
        torch.testing.assert_close(soup[k], naive[k].float(), rtol=0, atol=0)
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in soup)  # the mean is not either one
    meta = json.loads((tmp_path / "soup" / "config.json").read_text())["exported_from"]
    assert [s["step"] for s in meta["average_of"]] == [1, 2]

    code, stdout, err = run_main(["export", str(run), str(one), "--out", str(tmp_path / "cli")], capsys)
    assert code == 0 and "the average of 2 checkpoints (" in stdout and "step-00000002, " in stdout, err
    cli = InfiniLM.from_pretrained(tmp_path / "cli").state_dict()
    assert all(torch.equal(cli[k], soup[k]) for k in soup)  # the run dir's newest (2) and step 1, in either order

    other = tmp_path / "other"
    shutil.copytree(run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["rope_theta"] = 500.0
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    for args, code_, msg in (([str(run), str(other)], ConfigError.code, "differs from"),
                             ([str(run), str(two)], ConfigError.code, "same checkpoint given twice"),
                             ([str(run), str(tmp_path / "nope")], CheckpointError.code, "no such run directory")):
        code, stdout, err = run_main(["export", *args, "--out", str(tmp_path / "bad")], capsys)
        assert code == code_ and msg in err and stdout == "" and err.strip().count("\n") == 0, err
        assert "Traceback" not in err and not (tmp_path / "bad").exists()
    assert "rope_theta" in run_main(["export", str(run), str(other), "--out", str(tmp_path / "bad")], capsys)[2]


def test_export_with_a_memory_tau_scale_equals_the_run_read_with_it(run, tmp_path, capsys):
    """`export --memory-tau-scale F` bakes log τ + log F into the weights: the export's logits equal the run's
    loaded with the same scale, and differ from the run's own; a bad factor is refused before anything is read."""
    code, _, err = run_main(["export", str(run), "--out", str(tmp_path / "x2"), "--memory-tau-scale", "2"], capsys)
    assert code == 0, err
    exported = InfiniLM.from_pretrained(tmp_path / "x2")
    scaled, _ = load_for_inference(run, memory_tau_scale=2.0)
    plain, _ = load_for_inference(run)
    torch.testing.assert_close(logits(exported), logits(scaled), rtol=0, atol=0)
    assert (logits(exported) - logits(plain)).abs().max() > 1e-4
    for a, b in zip(exported.tau_parameters(), plain.tau_parameters()):
        torch.testing.assert_close(a.exp(), 2.0 * b.exp(), rtol=1e-6, atol=0)
    meta = json.loads((tmp_path / "x2" / "config.json").read_text())["exported_from"]
    assert meta["memory_tau_scale"] == 2.0 and meta["step"] == 2
    code, stdout, err = run_main(["export", str(run), "--out", str(tmp_path / "bad"), "--memory-tau-scale", "0"],
                                 capsys)
    assert code == ConfigError.code and "--memory-tau-scale must be a finite number > 0" in err and stdout == ""
    assert err.strip().count("\n") == 0 and not (tmp_path / "bad").exists()
