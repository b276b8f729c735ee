"""CPU feature detection (bf16 units read from /proc/cpuinfo, never assumed) and ``run.precision`` as trained."""

from __future__ import annotations

import yaml
from trainkit import train

from infinitrain import hardware


def test_cpu_flags_are_read_not_assumed():
    info = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert hardware.bf16_unit(hardware.cpu_flags(info)) == "amx_bf16"
    assert hardware.bf16_unit(hardware.cpu_flags("flags: fpu avx512f avx512_bf16")) == "avx512_bf16"
    assert hardware.bf16_unit(hardware.cpu_flags("flags: fpu avx2 fma")) is None
    assert hardware.cpu_flags("Features: fp asimd bf16") == {"fp", "asimd", "bf16"}
    assert hardware.cpu_flags("model name: x") == frozenset()


def test_precision_auto_picks_bf16_only_where_the_device_computes_it():
    r = hardware.resolve_precision
    assert r("auto", "cpu", unit="amx_bf16") == ("bf16", "run.precision auto -> bf16 (the CPU's amx_bf16)")
    assert r("auto", "cpu", unit="avx512_bf16")[0] == "bf16"
    chosen, note = r("auto", "cpu", unit=None)
    assert chosen == "fp32" and "no bf16 unit seen" in note
    assert r("auto", "cuda", cuda_bf16=True)[0] == "bf16" and r("auto", "cuda", cuda_bf16=False)[0] == "fp32"
    chosen, warning = r("bf16", "cpu", unit=None)  # what the user asked for is kept, with the reason it is slow
    assert chosen == "bf16" and "emulated" in warning
    assert r("bf16", "cpu", unit="amx_bf16") == ("bf16", None) and r("fp32", "cpu", unit=None) == ("fp32", None)
    assert r("bf16", "cuda", cuda_bf16=True) == ("bf16", None)


def test_trainer_records_the_precision_auto_resolved_to(tmp_path, capsys):
    """run.precision=auto trains in what this machine's detection says and config.yaml records that, not 'auto'."""
    want, note = hardware.precision_for("auto")
    out = train(tmp_path / "run", ["run.precision=auto", "schedule.steps=2", "schedule.warmup=1"])
    assert out["step"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["run"]["precision"] == want
    assert note in capsys.readouterr().err
    ds = yaml.safe_load((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] == (want == "bf16")
