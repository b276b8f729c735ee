"""What this machine's CPU can do for bf16: the instruction sets seen (AMX, AVX512-BF16), detected, never assumed."""

from __future__ import annotations

import functools
import platform

# the flags that make a bf16 matmul faster than fp32 on a CPU (oneDNN uses them), best first
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (text given for tests); empty when the
    file is absent (not Linux) or has no flags line (some ARM kernels call it Features: read that too)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_unit(flags: frozenset[str] | None = None) -> str | None:
    """The CPU's bf16 matmul unit: "amx_bf16", "avx512_bf16", or None (bf16 would be emulated: slower than fp32).
    ``flags`` None reads this machine's and also asks torch's oneDNN whether it runs bf16 natively."""
    if flags is None:
        flags = cpu_flags()
        if not _onednn_bf16():
            return None
    return next((f for f in BF16_FLAGS if f in flags), None)


@functools.lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def describe() -> dict:
    """Machine summary for benchmark reports: CPU model, the reported flags present, the bf16 unit."""
    flags = cpu_flags()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "flags": [f for f in REPORTED_FLAGS if f in flags],
            "bf16_unit": bf16_unit()}
